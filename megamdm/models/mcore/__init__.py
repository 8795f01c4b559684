"""The MDM built from megatron-core modules: tensor, sequence and pipeline parallel, TE/FP8 on GPUs.

This package is the only place in megamdm that builds megatron-core modules."""
