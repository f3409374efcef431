"""Stage-two training-step benchmark: plain SFT vs cached multi-teacher KD vs online KD, one student.

    python bench/train_step.py [--steps 30] [--warmup 3] [--batch-size 8] [--scenes 16] [--student student|medium]
                               [--workdir DIR] [--device cpu|cuda] [--threads 1] [--eager-attention]
                               [--set loss.FIELD=VALUE ...] [--profile]

One tiny VLM student (the demo's ``student`` preset, 2 layers x 64; ``--student medium`` is 4 x 256),
synthetic driving data (``kd.pipeline.demo.synth``: 3 records per scene, one per capability) and three
tiny teachers (``teacher`` preset, 4 x 128, different weight seeds, the student's tokenizer) with
Drive-KD's signals per capability: top-k ``--k`` log-probs + hidden states of layers 2 and 4 for
every teacher, plus text-to-vision maps of layer 0 (perception), full maps of layers 0..2
(reasoning) and text-to-vision maps of layer 2 (planning). Rows, same student, data order, batch,
steps and seeds:

(a) plain SFT: answer cross-entropy only, sdpa attention, the student's own encoding of each record.
(b) cached KD: ``kd distill``'s loader (``DistillDataset``: encode + join the three caches by sample
    id, alignment checked) and objective (``DistillObjective``: CE + per teacher top-k KL, hidden
    MSE through projectors, attention-map MSE, mixed by capability), the student's attention maps
    from ``student.MAPS_ATTENTION`` as ``kd distill`` sets it (sdpa in every layer plus the softmax
    weights of the answer rows of the layers whose maps are read); ``--eager-attention`` runs the
    student (and the online teachers) in eager attention instead, as kd distill did before.
    ``--set loss.attention=0`` (any ``LossConfig`` field) prices one signal at a time.
(c) online KD, the way Drive-KD runs: the three teacher models in memory, each step a no-grad
    teacher-forced forward of each on the batch produces the same signals (top-k log-probs + tail,
    hidden states, head-averaged attention maps at the answer positions, exactly as the hf engine
    caches them) for the same ``DistillObjective``. Teachers read the student's batch (shared tokenizer).

A step is what ``kd distill`` times: fetch the batch (``DataLoader``, ``num_workers`` as given),
forward, losses, backward, grad clip, AdamW step.

Time: the three rows run in one process, interleaved step by step (step ``i`` of a, b and c, in a
rotating order, then step ``i + 1``; each row keeps its own student copy, optimiser and loader), so
a burst of load on a shared machine hits every row alike. The table shows each row's median over
``--steps`` steps after ``--warmup``; the ratios are the medians of the per-step ratios.
Memory: each row alone in a fresh subprocess, from its set-up (student, optimiser, loader,
caches, teachers) through ``--warmup`` + ``--memory-steps`` steps, two numbers:
``tensors``, the peak of live torch tensors over those live before the row (``tensor_memory.py``:
exact, from the profiler's allocation events on CPU; ``torch.cuda.max_memory_allocated`` with
``--device cuda``): the model, optimiser state, activations and the batch (copied, as a GPU run
copies it; on CPU the loader's batch is mostly numpy memory), what a GPU holds;
and ``RSS+``, the growth of peak RSS (``VmHWM``, reset at the baseline) over the RSS after every import and the first
use of every library, the same warm-up for all rows (``train_step_warmup.py``: parquet, a scratch
kd cache, the processor, and every loss kernel kd distill uses, whose code libtorch pages in on
first call), median of ``--memory-repeats`` runs. The loader row iterates (b)'s data loader alone
(no model) and reports its input tokens/s. Targets (issue #5): (b)/(a) <= 1.15 in time and <= 1.1
in memory. ``--profile`` adds a cProfile of (b)'s timed steps.

What to expect on CPU (shared 2-core machine): (b) costs a roughly fixed ~5-6 ms per step over (a),
so the time ratio shrinks as the student grows: demo student (2 x 64, ~46-49 ms/step as the
machine's load varies) 1.12-1.13x, ``--student medium`` (4 x 256) 1.07x. Priced one signal at a
time (``--set loss.<signal>=0``, 40 interleaved steps): ~1.3 ms the loader's (one
``CacheReader.get_batch`` per teacher, batch-wide alignment checks, the targets' collation; it was
~2.2 ms with a read per sample and teacher), ~2.5 ms the attention maps (the answer rows' softmax
weights and their loss), ~2.4 ms the hidden states (six projections, forward and backward, and
the projectors' share of grad clipping and AdamW), ~1.4 ms the top-k KD terms.
Memory, demo student: tensors (a) +13.97 MiB, (b) +15.25 MiB = 1.091x: the six hidden-state
projectors and their AdamW state (0.57 MiB), the batch's teacher targets and the KD graph at the
step's peak (~0.7 MiB; the KD terms add no [N, V] tensor, see ``bench/kd_loss.py``). RSS+ (a)
+28.1-28.4 MiB, (b) +30.5-31.0 MiB = 1.081-1.098x over six runs: the tensors, plus ~1.3 MiB that does not grow
with the student: three readers (~0.75 MiB: the decoded-chunk LRU, 0.35 MiB here, their indexes
and Python objects) and heap fragmentation from the loader's reads (medium student: 1.08x).
Library set-up is not counted, for any row: libtorch's kernel code paged in on first use
(before the warm-up ran the loss kernels it read 1.14x), blosc's zstd decoder and pyarrow's
readers paged in by the first real cache read (~0.3 MiB; the scratch cache was once too small
for blosc to compress: 1.100-1.106x), pyarrow's mimalloc pool keeping the pages of an index
read's freed buffers (0.7 MiB per cache opened; the reader now hands them back: 1.19x -> 1.14x),
and free heap left by the set-up, handed back before the baseline (``train_step_memory.trim_heap``)
so that no row fills it for free. RSS also moved by ~10 MiB between fresh processes until the
workers fixed glibc's malloc thresholds (``train_step_memory.worker_env``), and the first run after
a fresh set-up read (a) and (b) ~14 MiB higher (ratio 1.00x) until the peak count was restarted at
the baseline (``train_step_memory.reset_peak_rss``): a transient peak from before the baseline had
been counted. RSS counts the library files' pages a row touches, and how many the kernel maps per
touch depends on its page cache: in a just-installed venv (``make test`` on a fresh clone) every
row read ~11 MiB higher, all of it file-backed (``RssFile``; anonymous memory was identical): (a) +39.4, (b)
+42.8 MiB = 1.085x.

The code, one job a file, beside this one in bench/: ``train_step_setup.py`` (the teachers' signals,
the rows, the data, models and caches built once), ``train_step_rows.py`` (a row's training state
and its timed step), ``train_step_online.py`` (row (c)'s teachers), ``train_step_worker.py`` (the
timing, memory and loader runs, each in a fresh process), ``train_step_warmup.py`` and
``train_step_memory.py`` (what every row pays before its memory baseline, and the RSS probes),
``train_step_report.py`` (the table and the ratios). This file parses the flags and runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The script's parts, in bench/ (the script's own folder, on sys.path).
from train_step_report import report  # noqa: E402
from train_step_setup import ROWS, prepare  # noqa: E402
from train_step_worker import run_worker, worker  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=6, help="steps of each memory run (after --warmup)")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh-process memory runs per row (median)")
    ap.add_argument("--batch-size", type=int, default=8, help="records per step")
    ap.add_argument("--scenes", type=int, default=16, help="synthetic scenes (3 records each)")
    ap.add_argument("--student", choices=("student", "medium"), default="student",
                    help="student size: the demo's (2 x 64) or 4 x 256")
    ap.add_argument("--k", type=int, default=64, help="top-k log-probs per answer token")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings when shared)")
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (kd distill's default: 0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--workdir", default=None, help="keep data, models and caches here and reuse them")
    ap.add_argument("--set", action="append", default=[], metavar="loss.FIELD=VALUE",
                    help="loss config override for (b) and (c), e.g. loss.attention=0 (repeatable)")
    ap.add_argument("--eager-attention", action="store_true",
                    help="attention maps from eager attention instead of kd's sdpa+maps attention (rows b, c)")
    ap.add_argument("--profile", action="store_true", help="cProfile (b)'s timed steps")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        result = worker(args.worker, json.loads(Path(args.setup).read_text()), args)
        Path(args.result).write_text(json.dumps(result))
        return 0

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="kd-train-step-")
        workdir = Path(tmp.name)
    try:
        setup = prepare(workdir, args)
        setup_path = workdir / "setup-current.json"
        setup_path.write_text(json.dumps(setup))
        t0 = time.perf_counter()
        timing = run_worker("time", setup_path, args)
        print(f"timing: {args.steps} interleaved steps per row in {time.perf_counter() - t0:.0f} s", flush=True)
        runs: dict[str, list[dict]] = {row: [] for row in ROWS}
        for _ in range(args.memory_repeats):  # RSS growth varies by several MiB from run to run: round-robin
            for row in ROWS:
                runs[row].append(run_worker(f"mem-{row}", setup_path, args))
        memory = {}
        for row, label in ROWS.items():
            values = sorted(r["rss_mb"] for r in runs[row])
            memory[row] = {**runs[row][0], "rss_mb": statistics.median(values),
                           "rss_peak_mb": statistics.median(r["rss_peak_mb"] for r in runs[row])}
            if args.device == "cpu":  # deterministic: one run
                memory[row]["tensor_mb"] = run_worker(f"tensors-{row}", setup_path, args)["tensor_mb"]
            print(f"memory {label}: tensors +{memory[row]['tensor_mb']:.2f} MiB, RSS +{memory[row]['rss_mb']:.1f} MiB "
                  f"(runs: {', '.join(f'{v:.1f}' for v in values)})", flush=True)
        loader = run_worker("loader", setup_path, args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report(timing, memory, loader, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
