"""Answer-only scoring in the vLLM engine, at a real vocabulary (151,936), against transformers.

The reference is an independent fp32 transformers forward of each sample alone (no padding, no
kd code): full log-softmax in float64, top-k and the tail mass outside kd's top-k from the whole
distribution. Both engine paths (answer_only, where kd applies norm + head itself, and
prompt_logprobs, where vLLM scores every position) must match it to 1e-5, with and without other
hidden layers captured in the same call. The choice of path is checked on configs alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_models import assert_same_topk

from kd.pipeline.build.engines.vllm_head import AnswerHead, choose_for_model, choose_head_path
from kd.pipeline.demo.tiny_models import build_tokenizer

TOL = 1e-5
VOCAB = 151_936  # Qwen2.5 / InternVL3's vocabulary
LAYERS = 2


def build_big_vocab_llm(out: Path, *, vocab: int = VOCAB, tied: bool = False, seed: int = 0) -> Path:
    """A 2 x 64 Llama whose LM head spans ``vocab`` ids (the tokenizer uses only the first ~1k).

    The final norm's weight is random and its eps large (1e-2), so a head that skipped either, or
    took the wrong weight (embeddings vs lm_head), would be caught.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-2, tie_word_embeddings=tied, initializer_range=0.1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def big_llm(tmp_path_factory) -> Path:
    return build_big_vocab_llm(tmp_path_factory.mktemp("bigvocab") / "llm")


@pytest.fixture(scope="module")
def big_llm_tied(tmp_path_factory) -> Path:
    return build_big_vocab_llm(tmp_path_factory.mktemp("bigvocab") / "tied", tied=True, seed=1)


RECORDS = [
    {"id": "short", "images": [], "prompt": "Should the ego car stop?", "answer": "yes, stop at the light"},
    {"id": "long", "images": [],
     "prompt": "How many cars and trucks are in the left lane ahead of the ego vehicle near the crosswalk?",
     "answer": "two cars and one truck, all moving slow"},
    {"id": "one-token", "images": [], "prompt": "Light color?", "answer": "red"},
]


def reference(model_dir: Path, samples) -> dict[str, dict]:
    """Per sample, alone and unpadded: float64 log-softmax at the answer-predicting rows, hidden states."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for s in samples:
            o = model(input_ids=torch.from_numpy(s.input_ids.astype(np.int64))[None], output_hidden_states=True)
            pos = torch.from_numpy(s.target_positions)
            out[s.sample_id] = {"logprobs": torch.log_softmax(o.logits[0].double(), -1)[pos],
                                "hidden": {i: h[0, pos].numpy() for i, h in enumerate(o.hidden_states)}}
    return out


def assert_matches_reference(signals, samples, ref, k: int, hidden_layers=()) -> None:
    for sig, s in zip(signals, samples):
        sig.validate()
        lp = ref[s.sample_id]["logprobs"]
        vals, ids = torch.topk(lp, k, dim=-1)
        assert sig.ids.shape == (s.num_answer_tokens, k)
        np.testing.assert_allclose(sig.logprobs, vals.numpy(), atol=TOL)
        assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
        # kd's ids carry the reference's own log-probs (not just the same sorted values).
        np.testing.assert_allclose(sig.logprobs, lp.gather(1, torch.from_numpy(sig.ids).long()).numpy(), atol=TOL)
        outside = torch.ones_like(lp, dtype=torch.bool).scatter_(1, torch.from_numpy(sig.ids).long(), False)
        tail = torch.logsumexp(lp.masked_fill(~outside, -math.inf), -1).numpy()
        np.testing.assert_allclose(sig.tail_logmass, tail, atol=TOL)
        assert sorted(sig.hidden) == sorted(hidden_layers)
        for layer in hidden_layers:  # LAYERS == num_layers: the final normed output, as in transformers
            np.testing.assert_allclose(sig.hidden[layer], ref[s.sample_id]["hidden"][layer], atol=TOL)


# ------------------------------------------------------------------------ which path (configs only)

LLAMA_KEYS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
              "lm_head.weight"]


def llama_config(**extra) -> dict:
    return {"model_type": "llama", "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **extra}


def test_plain_llama_heads_take_the_answer_only_path():
    c = choose_head_path(llama_config(), LLAMA_KEYS)
    assert (c.path, c.norm_key, c.head_key) == ("answer_only", "model.norm.weight", "lm_head.weight"), c
    for model_type in ("mistral", "qwen2", "qwen3"):
        assert choose_head_path(llama_config(model_type=model_type), LLAMA_KEYS).path == "answer_only"
    tied = choose_head_path(llama_config(tie_word_embeddings=True), LLAMA_KEYS[:3])
    assert (tied.path, tied.head_key) == ("answer_only", "model.embed_tokens.weight"), tied


@pytest.mark.parametrize("prefix,head", [("model.language_model.", "lm_head.weight"),
                                         ("language_model.model.", "language_model.lm_head.weight"),
                                         ("model.text_model.", "lm_head.weight")])
def test_vlm_text_models_are_found_under_their_key_prefixes(prefix, head):
    config = {"model_type": "some_vlm", "vision_config": {"hidden_size": 8},
              "text_config": {"model_type": "qwen2", "rms_norm_eps": 1e-6, "tie_word_embeddings": False}}
    keys = [prefix + "embed_tokens.weight", prefix + "norm.weight", head, "model.vision_tower.norm.weight"]
    c = choose_head_path(config, keys)
    assert (c.path, c.norm_key, c.head_key) == ("answer_only", prefix + "norm.weight", head), c
    config["text_config"]["tie_word_embeddings"] = True
    assert choose_head_path(config, keys).head_key == prefix + "embed_tokens.weight"


@pytest.mark.parametrize("config,why", [
    ({"model_type": "gemma2", "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0}, "gemma2"),
    (llama_config(final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "final_logit_softcapping": None}},
     "gemma3_text"),
    (llama_config(logit_scale=0.0625), "logit_scale"),
    ({"model_type": "cohere", "logit_scale": 0.0625, "layer_norm_eps": 1e-5}, "cohere"),
    (llama_config(text_config={"model_type": "llama", "rms_norm_eps": 1e-5, "logits_scaling": 8.0}), "logits_scaling"),
    ({"model_type": "phi3", "rms_norm_eps": 1e-5}, "phi3"),
])
def test_other_heads_fall_back_to_prompt_logprobs_and_say_why(config, why):
    c = choose_head_path(config, LLAMA_KEYS)
    assert c.path == "prompt_logprobs" and why in c.reason, c
    with pytest.raises(ValueError, match="answer_only.*not possible"):
        choose_head_path(config, LLAMA_KEYS, requested="answer_only")


def test_missing_weights_fall_back_and_the_old_path_can_be_forced():
    assert "LM head" in choose_head_path(llama_config(), LLAMA_KEYS[:3]).reason  # untied, no lm_head
    assert "norm" in choose_head_path(llama_config(), ["lm_head.weight"]).reason
    forced = choose_head_path(llama_config(), LLAMA_KEYS, requested="prompt_logprobs")
    assert forced.path == "prompt_logprobs" and "forced" in forced.reason
    with pytest.raises(ValueError, match="head must be"):
        choose_head_path(llama_config(), LLAMA_KEYS, requested="fast")


@pytest.mark.parametrize("tied", [False, True])
def test_answer_head_matches_transformers_on_the_pre_norm_residual(tmp_path, tied):
    """Without vLLM: kd's head on the final norm's input (hooked) equals transformers' log-softmax."""
    from transformers import AutoModelForCausalLM

    d = build_big_vocab_llm(tmp_path / "m", vocab=32_000, tied=tied)
    choice = choose_for_model(d)
    assert choice.path == "answer_only"
    assert choice.head_key == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    seen = {}
    model.model.norm.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    head = AnswerHead.from_model(d, choice)
    head.rows_per_chunk = 3  # several chunks, one short
    vals, top = head.topk(seen["x"][0], 8)
    ref_vals, ref_ids = torch.topk(ref, 8, dim=-1)
    np.testing.assert_allclose(vals.numpy(), ref_vals.numpy(), atol=TOL)
    assert_same_topk(top.numpy(), vals.numpy(), ref_ids.numpy(), ref_vals.numpy(), TOL)
    np.testing.assert_allclose(head.logprobs(seen["x"][0]).numpy(), ref.numpy(), atol=TOL)


# ------------------------------------------------------------------------ both paths through real vLLM


def _engine(model_dir: Path, head: str, hidden_layers: tuple[int, ...]):
    pytest.importorskip("vllm")
    from kd.pipeline.build.engines import load_engine

    return load_engine("vllm", model_dir, dtype="float32", hidden_layers=hidden_layers, head=head)


def _spy_prompt_logprobs(engine) -> list:
    """Record the ``prompt_logprobs`` each request asks vLLM for."""
    seen = []
    generate = engine._llm.generate

    def spy(prompts, params, **kw):
        seen.extend(p.prompt_logprobs for p in (params if isinstance(params, list) else [params] * len(prompts)))
        return generate(prompts, params, **kw)

    engine._llm.generate = spy
    return seen


@pytest.mark.vllm
@pytest.mark.parametrize("head,hidden", [("auto", ()), ("auto", (0, 1)), ("auto", (1, LAYERS)),
                                         ("prompt_logprobs", ()), ("prompt_logprobs", (1, LAYERS))])
def test_vllm_paths_match_transformers_at_vocab_151936(big_llm, head, hidden):
    from kd.pipeline.build.engines import SignalSpec

    engine = _engine(big_llm, head, hidden)
    try:
        expected = "answer_only" if head == "auto" else "prompt_logprobs"
        assert engine.head_path == expected and engine.identity()["head_path"] == expected
        samples = engine.encode(RECORDS)
        ref = reference(big_llm, samples)
        engine.capture(samples[:1], SignalSpec(top_k=4, hidden_layers=hidden))  # starts vLLM
        seen = _spy_prompt_logprobs(engine)
        got = engine.capture(samples, SignalSpec(top_k=16, hidden_layers=hidden))
        # answer_only never asks vLLM to score the prompt positions; the old path does.
        assert seen == ([None] * 3 if expected == "answer_only" else [16] * 3), seen
        assert_matches_reference(got, samples, ref, 16, hidden)
        if not hidden:
            sampled = engine.capture(samples, SignalSpec(logits="sampled", sampled_draws=12, seed=3))
            for sig, s in zip(sampled, samples):
                sig.validate()
                real = sig.ids >= 0
                assert (sig.counts.sum(-1) == 12).all()
                rows = np.nonzero(real)[0]
                ref_lp = ref[s.sample_id]["logprobs"].numpy()
                np.testing.assert_allclose(sig.logprobs[real], ref_lp[rows, sig.ids[real]], atol=TOL)
    finally:
        engine.close()


@pytest.mark.vllm
def test_vllm_answer_only_with_tied_embeddings(big_llm_tied):
    from kd.pipeline.build.engines import SignalSpec

    engine = _engine(big_llm_tied, "answer_only", ())
    try:
        assert engine.head_choice.head_key == "model.embed_tokens.weight"
        samples = engine.encode(RECORDS)
        got = engine.capture(samples, SignalSpec(top_k=16))
        assert_matches_reference(got, samples, reference(big_llm_tied, samples), 16)
    finally:
        engine.close()
