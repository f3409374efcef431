"""Multi-turn benchmark: a conversation cached as one sample against one record per assistant turn.

    python bench/multi_turn.py [--conversations 16] [--turns 4] [--prompt-tokens 1500] [--hidden-size 256]

LLaVA-style data: each conversation has a long first user turn (``--prompt-tokens`` of text, the
size of a few cameras' image tokens) and ``--turns`` short question / answer exchanges. Two
layouts of the same conversations, captured by kd's hf engine on a tiny Qwen2-shaped teacher
(``build_tiny("qwen2")``, ``--layers`` x ``--hidden-size``), top-64, in batches of ``--batch-size``:

* **per turn** (``kd data import llava --split-turns``): ``turns`` records per conversation, each
  with the turns before it as prompt, so the teacher runs the prefix once per turn;
* **one sample** (the default import): one multi-turn record per conversation.

Prints per layout the input tokens the teacher runs, the answer rows cached and the capture
seconds (the wall time of ``engine.capture``, best of ``--repeats``), then the ratios one sample /
per turn, and the largest difference between the two layouts' log-probs of the same turn (the
same tokens and the same causal prefix, so only batch rounding separates them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def conversations(n: int, turns: int, prompt_tokens: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = np.random.default_rng(seed)
    words = ["lane", "car", "truck", "light", "red", "green", "left", "right", "stop", "slow", "ahead", "behind",
             "pedestrian", "crossing", "signal", "brake", "merge", "keep", "distance", "speed"]
    out = []
    for _ in range(n):
        scene = " ".join(rng.choice(words, prompt_tokens))
        turns_ = [{"role": "user", "content": f"Scene: {scene}\nWhat is ahead?"}]
        for t in range(turns):
            turns_.append({"role": "assistant", "content": " ".join(rng.choice(words, int(rng.integers(20, 41))))})
            if t + 1 < turns:
                turns_.append({"role": "user", "content": f"And then, step {t + 1}?"})
        out.append(turns_)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from kd.pipeline.build.engines import SignalSpec, load_engine
    from kd.pipeline.common.encoding import encode_sample
    from kd.pipeline.demo.tiny_families import build_tiny
    from kd.pipeline.demo.tiny_models import TinyPreset

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-multi-turn-"))
    preset = TinyPreset(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=max(2, args.hidden_size // 64),
                        intermediate_size=2 * args.hidden_size)
    teacher = build_tiny("qwen2", work / "teacher", preset=preset, max_position=4 * args.prompt_tokens + 4096)
    tok = AutoTokenizer.from_pretrained(teacher)
    convs = conversations(args.conversations, args.turns, args.prompt_tokens)
    whole = [encode_sample(tok, c, None, sample_id=f"c{i}") for i, c in enumerate(convs)]
    per_turn = [encode_sample(tok, c[:t], c[t]["content"], sample_id=f"c{i}#{k}")
                for i, c in enumerate(convs) for k, t in enumerate(j for j, m in enumerate(c) if m["role"] == "assistant")]
    engine = load_engine("hf", str(teacher), batch_size=args.batch_size)
    spec = SignalSpec(top_k=64)
    engine.capture(whole[:1], spec)  # warm-up

    def timed(samples):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = engine.capture(samples, spec)
            best = min(best, time.perf_counter() - t0)
        return best, out

    t_turn, sig_turn = timed(per_turn)
    t_whole, sig_whole = timed(whole)
    rows = {"per turn": (per_turn, t_turn), "one sample": (whole, t_whole)}
    print(f"{args.conversations} conversations x {args.turns} turns, ~{args.prompt_tokens}-token first turn, "
          f"teacher {args.layers} x {args.hidden_size}, hf engine, top-64, batch {args.batch_size}")
    print(f"{'layout':<12} {'samples':>8} {'input tokens':>13} {'answer rows':>12} {'capture s':>10}")
    for name, (samples, secs) in rows.items():
        print(f"{name:<12} {len(samples):>8} {sum(len(s.input_ids) for s in samples):>13} "
              f"{sum(s.num_answer_tokens for s in samples):>12} {secs:>10.2f}")
    tokens = sum(len(s.input_ids) for s in whole) / sum(len(s.input_ids) for s in per_turn)
    print(f"one sample / per turn: input tokens {tokens:.3f}x, capture time {t_whole / t_turn:.3f}x")
    by_turn = {s.sample_id: sig for s, sig in zip(per_turn, sig_turn)}
    worst = 0.0
    for i, sig in enumerate(sig_whole):
        rows_turn = np.concatenate([by_turn[f"c{i}#{k}"].logprobs for k in range(args.turns)])
        worst = max(worst, float(np.abs(sig.logprobs - rows_turn).max()))
    print(f"largest |log-prob| difference between the layouts, same turns: {worst:.2e}")


if __name__ == "__main__":
    main()
