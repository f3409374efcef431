"""Bad input fails early and clearly: each error names the sample, option, file or entry at fault,
leaves nothing half-written (no cache directory, no run directory) and reaches the CLI as one
line with a non-zero exit and no traceback.

Covered elsewhere: bad JSON line, missing field, duplicate id, missing / unreadable / zero-byte
image, non-UTF-8 text and empty answer (test_dataset.py, test_build.py), unknown engine and
teacher directory without weights (test_build.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kd.cache_schema import CacheReader, SchemaVersionError
from kd.cli import app
from kd.pipeline.build import BuildRequest, build_cache, prepare
from kd.pipeline.common.dataset import load_records
from kd.pipeline.distill import AlignmentError, DistillDataset, load_config, open_teachers
from kd.pipeline.common.encoding import encode_record
from kd.pipeline.build.engines.base import SignalSpec
from kd.pipeline.build.engines.limits import check_top_k, engine_limits, sequence_lengths
from kd.pipeline.common.model_files import load_config_and_processor
from kd.pipeline.distill.mixing import check_capabilities, resolve_mixing
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset

ROLES = ["perception", "reasoning", "planning"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny VLM teacher, two students (same / other tokenizer), 3 synthetic scenes and one cache."""
    d = tmp_path_factory.mktemp("bad_input")
    synthesize(d / "data", 3, seed=0, splits=(1.0, 0.0, 0.0))
    teacher = build_preset("vlm", "student", d / "teacher", seed=1)
    build_preset("vlm", "student", d / "student", seed=2)
    build_preset("vlm", "student", d / "student-tok1", seed=2, tokenizer_seed=1)
    cache = build_cache(BuildRequest(teacher=str(teacher), data=str(d / "data" / "train.jsonl"), out=str(d / "caches"),
                                     engine="hf", top_k=4, value_coding="fp32", shard_size=16)).path
    return {"root": d, "teacher": teacher, "data": d / "data" / "train.jsonl", "cache": cache}


def request(world: dict, out: Path, **kw) -> BuildRequest:
    base = dict(teacher=str(world["teacher"]), data=str(world["data"]), out=str(out), engine="hf", top_k=4,
                value_coding="fp32", shard_size=16)
    base.update(kw)
    return BuildRequest(**base)


def one_line_error(res) -> str:
    """The CLI failed cleanly: exit 2, one 'error:' line, no traceback (transformers' load bar aside)."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


# ----------------------------------------------------------------------------- stage one


def long_answer_data(world: dict, index: int = 1, words: int = 400) -> tuple[Path, str]:
    """The dataset with one answer far beyond the tiny teacher's 1024 positions (beside its images)."""
    lines = world["data"].read_text().splitlines()
    rec = json.loads(lines[index])
    rec["answer"] = "left lane change " * words
    lines[index] = json.dumps(rec)
    path = world["data"].with_name("long.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path, rec["id"]


def test_context_lengths_are_what_the_engine_encodes(world):
    _, processor = load_config_and_processor(world["teacher"])
    records = load_records(world["data"])
    for rec, (prompt, image, answer) in zip(records, sequence_lengths(processor, records), strict=True):
        enc = encode_record(processor, rec.as_dict())
        assert prompt + image + answer == len(enc.input_ids) and answer == len(enc.answer_ids), rec.id
        assert image >= int(enc.image_token_mask.sum()) > 0


def test_answer_longer_than_the_context_is_refused_before_any_cache_dir(world, tmp_path):
    data, sid = long_answer_data(world)
    out = tmp_path / "caches"
    with pytest.raises(ValueError) as err:
        build_cache(request(world, out, data=str(data)))
    msg = str(err.value)
    assert f"'{sid}'" in msg and "long.jsonl:2" in msg and "context of 1024 tokens" in msg
    assert "prompt " in msg and "+ answer " in msg and str(world["teacher"]) in msg
    assert not out.exists()
    # A vLLM max_model_len below the model's own limit is the limit that counts.
    with pytest.raises(ValueError, match=r"context of 64 tokens .*max_model_len=64"):
        prepare(request(world, out, engine="vllm", engine_options={"max_model_len": 64}))
    assert not out.exists()


def test_top_k_larger_than_the_vocabulary_is_refused_before_any_cache_dir(world, tmp_path):
    config, _ = load_config_and_processor(world["teacher"])
    vocab = config.get_text_config().vocab_size
    out = tmp_path / "caches"
    with pytest.raises(ValueError, match=rf"--top-k {vocab + 1} .*vocabulary has {vocab} tokens.*--top-k <= {vocab}"):
        build_cache(request(world, out, top_k=vocab + 1))
    assert not out.exists()
    check_top_k(SignalSpec(top_k=vocab), engine_limits("hf", config))  # k = vocab is allowed


def test_vllm_max_logprobs_bounds_top_k_and_sampling(world):
    config, _ = load_config_and_processor(world["teacher"])
    limits = engine_limits("vllm", config, {"max_logprobs": 20}, where="teacher t")
    check_top_k(SignalSpec(top_k=20), limits)
    with pytest.raises(ValueError, match=r"--top-k 21 .*vllm engine.*max_logprobs=20 .*teacher t"):
        check_top_k(SignalSpec(top_k=21), limits)
    with pytest.raises(ValueError, match="--logits sampled needs the full vocabulary"):
        check_top_k(SignalSpec(logits="sampled", top_k=5), limits)
    check_top_k(SignalSpec(logits="sampled"), engine_limits("vllm", config, {"max_logprobs": -1}))


def test_cli_build_errors_are_one_line_and_write_nothing(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "caches"
    base = ["cache", "build", "--teacher", str(world["teacher"]), "--out", str(out), "--engine", "hf"]
    line = one_line_error(runner.invoke(app, base + ["--data", str(world["data"]), "--top-k", "100000"]))
    assert "--top-k 100000" in line and "vocabulary" in line
    data, sid = long_answer_data(world, index=2)
    line = one_line_error(runner.invoke(app, base + ["--data", str(data), "--top-k", "4"]))
    assert sid in line and "context" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- caches


def test_cache_of_another_schema_version_is_refused_naming_the_file(world, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    manifest = cache / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["schema_version"] = 7
    manifest.write_text(json.dumps(doc))
    with pytest.raises(SchemaVersionError) as err:
        CacheReader(str(cache))
    msg = str(err.value)
    assert str(manifest) in msg and "schema_version 7 found" in msg and "reads schema_version 1, 2, 3" in msg
    line = one_line_error(CliRunner().invoke(app, ["cache", "inspect", str(cache)]))
    assert "manifest.json" in line and "schema_version 7" in line
    # An unfinished build of another version is refused too, naming its plan.
    manifest.unlink()
    plan = json.loads((cache / "plan.json").read_text())
    plan["key_inputs"]["schema_version"] = 8
    (cache / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SchemaVersionError, match=r"plan\.json: cache schema_version 8 found"):
        CacheReader(str(cache), allow_unsealed=True)


def test_manifest_records_what_a_student_checks(world):
    teacher = CacheReader(world["cache"]).manifest.teacher
    assert len(teacher["vocab_sha256"]) == 64 and len(teacher["tokenizer_sha256"]) == 64
    assert teacher["num_layers"] == 2


# ----------------------------------------------------------------------------- stage two


def test_student_with_another_tokenizer_is_named_with_both_hashes(world):
    from kd.pipeline.distill.student import load_student

    _, processor = load_student(world["root"] / "student-tok1")
    sources = open_teachers({"perception": world["cache"]}, {}, processor)
    with pytest.raises(AlignmentError) as err:
        DistillDataset(load_records(world["data"]), processor, sources)
    msg = str(err.value)
    named = re.match(r"sample '([^']+)': the student tokenizer", msg)
    assert named and named.group(1) in {r.id for r in load_records(world["data"])}
    assert f"cache {world['cache']}" in msg and "first mismatching sample" in msg
    assert "student-tok1" in msg and msg.count("vocab_sha256") == 2 and "vocab_maps.perception" in msg
    # The same tokenizer (another student) aligns.
    _, same = load_student(world["root"] / "student")
    DistillDataset(load_records(world["data"]), same, open_teachers({"perception": world["cache"]}, {}, same))


def distill_args(world: dict, out: Path, student: str = "student", roles: tuple[str, ...] = tuple(ROLES)) -> list[str]:
    """``kd distill`` with one cache serving every role (the checks under test do not care)."""
    teachers = [a for role in roles for a in ("--teacher", f"{role}={world['cache']}")]
    return ["distill", "--student", str(world["root"] / student), "--data", str(world["data"]), *teachers,
            "--out", str(out), "--quiet", "--set", "train.max_steps=1"]


def test_cli_distill_errors_fail_before_training_and_write_no_run(world, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    line = one_line_error(runner.invoke(app, distill_args(world, out, "student-tok1")))
    assert "tokenizer" in line and world["cache"] in line
    line = one_line_error(runner.invoke(app, distill_args(world, out) + [
        "--set", "loss.mixing_matrix={perception: {perception: 1}, reasoning: {reasoning: 1}, planing: {planning: 1}}"]))
    assert "loss.mixing_matrix" in line and "'planing'" in line
    line = one_line_error(runner.invoke(app, distill_args(world, out) + [
        "--set", "loss.mixing_matrix=[[1, 0, 0], [0, 1, 0], [0, 0, 0]]"]))
    assert "row 'reasoning'" in line or "row 'planning'" in line
    assert "all zeros" in line
    # Only two teachers: the data's 'reasoning' samples have no mixing row.
    line = one_line_error(runner.invoke(app, distill_args(world, out, roles=("perception", "planning"))))
    assert "'reasoning'" in line and "unknown_capability" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- mixing matrices


@pytest.mark.parametrize("spec, match", [
    ({"perception": {"perception": 1}, "reasoning": {"reasoning": 1}, "Planning": {"planning": 1}},
     r"rows \['Planning'\] name no teacher role"),
    ({"perception": {"perception": 1}, "reasoning": {"reasoning": 1}, "planning": {"driving": 1}},
     r"row 'planning' names teachers \['driving'\]"),
    ({"perception": {"perception": 1}, "reasoning": {"reasoning": 1}}, r"no row for capabilities \['planning'\]"),
    ([[1, 0, 0], [0, 1, 0]], r"2 row\(s\) of length\(s\) \[3, 3\] but there are 3 teachers"),
    ([[1, 0], [0, 1], [0, 1]], r"3 row\(s\) of length\(s\) \[2, 2, 2\]"),
    ([[1, 0, 0], [0, 1.5, -0.5], [0, 0, 1]], r"\[capability 'reasoning', teacher 'planning'\] = -0.5 is negative"),
    ([[1, 0, 0], [0, 1, 0], [0, 0, float("inf")]], r"\[capability 'planning', teacher 'planning'\] = inf is not finite"),
    ([[1, 0, 0], [0, 0, 0], [0, 0, 1]], r"row 'reasoning' is all zeros"),
    ([[1, 0, 0], [0, 0.5, 0], [0, 0, 1]], r"sum to 1.*'reasoning', 0.5"),
    ({"perception": {"perception": "x"}, "reasoning": {"reasoning": 1}, "planning": {"planning": 1}},
     r"\[capability 'perception', teacher 'perception'\] must be a number"),
])
def test_mixing_matrix_errors_name_the_entry(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_mixing(spec, ROLES)


def test_named_mixing_matrix_fills_absent_entries_with_zero():
    m = resolve_mixing({"planning": {"planning": 1}, "perception": {"perception": 0.5, "planning": 0.5},
                        "reasoning": {"reasoning": 1}}, ROLES)
    assert m.tolist() == [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert resolve_mixing(m.tolist(), ROLES).tolist() == m.tolist()


def test_capabilities_without_a_teacher_are_refused_unless_uniform():
    with pytest.raises(ValueError, match=r"'Planning' \(2 sample\(s\)\) in d\.jsonl have no teacher"):
        check_capabilities(["perception", "Planning", "Planning"], ROLES, source="d.jsonl")
    check_capabilities(["Planning"], ROLES, "uniform")
    check_capabilities(ROLES, ROLES)


def test_config_rejects_a_mixing_matrix_that_does_not_fit_the_teachers():
    kw = dict(student="s", data="d", out="o", teachers={"perception": "/c/p", "planning": "/c/l"})
    with pytest.raises(ValueError, match=r"loss\.mixing_matrix: .*\[capability 'planning', teacher 'perception'\]"):
        load_config(None, ["loss.mixing_matrix=[[1, 0], [-1, 2]]"], **kw)
    cfg = load_config(None, ["loss.mixing_matrix={perception: {perception: 1}, planning: {planning: 1}}"], **kw)
    assert cfg.loss.mixing_matrix == {"perception": {"perception": 1.0}, "planning": {"planning": 1.0}}

