"""Static checks of docker/ and scripts/gpu_check.sh (no Docker engine or GPU here): the compose file's
structure (scheduler, one single-GPU worker per GPU, shared cache volume), pinned base images, and the
GPU script's syntax and refusal to run without a GPU. Hadolint / shellcheck runs are in the report of
issue #8 (they are not installed in CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_a_scheduler_one_worker_per_gpu_and_a_shared_cache_volume():
    doc = compose()
    services = doc["services"]
    assert "caches" in doc["volumes"]
    sched = services["scheduler"]
    assert sched["entrypoint"][:2] == ["dask", "scheduler"] and "8786:8786" in sched["ports"]
    assert sched["build"]["dockerfile"] == "docker/Dockerfile.gpu" and (DOCKER / sched["build"]["context"]).resolve() == ROOT
    workers = {name: s for name, s in services.items() if name.startswith("worker-gpu")}
    assert workers, "no GPU worker services"
    gpus = []
    for name, w in workers.items():
        cmd = w["entrypoint"]
        assert cmd[:3] == ["dask", "worker", "tcp://scheduler:8786"], name
        assert cmd[cmd.index("--nworkers") + 1] == "1" and cmd[cmd.index("--resources") + 1] == "GPU=1", name
        (dev,) = w["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"] and len(dev["device_ids"]) == 1, name
        assert name == f"worker-gpu{dev['device_ids'][0]}", name
        # The reservation already shows the container only its GPU (as device 0): a CUDA_VISIBLE_DEVICES
        # naming the host index would hide it.
        assert "CUDA_VISIBLE_DEVICES" not in (w.get("environment") or {}), name
        assert "scheduler" in w["depends_on"], name
        gpus.append(dev["device_ids"][0])
    assert len(set(gpus)) == len(gpus), f"two workers share a GPU: {gpus}"
    for name, s in services.items():  # same image and the same paths everywhere (what --scheduler needs)
        assert s["image"] == "kd-gpu:latest", name
        mounts = {re.search(r":(/[^:]+)(:ro|:rw)?$", v).group(1) for v in s["volumes"]}  # source may hold ':'
        assert {"/caches", "/models", "/data"} <= mounts and "caches:/caches" in s["volumes"], name
    assert services["kd"]["profiles"] == ["cli"]


def test_dockerfiles_pin_their_bases_and_install_kd():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
        assert ":" in base and not base.endswith(":latest"), f"{name}: unpinned base {base}"
        assert "COPY kd ./kd" in text and 'ENTRYPOINT ["kd"]' in text, name
        assert "COPY scripts ./scripts" in text and "COPY bench ./bench" in text, name
    cpu = (DOCKER / "Dockerfile.cpu").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.MULTILINE).group(1)
    assert f'"{torch_pin}"' in cpu and "-c constraints-cpu.txt" in cpu  # the Makefile's CPU install
    assert re.search(r"^FROM vllm/vllm-openai:v\d", (DOCKER / "Dockerfile.gpu").read_text(), flags=re.MULTILINE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_gpu_check_script_parses_and_refuses_to_run_without_a_gpu(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "bench/gpu_check.py --device cuda" in script.read_text() and (ROOT / "bench" / "gpu_check.py").exists()
    bin_dir = tmp_path / "bin"  # a PATH with the tools the script needs but no nvidia-smi
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    proc = subprocess.run([shutil.which("bash"), str(script)], env={"PATH": str(bin_dir)}, capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 2 and "no nvidia-smi" in proc.stderr, proc.stderr
