"""Counting, on CPU, the ops that would make the host wait for a GPU."""

import torch


class DeviceReads:
    """A dispatch mode that records every op which makes the host wait for the device on a GPU: a
    scalar read (``.item()``, ``int()``, ``bool()``), an output whose size depends on the data
    (``nonzero``, boolean indexing, ``masked_select``), a tensor built from host data inside the
    loop (a host-to-device copy there), and ``multinomial`` (its validity check reads back)."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "lift_fresh", "multinomial", "unique"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self.reads = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                bool_index = name.startswith("index") and any(
                    isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()) or ()
                )
                if name in DeviceReads.READS or name.startswith("unique") or bool_index:
                    reads.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
