"""The CLI's surface: every command documented, bad arguments give clear errors (exit 2)."""

from typer.testing import CliRunner

from kd.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("cache", "data", "models", "distill", "eval", "demo"):
        assert command in res.output
    res = runner.invoke(app, ["cache", "--help"])
    for command in ("build", "inspect", "verify", "ls"):
        assert command in res.output


def test_eval_refuses_non_model_dir(tmp_path):
    res = runner.invoke(app, ["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "config.json" in res.output


def test_distill_rejects_malformed_teacher(tmp_path):
    res = runner.invoke(app, ["distill", "--teacher", "perception", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "ROLE=CACHE" in res.output


def test_build_needs_inputs():
    res = runner.invoke(app, ["cache", "build"])
    assert res.exit_code == 2 and "--teacher" in res.output


def test_inspect_of_missing_cache(tmp_path):
    res = runner.invoke(app, ["cache", "inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope" in res.output


def test_verify_of_missing_cache_fails(tmp_path):
    res = runner.invoke(app, ["cache", "verify", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "nope" in res.output
