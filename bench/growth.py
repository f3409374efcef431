"""Growth benchmark: what +10% records cost when the build grows the existing cache, against a full rebuild.

    python bench/growth.py [--records 400] [--growth 0.1] [--batch-size 8] [--keep DIR]

A tiny local VLM teacher (``build_preset("vlm", "teacher")``), synthetic scenes
(``kd.pipeline.demo.synth.synthesize``), the hf engine, top-16 fp16 log-probs and one hidden
layer. First a cache of the first ``records`` records is built (this also warms the engine), then
the dataset grown by ``growth`` is built twice in one process, with the same warm engine:

* **grow**: under the same root, so the build finds the first cache and writes a child cache of
  the new records only (``reuse``, the default);
* **full**: under a root of its own with ``reuse=False``, every record captured again.

Teacher time is the wall time inside the engine's ``capture`` (what the teacher costs); build time
is all of ``build_cache`` (hashing the dataset and teacher files, planning, writing, sealing).
The self-check is off in both (its reference forwards would add to each). Prints per row the samples
captured, teacher and build seconds and bytes on disk, then the ratio lines grow / full, and the
largest difference between the chain and the full cache over every sample (batches of other
samples round the last bits differently; it is 0 with ``--batch-size 1``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def cache_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=400, help="records of the first dataset")
    ap.add_argument("--growth", type=float, default=0.1, help="records added, as a fraction of --records")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir, removed)")
    args = ap.parse_args()

    from kd.cache_schema import CacheReader
    from kd.pipeline.build import BuildRequest, build_cache
    from kd.pipeline.build import shard as shard_mod
    from kd.pipeline.demo.synth import synthesize
    from kd.pipeline.demo.tiny_models import build_preset

    work = args.keep or Path(tempfile.mkdtemp(prefix="kd-bench-growth-"))
    added = max(1, round(args.records * args.growth))
    total = args.records + added
    try:
        synthesize(work / "data", -(-total // 3), seed=0, splits=(1.0, 0.0, 0.0))  # 3 records per scene
        lines = (work / "data" / "train.jsonl").read_text().splitlines()[:total]
        (work / "data" / "base.jsonl").write_text("\n".join(lines[: args.records]) + "\n")
        (work / "data" / "grown.jsonl").write_text("\n".join(lines) + "\n")
        teacher = build_preset("vlm", "teacher", work / "teacher")

        def req(data: str, out: str, **kw) -> BuildRequest:
            return BuildRequest(teacher=str(teacher), data=str(work / "data" / f"{data}.jsonl"), out=str(work / out),
                                engine="hf", top_k=16, value_coding="fp16", hidden_layers=(2,), self_check=False,
                                batch_size=args.batch_size, shard_size=args.shard_size, **kw)

        engine = shard_mod.warm_engine(req("base", "caches"), "hf")
        teacher_s = [0.0]
        captured = [0]
        original = engine.capture

        def timed_capture(records, spec):
            t = time.perf_counter()
            try:
                return original(records, spec)
            finally:
                teacher_s[0] += time.perf_counter() - t
                captured[0] += len(records)

        engine.capture = timed_capture

        def run(data: str, out: str, **kw) -> dict:
            teacher_s[0], captured[0] = 0.0, 0
            t = time.perf_counter()
            res = build_cache(req(data, out, **kw))
            return {"path": res.path, "build_s": time.perf_counter() - t, "teacher_s": teacher_s[0],
                    "captured": captured[0], "bytes": cache_bytes(res.path), "parent": res.parent,
                    "samples": res.samples}

        base = run("base", "caches")
        grow = run("grown", "caches")
        full = run("grown", "full", reuse=False)
        assert grow["parent"] == Path(base["path"]).name, "the grown build did not find the first cache"
        assert full["parent"] is None and grow["samples"] == full["samples"] == total

        print(f"dataset: {args.records} records, then +{added} ({added / args.records:.0%}) = {total}; "
              f"tiny VLM teacher, hf engine, batch {args.batch_size}, shards of {args.shard_size}")
        for name, row in (("first", base), ("grow", grow), ("full", full)):
            print(f"  {name:5s}: captured {row['captured']:5d} samples, teacher {row['teacher_s']:7.2f} s, "
                  f"build {row['build_s']:7.2f} s, {row['bytes'] / 1e6:8.3f} MB on disk")
        print(f"grow/full teacher time {grow['teacher_s'] / full['teacher_s']:.3f}x "
              f"(samples captured {grow['captured'] / full['captured']:.3f}x)")
        print(f"grow/full build time {grow['build_s'] / full['build_s']:.3f}x")
        print(f"grow/full bytes written {grow['bytes'] / full['bytes']:.3f}x")

        chain, flat = CacheReader(grow["path"]), CacheReader(full["path"])
        ids = flat.sample_ids
        same_ids = sorted(chain.sample_ids) == sorted(ids)
        worst = 0.0
        for i in range(0, len(ids), 64):
            a, b = chain.get_batch(ids[i : i + 64]), flat.get_batch(ids[i : i + 64])
            same_ids = same_ids and np.array_equal(a.target_ids, b.target_ids)
            worst = max(worst, float(np.max(np.abs(a.logprobs - b.logprobs))),
                        float(np.max(np.abs(a.hidden[2] - b.hidden[2]))))
        print(f"chain vs full: same samples and targets {same_ids}, max |difference| {worst:.2e} "
              f"(log-probs and hidden states over {len(ids)} samples)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
