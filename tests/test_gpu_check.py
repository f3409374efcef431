"""bench/gpu_check.py (what scripts/gpu_check.sh runs on a GPU machine), exercised on CPU.

The fidelity rules and the exit status are tested on hand-made engine outputs; one end-to-end run
uses the CPU build of vLLM on tiny sizes (the CUDA path differs only in ``--device`` and defaults).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check


def signals(sid: str, seed: int = 0, t: int = 3, k: int = 4, h: int = 8):
    rng = np.random.default_rng(seed)
    lp = np.sort(rng.normal(-3, 1, (t, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    return SimpleNamespace(sample_id=sid, target_ids=np.arange(t), ids=np.tile(np.arange(k, dtype=np.int32), (t, 1)),
                           logprobs=lp, tail_logmass=np.full(t, -2.0, np.float32),
                           hidden={2: rng.normal(0, 2, (t, h)).astype(np.float32)})


def copy(s, **changes):
    out = SimpleNamespace(**{k: (v.copy() if hasattr(v, "copy") else v) for k, v in vars(s).items()})
    out.hidden = {k: v.copy() for k, v in s.hidden.items()}
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def check(a, b):
    return gpu_check.compare(a, b, lp_atol=1e-3, hidden_atol=1e-4, hidden_rtol=1e-3)


def test_compare_passes_within_tolerance_and_reports_the_worst_differences():
    ref = [signals("a", 0), signals("b", 1)]
    got = [copy(s, logprobs=s.logprobs + 5e-4) for s in ref]
    got[1].hidden[2] += 1e-4
    f = check(got, ref)
    assert f.failures == [] and f.tokens == 6 and f.topk_mismatches == 0
    assert f.max_lp_diff == pytest.approx(5e-4, rel=1e-3) and 0 < f.max_hidden_rel < 1e-3


def test_compare_fails_on_log_probs_top_k_ids_tail_and_hidden_states():
    ref = [signals("a", 0)]
    assert any("log-prob" in m for m in check([copy(ref[0], logprobs=ref[0].logprobs + 2e-3)], ref).failures)
    assert any("tail" in m for m in check([copy(ref[0], tail_logmass=ref[0].tail_logmass - 1e-2)], ref).failures)
    ids = ref[0].ids.copy()
    ids[1, 0] = 99  # the top-1 id replaced: not a tie at the cut
    f = check([copy(ref[0], ids=ids)], ref)
    assert f.topk_mismatches == 1 and any("token 1" in m for m in f.failures)
    bad = copy(ref[0])
    bad.hidden[2][0, 0] += 0.5
    assert any("hidden layer 2" in m for m in check([bad], ref).failures)
    assert any("missing" in m for m in check([copy(ref[0], hidden={})], ref).failures)


def test_compare_allows_a_tie_swapped_at_the_k_th_entry():
    ref = signals("a", 0)
    got = copy(ref)
    got.ids[0, -1] = 77  # another id with (nearly) the k-th log-prob
    got.logprobs[0, -1] = ref.logprobs[0, -1] + 1e-4
    assert check([got], [ref]).failures == []


def test_argument_defaults_per_device_and_errors(capsys):
    gpu = gpu_check.parse_args([])
    assert gpu.device == "cuda" and gpu.dtype == "bfloat16" and gpu.ks == [0, 20, 64] and gpu.lp_atol == 2e-3
    cpu = gpu_check.parse_args(["--device", "cpu"])
    assert cpu.dtype == "float32" and cpu.lp_atol == 1e-4 and cpu.hidden_rtol == 1e-4
    for bad in (["--ks", "a"], ["--ks", "-1"], ["--engines", "trt"], ["--hidden-size", "256"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


class FakeEngines:
    """Stands in for the engines: hf returns reference signals, vLLM the same shifted by ``shift``."""

    shift = 0.0

    def __init__(self, teacher, args, layers):
        self.layers = layers

    def get(self, name, dtype):
        shift = self.shift if name == "vllm" else 0.0

        def capture(batch, spec):
            return [copy(signals(r["id"], i), logprobs=signals(r["id"], i).logprobs + shift) for i, r in enumerate(batch)]

        def encode(batch):
            return [SimpleNamespace(input_ids=np.zeros(10), num_answer_tokens=3) for _ in batch]

        return SimpleNamespace(capture=capture, encode=encode)

    def close(self):
        pass


@pytest.mark.parametrize(("shift", "status"), [(0.0, 0), (0.5, gpu_check.EXIT_FIDELITY)])
def test_exit_status_follows_the_fidelity_verdict(tmp_path, monkeypatch, capsys, shift, status):
    monkeypatch.setattr(gpu_check, "Engines", type("E", (FakeEngines,), {"shift": shift}))
    out = tmp_path / "r.json"
    rc = gpu_check.main(["--device", "cpu", "--engines", "hf", "--ks", "4", "--samples", "2", "--fidelity-samples", "2",
                         "--seq-tokens", "32", "--repeats", "1", "--json", str(out), "--dir", str(tmp_path / "w")])
    text = capsys.readouterr().out
    assert rc == status and ("FAIL" in text) == bool(status)
    result = json.loads(out.read_text())
    assert [(r["engine"], r["k"]) for r in result["throughput"]] == [("hf", 4)]  # timings reported either way


@pytest.mark.vllm
def test_cpu_vllm_end_to_end(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "r.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--ks", "0,8", "--samples", "4",
           "--fidelity-samples", "2", "--seq-tokens", "48", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    fid = result["fidelity"]
    assert fid["failures"] == [] and fid["tokens"] > 0 and fid["max_lp_diff"] < 1e-4
    rows = [(r["engine"], r["k"], r["hidden_layers"]) for r in result["throughput"]]
    assert rows == [("vllm", 0, [2, 4]), ("vllm", 8, [2, 4]), ("hf", 8, [2, 4])]
    assert all(r["prompt_tps"] > 0 and r["answer_tokens"] > 0 for r in result["throughput"])
    assert "fidelity vLLM vs hf" in proc.stdout and "prompt tok/s" in proc.stdout
