"""Training on megatron-core: parallel set-up, the loop, checkpointing, logging. This package alone
owns the training loop and global (process-group, RNG) state."""
