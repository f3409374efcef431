"""Crash-resume benchmark: SIGKILL `kd cache build` at many points, resume, compare bit for bit.

    python bench/faults.py [--kills 20] [--seed 0] [--keep DIR]

Builds a reference cache uninterrupted (tiny local VLM teacher, hf engine, top-8 log-probs, a
hidden layer and a t2v attention map, 9 synthetic samples in 3 shards), and once more in a
subprocess (equal to it; its time from plan.json to exit is the window of random kills). Then, N
times: starts a builder as a subprocess, kills it with SIGKILL, resumes the build (here, with
``lease_timeout=0``: the dead builder's lease must be taken over at once) and checks the result
against the reference: same sample set in the same order, no duplicate, every array and the
index bit for bit, ``verify`` clean, no stray attempt dir, temp file or lease left behind.
Before resuming, an ``allow_unsealed`` reader must see only whole committed shards.

Kills alternate between named fault points (``KD_FAULT_POINT``, ``kd/cache_schema/faults.py``;
the n-th hit chosen at random) and random wall-clock delays after the builder wrote its plan:

* ``batch``: teacher outputs in memory, the shard not yet written;
* ``shard_write``: after one of a shard's zarr arrays was written, before its commit;
* ``after_commit``: a shard's commit file published, the next shard (or the seal) pending;
* ``seal``: ``seal_index`` (index.parquet published, no manifest) or ``before_manifest``
  (strays swept, manifest not yet written);
* ``random``: SIGKILL a random delay after the plan, within that window (lands in model load,
  a teacher forward, a write, the seal, ...; the line says where, judged from the files).

Prints one line per kill, the survived count per phase and the total ``survived N/N``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cache_schema import CacheReader, verify_cache
from kd.cache_schema.lease import DEFAULT_TTL, LEASE_FILE, LeaseInfo
from kd.pipeline.build import BuildRequest, BuildResult, asdict_request, build_cache

PHASES = ("batch", "shard_write", "after_commit", "seal", "random")
RUNNER = (
    "import json, sys\n"
    "from kd.pipeline.build import BuildRequest, build_cache\n"
    "d = json.loads(sys.argv[1])\n"
    "d['hidden_layers'] = tuple(d['hidden_layers']); d['attention_layers'] = tuple(d['attention_layers'])\n"
    "print('ready', flush=True)\n"
    "print(json.dumps(build_cache(BuildRequest(**d)).to_dict()), flush=True)\n"
)
ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def setup(workdir: Path, n_scenes: int = 4) -> None:
    """Tiny teacher + data under ``workdir`` (9 train samples for 4 scenes)."""
    from kd.pipeline.demo.synth import synthesize
    from kd.pipeline.demo.tiny_models import build_preset

    synthesize(workdir / "data", n_scenes, seed=3)
    build_preset("vlm", "student", workdir / "teacher", seed=1)


def make_request(workdir: Path, out: Path, **kw) -> BuildRequest:
    base = {"teacher": str(workdir / "teacher"), "data": str(workdir / "data" / "train.jsonl"), "out": str(out),
            "engine": "hf", "top_k": 8, "value_coding": "fp32", "hidden_layers": (1,), "hidden_coding": "fp32",
            "attention_layers": (0,), "attention_kind": "t2v", "shard_size": 3, "batch_size": 2}
    base.update(kw)
    return BuildRequest(**base)


def start_builder(request: BuildRequest, fault: str | None = None) -> subprocess.Popen:
    """A builder subprocess (stdout: 'ready' after imports, then the BuildResult JSON)."""
    import torch

    # Same intra-op thread count as the in-process reference: float reductions, hence bits, depend on it
    # (and an inherited OMP_NUM_THREADS, e.g. from a dask LocalCluster elsewhere, would differ).
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("KD_FAULT_POINT", None)
    if fault:
        env["KD_FAULT_POINT"] = fault
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(asdict_request(request))], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until ``path`` exists or the builder exits."""
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)


def wait_killed(proc: subprocess.Popen, delay: float | None = None, start: Path | None = None,
                timeout: float = 600) -> int:
    """Wait for a fault-point kill, or SIGKILL ``delay`` s after ``start`` appears; the exit code."""
    if delay is not None:
        proc.stdout.readline()  # "ready": imports done
        if start is not None:
            wait_for(start, proc)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


def sample_bytes(reader: CacheReader, sid: str) -> dict[str, bytes]:
    """Every decoded array of one sample as raw bytes (bit-for-bit comparison, -inf and all)."""
    s = reader.get(sid)
    out = {"ids": s.ids, "logprobs": s.logprobs, "tail": s.tail_logmass, "targets": s.target_ids}
    out.update({f"hidden_L{k}": v for k, v in s.hidden.items()})
    out.update({f"t2v_L{k}": v for k, v in s.attention_t2v.items()})
    out.update({f"full_L{k}": v for k, v in s.attention_full.items()})
    if s.counts is not None:
        out["counts"] = s.counts
    return {k: f"{v.dtype}{v.shape}".encode() + np.ascontiguousarray(v).tobytes() for k, v in out.items()}


@dataclass
class Reference:
    path: str
    ids: list[str]
    arrays: dict[str, dict[str, bytes]]
    index_sum: str

    @classmethod
    def load(cls, path: str) -> Reference:
        r = CacheReader(path)
        return cls(path, r.sample_ids, {sid: sample_bytes(r, sid) for sid in r.sample_ids}, r.manifest.index.xxh3_128)


def check_partial(ref: Reference, path: str) -> list[str]:
    """An unsealed (killed) cache: a reader sees only whole committed shards, equal to the reference."""
    if not Path(path, "plan.json").exists():
        return []
    r = CacheReader(path, allow_unsealed=True)
    problems = [f"partial: sample {sid!r} not in the reference" for sid in r.sample_ids if sid not in ref.arrays]
    problems += [f"partial: sample {sid!r} differs from the reference" for sid in r.sample_ids
                 if sid in ref.arrays and sample_bytes(r, sid) != ref.arrays[sid]]
    return problems


def check_final(ref: Reference, path: str) -> list[str]:
    """A resumed cache: same samples and bytes as the reference, verify clean, nothing stray."""
    report = verify_cache(path)
    if not report.ok:
        return [f"verify: {p}" for p in report.problems]
    r = CacheReader(path)
    problems = []
    if r.sample_ids != ref.ids:
        lost, extra = set(ref.ids) - set(r.sample_ids), set(r.sample_ids) - set(ref.ids)
        problems.append(f"sample set differs: lost {sorted(lost)[:5]}, extra {sorted(extra)[:5]}, "
                        f"{len(r.sample_ids) - len(set(r.sample_ids))} duplicated")
    problems += [f"sample {sid!r}: {name} differs" for sid in r.sample_ids if sid in ref.arrays
                 for name, data in sample_bytes(r, sid).items() if ref.arrays[sid].get(name) != data]
    if r.manifest.index.xxh3_128 != ref.index_sum:
        problems.append("index.parquet differs from the reference")
    keep = {e.path.split("/", 1)[1] for e in r.manifest.shards} | {f"{e.shard:05d}.commit.json" for e in r.manifest.shards}
    stray = sorted(set(os.listdir(Path(path, "shards"))) - keep)
    top = set(os.listdir(path)) - {"plan.json", "shards", "index.parquet", "manifest.json"}
    if LEASE_FILE in top and LeaseInfo.parse(Path(path, LEASE_FILE).read_bytes()).stale(DEFAULT_TTL):
        top.discard(LEASE_FILE)  # killed between manifest and release: a dead builder's lease, not cache content
    stray += sorted(top)
    if stray:
        problems.append(f"left behind: {stray}")
    return problems


def phase_of(path: str) -> str:
    """Where a random kill landed, judged from what is on disk."""
    p = Path(path)
    if (p / "manifest.json").exists():
        return "after seal"
    if (p / "index.parquet").exists():
        return "during seal"
    commits = len(list(p.glob("shards/*.commit.json")))
    attempts = len([d for d in p.glob("shards/*") if d.is_dir()])
    if attempts > commits:
        return f"mid shard write ({commits} committed)"
    return f"{commits} shards committed" if p.exists() else "before plan"


def cache_path(request: BuildRequest) -> str:
    from kd.pipeline.build import prepare

    return prepare(request)[0].location.path


def run_kill(request: BuildRequest, fault: str | None, delay: float | None, ref: Reference) -> tuple[bool, str]:
    """One kill + resume + comparison: (survived, detail)."""
    path = cache_path(request)
    rc = wait_killed(start_builder(request, fault), delay, Path(path, "plan.json"))
    if rc != -signal.SIGKILL:
        detail = f"exit {rc} (finished before the kill)" if rc == 0 else f"exit {rc}"
        if rc != 0:
            return False, detail
    else:
        detail = "killed, " + phase_of(path)
        if fault and not Path(path, LEASE_FILE).exists():
            return False, detail + ": the killed builder left no lease to take over"
    problems = check_partial(ref, path)
    res: BuildResult = build_cache(request, lease_timeout=0)  # the dead builder's lease must go at once
    problems += check_final(ref, res.path)
    detail += f"; resumed {res.shards_built}/{res.shards_total} shards" if not res.reused else "; reused"
    return not problems, detail + "".join(f"\n    {p}" for p in problems)


def schedule(kills: int, rng: random.Random, samples: int, shards: int, arrays: int,
             build_s: float) -> list[tuple[str, str | None, float | None]]:
    """(phase, KD_FAULT_POINT or None, delay or None) per kill: named points (cycling) and random delays alternate."""
    named = {
        "batch": lambda: f"batch:{rng.randint(1, samples)}",
        "shard_write": lambda: f"shard_write:{rng.randint(1, shards * arrays)}",
        "after_commit": lambda: f"after_commit:{rng.randint(1, shards)}",
        "seal": lambda: f"{rng.choice(['seal_index', 'before_manifest'])}:1",
    }
    out: list[tuple[str, str | None, float | None]] = []
    for i in range(kills):
        if i % 2 == 0 or kills < 8:  # few kills: named points only, so every phase is hit
            phase = list(named)[len([o for o in out if o[1]]) % len(named)]
            out.append((phase, named[phase](), None))
        else:
            out.append(("random", None, rng.uniform(0, build_s)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    args = ap.parse_args()
    os.environ.update(ENV)
    work = args.keep or Path(tempfile.mkdtemp(prefix="kd-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    setup(work)
    t0 = time.perf_counter()
    ref_res = build_cache(make_request(work, work / "ref"))
    build_s = time.perf_counter() - t0
    ref = Reference.load(ref_res.path)
    print(f"reference: {ref_res.samples} samples, {ref_res.shards_total} shards, {build_s:.1f}s in-process")
    calib = make_request(work, work / "calibrate")  # a whole subprocess build: plan.json -> exit is the kill window
    proc = start_builder(calib)
    wait_for(Path(cache_path(calib), "plan.json"), proc)
    t1 = time.perf_counter()
    out, err = proc.communicate()
    build_s = time.perf_counter() - t1
    problems = check_final(ref, json.loads(out.splitlines()[-1])["path"]) if proc.returncode == 0 else [err[-2000:]]
    print(f"subprocess build: {build_s:.1f}s from plan to exit, {'equal to the reference' if not problems else problems}")
    if problems:
        return 1
    survived = {p: [0, 0] for p in PHASES}
    finished = 0  # random delays that fell after the builder had already exited
    arrays = sum(1 for d in Path(ref_res.path, CacheReader(ref_res.path).manifest.shards[0].path).iterdir() if d.is_dir())
    plan = schedule(args.kills, rng, ref_res.samples, ref_res.shards_total, arrays, 0.8 * build_s)  # exit is in build_s
    for i, (phase, fault, delay) in enumerate(plan):
        out = work / f"kill-{i:02d}"
        ok, detail = run_kill(make_request(work, out), fault, delay, ref)
        survived[phase][0] += ok
        survived[phase][1] += 1
        finished += detail.startswith("exit 0")
        how = fault or f"after {delay:.2f}s"
        print(f"kill {i + 1:2d}/{args.kills} {phase:12s} {how:20s} {'ok  ' if ok else 'FAIL'} {detail}", flush=True)
        if ok and not args.keep:
            shutil.rmtree(out)
    total = sum(s for s, _ in survived.values()), sum(n for _, n in survived.values())
    print("per phase: " + ", ".join(f"{p} {s}/{n}" for p, (s, n) in survived.items() if n))
    print(f"survived {total[0]}/{total[1]} ({total[1] - finished} killed, {finished} finished before a random kill)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if total[0] == total[1] else 1


if __name__ == "__main__":
    sys.exit(main())
