"""Model definitions: the plain-PyTorch standalone MDM, and (in ``mcore/``) its megatron-core twin."""
