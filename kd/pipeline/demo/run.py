"""`kd demo`: the whole pipeline on a tiny built-in example, from nothing to a report, on CPU.

1. synthesize driving scenes (``kd data synth``) and split the training scenes in two disjoint
   parts: the teacher's (clean answers) and the student's (a fraction of answers corrupted);
2. build a tiny teacher VLM and TRAIN it (plain cross-entropy loop on its part);
3. ``kd cache build`` one cache per capability role (perception / reasoning / planning) from that
   one trained checkpoint, on the student's data, with the hf engine and role-specific signals;
4. ``kd distill`` a smaller student once with CE only (SFT) and with multi-teacher KD (and, in the
   full mode, one signal at a time: the ablation), same student init, data and steps, per seed;
5. ``kd eval`` every model on the held-out test split; write ``report.md``, ``report.json`` and a
   plot of the training curves (``kd.pipeline.demo.report``).

Running it again reuses the data, the trained teacher (checkpoint, curve and scores) and every
cache, so no teacher runs; only the students are trained again, from the caches. The report
says what was reused, with the timings of this run and of the original builds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.cache_schema import CacheReader, verify_cache

from kd.pipeline.build import BuildRequest, build_cache
from kd.pipeline.demo import report as report_mod
from kd.pipeline.demo.report_render import format_table, write_report
from kd.pipeline.demo.plans import PLANS, ROLE_SIGNALS, DemoPlan
from kd.pipeline.demo.util import quiet_progress, torch_threads
from kd.pipeline.demo.students import demo_workers, run_students, student_jobs
from kd.pipeline.demo.teacher import prepare_data, prepare_teacher


@dataclass
class DemoResult:
    workdir: str
    mode: str = "quick"
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        files = {k: self.report.get("files", {}).get(k) for k in ("markdown", "json", "plot")}
        return {"workdir": self.workdir, "mode": self.mode, "caches": self.caches, "seconds": round(self.seconds, 2),
                "report": files, "results": self.report.get("summary", {})}


# ----------------------------------------------------------------------------- helpers


def build_caches(work: Path, plan: DemoPlan, teacher_dir: str, data: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """``kd cache build`` for each role from the one trained teacher, on the student's data."""
    caches = {}
    for role, signals in ROLE_SIGNALS.items():
        request = BuildRequest(teacher=teacher_dir, data=data["paths"]["student_train"], out=str(work / "caches"),
                               engine="hf", top_k=plan.top_k, role=role, shard_size=128, batch_size=16,
                               teacher_name=f"demo-teacher-{plan.mode}", **signals)
        res = build_cache(request)
        report = verify_cache(res.path)
        summary = CacheReader(res.path).summary()
        state = "reused (no teacher ran)" if res.reused else f"built in {res.seconds:.1f}s"
        log(f"cache {role:<10} {state}: {res.samples} samples, {res.tokens} tokens, "
            f"{summary['bytes_per_token']} B/token, verify {'OK' if report.ok else 'FAILED'} -> {res.path}")
        if not report.ok:
            raise RuntimeError(f"demo cache failed verification: {report.problems}")
        caches[role] = {"path": res.path, "key": res.key, "reused": res.reused, "seconds": round(res.seconds, 2),
                        "samples": res.samples, "tokens": res.tokens, "bytes_per_token": summary["bytes_per_token"],
                        "signals": {k: list(v) if isinstance(v, tuple) else v for k, v in signals.items()}}
    return caches


# ----------------------------------------------------------------------------- stage 2: students


def run_demo(workdir: str | Path, *, quick: bool = True, log: Callable[[str], None] = print,
             plan: DemoPlan | None = None, workers: int | None = None) -> DemoResult:
    """Run the demo in ``workdir`` (``quick``: the small mode; ``plan`` overrides the mode's settings)."""

    t0 = time.perf_counter()
    plan = plan or PLANS["quick" if quick else "full"]
    workers = workers or demo_workers()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, Any] = {}
    with torch_threads(1), quiet_progress():
        data = prepare_data(work, plan, log)
        timings["data"] = data["seconds"]
        teacher = prepare_teacher(work, plan, data, log)
        timings["teacher"] = teacher["seconds"]
        t1 = time.perf_counter()
        caches = build_caches(work, plan, teacher["path"], data, log)
        timings["caches"] = round(time.perf_counter() - t1, 2)
        jobs = student_jobs(work, plan, data, caches)
    log(f"training {len(jobs)} students ({len(plan.seeds)} seed(s) x {len(plan.variants)} variants, "
        f"{plan.student_steps} steps each) from the caches in {workers} process(es)")
    t2 = time.perf_counter()
    students = run_students(jobs, workers, log)
    timings["students"] = round(time.perf_counter() - t2, 2)
    result = DemoResult(str(work), mode=plan.mode)
    result.caches = caches
    timings["total_before_report"] = round(time.perf_counter() - t0, 2)
    doc = report_mod.build_report(work, plan=plan, data=data, teacher=teacher, caches=caches, students=students,
                                  timings=timings, workers=workers)
    result.seconds = time.perf_counter() - t0
    doc["timings"]["total"] = round(result.seconds, 2)
    write_report(work, doc)
    result.report = doc
    log(format_table(doc))
    log(f"report: {work / 'report.md'}, {work / 'report.json'}, {work / doc['files']['plot']}")
    (work / "demo.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result
