"""Writer-overlap benchmark: how long a teacher waits for kd's shard writer, with and without
the background commits (kd/pipeline/build/commits.py).

    python bench/writer_overlap.py [--tokens 100000] [--vocab 151936] [--k 64] [--codings u8,bf16]
                                   [--teacher-us 100] [--teacher sleep|spin] [--shard-size 256]
                                   [--batch-size 8] [--prompt-tokens 1600] [--repeats 3]

Synthetic teacher outputs (``kd.cache_schema.synthetic.teacher_like_topk`` at ``--vocab``, top
``--k``; answers of 20-40 tokens after ``--prompt-tokens``-token prompts, ``--tokens`` answer
tokens in all) go through the real stage-one path, ``fanout.run_jobs`` -> ``shard.run_shard`` ->
``ShardWriter.add`` / ``commit`` -> ``CacheBuild.seal``, with a simulated teacher engine in
place of a model: its ``capture`` hands back the batch's precomputed outputs, then sleeps (a GPU
teacher waiting on its device, the GIL free) or spins (a CPU teacher holding the GIL) for
``--teacher-us`` per answer token of the batch (default 100: a fast teacher; a 1B-parameter VLM
prefilling ~1,600-token samples with 30-token answers at ~500 TFLOP/s takes ~200 us an answer
token, a 7B one ~1.5 ms; below the writer's own ~10-15 us a token, commits cannot keep up and the
teacher waits for them). Shards are of equal size (about ``--shard-size`` samples), so the last
one, whose commit nothing can hide, is a full one.

Rows, per value coding, timed round-robin ``--repeats`` times (each round times both, so load
from other users hits them alike):

(s) sequential: each shard committed before the next one's capture (``background=False``: the
    build before the commits moved off the critical path);
(o) overlapped: each shard committed by the commit thread while the next one is captured.

kd's critical path is the wall time of ``run_jobs`` less the time the teacher was to take (a
sleeping teacher spins its last millisecond, so a timer's overshoot is not counted, but a capture
kd slowed by more, through the GIL or the CPU, is): the time the teacher waited for kd, per
answer token. It splits into the gaps between captures (``add``, the writer's work per sample on
the capture's thread; commit waits; the shard loop) and the tail (the last shard's commit, after
the last capture: once a build, nothing can hide it). ``cpu+wait`` is the same path by the
capture thread's CPU time plus its waits on commits: what is left without other processes'
preemption and GIL waits (on a shared machine the wall figures carry its load). ``encode``
(``_assemble``) and ``commit`` (all of ``ShardWriter.commit``: checks, encode, zarr and zstd,
checksums) are the writer's totals; ``hidden`` is the share of commit time the teacher did not
wait for (1 - waited / commit). The verdict compares the overlapped row's critical path with 2 us
per answer token, and (o)/(s) is the median of the per-round ratios. The caches of (s) and (o) are
compared file by file (size and checksum of every stored file): they must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.cache_schema import BuildPlan, CacheBuild, CacheReader, Location, key_inputs  # noqa: E402
from kd.cache_schema.synthetic import teacher_like_topk  # noqa: E402
from kd.cache_schema.writer import ShardWriter  # noqa: E402
from kd.pipeline.build import fanout, shard as shard_mod  # noqa: E402
from kd.pipeline.build.commits import COMMITS  # noqa: E402
from kd.pipeline.build.request import BuildRequest, asdict_request  # noqa: E402
from kd.pipeline.build.signals import TeacherSignals  # noqa: E402
from kd.pipeline.common.dataset import fingerprint_and_hashes, load_records  # noqa: E402

TARGET_US = 2.0  # kd's critical path per answer token
SPIN_S = 1e-3  # a sleeping teacher spins its last millisecond


class SimulatedTeacher:
    """A teacher engine of precomputed outputs that takes ``us_per_token`` per answer token."""

    def __init__(self, outputs: dict[str, TeacherSignals], us_per_token: float, mode: str):
        self.outputs, self.us, self.mode = outputs, us_per_token, mode
        self.spans: list[tuple[float, float, float]] = []  # (start, end, seconds it was to take) of each capture
        self.cpu = 0.0  # CPU seconds of this thread inside the captures (the spinning)

    def capture(self, batch: list[dict], spec) -> list[TeacherSignals]:
        t0, c0 = time.perf_counter(), time.thread_time()
        out = [self.outputs[r["id"]] for r in batch]
        seconds = self.us * 1e-6 * sum(s.num_tokens for s in out)
        if self.mode == "sleep":  # the last ms spun: a timer's overshoot is not kd's, a GIL wait over 1 ms is
            time.sleep(max(0.0, seconds - SPIN_S))
        while time.perf_counter() < t0 + seconds:
            pass
        self.spans.append((t0, time.perf_counter(), seconds))
        self.cpu += time.thread_time() - c0
        return out

    def close(self) -> None:
        pass


def make_data(work: Path, tokens: int, k: int, vocab: int, prompt_tokens: int, seed: int):
    """Records (a JSONL the build reads) and their teacher outputs: ``tokens`` answer tokens in all."""
    d = teacher_like_topk(tokens, k, vocab=vocab, seed=seed)
    rng = np.random.default_rng(seed)
    outputs, lines, lo = {}, [], 0
    while lo < tokens:
        hi = min(tokens, lo + int(rng.integers(20, 41)))
        sid = f"s{len(lines):06d}"
        target = d.target_ids[lo:hi].copy()
        prompt = rng.integers(0, vocab, prompt_tokens).astype(np.int32)
        outputs[sid] = TeacherSignals(sid, target, d.ids[lo:hi].copy(), d.logprobs[lo:hi].copy(),
                                      d.tail_logmass[lo:hi].copy(), np.concatenate([prompt, target]), prompt_tokens)
        lines.append(json.dumps({"id": sid, "images": [], "prompt": "p", "answer": "a", "capability": "bench"}))
        lo = hi
    path = work / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, outputs


class Timers:
    """Seconds inside ShardWriter.add / _assemble, and in commit + check_added (the background
    checks) counted once where one calls the other, from any thread (patched in, removed after)."""

    NAMES = ("add", "_assemble", "commit", "check_added")

    def __init__(self) -> None:
        self.total = dict.fromkeys(("add", "_assemble", "commit"), 0.0)
        self._orig = {n: getattr(ShardWriter, n) for n in self.NAMES}
        self._inside = threading.local()

    def __enter__(self) -> Timers:
        for name, orig in self._orig.items():
            key = "commit" if name == "check_added" else name

            def timed(*a, _orig=orig, _key=key, **kw):
                depth = getattr(self._inside, "depth", 0)
                if _key == "commit":
                    self._inside.depth = depth + 1
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    if _key == "commit":
                        self._inside.depth = depth
                    if _key != "commit" or not depth:  # commit's own check_added is in commit's time already
                        self.total[_key] += time.perf_counter() - t0
            setattr(ShardWriter, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._orig.items():
            setattr(ShardWriter, name, orig)


@dataclass
class Run:
    wall: float
    teacher: float
    gaps: float  # kd's time between the first capture's start and the last one's end
    tail: float  # after the last capture, until every commit is durable
    add: float
    encode: float
    commit: float
    waited: float  # time the capture's thread was blocked on commits
    cpu: float  # CPU seconds of kd's own work on the capture's thread (no preemption, no GIL wait)
    blocked: float  # seconds the capture's thread was blocked on background commits
    seal: float
    path: str

    @property
    def critical(self) -> float:
        return self.wall - self.teacher

    @property
    def on_thread(self) -> float:
        """kd on the capture's thread by CPU time, plus its commit waits: the critical path less
        what other processes (preemption) and the GIL took."""
        return self.cpu + self.blocked


@dataclass
class Setup:
    request: BuildRequest
    records: list
    hashes: list[str]
    teacher: SimulatedTeacher
    tokens: int
    plan: BuildPlan = field(init=False)


def build_once(setup: Setup, coding: str, out: Path, background: bool) -> Run:
    """One build of every shard through run_jobs, then the seal; the cache at ``out``."""
    req = BuildRequest(**{**setup.request.__dict__, "value_coding": coding, "out": str(out)})
    sig = req.signal_config()
    inputs = key_inputs(teacher={"name": "simulated"}, tokenizer_hash="bench", template_hash="bench",
                        dataset_fingerprint="bench", signals=sig)
    build = CacheBuild(Location.from_url(req.out), inputs, {"name": "simulated"}, sig)
    build.start(setup.plan)
    hashes = dict(zip((r.id for r in setup.records), setup.hashes))
    jobs = [shard_mod.ShardJob(asdict_request(req), "simulated", build.location.url, build.inputs, build.teacher, i,
                               ids, [hashes[s] for s in ids]) for i, ids in enumerate(setup.plan.shards)]
    teacher = setup.teacher
    teacher.spans.clear()
    teacher.cpu = 0.0
    before = COMMITS.stats()
    with Timers() as timers:
        t0, c0 = time.perf_counter(), time.thread_time()
        fanout.run_jobs(jobs, background=background)
        t1, cpu = time.perf_counter(), time.thread_time() - c0 - teacher.cpu
    build.seal("bench")
    seal = time.perf_counter() - t1
    spans = teacher.spans
    busy = sum(s for _, _, s in spans)  # what the teacher was to take: a capture slowed by kd counts as kd's
    blocked = COMMITS.stats()["wait_s"] - before["wait_s"]
    waited = blocked if background else timers.total["commit"]
    return Run(t1 - t0, busy, (spans[-1][1] - spans[0][0]) - busy, t1 - spans[-1][1], timers.total["add"],
               timers.total["_assemble"], timers.total["commit"], waited, cpu, blocked, seal,
               build.location.path)


def shard_files(path: str) -> list[dict[str, tuple[int, str]]]:
    return [{n: (f.size, f.xxh3_128) for n, f in e.files.items()} for e in CacheReader(path).manifest.shards]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000, help="answer tokens of the whole build")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--codings", default="u8,bf16", help="value codings, comma-separated")
    ap.add_argument("--teacher-us", type=float, default=100.0, help="simulated teacher time per answer token (us)")
    ap.add_argument("--teacher", choices=("sleep", "spin"), default="sleep",
                    help="sleep: the GIL free, as a GPU teacher waiting on its device; spin: a CPU teacher holding it")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard (about: shards are made equal)")
    ap.add_argument("--batch-size", type=int, default=8, help="samples per engine.capture call")
    ap.add_argument("--prompt-tokens", type=int, default=1600, help="prompt length of each sample (its input ids)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kd-bench-writer-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    t0 = time.perf_counter()
    data, outputs = make_data(work, args.tokens, args.k, args.vocab, args.prompt_tokens, args.seed)
    records = load_records(data, check_images=False)
    teacher = SimulatedTeacher(outputs, args.teacher_us, args.teacher)
    request = BuildRequest(teacher=str(work / "teacher"), data=str(data), out="", engine="simulated", top_k=args.k,
                           batch_size=args.batch_size)
    warm_key = ("simulated", str(Path(request.teacher).resolve()), request.device, request.dtype, ())
    shard_mod._WARM_ENGINES[warm_key] = teacher  # the key shard.warm_engine looks up: no model is loaded
    setup = Setup(request, records, fingerprint_and_hashes(records)[1], teacher, args.tokens)
    n_shards = max(1, round(len(records) / args.shard_size))
    per = -(-len(records) // n_shards)
    setup.plan = BuildPlan.from_ids([r.id for r in records], per)
    codings = [c for c in args.codings.replace(" ", "").split(",") if c]
    warm = Setup(request, records[: args.batch_size], setup.hashes[: args.batch_size], teacher, 0)
    warm.plan = BuildPlan.from_ids([r.id for r in warm.records], args.batch_size)
    for coding in codings:  # imports, zarr and the codecs' first calls: not timed
        build_once(warm, coding, work / "warm", True)
    prep = time.perf_counter() - t0
    runs: dict[tuple[str, str], list[Run]] = {}
    same: dict[str, bool] = {}
    for rnd in range(args.repeats):
        for coding in codings:
            for row, background in (("s", False), ("o", True)):
                out = work / f"{coding}-{row}-{rnd}"
                runs.setdefault((coding, row), []).append(build_once(setup, coding, out, background))
            if rnd == 0:
                same[coding] = shard_files(runs[coding, "s"][0].path) == shard_files(runs[coding, "o"][0].path)
            for row in ("s", "o"):  # keep the disk small: the first round's caches were compared
                shutil.rmtree(work / f"{coding}-{row}-{rnd}", ignore_errors=True)
        walls = [f"{c} (s) {runs[c, 's'][-1].wall:.2f}s (o) {runs[c, 'o'][-1].wall:.2f}s" for c in codings]
        print(f"  round {rnd + 1}: " + "  ".join(walls), file=sys.stderr, flush=True)
    report(args, len(records), setup.plan, runs, same, codings, prep)
    return 0 if all(same.values()) else 1


def report(args, n_samples: int, plan: BuildPlan, runs, same, codings, prep: float) -> None:
    us = 1e6 / args.tokens
    sizes = sorted({len(s) for s in plan.shards})
    print(f"\nwriter overlap benchmark: vocab {args.vocab:,}, k={args.k}, {args.tokens:,} answer tokens "
          f"({n_samples:,} samples of 20-40 tokens after {args.prompt_tokens}-token prompts), {len(plan.shards)} "
          f"shards of {'/'.join(map(str, sizes))} samples, batches of {args.batch_size}; simulated teacher "
          f"{args.teacher} {args.teacher_us:g} us/token; median of {args.repeats} rounds; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; data + warm-up {prep:.1f}s")
    print(f"{'':6} {'row':15} {'teacher s':>9} {'kd critical':>11} {'= gaps':>7} {'+ tail':>7} {'cpu+wait':>8}  "
          f"{'add':>5} {'encode':>6} {'commit':>6} {'hidden':>6}  {'seal s':>6}   (us per answer token)")
    for coding in codings:
        for row, label in (("s", "(s) sequential"), ("o", "(o) overlapped")):
            rs = runs[coding, row]
            med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
            hidden = statistics.median(1 - r.waited / r.commit for r in rs)
            print(f"{coding:6} {label:15} {med(lambda r: r.teacher):9.2f} {med(lambda r: r.critical) * us:11.2f} "
                  f"{med(lambda r: r.gaps) * us:7.2f} {med(lambda r: r.tail) * us:7.2f} "
                  f"{med(lambda r: r.on_thread) * us:8.2f}  "
                  f"{med(lambda r: r.add) * us:5.2f} "
                  f"{med(lambda r: r.encode) * us:6.2f} {med(lambda r: r.commit) * us:6.2f} {hidden:6.0%}  "
                  f"{med(lambda r: r.seal):6.2f}")
    print()
    for coding in codings:
        s, o = runs[coding, "s"], runs[coding, "o"]
        ratio = statistics.median(b.critical / a.critical for a, b in zip(s, o))
        crit = statistics.median(r.critical for r in o) * us
        gaps = statistics.median(r.gaps for r in o) * us
        thread = statistics.median(r.on_thread for r in o) * us
        print(f"  {coding}: (o)/(s) kd critical path = {ratio:.2f} (paired median); (o) {crit:.2f} us/token "
              f"({gaps:.2f} between captures; cpu+wait {thread:.2f})   target <= {TARGET_US:g} us/token: "
              f"{'PASS' if crit <= TARGET_US else 'MISS'}")
        print(f"  {coding}: same cache bytes (o) == (s): {same[coding]}")


if __name__ == "__main__":
    raise SystemExit(main())
