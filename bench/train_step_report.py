"""bench/train_step.py's table and ratio lines, from the timing and memory workers' results.
"""

from __future__ import annotations

import argparse
import statistics

from train_step_setup import ROWS

TIME_TARGET, MEMORY_TARGET = 1.15, 1.10


def verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "MISS"


def report(timing: dict, memory: dict[str, dict], loader: dict, args: argparse.Namespace) -> None:
    steps = timing["steps"]

    def med(row: str, key: str) -> float:
        return statistics.median(s[key] for s in steps[row])

    tensors = "peak CUDA allocation" if args.device.startswith("cuda") else "peak of live torch CPU tensors"
    print(f"\nstudent {args.student}, batch {args.batch_size}, top-k {args.k}, {args.threads} thread(s), device "
          f"{args.device}; time: median of {args.steps} interleaved steps after {args.warmup} warm-up")
    print(f"{'row':<28}{'ms/step':>9}{'data ms':>9}{'teach ms':>9}{'tok/s':>8}{'tensors':>9}{'RSS+':>7}{'RSS':>6}")
    for row, label in ROWS.items():
        tps = sum(s["tokens"] for s in steps[row]) / sum(s["step_s"] for s in steps[row])
        print(f"{label:<28}{1000 * med(row, 'step_s'):>9.1f}{1000 * med(row, 'data_s'):>9.1f}"
              f"{1000 * med(row, 'teachers_s'):>9.1f}{tps:>8.0f}{memory[row]['tensor_mb']:>9.2f}"
              f"{memory[row]['rss_mb']:>7.1f}{memory[row]['rss_peak_mb']:>6.0f}")
    lib = statistics.median(m["lib_init_mb"] for m in memory.values())
    print(f"(MiB, each row alone in a fresh process. tensors: {tensors} from the row's set-up to its last step. "
          f"RSS+: peak RSS growth over the baseline after imports and first use of every library (the first "
          f"parquet/zarr use alone took {lib:.0f} MiB), median of {args.memory_repeats} runs. RSS: the process's peak "
          f"over the row, baseline included)")
    if not all(r.get("peak_reset", True) for r in memory.values()):
        print("note: /proc/self/clear_refs unavailable: RSS peaks count from process start, set-up transients included")
    print(f"(b) loader alone (no model): {loader['tokens_per_s']:,.0f} input tokens/s, "
          f"{loader['answer_tokens_per_s']:,.0f} answer tokens/s\n")
    for row, tag, target_t, target_m in (("cached", "b", TIME_TARGET, MEMORY_TARGET), ("online", "c", None, None)):
        # Ratio of the same step index (both rows ran within a fraction of a second of each other).
        t = statistics.median(x["step_s"] / a["step_s"] for x, a in zip(steps[row], steps["sft"]))
        line = f"({tag})/(a) time {t:.3f}x" + (f" [{verdict(t, target_t)} <= {target_t}]" if target_t else "")
        for key, what in (("tensor_mb", "memory (tensors)"), ("rss_mb", "memory (RSS+)")):
            m = memory[row][key] / max(memory["sft"][key], 1e-9)
            line += f"   {what} {m:.3f}x" + (f" [{verdict(m, target_m)} <= {target_m}]" if target_m else "")
        print(line)
    if "profile" in timing:
        print("\ncProfile of (b)'s timed steps:\n" + timing["profile"])
