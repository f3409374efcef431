"""`kd demo --quick` end to end: report files and structure, then a second run that reuses everything teacher-side.

The quick mode runs one seed (SFT vs multi-teacher KD only), so its numbers are a smoke test; the test
checks structure and ranges, not which student wins.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.pipeline.demo import PLANS, run_demo
from kd.pipeline.demo.report import CAPABILITIES, METRICS

pytestmark = pytest.mark.slow  # about a minute and a half for both runs on 2 CPU cores


def _check_scores(scores: dict) -> None:
    assert set(scores) >= set(METRICS)
    for m in METRICS:
        assert 0.0 <= scores[m] <= 1.0, (m, scores[m])


def _check_report(work: Path, doc: dict) -> None:
    plan = PLANS["quick"]
    assert doc["mode"] == "quick" and doc["seeds"] == list(plan.seeds) and doc["n_seeds"] == len(plan.seeds)
    assert "seed" in doc["seeds_note"]
    models = doc["models"]
    for key in ("majority", "teacher_untrained", "teacher", "sft", "kd"):
        assert key in models, key
        m = models[key]
        _check_scores(m["mean"])
        assert set(m["std"]) == set(METRICS)
        assert m["n_seeds"] >= 1
    for key in ("sft", "kd"):
        per_seed = models[key]["per_seed"]
        assert sorted(int(s) for s in per_seed) == list(plan.seeds)
        for scores in per_seed.values():
            _check_scores(scores)
    # The teacher must be clearly better than its untrained init.
    assert models["teacher"]["mean"]["average"] > models["teacher_untrained"]["mean"]["average"] + 0.1
    assert set(doc["caches"]) == set(CAPABILITIES)
    assert doc["kd_vs_sft"]["variant"] == "kd" and set(doc["kd_vs_sft"]["delta_vs_sft"]["mean"]) == set(METRICS)
    assert doc["conclusion"] and all(isinstance(line, str) for line in doc["conclusion"])
    curves = doc["curves"]
    assert curves["teacher"]["train"] and curves["teacher"]["val"]
    for v in ("sft", "kd"):
        assert curves["students"][v]["train_ce"] and curves["students"][v]["val_average"]
    for key in ("data", "teacher", "caches", "students", "total"):
        assert doc["timings"][key] >= 0
    md = (work / "report.md").read_text()
    for heading in ("## Experiment design", "## Results", "## Training curves", "## Reuse and timings", "## Caches"):
        assert heading in md
    assert "| student SFT (CE only) |" in md and "| student multi-teacher KD (all signals) |" in md
    assert (work / doc["files"]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_then_reuse(tmp_path, monkeypatch):
    work = tmp_path / "demo"
    lines: list[str] = []
    first = run_demo(work, quick=True, log=lines.append)
    assert (work / "report.md").is_file() and (work / "report.json").is_file()
    doc = json.loads((work / "report.json").read_text())
    _check_report(work, doc)
    assert doc["reuse"]["teacher"] is False and not any(doc["reuse"]["caches"].values())
    assert doc["timings"]["teacher"] > 0
    assert first.to_dict()["report"]["markdown"] == "report.md"
    assert any("test accuracy" in line for line in lines)  # the printed table
    teacher_dir = Path(doc["teacher"]["path"])
    weights = {p.name: p.stat().st_mtime_ns for p in teacher_dir.glob("*.safetensors")}
    cache_paths = {r: c["path"] for r, c in doc["caches"].items()}

    # Second run, through the CLI: no teacher may run (training and engines are booby-trapped).
    import kd.pipeline.demo.teacher as demo_mod
    from kd.pipeline.build import engines

    def boom(*args, **kwargs):
        raise AssertionError("a teacher ran on the second demo run")

    monkeypatch.setattr(demo_mod, "train_supervised", boom)
    monkeypatch.setattr(engines, "load_engine", boom)
    from typer.testing import CliRunner

    from kd.cli import app

    res = CliRunner().invoke(app, ["demo", "--workdir", str(work), "--quick", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["mode"] == "quick" and all(c["reused"] for c in summary["caches"].values())
    doc2 = json.loads((work / "report.json").read_text())
    _check_report(work, doc2)
    assert doc2["reuse"]["teacher"] is True and doc2["reuse"]["no_teacher_ran"] is True
    assert all(doc2["reuse"]["caches"].values())
    assert doc2["timings"]["teacher"] == 0.0
    assert {r: c["path"] for r, c in doc2["caches"].items()} == cache_paths
    assert {p.name: p.stat().st_mtime_ns for p in teacher_dir.glob("*.safetensors")} == weights
    # The reused teacher's scores and training time come from the run that trained it.
    assert doc2["models"]["teacher"]["mean"] == doc["models"]["teacher"]["mean"]
    assert doc2["timings"]["teacher_original_train_seconds"] == doc["timings"]["teacher_original_train_seconds"]
    assert "ran no teacher at all" in (work / "report.md").read_text()
