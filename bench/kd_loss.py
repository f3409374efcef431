"""Memory and time of the logit KD terms at a real student's vocabulary: CE alone vs CE + top-k KD of R teachers.

    python bench/kd_loss.py [--tokens 512] [--vocab 151936] [--teachers 3] [--k 64] [--repeats 3]
                            [--device cpu|cuda] [--threads 2]

One batch of ``--tokens`` answer rows of student logits ``[N, V]`` (float32, the dtype the losses
compute in) and, per teacher, a top-k cache entry (ids, log-probs, tail). Rows, forward + backward
to the logits, each in the same process, interleaved ``--repeats`` times:

(a) CE alone: ``answer_ce_loss``, what plain SFT pays.
(b) kd: CE + top-k KL (tail bucket, forward, T = 1) of all teachers as ``kd distill``'s objective
    runs them: one shared ``student_log_probs``, the teachers stacked into one ``topk_kd_loss``,
    the student's tails from ``student_tail.student_tail_logmass``.
(c) direct: the same losses written directly: a log-softmax per loss and, per teacher, the
    student's tail as ``logsumexp`` over an ``[N, V]`` masked copy (kd before this benchmark).
(d) dense online KD: CE + full-vocabulary KL to each teacher's ``[N, V]`` log-probs, which an online
    teacher produces every step. They are made before the timed step (their making is the teacher's
    cost, not the loss's) and their bytes added to the row's peak (they are live during the step).

Memory: peak of live tensors over what is live before the step (the logits and the teachers'
cached entries), ``bench/tensor_memory.py``: exact on CPU (profiler allocation events),
``torch.cuda.max_memory_allocated`` on CUDA. Printed in MiB and as a ratio to (a), with the
logits' own size for scale. Time: median seconds of forward + backward per row; ratios of medians.
The losses of (b) and (c) agree (printed), so the rows compare the same quantity.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tensor_memory import peak_tensor_mib  # noqa: E402  (bench/, the script's own folder)

ROWS = {"ce": "(a) CE alone", "kd": "(b) CE + kd top-k KD", "direct": "(c) CE + direct top-k KD",
        "dense": "(d) CE + dense online KD"}


def _masked_tail(s_lsm, ids, valid):
    """The direct student tail: an ``[R, N, V]`` masked copy of the log-probs, logsumexp'd."""
    import torch

    in_top = s_lsm.new_zeros(ids.shape[:-1] + s_lsm.shape[-1:]).scatter_add_(-1, ids, valid.to(s_lsm.dtype)) > 0
    return torch.logsumexp(torch.where(in_top, float("-inf"), s_lsm), -1)


@contextmanager
def _direct_tail():
    import kd.pipeline.distill.logit_losses as losses  # where topk_kd_loss looks the tail up

    saved = losses.student_tail_logmass
    losses.student_tail_logmass = _masked_tail
    try:
        yield
    finally:
        losses.student_tail_logmass = saved


def _inputs(args: argparse.Namespace):
    import torch

    g = torch.Generator().manual_seed(0)
    n, v, r, k = args.tokens, args.vocab, args.teachers, args.k
    logits = (2.0 * torch.randn(n, v, generator=g)).to(args.device)
    targets = torch.randint(0, v, (n,), generator=g).to(args.device)
    # Teachers: a peaked distribution over a random top-k per row, the rest of the mass in the tail.
    ids = torch.stack([torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)]) for _ in range(r)])
    top = torch.log_softmax(torch.randn(r, n, k + 1, generator=g) * 2.0, -1)
    cache = {"ids": ids.to(args.device), "logprobs": top[..., :k].to(args.device), "tail": top[..., k].to(args.device)}
    return logits, targets, cache


def _losses(row: str, z, targets, cache, dense):
    """Forward of one row's total loss from leaf logits ``z`` (``dense``: teachers' [N, V] log-probs)."""
    import torch.nn.functional as F

    from kd.pipeline.distill.losses import answer_ce_loss, student_log_probs, topk_kd_loss

    if row == "ce":
        return answer_ce_loss(z, targets)
    if row == "kd":
        s = student_log_probs(z)
        kd = topk_kd_loss(s, cache["ids"], cache["logprobs"], cache["tail"], reduction="none", normalized=True)
        return answer_ce_loss(s, targets, normalized=True) + kd.mean(-1).sum()
    if row == "direct":
        with _direct_tail():
            kd = sum(topk_kd_loss(z, cache["ids"][j], cache["logprobs"][j], cache["tail"][j])
                     for j in range(cache["ids"].shape[0]))
        return answer_ce_loss(z, targets) + kd
    s = F.log_softmax(z, -1)
    kd = sum(F.kl_div(s, t, log_target=True, reduction="batchmean") for t in dense)
    return answer_ce_loss(z, targets) + kd


def measure(args: argparse.Namespace) -> dict:
    import torch

    logits, targets, cache = _inputs(args)
    out = {row: {"s": [], "mib": None, "loss": None} for row in ROWS}
    dense: list = []

    def step(row: str) -> None:
        z = logits.detach().requires_grad_()
        loss = _losses(row, z, targets, cache, dense)
        loss.backward()
        out[row]["loss"] = float(loss.detach())
        del z, loss

    def make_teachers() -> None:
        g = torch.Generator(device=args.device).manual_seed(1)
        dense[:] = [torch.log_softmax(2.0 * torch.randn(logits.shape, generator=g, device=args.device), -1)
                    for _ in range(args.teachers)]

    for row in ROWS:  # warm-up and memory, one row at a time
        if row == "dense":
            make_teachers()
        step(row)
        out[row]["mib"] = peak_tensor_mib(lambda row=row: step(row), args.device)
    out["dense"]["mib"] += sum(t.numel() * t.element_size() for t in dense) / 2**20
    for i in range(args.repeats):
        for row in list(ROWS)[i % 4:] + list(ROWS)[: i % 4]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(row)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            out[row]["s"].append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512, help="answer rows N in the batch")
    ap.add_argument("--vocab", type=int, default=151936, help="student vocabulary V (Qwen2's: 151936)")
    ap.add_argument("--teachers", type=int, default=3)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed forward + backward passes per row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    res = measure(args)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} answer tokens, V={args.vocab}, {args.teachers} teachers, k={args.k}, device {args.device}, "
          f"{args.threads} thread(s); float32 logits [N, V] = {logits_mib:.0f} MiB")
    print(f"{'row':<28}{'peak MiB':>10}{'x logits':>10}{'s fwd+bwd':>11}{'loss':>10}")
    for row, label in ROWS.items():
        r = res[row]
        print(f"{label:<28}{r['mib']:>10.0f}{r['mib'] / logits_mib:>10.2f}{statistics.median(r['s']):>11.3f}"
              f"{r['loss']:>10.4f}")
    base_t, base_m = statistics.median(res["ce"]["s"]), res["ce"]["mib"]
    for row in ("kd", "direct", "dense"):
        print(f"{ROWS[row]} / (a): memory {res[row]['mib'] / base_m:.2f}x, time "
              f"{statistics.median(res[row]['s']) / base_t:.2f}x")
    print(f"(b) vs (c): memory {res['direct']['mib'] / res['kd']['mib']:.2f}x less, time "
          f"{statistics.median(res['direct']['s']) / statistics.median(res['kd']['s']):.2f}x less; "
          f"same loss: {abs(res['kd']['loss'] - res['direct']['loss']) <= 1e-4 * abs(res['direct']['loss'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
