"""Teacher engines against plain transformers references, and vLLM against the transformers engine."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures_models import (assert_same_topk, make_image, tiny_llm_dir, tiny_vlm_dir,  # noqa: F401
                             vlm_processor, vlm_samples)

from kd.pipeline.build.engines import SignalSpec, engine_identity, load_engine
from kd.pipeline.build.engines.base import TAIL_EPS, TeacherEngine, sample_sparse, tail_logmass

TOL = 1e-5


@pytest.fixture(scope="module")
def hf(tiny_vlm_dir):
    engine = load_engine("hf", tiny_vlm_dir, device="cpu", dtype="float32")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(tiny_vlm_dir, vlm_samples):
    """Independent eager transformers forward per sample: full log-softmax, hidden states, attentions."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm_dir, dtype=torch.float32, attn_implementation="eager")
    out = {}
    with torch.no_grad():
        for s in vlm_samples:
            extra = {k: torch.from_numpy(v) for k, v in s.model_inputs.items()}
            o = model(input_ids=torch.from_numpy(s.input_ids.astype(np.int64))[None], output_hidden_states=True,
                      output_attentions=True, **extra)
            pos = torch.from_numpy(s.target_positions)
            out[s.sample_id] = {
                "logprobs": torch.log_softmax(o.logits[0].double(), -1)[pos],
                "hidden": {i: h[0, pos].numpy() for i, h in enumerate(o.hidden_states)},
                "attn": {i: a[0].mean(0)[pos].numpy() for i, a in enumerate(o.attentions)},
            }
    return out


def test_engines_satisfy_the_protocol(hf):
    assert isinstance(hf, TeacherEngine) and hf.name == "hf"
    ident = hf.identity()
    assert ident["engine"] == "hf" and len(ident["config_sha256"]) == 64 and ident["weights_hash_kind"] == "content"


def test_hf_topk_matches_independent_log_softmax(hf, vlm_samples, reference):
    spec = SignalSpec(top_k=16)
    worst = 0.0
    for sig, s in zip(hf.capture(vlm_samples, spec), vlm_samples):
        sig.validate()
        ref = reference[s.sample_id]["logprobs"]
        vals, ids = torch.topk(ref, 16, dim=-1)
        worst = max(worst, float(np.abs(sig.logprobs - vals.numpy()).max()))
        assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
        # The tail is the mass outside the top-k, from the full distribution in float64.
        mask = torch.ones_like(ref, dtype=torch.bool).scatter_(1, torch.from_numpy(sig.ids).long(), False)
        tail_ref = torch.logsumexp(ref.masked_fill(~mask, -math.inf), -1).numpy()
        np.testing.assert_allclose(sig.tail_logmass, tail_ref, atol=TOL)
        assert np.array_equal(sig.target_ids, s.answer_ids) and sig.answer_start == s.answer_start
    assert worst < TOL


def test_hf_batching_does_not_change_results(tiny_vlm_dir, hf, vlm_samples):
    spec = SignalSpec(top_k=8, hidden_layers=(1,))
    one = load_engine("hf", tiny_vlm_dir, batch_size=1).capture(vlm_samples, spec)
    many = hf.capture(vlm_samples, spec)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL)
        np.testing.assert_allclose(a.hidden[1], b.hidden[1], atol=TOL)


def test_hf_kernel_head_equals_the_models_own_forward(tiny_vlm_dir, hf, vlm_samples):
    """The plain-head path (base model, then head_kernels.TiledHead on each sample's own rows) against
    the model's own forward at the union of answer positions, the path of heads kd cannot apply."""
    from kd.pipeline.build.engines.hf_engine import plain_lm_head

    assert hf._kernel is not None
    own = load_engine("hf", tiny_vlm_dir)
    own._kernel = None
    for spec in (SignalSpec(top_k=8, hidden_layers=(2,)), SignalSpec(logits="sampled", sampled_draws=12, seed=7)):
        for a, b in zip(hf.capture(vlm_samples, spec), own.capture(vlm_samples, spec)):
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
            if spec.logits == "sampled":
                assert np.array_equal(a.ids, b.ids) and np.array_equal(a.counts, b.counts)
            else:
                assert_same_topk(a.ids, a.logprobs, b.ids, b.logprobs, 1e-6)
                np.testing.assert_allclose(a.hidden[2], b.hidden[2], atol=1e-6)
    own.model.config.get_text_config().final_logit_softcapping = 30.0  # a head kd must leave to the model
    assert plain_lm_head(own.model) is None
    own.close()


def test_hf_hidden_states_match_reference(hf, vlm_samples, reference):
    spec = SignalSpec(top_k=4, hidden_layers=(0, 1, 2))
    for sig, s in zip(hf.capture(vlm_samples, spec), vlm_samples):
        for layer in (0, 1, 2):
            assert sig.hidden[layer].shape == (s.num_answer_tokens, 64)
            np.testing.assert_allclose(sig.hidden[layer], reference[s.sample_id]["hidden"][layer], atol=TOL)


def test_hf_attention_maps(hf, vlm_samples, reference):
    spec = SignalSpec(top_k=4, attention_layers=(0, 1), attention_kind="both")
    for sig, s in zip(hf.capture(vlm_samples, spec), vlm_samples):
        sig.validate()
        for layer in (0, 1):
            full, t2v = sig.attention_full[layer], sig.attention_t2v[layer]
            assert full.shape == (s.num_answer_tokens, len(s.input_ids))
            np.testing.assert_allclose(full.sum(-1), 1.0, atol=TOL)
            np.testing.assert_allclose(full, reference[s.sample_id]["attn"][layer], atol=TOL)
            assert t2v.shape == (s.num_answer_tokens, int(s.image_token_mask.sum()))
            np.testing.assert_array_equal(t2v, full[:, s.image_token_mask])


def test_hf_sampled_mode(hf, vlm_samples, reference):
    spec = SignalSpec(logits="sampled", sampled_draws=12, seed=7)
    first, again = hf.capture(vlm_samples, spec), hf.capture(vlm_samples[::-1], spec)[::-1]
    other_seed = hf.capture(vlm_samples, SignalSpec(logits="sampled", sampled_draws=12, seed=8))
    assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(first, other_seed))
    for sig, rep, s in zip(first, again, vlm_samples):
        sig.validate()
        assert np.array_equal(sig.ids, rep.ids) and np.array_equal(sig.counts, rep.counts)  # batch-independent
        assert sig.ids.shape == (s.num_answer_tokens, 12) and sig.counts.dtype == np.uint16
        assert (sig.counts.sum(-1) == 12).all()
        real = sig.ids >= 0
        assert ((sig.counts > 0) == real).all() and np.isneginf(sig.logprobs[~real]).all()
        ref = reference[s.sample_id]["logprobs"].numpy()
        rows = np.nonzero(real)[0]
        np.testing.assert_allclose(sig.logprobs[real], ref[rows, sig.ids[real]], atol=TOL)
        for r in range(len(sig.ids)):
            ids = sig.ids[r][real[r]]
            assert len(set(ids.tolist())) == len(ids) and (np.diff(sig.logprobs[r][real[r]]) <= 0).all()


def test_sparse_sampling_is_unbiased_on_a_small_vocab():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6) * 2, 0).double()
    rows, draws = 4000, 12
    ids, _, counts = sample_sparse(p.log().expand(rows, 6), draws, seed=123)
    freq = np.zeros(6)
    np.add.at(freq, ids[ids >= 0], counts[ids >= 0])
    est = freq / (rows * draws)
    sigma = np.sqrt(p.numpy() * (1 - p.numpy()) / (rows * draws))
    assert (np.abs(est - p.numpy()) < 5 * sigma + 1e-12).all(), (est, p)
    # An estimator built from counts (here E_p[f] for a fixed f) is unbiased as well.
    f = np.arange(6.0) ** 2
    per_row = np.where(ids >= 0, counts * f[np.clip(ids, 0, None)], 0).sum(-1) / draws
    assert abs(per_row.mean() - float(p.numpy() @ f)) < 5 * per_row.std() / math.sqrt(rows)


def test_tail_logmass_edge_cases():
    full = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert torch.isneginf(tail_logmass(full)).all()
    part = torch.log(torch.tensor([[0.5, 0.25]]))
    assert torch.allclose(tail_logmass(part), torch.log(torch.tensor([0.25])))
    nearly = torch.tensor([[math.log1p(-1e-4)]])  # mass 1 - 1e-4: tail log(1e-4), no cancellation
    assert abs(float(tail_logmass(nearly)) - math.log(1e-4)) < 1e-4
    assert torch.isneginf(tail_logmass(torch.tensor([[math.log1p(-TAIL_EPS / 10)]]))).all()


def test_spec_validation_and_layer_ranges(hf, vlm_samples):
    with pytest.raises(ValueError):
        SignalSpec(logits="dense")
    with pytest.raises(ValueError):
        SignalSpec(attention_kind="cross")
    assert SignalSpec(hidden_layers=(2, 0, 2)).hidden_layers == (0, 2)
    with pytest.raises(ValueError, match="hidden_layers"):
        hf.capture(vlm_samples[:1], SignalSpec(hidden_layers=(3,)))
    with pytest.raises(ValueError, match="attention_layers"):
        hf.capture(vlm_samples[:1], SignalSpec(attention_layers=(2,)))
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine("onnx", "unused")


def test_capture_accepts_raw_records_and_rejects_empty_answers(hf, tmp_path):
    make_image(4).save(tmp_path / "cam.png")
    rec = {"id": "rec", "images": ["cam.png"], "prompt": "Light color?", "answer": "green", "base_dir": str(tmp_path)}
    (sig,) = hf.capture([rec], SignalSpec(top_k=4))
    sig.validate()
    assert sig.sample_id == "rec"
    with pytest.raises(ValueError, match="empty answer"):
        hf.capture([{**rec, "answer": ""}], SignalSpec(top_k=4))


def test_engine_identity_is_content_based(tmp_path, tiny_llm_dir):
    from kd.pipeline.demo.tiny_models import build_preset

    a = engine_identity(tiny_llm_dir)
    b = engine_identity(build_preset("llm", "student", tmp_path / "copy"))
    c = engine_identity(build_preset("llm", "student", tmp_path / "seed1", seed=1))
    keys = ("config_sha256", "tokenizer_sha256", "weights_sha256")
    assert all(a[k] == b[k] for k in keys) and a["weights_sha256"] != c["weights_sha256"]


def test_vllm_engine_module_imports_without_vllm():
    code = "import sys, kd.pipeline.build.engines.vllm_engine, kd.pipeline.build.engines; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- vLLM against the transformers engine


@pytest.fixture(scope="module")
def vllm_engine(tiny_vlm_dir):
    pytest.importorskip("vllm")
    engine = load_engine("vllm", tiny_vlm_dir, dtype="float32", hidden_layers=(0, 1, 2))
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_topk_and_hidden_match_hf(vllm_engine, hf, vlm_samples):
    spec = SignalSpec(top_k=16, hidden_layers=(0, 1, 2))
    got, ref = vllm_engine.capture(vlm_samples, spec), hf.capture(vlm_samples, spec)
    assert any(s.images for s in vlm_samples) and any(len(s.images) == 2 for s in vlm_samples)
    for a, b, s in zip(got, ref, vlm_samples):
        a.validate()
        assert np.array_equal(a.input_ids, s.input_ids)  # the ids vLLM ran, images expanded by vLLM
        assert a.ids.shape == b.ids.shape == (s.num_answer_tokens, 16)
        assert (np.diff(a.logprobs, axis=-1) <= 0).all()
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=TOL)
        assert_same_topk(a.ids, a.logprobs, b.ids, b.logprobs, TOL)
        np.testing.assert_allclose(a.tail_logmass, b.tail_logmass, atol=TOL)
        for layer in (0, 1, 2):  # 2 == num_layers: the final normed output, as in transformers
            np.testing.assert_allclose(a.hidden[layer], b.hidden[layer], atol=TOL)


@pytest.mark.vllm
def test_vllm_sampled_mode_matches_hf(vllm_engine, hf, vlm_samples):
    spec = SignalSpec(logits="sampled", sampled_draws=12, seed=3)
    for a, b in zip(vllm_engine.capture(vlm_samples, spec), hf.capture(vlm_samples, spec)):
        a.validate()
        assert (a.counts.sum(-1) == 12).all()
        same = (a.ids == b.ids).all(-1)  # same seed and (nearly) same distribution: same draws
        assert same.mean() >= 0.75
        np.testing.assert_allclose(a.logprobs[same], b.logprobs[same], atol=TOL)


@pytest.mark.vllm
def test_vllm_refuses_attention_and_unconfigured_layers(vllm_engine, vlm_samples):
    with pytest.raises(ValueError, match="--engine hf"):
        vllm_engine.capture(vlm_samples[:1], SignalSpec(attention_layers=(0,)))
    assert vllm_engine.capture(vlm_samples[:1], SignalSpec(top_k=4))[0].hidden == {}
    with pytest.raises(ValueError, match="hidden_layers= to load_engine"):
        load_engine("vllm", vllm_engine.model_dir, hidden_layers=(1,)).capture(vlm_samples[:1], SignalSpec(hidden_layers=(2,)))


def _in_own_process(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose temp dir is ``tmp_path`` (vLLM engines there leave this process's alone)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(tmp_path)})


@pytest.mark.vllm
def test_vllm_in_a_process_with_flask_fails_with_a_clear_message(tiny_llm_dir, tmp_path):
    """vLLM's start-up scan of sys.modules trips over flask's proxies: kd names the cause (own process: flask stays out of this one)."""
    if importlib.util.find_spec("flask") is None:  # not importorskip: flask must stay out of this process
        pytest.skip("flask is not installed")
    code = (
        "import flask, sys\n"
        "from kd.pipeline.build.engines import SignalSpec, load_engine\n"
        f"e = load_engine('vllm', {str(tiny_llm_dir)!r}, dtype='float32', hidden_layers=(1,))\n"
        "try:\n"
        "    e.capture([{'id': 's', 'prompt': 'hi', 'answer': 'yes', 'images': []}], SignalSpec(top_k=2))\n"
        "except RuntimeError as err:\n"
        "    print('ERR', err)\n"
        "    sys.exit(3)\n"
    )
    res = _in_own_process(code, tmp_path)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "flask" in res.stdout and "--engine hf" in res.stdout
    assert not list(tmp_path.glob("kd-vllm-hidden-*")), "the engine that failed to start left its scratch folder"


@pytest.mark.vllm
def test_vllm_hidden_states_scratch_folder_is_removed_at_exit_without_close(tiny_llm_dir, tmp_path):
    """Build workers keep their engine warm and never close it: the scratch folder goes at exit."""
    code = (
        "import glob, sys, tempfile\n"
        "from kd.pipeline.build.engines import SignalSpec, load_engine\n"
        f"e = load_engine('vllm', {str(tiny_llm_dir)!r}, dtype='float32', hidden_layers=(1,))\n"
        "e.capture([{'id': 's', 'prompt': 'hi', 'answer': 'yes', 'images': []}], SignalSpec(top_k=2, hidden_layers=(1,)))\n"
        "print('SCRATCH', len(glob.glob(tempfile.gettempdir() + '/kd-vllm-hidden-*')))\n"
    )
    res = _in_own_process(code, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "SCRATCH 1" in res.stdout  # it existed while the engine ran
    assert not list(tmp_path.glob("kd-vllm-hidden-*"))


@pytest.mark.vllm
def test_a_second_vllm_engine_is_refused_while_one_runs_and_starts_once_it_is_closed(tiny_llm_dir, tmp_path):
    """vLLM's KV-transfer group is per process: kd names the running engine instead of vLLM's deep
    "Expected 1 CacheOnlyAttentionLayer" (own process: the engines of this one stay as they are)."""
    code = (
        "import glob, sys, tempfile\n"
        "from kd.pipeline.build.engines import SignalSpec, load_engine\n"
        "rec = [{'id': 's', 'prompt': 'hi', 'answer': 'yes', 'images': []}]\n"
        f"a = load_engine('vllm', {str(tiny_llm_dir)!r}, dtype='float32', hidden_layers=(1,))\n"
        f"b = load_engine('vllm', {str(tiny_llm_dir)!r}, dtype='float32')\n"
        "ref = a.capture(rec, SignalSpec(top_k=2))[0]\n"
        "try:\n"
        "    b.capture(rec, SignalSpec(top_k=2))\n"
        "    sys.exit('the second engine started beside the first')\n"
        "except RuntimeError as err:\n"
        "    print('ERR', err)\n"
        "print('SCRATCH', len(glob.glob(tempfile.gettempdir() + '/kd-vllm-hidden-*')))\n"
        "a.close()\n"
        "got = b.capture(rec, SignalSpec(top_k=2))[0]\n"
        "print('SAME', bool((got.ids == ref.ids).all()))\n"
    )
    res = _in_own_process(code, tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "another one runs in this process" in res.stdout and str(tiny_llm_dir) in res.stdout
    assert "SCRATCH 1" in res.stdout  # only the first engine's: the refused one made none
    assert "SAME True" in res.stdout
