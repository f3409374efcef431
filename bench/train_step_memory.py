"""The memory probes of bench/train_step.py's rows: current and peak RSS of this process, the
peak's restart at a row's baseline, the heap trim before it, and the workers' malloc settings.
"""

from __future__ import annotations

import os
import resource


def rss_mb() -> float:
    """Current resident set size (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so the baseline holds no
    slack left by the set-up that a row could fill for free (rows with many small allocations,
    like a cache reader's, would profit more than rows of large tensors, which malloc maps apart)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count (Linux: ``VmHWM`` after writing 5 to ``/proc/self/clear_refs``), so
    a row's peak is measured from its baseline on, not the set-up's transients before it (those
    once made the first run after a fresh set-up read SFT's RSS+ as 42 MiB instead of 28)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_peak_rss`` (``VmHWM``), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_env() -> dict[str, str]:
    """The environment of the worker processes, with glibc's malloc thresholds fixed.

    glibc adapts its mmap threshold as a process frees large blocks, so how much freed memory
    stays resident, and so peak RSS, varied by ~10 MiB from one fresh process to the next (SFT's
    growth read 39 or 49 MiB on the same inputs). Fixed thresholds make it repeat within ~0.3 MiB;
    every row gets the same setting (set them yourself to override).
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    return env
