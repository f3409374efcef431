"""`kd distill` under `accelerate launch` with 2 CPU processes (gloo DDP) against the same run in one process.

Both runs train the same tiny student on the same cache with the same seed and the same global batch
(batch_size 1: one process accumulates 4 micro-batches per step, each of the 2 ranks accumulates 2).
They see the same micro-batches per step (see ``kd/pipeline/distill/train.py``), so their loss curves
may differ only by float summation order: the DDP gradient is an all-reduced mean of two partial sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distill_helpers import build_test_cache

from kd.pipeline.build.engines import SignalSpec
from kd.pipeline.demo.synth import synthesize
from kd.pipeline.demo.tiny_models import build_preset

STEPS = 3
GLOBAL_ACCUM = 4
# Float32 forward/backward on either side; the only difference is the order in which the four
# micro-batch gradients are summed (DDP: two per rank, then an all-reduce mean). Measured: relative
# loss differences of 0, 5e-8, 3e-8 at steps 1-3. A change in what is trained shows far above the
# tolerance: the single run with lr 1% higher (3.03e-3) differs by 1.5e-4 at step 2 and 1e-3 at step 3.
RTOL = 1e-5

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
          "-m", "kd.cli"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny teacher cache (top-k 8 + hidden layer 2) of 12 synthetic records and a student sharing its tokenizer."""
    root = tmp_path_factory.mktemp("ddp")
    teacher = build_preset("vlm", "teacher", root / "teacher")
    student = build_preset("vlm", "student", root / "student")
    data = synthesize(root / "data", 4, seed=3, splits=(1.0, 0.0, 0.0))["train"]
    cache = build_test_cache(teacher, data, root / "caches", SignalSpec(top_k=8, hidden_layers=(2,)))
    return {"root": root, "student": student, "data": data, "cache": cache}


def _env() -> dict[str, str]:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(var, None)  # a launcher around pytest must not leak into the runs
    return env


def _distill(prefix: list[str], world: dict, out: Path, grad_accum: int) -> list[dict]:
    args = [*prefix, "distill", "--student", str(world["student"]), "--data", str(world["data"]),
            "--teacher", f"perception={world['cache']}", "--out", str(out), "--quiet",
            "--set", "train.batch_size=1", "--set", f"train.grad_accum={grad_accum}",
            "--set", f"train.max_steps={STEPS}", "--set", "train.lr=3e-3", "--set", "train.warmup_steps=0",
            "--set", "train.mixed_precision=no", "--set", "train.log_samples=true", "--set", "train.seed=7"]
    env = {**_env(), "TMPDIR": str(out.parent)}  # torchrun's torchelastic_* folders stay in the test's tmp
    proc = subprocess.run(args, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def test_two_process_ddp_matches_the_single_process_run(world):
    single = _distill([sys.executable, "-m", "kd.cli"], world, world["root"] / "run-1p", GLOBAL_ACCUM)
    ddp = _distill(LAUNCH, world, world["root"] / "run-2p", GLOBAL_ACCUM // 2)

    assert [r["step"] for r in single] == [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    assert all(r["num_processes"] == 1 for r in single)
    assert all(r["num_processes"] == 2 for r in ddp), [r["num_processes"] for r in ddp]
    for a, b in zip(single, ddp):
        # Same global batch: 4 samples; the two ranks read disjoint halves whose union is the single run's batch.
        (ids,) = a["sample_ids"]
        rank0, rank1 = b["sample_ids"]
        assert a["samples"] == b["samples"] == GLOBAL_ACCUM and len(rank0) == len(rank1) == GLOBAL_ACCUM // 2
        assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == sorted(ids), (a["step"], ids, rank0, rank1)
        assert a["answer_tokens"] == b["answer_tokens"]
    # The steps over 12 records cover every sample once (3 steps x 4): the sharding drops and repeats none.
    assert sorted(i for r in single for i in r["sample_ids"][0]) == sorted(
        json.loads(line)["id"] for line in Path(world["data"]).read_text().splitlines())

    la, lb = [r["loss"] for r in single], [r["loss"] for r in ddp]
    assert lb == pytest.approx(la, rel=RTOL), (la, lb)
    for name in single[-1]["terms"]:
        assert ddp[-1]["terms"][name] == pytest.approx(single[-1]["terms"][name], rel=RTOL, abs=1e-6), name


def test_resume_refuses_another_process_count(tmp_path):
    from kd.pipeline.distill.launch import check_world_size

    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "num_processes": 2}))
    check_world_size(tmp_path, 2)
    with pytest.raises(ValueError, match="2 process"):
        check_world_size(tmp_path, 1)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2}))  # written before the field existed
    check_world_size(tmp_path, 1)


def test_yaml_no_reads_as_the_string_for_choice_fields():
    from kd.pipeline.distill import load_config

    cfg = load_config(None, ["train.mixed_precision=no", "train.log_samples=yes"], student="s", data="d", out="o",
                      teachers={"perception": "c"})
    assert cfg.train.mixed_precision == "no" and cfg.train.log_samples is True


def test_a_cpu_launch_that_started_one_process_warns_with_the_working_command(monkeypatch):
    from types import SimpleNamespace

    from kd.pipeline.distill.launch import warn_single_cpu_launch

    for var in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    warn_single_cpu_launch(SimpleNamespace(num_processes=1))  # a plain run: silent
    # What `accelerate launch --cpu --num_processes 2` leaves in the one process it starts:
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="--multi_gpu"):
        warn_single_cpu_launch(SimpleNamespace(num_processes=1))
