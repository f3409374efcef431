"""bench/capture.py's report: the rows, where the build time goes, kd's cost on the teacher's
critical path per answer token and how much of the writer's work was hidden, and the ratios."""

from __future__ import annotations

import os

from capture_timing import Row

TARGET_RATIO = 0.8  # (b)/(a) and (d)/(e) on CPU


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
    width = f"4 x {args.hidden_size}" if args.model == "llm" else "teacher preset"
    print(f"\ncapture benchmark: model={args.model} ({width}), vocab {vocab_size:,}"
          f"{' (the tokenizer' + chr(39) + 's)' if not vocab else ''}, shape {args.shape}: {n} samples, "
          f"{a.prompt_tokens / n:.0f} prompt tokens/sample (answer {a.answer_tokens / n:.1f}), k={args.k}, "
          f"best of {args.repeats} rounds; vllm {vllm.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'vLLM default'}, setup {setup:.1f}s")
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
          "encode / commit = the shard writer; rest = validate, key, plan, seal):")
    for r in rows:
        if r.label not in splits:
            continue
        print(f"  {r.label}: {r.seconds:.2f}s")
        for name, sec in splits[r.label].items():
            print(f"    {name:42} {sec:7.2f}s")
    print("\nratios of prompt tok/s: best-of-rounds, and the median of the per-round ratios (each round times"
          "\nevery row once, so a burst of load from other users hits the rows of one round alike):")

    def line(key: str, ref: str, target: bool) -> str:
        best = by_key[ref].seconds / by_key[key].seconds
        med = statistics.median(x / y for x, y in zip(times[ref], times[key]))
        out = f"  ({key})/({ref}) = {best:.2f} best-of, {med:.2f} paired median"
        if target:
            out += f"   target >= {TARGET_RATIO} on CPU: {'PASS' if med >= TARGET_RATIO else 'MISS'}"
        return out

    for key in times:
        if key != "a" and key != "e":
            print(line(key, "a", key == "b"))
    if "d" in times and "e" in times:
        print(line("d", "e", True))
