"""Stage-one capture benchmark: vLLM prefill vs kd capture (top-k, + hidden states) vs the hf engine.

    python bench/capture.py [--samples N] [--model llm|vlm] [--k 64] [--threads 1] [--profile] [--compare-lists]

Everything runs on a tiny random-weight teacher built locally (``kd.pipeline.tiny_models``):

* ``--model llm`` (default): a text-only Llama (the "teacher" preset: 4 layers x 128) and a stage-one
  JSONL of long prompts (random driving words) with multi-token answers, ~256 tokens per sequence.
* ``--model vlm``: the Idefics3 teacher preset on the synthetic driving data (``kd.pipeline.synth``);
  sequences are short there (16 image tokens + a question), so fixed per-request costs weigh more.

Rows:

(a) vLLM prefill, no log-probs: ``LLM.generate(max_tokens=1, prompt_logprobs=None)`` over the same
    token prompts, on the *same* ``LLM`` instance kd uses for (b) (same engine settings), all
    prompts in one call. Pre-tokenized: this is the ceiling of what vLLM can do.
(b) kd capture, top-k: ``build_cache(BuildRequest(engine="vllm", top_k=k))`` writing a sealed cache
    (validate, key, tokenize, generate, convert, zarr write, seal): the real stage-one path.
(c) as (b) plus hidden states of 2 layers (vLLM's ``extract_hidden_states`` route; a second engine).
(d) as (b) with ``engine="hf"`` (transformers forward, batch ``--hf-batch-size``).
(b0) with ``--compare-lists``: as (b) with the engine's ``array_prompt_logprobs`` off, i.e. reading
    vLLM's per-position Python lists of prompt log-probs (the engine's fallback path).

Rates are prompt tokens/s (the whole teacher-forced sequence, image tokens included: what the
teacher prefills); answer tokens/s (what the cache stores) are shown beside them. By default
everything runs on one pinned CPU thread (``--threads``): with vLLM's own binding (all cores,
spin-waiting OpenMP threads) a second busy process on the machine makes timings swing several-fold.
Engine start-up is excluded: each build row first runs a warm-up build on 8 samples (which starts
the engine, kept warm in ``build._WARM_ENGINES``), then times full builds with ``force=True``.

The machine may be shared, so rows are timed round-robin (each round times every row once, so a
burst of load hits all rows of the round); each row's best of ``--repeats`` rounds is reported, and
beside its ratio to (a) the median of the per-round ratios, on which the PASS/MISS verdict for
(b)/(a) rests (a short row like (a) is likelier to catch a quiet moment, which biases best-of
ratios downwards on a busy machine). (c) runs in a second phase after the plain engine is
closed: vLLM's KV-transfer group (which the hidden-states route needs) is process-global, so a
plain and a hidden-states engine cannot run in one process together. ``--profile`` adds a cProfile
of the timed (b) builds; the "where the time goes" table comes from timers wrapped around
``VLLMEngine.capture/encode/_signals``, ``LLM.generate`` and ``ShardWriter.add/commit``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its CPU-backend warnings would bury the table

from kd.pipeline import build as build_mod  # noqa: E402
from kd.pipeline.build import BuildRequest, build_cache  # noqa: E402
from kd.pipeline.dataset import load_records  # noqa: E402
from kd.pipeline.tiny_models import DRIVING_WORDS, build_preset  # noqa: E402

TARGET_RATIO = 0.5  # (b)/(a) on CPU


# ----------------------------------------------------------------------------------------- data


def write_llm_data(path: Path, n: int, seq_tokens: int, seed: int) -> Path:
    """Stage-one JSONL of ``n`` text-only records whose encoded sequences are ~``seq_tokens`` long.

    Every driving word is a single BPE token (with its leading space), and the chat template adds
    ~6 tokens around the prompt, so the word counts below set the token counts.
    """
    rng = random.Random(seed)
    words = [w for w in DRIVING_WORDS if w.isalpha()]
    lines = []
    for i in range(n):
        answer_words = rng.randint(8, 24)
        prompt_words = max(8, seq_tokens - 8 - answer_words + rng.randint(-16, 16))
        prompt = " ".join(rng.choices(words, k=prompt_words)) + "?"
        answer = " ".join(rng.choices(words, k=answer_words)) + "."
        lines.append(json.dumps({"id": f"s{i:06d}", "images": [], "prompt": prompt, "answer": answer,
                                 "capability": rng.choice(["perception", "reasoning", "planning"])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_vlm_data(root: Path, n: int, seed: int) -> Path:
    """The first ``n`` records of the synthetic driving data (images relative to ``root``)."""
    from kd.pipeline.synth import synthesize

    scenes = max(1, math.ceil(n / 3))  # 3 records per scene; all splits are pooled below
    paths = synthesize(root, scenes, seed=seed)
    lines = []
    for split in ("train", "val", "test"):
        if split in paths:
            lines += [ln for ln in paths[split].read_text().splitlines() if ln.strip()]
    out = root / "bench.jsonl"
    out.write_text("\n".join(lines[:n]) + "\n")
    return out


def head_jsonl(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


# ------------------------------------------------------------------------------------- timing


@dataclass
class Row:
    label: str
    seconds: float
    prompt_tokens: int
    answer_tokens: int
    note: str = ""

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.seconds

    @property
    def answer_tps(self) -> float:
        return self.answer_tokens / self.seconds


class Timers:
    """Wall time inside named functions during the timed builds (patched in, removed after)."""

    def __init__(self, targets: list[tuple[type, str, str]]):
        self.targets = targets
        self.total: dict[str, float] = {}
        self._undo: list[tuple[type, str, object]] = []

    def install(self) -> None:
        for owner, attr, name in self.targets:
            raw = owner.__dict__[attr]
            is_static = isinstance(raw, staticmethod)
            orig = raw.__func__ if is_static else raw
            totals = self.total

            def timed(*a, _orig=orig, _name=name, **kw):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - t0

            setattr(owner, attr, staticmethod(timed) if is_static else timed)
            self._undo.append((owner, attr, raw))

    def reset(self) -> None:
        self.total.clear()

    def remove(self) -> None:
        for owner, attr, raw in reversed(self._undo):
            setattr(owner, attr, raw)
        self._undo.clear()


def drop_engines() -> None:
    """Close and forget every warm engine."""
    for eng in build_mod._WARM_ENGINES.values():
        eng.close()
    build_mod._WARM_ENGINES.clear()


def forced(request: BuildRequest, **changes) -> BuildRequest:
    return BuildRequest(**{**request.__dict__, "force": True, **changes})


def prefill_prompts(engine, records) -> list:
    """kd's own token prompts (one unexpanded placeholder per image, as kd sends them)."""
    from vllm.inputs import TokensPrompt

    prompts = []
    for s in engine.encode([r.as_dict() for r in records]):
        p = TokensPrompt(prompt_token_ids=list(s.vllm_prompt_ids))
        if s.images:
            p["multi_modal_data"] = {"image": list(s.images)}
        prompts.append(p)
    return prompts


# --------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=128, help="records captured per timed build")
    ap.add_argument("--model", choices=("llm", "vlm"), default="llm")
    ap.add_argument("--k", type=int, default=64, help="top-k log-probs per answer token")
    ap.add_argument("--seq-tokens", type=int, default=256, help="target sequence length (--model llm)")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="samples per engine.capture call for vLLM (default 0: the whole shard = --samples)")
    ap.add_argument("--hf-batch-size", type=int, default=8, help="batch size of the hf engine")
    ap.add_argument("--hidden", default="", help="hidden layers for (c), comma-separated (default: middle,last)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each times every row once (best is reported)")
    ap.add_argument("--skip", default="", help="rows to skip among c,d, e.g. 'c,d'")
    ap.add_argument("--profile", action="store_true", help="cProfile the (b) builds and print the top functions")
    ap.add_argument("--compare-lists", action="store_true",
                    help="add row (b0): (b) with array_prompt_logprobs=False (vLLM's per-position lists, the old path)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for vLLM and torch, bound to the first N allowed cores (default 1: steady "
                         "numbers on a shared machine; 0: vLLM's own binding and torch's default)")
    ap.add_argument("--quiet", action="store_true", help="no per-round times on stderr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    skip = set(args.skip.replace(" ", "").split(",")) - {""}
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if args.threads:
        cores = sorted(os.sched_getaffinity(0))[: args.threads]
        os.environ["OMP_NUM_THREADS"] = str(len(cores))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        import torch

        torch.set_num_threads(len(cores))

    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vLLM is not installed: rows (a)-(c) need it (pip install -e '.[cpu]')", file=sys.stderr)
        return 2
    from kd.cache_schema.writer import ShardWriter
    from kd.pipeline.engines.vllm_engine import VLLMEngine

    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kd-bench-capture-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        teacher = build_preset(args.model, "teacher", work / "teacher", seed=args.seed)
        if args.model == "llm":
            data = write_llm_data(work / "bench.jsonl", args.samples, args.seq_tokens, args.seed)
        else:
            data = write_vlm_data(work / "data", args.samples, args.seed)
        warm = head_jsonl(data, data.with_name("warm.jsonl"), 8)
        records = load_records(data)
        setup = time.perf_counter() - t0

        config = json.loads((teacher / "config.json").read_text())
        num_layers = config.get("text_config", config)["num_hidden_layers"]
        hidden = tuple(int(x) for x in args.hidden.split(",")) if args.hidden else (num_layers // 2, num_layers)
        batch = args.batch_size or len(records)
        base = dict(teacher=str(teacher), data=str(data), top_k=args.k, value_coding="fp16", hidden_coding="fp16",
                    shard_size=len(records), batch_size=batch)
        requests = {"b": BuildRequest(engine="vllm", out=str(work / "cache-b"), **base)}
        if "c" not in skip:
            requests["c"] = BuildRequest(engine="vllm", out=str(work / "cache-c"), hidden_layers=hidden, **base)
        if "d" not in skip:
            requests["d"] = BuildRequest(engine="hf", out=str(work / "cache-d"),
                                         **{**base, "batch_size": args.hf_batch_size})
        if args.compare_lists:
            requests["b0"] = BuildRequest(engine="vllm", out=str(work / "cache-b0"), **base)
        notes = {"a": "same LLM as (b), pre-tokenized, 1 call", "b": f"batch {batch}, sealed cache",
                 "b0": "as (b), prompt log-probs via vLLM's lists",
                 "c": f"hidden layers {list(hidden)}", "d": f"batch {args.hf_batch_size}"}

        timers = Timers([(VLLMEngine, "capture", "engine.capture"), (VLLMEngine, "encode", "  tokenize (encode)"),
                         (LLM, "generate", "  LLM.generate"), (VLLMEngine, "_drain", "  hidden: drain steps"),
                         (VLLMEngine, "_signals", "  to TeacherSignals"), (ShardWriter, "add", "writer.add"),
                         (ShardWriter, "commit", "writer.commit (zarr)")])
        profile = cProfile.Profile() if args.profile else None
        times: dict[str, list[float]] = {k: [] for k in ROW_LABELS if k == "a" or k in requests}
        splits: dict[str, dict[str, float]] = {}
        tokens: dict[str, int] = {}
        params = SamplingParams(max_tokens=1, prompt_logprobs=None, detokenize=False)

        # Two vLLM engines cannot live in one process when one has a KV connector (hidden states):
        # vLLM's KV-transfer group is process-global. So phase 1 times (a), (b), (d) round-robin on
        # the plain engine, phase 2 times (c) after closing it. Round-robin: each round times every
        # row once, so load from other users of the machine hits the rows of a phase alike.
        phases = [[k for k in ("a", "b", "b0", "d") if k == "a" or k in requests], [k for k in ("c",) if k in requests]]
        load = [os.getloadavg()[0]]
        for phase in phases:
            if not phase:
                continue
            drop_engines()
            for key in phase:  # start engines: a warm-up build on a few samples (kept warm in build)
                if key in ("a", "b0"):  # (a) and (b0) use (b)'s engine
                    continue
                req = requests[key]
                t0 = time.perf_counter()
                build_cache(forced(req, data=str(warm), out=req.out + "-warm"))
                splits[key] = {"warm-up build (engine start, not counted)": time.perf_counter() - t0}
                log(f"  ({key}) warm-up build (engine start) {splits[key]['warm-up build (engine start, not counted)']:.1f}s")
            if "a" in phase:
                engine = build_mod._engine_for(requests["b"], "vllm")
                prompts = prefill_prompts(engine, records)
                engine._llm.generate(prompts[:8], params, use_tqdm=False)
            for rnd in range(args.repeats):
                for key in phase:
                    if key == "a":
                        t0 = time.perf_counter()
                        outs = engine._llm.generate(prompts, params, use_tqdm=False)
                        times["a"].append(time.perf_counter() - t0)
                        tokens["prompt"] = sum(len(o.prompt_token_ids) for o in outs)
                        continue
                    vllm_engine = build_mod._engine_for(requests["b"], "vllm") if key == "b0" else None
                    if vllm_engine is not None:
                        vllm_engine.array_prompt_logprobs = False
                    if key != "d":
                        timers.install()
                    timers.reset()
                    if profile and key == "b":
                        profile.enable()
                    t0 = time.perf_counter()
                    res = build_cache(forced(requests[key]))
                    dt = time.perf_counter() - t0
                    if profile:
                        profile.disable()
                    timers.remove()
                    if vllm_engine is not None:
                        vllm_engine.array_prompt_logprobs = True
                    if not times[key] or dt < min(times[key]):
                        warm_up = {k: v for k, v in splits.get(key, {}).items() if "warm" in k}
                        splits[key] = {**dict(timers.total), **warm_up}
                    times[key].append(dt)
                    tokens["answer"] = res.tokens
                log(f"  round {rnd + 1}: " + "  ".join(f"({k}) {times[k][-1]:.2f}s" for k in phase))
            load.append(os.getloadavg()[0])
        drop_engines()

        rows = [Row(ROW_LABELS[k], min(v), tokens["prompt"], tokens["answer"], notes[k]) for k, v in times.items()]
        report(args, records, rows, {ROW_LABELS[k]: v for k, v in splits.items()}, setup, times, load)
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


ROW_LABELS = {"a": "(a) vLLM prefill, no logprobs", "b": "(b) kd capture top-k (vllm)",
              "b0": "(b0) kd capture, vLLM lists", "c": "(c) kd capture top-k + hidden",
              "d": "(d) kd capture top-k (hf)"}


def report(args, records, rows: list[Row], splits, setup: float, times: dict[str, list[float]],
           load: list[float]) -> None:
    import statistics

    import torch
    import vllm

    a = rows[0]
    n = len(records)
    print(f"\ncapture benchmark: model={args.model} (tiny teacher preset), {n} samples, "
          f"{a.prompt_tokens / n:.0f} prompt tokens/sample (answer {a.answer_tokens / n:.1f}), k={args.k}, "
          f"best of {args.repeats} rounds; vllm {vllm.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'vLLM default'}, setup {setup:.1f}s")
    busy = max(load) > (os.cpu_count() or 1)  # the benchmark itself accounts for up to one per core
    print(f"1-min load average at start / after each phase: {' / '.join(f'{x:.1f}' for x in load)}"
          + ("  (machine busy: numbers are noisy" + ("; --threads 1 steadies them)" if args.threads != 1 else ")")
             if busy else ""))
    print(f"{'row':31} {'seconds':>8} {'prompt tok/s':>13} {'answer tok/s':>13} {'vs (a)':>7}  note")
    for r in rows:
        print(f"{r.label:31} {r.seconds:8.2f} {r.prompt_tps:13,.0f} {r.answer_tps:13,.0f} "
              f"{r.prompt_tps / a.prompt_tps:7.2f}  {r.note}")
    print("\nwhere the build time goes (best timed run; indented = inside engine.capture; "
          "rest = validate, key, plan, seal):")
    for r in rows:
        if r.label not in splits:
            continue
        print(f"  {r.label}: {r.seconds:.2f}s")
        for name, sec in splits[r.label].items():
            print(f"    {name:42} {sec:7.2f}s")
    print("\nratios of prompt tok/s to (a): best-of-rounds, and the median of the per-round ratios (each round"
          "\ntimes (a) next to the row, so it is the steadier one on a busy machine; (c) runs in its own phase):")
    for key, r in zip(list(times)[1:], rows[1:]):
        best = r.prompt_tps / a.prompt_tps
        line = f"  ({key})/(a) = {best:.2f} best-of"
        paired = statistics.median(x / y for x, y in zip(times["a"], times[key])) if key != "c" else None
        if paired is not None:
            line += f", {paired:.2f} paired median"
        if key == "b":
            verdict = "PASS" if paired >= TARGET_RATIO else "MISS"
            line += f"   target >= {TARGET_RATIO} on CPU (paired median): {verdict}"
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
