"""Training on megatron-core: parallel set-up, the loop, checkpointing, logging. This package alone
owns the training loop (:class:`~megamdm.training.trainer.Trainer`) and global (process-group, RNG) state."""
