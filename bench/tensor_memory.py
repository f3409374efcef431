"""Peak memory of live torch tensors while a function runs: the number both benches report.

On CUDA that is ``torch.cuda.max_memory_allocated``. On CPU torch keeps no such counter, but the
profiler's memory events are every allocation and free of its CPU allocator, so their running sum
is exact and repeats bit for bit, where peak RSS also holds what glibc and pyarrow's pools keep and
moves with them by several MiB between identical runs.
"""

from __future__ import annotations

from collections.abc import Callable


def peak_tensor_mib(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak bytes of live tensors on ``device`` while ``fn()`` runs, over those live when it starts (MiB)."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2**20
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20
