"""Adapters to the machine and to the libraries' assumptions, each an explicit, reversible context.

* :mod:`.megatron_cpu` — megatron-core on CPU with gloo (the demo, the tests): entered by the CPU
  entry points, left when they return; nothing stays patched and nothing of it runs on GPU machines.
* :mod:`.dist_ckpt` — a fast results queue for megatron's torch_dist writer, for one save session.
* :mod:`.cpu_precision` — which dtype this CPU multiplies matrices fastest in (bf16 or fp32).
* :mod:`.deepspeed_cpu` — DeepSpeed on CPU without its JIT-compiled shared-memory all-reduce.
* :mod:`.quiet` — the library notices that megamdm's CLIs hide (never installed at import).
"""
