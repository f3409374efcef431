"""`kd demo`: the whole pipeline on a tiny built-in example, from nothing, on CPU.

Synthetic driving scenes -> tiny teacher VLMs -> one cache per capability teacher -> inspect
and verify. Running it again reuses every cache (no teacher runs) and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kd.cache_schema import CacheReader, verify_cache

from .build import BuildRequest, build_cache
from .synth import synthesize
from .tiny_models import build_preset

# One teacher per Drive-KD capability, each with the signals Drive-KD distils for it.
ROLE_SIGNALS: dict[str, dict[str, Any]] = {
    "perception": {"attention_layers": (0,), "attention_kind": "t2v"},
    "reasoning": {"attention_layers": (1, 2), "attention_kind": "full", "hidden_layers": (2,)},
    "planning": {"attention_layers": (2,), "attention_kind": "t2v"},
}


@dataclass
class DemoResult:
    workdir: str
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"workdir": self.workdir, "caches": self.caches, "seconds": round(self.seconds, 2)}


def run_demo(workdir: str | Path, *, quick: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_scenes = 60 if quick else 600
    data_dir = work / "data"
    if not (data_dir / "train.jsonl").exists():
        log(f"synthesizing {n_scenes} driving scenes -> {data_dir}")
        synthesize(data_dir, n_scenes, seed=0)
    result = DemoResult(str(work))
    for i, (role, signals) in enumerate(ROLE_SIGNALS.items()):
        teacher_dir = work / "models" / f"teacher-{role}"
        if not (teacher_dir / "config.json").exists():
            build_preset("vlm", "teacher", teacher_dir, seed=10 + i)
        request = BuildRequest(teacher=str(teacher_dir), data=str(data_dir / "train.jsonl"), out=str(work / "caches"),
                               engine="hf", top_k=16, role=role, shard_size=64, batch_size=8, **signals)
        res = build_cache(request)
        report = verify_cache(res.path)
        summary = CacheReader(res.path).summary()
        state = "reused (no teacher ran)" if res.reused else f"built in {res.seconds:.1f}s"
        log(f"{role:<10} {state}: {res.samples} samples, {res.tokens} tokens, "
            f"{summary['bytes_per_token']} B/token, verify {'OK' if report.ok else 'FAILED'} -> {res.path}")
        if not report.ok:
            raise RuntimeError(f"demo cache failed verification: {report.problems}")
        result.caches[role] = {"path": res.path, "key": res.key, "reused": res.reused, "seconds": round(res.seconds, 2),
                               "samples": res.samples, "tokens": res.tokens, "bytes_per_token": summary["bytes_per_token"]}
    result.seconds = time.perf_counter() - t0
    (work / "demo.json").write_text(json.dumps(result.to_dict(), indent=1))
    return result
