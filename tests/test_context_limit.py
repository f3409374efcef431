"""The context check at its edge: vLLM takes one token less than the model's length, transformers all of it.

vLLM must generate at least one token after the prompt (kd asks for ``max_tokens=1``), so a
teacher-forced sequence of exactly ``max_model_len`` tokens is refused by vLLM mid-build ("decoder
prompt ... plus the number of requested output tokens (at least 1) is longer than the maximum model
length"). ``check_context`` must refuse it before anything runs, and only for vLLM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.pipeline.common.dataset import Record
from kd.pipeline.build.engines.limits import check_context, engine_limits, sequence_lengths
from kd.pipeline.common.model_files import load_config_and_processor
from kd.pipeline.demo.tiny_models import DRIVING_WORDS, build_tiny_llm

MAX_POSITIONS = 64


@pytest.fixture(scope="module")
def short_llm(tmp_path_factory) -> Path:
    """A tiny Llama whose context is only 64 positions (head_dim 32, as vLLM's CPU attention needs)."""
    return build_tiny_llm(tmp_path_factory.mktemp("ctx") / "llm64", max_position=MAX_POSITIONS)


def record_of_length(processor, total: int, sample_id: str) -> Record:
    """A text record whose teacher-forced sequence (prompt + answer) is exactly ``total`` tokens.

    Driving words are one token each, so adding a word to the prompt adds one token; the length is
    measured with ``sequence_lengths`` (what ``check_context`` measures), not assumed.
    """
    words = [w for w in DRIVING_WORDS if w.isalpha()]

    def rec(n_words: int) -> Record:
        prompt = " ".join(words[i % len(words)] for i in range(n_words))
        return Record(id=sample_id, images=(), prompt=prompt, messages=None, answer="stop", capability="planning",
                      line=7)

    n = 1
    while True:
        (prompt, image, answer), = sequence_lengths(processor, [rec(n)])
        length = prompt + image + answer
        if length == total:
            return rec(n)
        if length > total:
            raise AssertionError(f"cannot hit {total} tokens exactly (jumped to {length})")
        n += total - length


def test_a_sequence_of_exactly_the_model_length_is_refused_for_vllm_and_accepted_by_hf(short_llm):
    config, processor = load_config_and_processor(short_llm)
    exact = record_of_length(processor, MAX_POSITIONS, "exactly-64")
    one_less = record_of_length(processor, MAX_POSITIONS - 1, "exactly-63")

    check_context([exact, one_less], processor, engine_limits("hf", config), source="data.jsonl")
    check_context([one_less], processor, engine_limits("vllm", config), source="data.jsonl")
    with pytest.raises(ValueError) as err:
        check_context([one_less, exact], processor, engine_limits("vllm", config, where="teacher t"),
                      source="data.jsonl")
    msg = str(err.value)
    assert msg.startswith("1 sample(s)") and "'exactly-64' (data.jsonl:7)" in msg and "= 64 tokens" in msg, msg
    assert "exactly-63" not in msg
    assert "context of 64 tokens" in msg and "at most 63 tokens" in msg and "teacher t" in msg, msg
    # vLLM's max_model_len lowers the limit the same way: 63 positions take at most 62 tokens.
    with pytest.raises(ValueError, match=r"max_model_len=63\).*'exactly-63'.*at most 62 tokens"):
        check_context([one_less], processor, engine_limits("vllm", config, {"max_model_len": 63}, where="teacher t"))


def test_limits_say_what_each_engine_takes(short_llm):
    config, _ = load_config_and_processor(short_llm)
    hf, vllm = engine_limits("hf", config), engine_limits("vllm", config)
    assert hf.max_positions == vllm.max_positions == MAX_POSITIONS
    assert (hf.max_sequence, vllm.max_sequence) == (MAX_POSITIONS, MAX_POSITIONS - 1)


@pytest.mark.vllm
def test_vllm_itself_takes_max_sequence_tokens_and_refuses_one_more(short_llm):
    """The limit is vLLM's own: the longest admitted sequence captures, one more is what vLLM rejects."""
    pytest.importorskip("vllm")
    from kd.pipeline.build.engines import SignalSpec, load_engine

    _, processor = load_config_and_processor(short_llm)
    engine = load_engine("vllm", short_llm, dtype="float32")
    try:
        longest = record_of_length(processor, engine.limits.max_sequence, "longest")
        (sig,) = engine.capture([longest.as_dict()], SignalSpec(top_k=4))
        assert len(sig.input_ids) == MAX_POSITIONS - 1
        too_long = record_of_length(processor, MAX_POSITIONS, "too-long")
        with pytest.raises(Exception, match="maximum model length"):
            engine.capture([too_long.as_dict()], SignalSpec(top_k=4))
    finally:
        engine.close()
