"""The benchmarks in bench/ run end to end at toy sizes and print their ratios.

Nothing here checks a timing (the machine is shared and noisy); what is checked is that each
script still runs against the current code and reports what its docstring promises, plus the
orderings that do not depend on timing (exact tensor peaks, losses that must agree).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def _run(script: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"bench/{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _ratios(out: str, row: str) -> tuple[float, float, float]:
    m = re.search(rf"\({row}\)/\(a\) time {NUMBER}x.*memory \(tensors\) {NUMBER}x.*memory \(RSS\+\) {NUMBER}x", out)
    assert m, f"no ({row})/(a) ratio line in:\n{out[-2000:]}"
    return tuple(float(g) for g in m.groups())


def test_train_step_prints_both_ratio_lines_and_the_loader_rate(tmp_path):
    out = _run("train_step.py", "--steps", "2", "--warmup", "1", "--memory-steps", "1", "--memory-repeats", "1",
               "--scenes", "2", "--batch-size", "2", "--workdir", str(tmp_path))
    cached, online = _ratios(out, "b"), _ratios(out, "c")
    assert all(r > 0 for r in cached + online)
    # Exact tensor peaks: the cached row holds projectors + targets, the online row three teacher models.
    assert 1.0 < cached[1] < online[1], out[-2000:]
    m = re.search(r"loader alone \(no model\): ([0-9,]+) input tokens/s", out)
    assert m and int(m.group(1).replace(",", "")) > 0, out[-2000:]
    assert "[PASS <= 1.15]" in out or "[MISS <= 1.15]" in out


def test_kd_loss_rows_agree_and_print_ratios():
    out = _run("kd_loss.py", "--tokens", "16", "--vocab", "500", "--repeats", "1", timeout=300)
    assert "same loss: True" in out, out[-2000:]
    for row in ("(b) CE + kd top-k KD", "(c) CE + direct top-k KD", "(d) CE + dense online KD"):
        assert re.search(rf"{re.escape(row)} / \(a\): memory {NUMBER}x, time {NUMBER}x", out), row


def test_cache_io_reports_sizes_kl_and_throughput_for_every_coding():
    out = _run("cache_io.py", "--tokens", "2000", "--batches", "2", timeout=300)
    for coding in ("fp32", "fp16", "bf16", "u8"):
        m = re.search(rf"{coding}: written and read \({NUMBER} B/token\)", out)
        assert m and float(m.group(1)) > 0, coding
        assert re.search(rf"\[(PASS|MISS)\] warm two-cache join >= 1M tokens/s \({coding}\)", out), coding
    assert "fp32 0.00e+00" in out  # fp32 is exact: zero KL over the vocabulary


@pytest.mark.vllm
def test_capture_prints_the_prefill_ratio():
    pytest.importorskip("vllm")
    out = _run("capture.py", "--samples", "4", "--repeats", "1", "--skip", "c,d", "--teacher", "qwen2.5-0.5b",
               "--layers", "1")
    assert re.search(rf"\(b\)/\(a\) = {NUMBER} best-of, {NUMBER} paired median   target >= 0.8 on CPU: (PASS|MISS)", out), \
        out[-2000:]
    assert "model=llm (qwen2.5-0.5b: 1 x 896, MLP 4864, 14/2 heads, tied)" in out, out[-2000:]
    assert "vLLM engine head path: answer_only (qwen2 text model" in out, out[-2000:]  # tied: embed_tokens


def test_capture_refuses_a_width_for_a_teacher_that_has_its_own():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "capture.py"), "--teacher", "qwen2.5-0.5b",
                           "--hidden-size", "256"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--hidden-size is for --teacher tiny" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.vllm
def test_capture_at_a_real_shape_prints_every_vocabulary_and_the_split():
    """--shape real (~1,600-token prompts, 20-40-token answers) at two vocabularies, one process each."""
    pytest.importorskip("vllm")
    out = _run("capture.py", "--shape", "real", "--vocab", "0,4096", "--samples", "2", "--repeats", "1",
               "--skip", "c", "--compare-old")
    prompt_tokens = [float(m) for m in re.findall(rf"samples, {NUMBER} prompt tokens/sample", out)]
    answers = [float(m) for m in re.findall(rf"\(answer {NUMBER}\)", out)]
    assert len(prompt_tokens) == 2 and min(prompt_tokens) >= 1500, out[-3000:]
    assert answers and all(20 <= a <= 40 for a in answers), out[-3000:]
    assert "vocab 832 (the tokenizer's)" in out and "vocab 4,096," in out, out[-3000:]
    summary = out[out.index("ratio lines of every vocabulary:"):]
    for vocab in ("tokenizer", "4096"):
        assert re.search(rf"vocab {vocab}: \(b\)/\(a\) = {NUMBER} best-of, {NUMBER} paired median", summary), summary
        assert re.search(rf"vocab {vocab}: \(d\)/\(e\) = {NUMBER} best-of, {NUMBER} paired median", summary), summary
        assert re.search(rf"vocab {vocab}: \(b0\)/\(a\) = {NUMBER} best-of", summary), summary
    for part in ("teacher: engine.capture (vllm)", "answer head (kd: norm, lm_head, top-k)", "queue: writer.add",
                 "commit: writer.commit", "of the commit: encode (_assemble)", "teacher: engine.capture (hf)"):
        assert part in out, part


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_capture_on_cuda_without_a_gpu_says_so_and_exits_2():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "capture.py"), "--device", "cuda", "--samples", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr, proc.stderr[-2000:]


def test_writer_overlap_prints_both_rows_the_ratio_and_equal_caches():
    """Both rows per coding, the (o)/(s) ratio and verdict lines, and equal caches."""
    out = _run("writer_overlap.py", "--tokens", "3000", "--vocab", "4096", "--k", "8", "--shard-size", "25",
               "--teacher-us", "20", "--repeats", "1", timeout=300)
    assert re.search(r"3,000 answer tokens \(\d+ samples .*\), 4 shards of", out), out[-2000:]
    for coding in ("u8", "bf16"):
        for row in ("(s) sequential", "(o) overlapped"):
            assert re.search(rf"^{coding}\s+{re.escape(row)}\s+{NUMBER}\s+{NUMBER}", out, re.M), (coding, row)
        m = re.search(rf"{coding}: \(o\)/\(s\) kd critical path = {NUMBER} \(paired median\); \(o\) {NUMBER} us/token "
                      rf".*target <= 2 us/token: (PASS|MISS)", out)
        assert m and float(m.group(1)) > 0, out[-2000:]
        assert f"{coding}: same cache bytes (o) == (s): True" in out


def test_growth_prints_the_grow_over_full_ratios():
    out = _run("growth.py", "--records", "30", "--batch-size", "1", timeout=300)
    for what in ("teacher time", "build time", "bytes written"):
        m = re.search(rf"grow/full {what} {NUMBER}x", out)
        assert m and float(m.group(1)) > 0, what
    assert re.search(r"captured\s+3 samples", out), out[-2000:]  # +10% of 30: only the new records ran
    assert "same samples and targets True, max |difference| 0.00e+00" in out, out[-2000:]


def test_multi_turn_prints_the_layout_ratios_and_equal_turns():
    out = _run("multi_turn.py", "--conversations", "2", "--turns", "2", "--prompt-tokens", "60", "--layers", "2",
               "--hidden-size", "64", "--repeats", "1")
    assert "one sample / per turn: input tokens" in out
    tokens = float(out.split("input tokens ")[-1].split("x")[0])
    assert 0.3 < tokens < 1.0  # the prefix is run once, not once per turn
    diff = float(out.split("same turns: ")[-1].split()[0])
    assert diff < 1e-5
