"""bench/train_step.py's measurements, each in a fresh worker process: the interleaved timing of
every row, one row's memory, (b)'s loader alone (``worker``), and how the script starts one
(``run_worker``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensor_memory import peak_tensor_mib
from train_step_memory import peak_rss_mb, reset_peak_rss, rss_mb, trim_heap, worker_env
from train_step_rows import RowRunner
from train_step_setup import ROWS
from train_step_warmup import import_everything, warm_up_framework

SCRIPT = Path(__file__).resolve().with_name("train_step.py")  # the workers run the script itself


def worker(mode: str, setup: dict, args: argparse.Namespace) -> dict:
    """``time``: all rows interleaved step by step in this process (a load burst on the shared machine
    hits every row alike; each row keeps its own state). ``mem-<row>``: one row alone in this fresh
    process, for its peak RSS (and on CUDA its peak allocation). ``tensors-<row>``: the same under
    the profiler, for its peak of live CPU tensors. ``loader``: (b)'s data loader alone."""
    import_everything()
    import torch

    from kd.pipeline.common.dataset import load_records

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = load_records(setup["data"])
    with tempfile.TemporaryDirectory() as scratch:
        lib_init = warm_up_framework(setup["student"], records[0], device, Path(scratch))
    trim_heap()
    base_rss = rss_mb()
    peak_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)

    if mode == "loader":
        runner = RowRunner("loader", setup, args, records, device)
        next(runner.data)  # first batch: worker start-up and first reads
        n = args.warmup + args.steps
        t0, tokens, answer_tokens = time.perf_counter(), 0, 0
        for _ in range(n):
            batch = next(runner.data)
            tokens += int(batch["lengths"].sum())
            answer_tokens += int(batch["num_tokens"].sum())
        seconds = time.perf_counter() - t0
        return {"tokens_per_s": tokens / seconds, "answer_tokens_per_s": answer_tokens / seconds}

    if mode.startswith("tensors-"):
        def run() -> None:
            runner = RowRunner(mode[8:], setup, args, records, device)
            runner.copy_batch = True
            for _ in range(args.warmup + args.memory_steps):
                runner.step()

        return {"tensor_mb": peak_tensor_mib(run)}

    if mode.startswith("mem-"):
        runner = RowRunner(mode[4:], setup, args, records, device)
        steps = [runner.step() for _ in range(args.warmup + args.memory_steps)]
        result = {"rss_base_mb": base_rss, "lib_init_mb": lib_init, "rss_peak_mb": peak_rss_mb(), "peak_reset": peak_reset,
                  "rss_mb": peak_rss_mb() - base_rss,
                  "step_s": statistics.median(s["step_s"] for s in steps[args.warmup:])}
        if device.type == "cuda":
            result["tensor_mb"] = (torch.cuda.max_memory_allocated(device) - base_cuda) / 2**20
        return result

    runners = {row: RowRunner(row, setup, args, records, device) for row in ROWS}
    for _ in range(args.warmup):
        for runner in runners.values():
            runner.step()
    timings: dict[str, list[dict]] = {row: [] for row in ROWS}
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    order = list(ROWS)
    for i in range(args.steps):
        for row in order[i % 3:] + order[: i % 3]:  # rotate who goes first
            if profiler is not None and row == "cached":
                profiler.enable()
            timings[row].append(runners[row].step())
            if profiler is not None and row == "cached":
                profiler.disable()
    result = {"steps": timings}
    if profiler is not None:
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        result["profile"] = buf.getvalue()
    return result


def run_worker(mode: str, setup_path: Path, args: argparse.Namespace) -> dict:
    """``mode`` in a fresh interpreter (its own peak memory); returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(SCRIPT), "--worker", mode, "--setup", str(setup_path), "--result", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--memory-steps", str(args.memory_steps),
           "--batch-size", str(args.batch_size), "--k", str(args.k), "--threads", str(args.threads),
           "--device", args.device, "--num-workers", str(args.num_workers)] + (["--profile"] if args.profile else [])
    cmd += [f"--set={o}" for o in args.set] + (["--eager-attention"] if args.eager_attention else [])
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=worker_env())
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
