"""bench/capture.py's report: the rows, where the build time goes, kd's cost on the teacher's
critical path per answer token and how much of the writer's work was hidden, and the ratios."""

from __future__ import annotations

import os

from capture_timing import Row

TARGET_RATIO = 0.8  # (b)/(a) and (d)/(e) on CPU
TARGET_RATIO_GPU = 0.9  # ... and on a GPU (--device cuda)
TARGET_KD_US = 2.0  # kd's cost on the teacher's critical path per answer token ...
TARGET_KD_TOKENS = 50_000  # ... in builds of this many answer tokens or more (the issue's: 100k), where the
# fixed cost of each commit (~30 ms: zarr groups, checksums, fsync) spreads; bench/writer_overlap.py measures it
# Timer labels of the shard loop and the writer (capture.py times these functions).
ADD = "queue: writer.add"  # on the capture's thread: queues the sample (its checks run in the commit thread)
CHECKS = "  commit thread: batch checks"
COMMIT = "commit: writer.commit"  # in the commit thread: left checks, encode, zarr + zstd, checksums
ENCODE = "  of the commit: encode (_assemble)"
LOOP = "shard loop: run_jobs"
WAITS = "  capture thread: waits on commits"


ROW_LABELS = {"a": "(a) vLLM prefill, no logprobs", "b": "(b) kd capture top-k (vllm)",
              "b0": "(b0) kd capture, prompt_logprobs", "c": "(c) kd capture top-k + hidden",
              "d": "(d) kd capture top-k (hf)", "e": "(e) hf forward, no logits"}


def report(args, vocab: int, vocab_size: int, records, rows: list[Row], splits, setup: float,
           times: dict[str, list[float]], load: list[float], head_choice) -> None:
    import statistics

    import torch
    import vllm

    by_key = dict(zip(times, rows))
    a = by_key["a"]
    n = len(records)
    d = args.dims
    width = (f"{args.teacher}: {d['num_layers']} x {d['hidden_size']}, MLP {d['intermediate_size']}, "
             f"{d['num_heads']}/{d['kv_heads']} heads{', tied' if d['tied'] else ''}") if args.model == "llm" \
        else "teacher preset"
    print(f"\ncapture benchmark: model={args.model} ({width}), vocab {vocab_size:,}"
          f"{' (the tokenizer' + chr(39) + 's)' if not vocab else ''}, shape {args.shape}: {n} samples, "
          f"{a.prompt_tokens / n:.0f} prompt tokens/sample (answer {a.answer_tokens / n:.1f}), k={args.k}, "
          f"best of {args.repeats} rounds; vllm {vllm.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'vLLM default'}, device {args.device} {args.dtype}, "
          f"setup {setup:.1f}s")
    print(f"vLLM engine head path: {head_choice.path} ({head_choice.reason})")
    busy = max(load) > (os.cpu_count() or 1)  # the benchmark itself accounts for up to one per core
    print(f"1-min load average at start / max after a phase: {load[0]:.1f} / {max(load):.1f}"
          + ("  (machine busy: numbers are noisy" + ("; --threads 1 steadies them)" if args.threads != 1 else ")")
             if busy else ""))
    print(f"{'row':34} {'seconds':>8} {'prompt tok/s':>13} {'answer tok/s':>13} {'vs (a)':>7}  note")
    for r in rows:
        print(f"{r.label:34} {r.seconds:8.2f} {r.prompt_tps:13,.0f} {r.answer_tps:13,.0f} "
              f"{r.prompt_tps / a.prompt_tps:7.2f}  {r.note}")
    print("\nwhere the build time goes (best timed run; teacher = engine.capture, indented = inside it; "
          "writer.add on the capture's thread, batch checks and commit in the commit thread; "
          "rest = validate, key, plan, seal):")
    for r in rows:
        if r.label not in splits:
            continue
        print(f"  {r.label}: {r.seconds:.2f}s")
        for name, sec in splits[r.label].items():
            print(f"    {name:42} {sec:7.2f}s")
    critical_path(rows, splits, a.answer_tokens)
    print("\nratios of prompt tok/s: best-of-rounds, and the median of the per-round ratios (each round times"
          "\nevery row once, so a burst of load from other users hits the rows of one round alike):")

    def line(key: str, ref: str, target: bool) -> str:
        best = by_key[ref].seconds / by_key[key].seconds
        med = statistics.median(x / y for x, y in zip(times[ref], times[key]))
        out = f"  ({key})/({ref}) = {best:.2f} best-of, {med:.2f} paired median"
        if target:
            goal, where = (TARGET_RATIO_GPU, "GPU") if args.device == "cuda" else (TARGET_RATIO, "CPU")
            out += f"   target >= {goal} on {where}: {'PASS' if med >= goal else 'MISS'}"
        return out

    for key in times:
        if key != "a" and key != "e":
            print(line(key, "a", key == "b"))
    if "d" in times and "e" in times:
        print(line("d", "e", True))


def critical_path(rows: list[Row], splits: dict[str, dict[str, float]], answer_tokens: int) -> None:
    """Per build row: what the teacher waited for kd (the shard loop less engine.capture), per answer
    token, and the share of the writer's work (batch checks + commits) the teacher did not wait for."""
    us = 1e6 / answer_tokens
    print("\nkd on the teacher's critical path (best timed run): the shard loop (run_jobs) less engine.capture, "
          "per answer token;\nhidden = the share of the writer's work (batch checks + commits, in the commit "
          "thread) the capture's thread did not wait for (the last shard's commit it always waits for):")
    for r in rows:
        split = splits.get(r.label, {})
        if LOOP not in split:
            continue
        teacher = sum(sec for name, sec in split.items() if name.startswith("teacher:"))
        kd = split[LOOP] - teacher
        work = split.get(COMMIT, 0.0) + split.get(CHECKS, 0.0)
        waits = split.get(WAITS, 0.0)
        hidden = 1 - waits / work if work else 0.0
        if answer_tokens >= TARGET_KD_TOKENS:
            verdict = f"target <= {TARGET_KD_US:g} us/token: {'PASS' if kd * us <= TARGET_KD_US else 'MISS'}"
        else:
            verdict = (f"(the {TARGET_KD_US:g} us/token target is for >= {TARGET_KD_TOKENS:,} answer tokens: "
                       "bench/writer_overlap.py)")
        print(f"  {r.label:34} kd {kd * us:6.2f} us/token (writer.add {split.get(ADD, 0.0) * us:.2f}, waits on "
              f"commits {waits * us:.2f}); writer work {work * us:.2f} us/token, hidden {hidden:.0%}   {verdict}")
