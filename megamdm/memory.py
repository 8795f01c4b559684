"""This process's resident memory on Linux (``/proc/self/status``): now, at its peak, and the peak's
reset (``clear_refs``), so a measurement can bracket one piece of work."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{_STATUS} has no {field}")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The highest resident size since the process started, or since :func:`reset_peak_rss`."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Set the peak back to the current resident size (Linux ``clear_refs``; OSError elsewhere)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rise_during(fn) -> int:
    """Bytes the peak resident size rose by while ``fn()`` ran (0 where it cannot be measured)."""
    try:
        reset_peak_rss()
        before = rss_bytes()
    except (OSError, RuntimeError):
        fn()
        return 0
    fn()
    return max(0, peak_rss_bytes() - before)
