"""The forked-rank harness every distributed test relies on."""

import pytest

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402,F401 - imported, so a rank's teardown is instant

from .support.distributed import run_distributed


def _payload(n):
    import torch.distributed as dist

    return bytes([dist.get_rank()]) * n


@pytest.mark.timeout(120)
def test_large_results_arrive_whole():
    # a rank exits right after handing its result to the queue: the result must still be delivered
    results = run_distributed(_payload, 2, 20_000_000, timeout=60)
    assert [len(r) for r in results] == [20_000_000, 20_000_000]
    assert [r[:1] for r in results] == [b"\x00", b"\x01"]
