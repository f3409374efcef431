"""Where the answer head's time goes: norm + LM head + logsumexp / top-k over a real vocabulary, alone.

    python bench/head_profile.py [--vocab 151936] [--hidden 256] [--rows 947] [--k 64] [--threads 1]

The default rows are what ``bench/capture.py --shape real`` scores in one capture (32 samples x
~29.6 answer tokens); weights are random. Rows, best of ``--repeats``, CPU time of this process
(steadier than wall time on a shared machine; wall beside it):

* the FLOPs' yardstick: a GEMM of vLLM's prefill shape (``[tokens, H] x [H, 2H]``), in GFLOP/s;
* ``plain (before)``: the head as kd ran it before ``head_kernels``: 32-row blocks of
  ``x @ W.T`` (oneDNN), ``torch.topk`` over each whole row, an in-place ``exp`` for the logsumexp;
* ``TiledHead`` and its parts: the GEMM alone in the kernel's shapes (fixed row blocks,
  vocabulary tiles, hidden slices), then the per-tile passes (sub-block maxima, exp-sum), then all
  of it (top-k search, logsumexp, copies out);
* what the head's FLOPs alone allow: ``prefill / (prefill + head)`` at equal GFLOP/s, for this
  width and for a given real teacher (``--teacher-hidden`` etc.).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kd.pipeline.build.engines.head_kernels import TiledHead  # noqa: E402
from kd.pipeline.build.engines.vllm_head import AnswerHead  # noqa: E402


def best(fn, repeats: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds), each the best of ``repeats`` after a warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return min(cpu), min(wall)


def plain_head(x: torch.Tensor, weight: torch.Tensor, k: int, rows: int = 32) -> None:
    """The pre-kernel head: 32-row oneDNN blocks, full-row top-k, in-place exp for the normaliser."""
    for i in range(0, x.shape[0], rows):
        logits = torch.ops.mkldnn._linear_pointwise(x[i : i + rows], weight, None, "none", [], "")
        top, _ = torch.topk(logits, k, dim=-1, sorted=True)
        peak = top[:, :1]
        logits.sub_(peak).exp_().sum(-1, keepdim=True).log_()


def kernel_parts(head: TiledHead, x: torch.Tensor, passes: bool) -> None:
    """The kernel's GEMMs (and, with ``passes``, its per-tile max / exp-sum passes), nothing else."""
    r, sub, v = head.rows, 64, head.vocab_size
    buf, scratch = torch.empty(v, r), torch.empty(head.vocab_tile, r)
    submax = torch.empty(-(-v // sub), r)
    for i in range(0, x.shape[0], r):
        xt = torch.nn.functional.pad(x[i : i + r], (0, 0, 0, max(0, r - x[i : i + r].shape[0]))).T.contiguous()
        for lo in range(0, v // sub * sub, head.vocab_tile):
            hi = min(lo + head.vocab_tile, v // sub * sub)
            head._matmul(lo, hi, xt, buf[lo:hi])
            if passes:
                sm = torch.amax(buf[lo:hi].view(-1, sub, r), dim=1, out=submax[lo // sub : hi // sub])
                m = sm.amax(0)
                torch.sub(buf[lo:hi], m, out=scratch[: hi - lo]).exp_().sum(0)


def prefill_flops(tokens: float, layers: int, hidden: int, inter: int, kv_ratio: float = 1.0) -> float:
    """Decoder FLOPs of a causal prefill of ``tokens`` tokens: projections, MLP, attention scores."""
    proj = 2 * hidden * hidden * (2 + 2 * kv_ratio) + 3 * 2 * hidden * inter
    attn = 2 * 2 * hidden * tokens / 2  # QK^T and PV over half the prompt on average
    return tokens * layers * (proj + attn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--rows", type=int, default=947)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=float, default=1607, help="per sample, for the FLOP ratio")
    ap.add_argument("--answer-tokens", type=float, default=29.6, help="per sample, for the FLOP ratio")
    ap.add_argument("--teacher", default="3584,28,18944,0.143,2600,33",
                    help="a real teacher for the FLOP ratio: hidden,layers,intermediate,kv_heads/heads,prompt,answer "
                         "(default Qwen2.5-VL-7B's text model, ~2,600-token prompts, ~33-token answers)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    v, h, n, k = args.vocab, args.hidden, args.rows, args.k
    weight, x = torch.randn(v, h) * 0.1, torch.randn(n, h)
    head_gflop = 2 * n * h * v / 1e9

    tokens = 32 * 1607
    a, w2 = torch.randn(tokens, h), torch.randn(2 * h, h)
    cpu, _ = best(lambda: a @ w2.T, args.repeats)
    print(f"yardstick GEMM [{tokens}, {h}] x [{h}, {2 * h}]: {2 * tokens * h * 2 * h / cpu / 1e9:.0f} GFLOP/s, "
          f"{args.threads} thread(s)")
    print(f"head: {n} rows x H {h} x V {v:,} = {head_gflop:.1f} GFLOP, k={k}")
    head = AnswerHead(torch.rand(h) + 0.5, 1e-5, weight)
    kernel = head.kernel
    padded = -(-n // kernel.rows) * kernel.rows
    rows = [("plain (before): 32-row oneDNN, topk, exp", lambda: plain_head(x, weight, k)),
            (f"TiledHead GEMMs only ({padded} padded rows)", lambda: kernel_parts(kernel, x, False)),
            ("  + per-tile max and exp-sum passes", lambda: kernel_parts(kernel, x, True)),
            ("AnswerHead.topk (norm + TiledHead, all)", lambda: head.topk(x, k))]
    for label, fn in rows:
        cpu, wall = best(fn, args.repeats)
        print(f"  {label:46} {cpu:7.3f}s cpu {wall:7.3f}s wall  {head_gflop / cpu:5.0f} GFLOP/s of head FLOPs")

    print("\nwhat the head's FLOPs allow, prefill / (prefill + head) at equal GFLOP/s (decoder + head only):")
    own = prefill_flops(args.prompt_tokens, 4, h, 2 * h)
    print(f"  this teacher (4 x {h}, {args.prompt_tokens:.0f}-token prompts, {args.answer_tokens}-token answers): "
          f"{own / (own + 2 * args.answer_tokens * h * v):.2f}")
    th, tl, ti, kv, tp, ta = (float(t) for t in args.teacher.split(","))
    real = prefill_flops(tp, int(tl), int(th), int(ti), kv)
    print(f"  teacher {int(th)} x {int(tl)} layers ({tp:.0f}-token prompts, {ta:.0f}-token answers): "
          f"{real / (real + 2 * ta * th * v):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
