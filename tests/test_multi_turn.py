"""Multi-turn records: every assistant turn supervised in one sample, in every family.

The reference never goes through kd's pieces: the family's processor renders the whole
conversation (``apply_chat_template``) and tokenizes it in one call with the sample's images, and
the model runs that one sample unpadded in fp32 with eager attention. kd's ids must equal the
processor's, each cached turn must decode to its assistant text plus the end-of-turn token, and
kd's captures (hf in mixed batches, vLLM for two families) must equal the reference's log-probs
at every turn's positions to 1e-5.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from family_archs import TEXT_ARCHS, VLM_ARCHS
from fixtures_models import assert_same_topk, llm_tokenizer, make_image, tiny_llm_dir  # noqa: F401 - fixtures

from kd.cache_schema import SCHEMA_VERSION
from kd.pipeline.build.engines import SignalSpec, load_engine
from kd.pipeline.common.chat import build_messages, end_of_turn_token, render_pieces
from kd.pipeline.common.encoding import encode_sample
from kd.pipeline.demo.tiny_families import ARCHS, build_tiny
from kd.pipeline.demo.tiny_models import TinyPreset

TOL = 1e-5
TEACHER = TinyPreset(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
SPEC = SignalSpec(top_k=16, hidden_layers=(0, 2))
CONVERSATION = [
    {"role": "system", "content": "You drive carefully."},
    {"role": "user", "content": "What color is the light?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the car ahead?"},
    {"role": "assistant", "content": "it brakes, slowly"},
    {"role": "user", "content": "So?"},
    {"role": "assistant", "content": "keep distance"},
]
TURNS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]


def _samples(arch: str) -> list[tuple[str, object, str | None, list]]:
    """(id, messages or prompt, answer, images): two conversations and a single answer, mixed in one batch."""
    images = [] if ARCHS[arch].text_only else [make_image(0), make_image(1, 64, 64)]
    two = [dict(m) for m in CONVERSATION[1:5]]
    return [("conv", CONVERSATION, None, images[:1]), ("single", "Is the road clear?", "yes", images[1:]),
            ("conv-two", two, None, images)]


def _reference_text(processor, messages, images) -> str:
    """The whole conversation as the template renders it, cut after the last turn's end-of-turn token;
    a template that closes turns without one (LLaVA-1.5) gets it after each assistant text."""
    eot = end_of_turn_token(processor)
    full = processor.apply_chat_template(build_messages(messages, len(images), getattr(processor, "image_token", "<image>")),
                                         tokenize=False)
    out, at = "", 0
    for m in (m for m in messages if m["role"] == "assistant"):
        end = full.index(m["content"], at) + len(m["content"])
        stop = full.find(eot, end)
        closes = stop >= 0 and not full[end:stop].strip()
        at_end = stop + len(eot) if closes else end
        out += full[at:at_end] + ("" if closes else eot)
        at = at_end
    return out


@pytest.fixture(scope="module", params=VLM_ARCHS + TEXT_ARCHS)
def family(request, tmp_path_factory):
    from transformers import AutoProcessor, AutoTokenizer

    arch = request.param
    model_dir = build_tiny(arch, tmp_path_factory.mktemp(arch) / "teacher", preset=TEACHER, seed=4)
    processor = (AutoTokenizer if ARCHS[arch].text_only else AutoProcessor).from_pretrained(model_dir)
    raw = _samples(arch)
    encoded = [encode_sample(processor, p, a, imgs, sample_id=sid) for sid, p, a, imgs in raw]
    return arch, model_dir, processor, raw, encoded


@pytest.fixture(scope="module")
def reference(family):
    """log-probs of the independent single-sample forward at kd's target positions, per sample."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    arch, model_dir, processor, raw, encoded = family
    cls = AutoModelForCausalLM if ARCHS[arch].text_only else AutoModelForImageTextToText
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    out = {}
    with torch.no_grad():
        for (sid, prompt, answer, images), enc in zip(raw, encoded):
            if answer is not None:
                continue
            text = _reference_text(processor, prompt, images)
            kwargs = {"images": [images]} if images else {}
            inputs = processor(text=[text], return_tensors="pt", add_special_tokens=False, **kwargs)
            assert np.array_equal(inputs["input_ids"][0].numpy(), enc.input_ids), f"{arch}/{sid}: ids differ"
            inputs.pop("attention_mask", None)
            logits = model(**inputs, use_cache=False, output_hidden_states=True)
            pos = torch.from_numpy(enc.target_positions)
            out[sid] = {"logprobs": torch.log_softmax(logits.logits[0].double(), -1)[pos],
                        "hidden": {i: h[0, pos].numpy() for i, h in enumerate(logits.hidden_states)}}
    return out


def test_each_turn_is_its_text_and_end_of_turn_at_its_positions(family):
    arch, _, processor, raw, encoded = family
    tok = getattr(processor, "tokenizer", processor)
    eot = end_of_turn_token(processor)
    for (sid, prompt, answer, _), enc in zip(raw, encoded):
        wanted = [answer] if answer is not None else [m["content"] for m in prompt if m["role"] == "assistant"]
        assert len(enc.turn_starts) == len(wanted) and enc.turn_starts[0] == enc.answer_start
        pieces = [enc.input_ids[s : s + n] for s, n in zip(enc.turn_starts, enc.turn_lengths)]
        assert np.array_equal(np.concatenate(pieces), enc.answer_ids)
        for text, ids in zip(wanted, pieces):
            decoded = tok.decode(ids)
            assert decoded.endswith(eot) and decoded[: -len(eot)].strip() == text, f"{arch}/{sid}: {decoded!r}"
        assert enc.target_positions.tolist() == [p - 1 for s, n in zip(enc.turn_starts, enc.turn_lengths)
                                                 for p in range(s, s + n)]
        assert enc.turn_starts[-1] + enc.turn_lengths[-1] == len(enc.input_ids)  # nothing after the last turn


def test_hf_capture_of_every_turn_matches_the_reference(family, reference):
    arch, model_dir, _, _, encoded = family
    engine = load_engine("hf", model_dir, batch_size=8)
    try:
        captured = engine.capture(encoded, SPEC)
    finally:
        engine.close()
    for s, sig in zip(encoded, captured):
        sig.validate()
        assert np.array_equal(sig.turn_lengths, s.turn_lengths) and np.array_equal(sig.turn_starts, s.turn_starts)
        if s.sample_id not in reference:
            continue
        ref = reference[s.sample_id]
        vals, ids = torch.topk(ref["logprobs"], SPEC.top_k, dim=-1)
        np.testing.assert_allclose(sig.logprobs, vals.numpy(), atol=TOL, err_msg=f"{arch}/{s.sample_id}")
        assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
        outside = torch.ones_like(ref["logprobs"], dtype=torch.bool).scatter_(1, torch.from_numpy(sig.ids).long(), False)
        tail = torch.logsumexp(ref["logprobs"].masked_fill(~outside, -math.inf), -1).numpy()
        np.testing.assert_allclose(sig.tail_logmass, tail, atol=TOL, err_msg=f"{arch}/{s.sample_id} tail")
        for layer in SPEC.hidden_layers:
            np.testing.assert_allclose(sig.hidden[layer], ref["hidden"][layer], atol=TOL)


VLLM_ARCHS = ("qwen2_5_vl", "llava", "qwen2")  # Qwen's template, LLaVA-1.5's added end-of-turn, a text model


@pytest.mark.vllm
@pytest.mark.parametrize("family", VLLM_ARCHS, indirect=True)
def test_vllm_capture_of_every_turn_matches_the_reference(family, reference):
    """Three families, not all: the per-family vLLM tests cover the rest; turns only change which rows are read."""
    arch, model_dir, _, _, encoded = family
    pytest.importorskip("vllm")
    engine = load_engine("vllm", model_dir, dtype="float32", hidden_layers=SPEC.hidden_layers, max_images_per_prompt=2)
    try:
        captured = engine.capture(encoded, SPEC)
    finally:
        engine.close()
    for s, sig in zip(encoded, captured):
        if s.sample_id in reference:
            vals, ids = torch.topk(reference[s.sample_id]["logprobs"], SPEC.top_k, dim=-1)
            np.testing.assert_allclose(sig.logprobs, vals.numpy(), atol=TOL, err_msg=f"{arch}/{s.sample_id} vllm")
            assert_same_topk(sig.ids, sig.logprobs, ids.numpy(), vals.numpy(), TOL)
            for layer in SPEC.hidden_layers:
                np.testing.assert_allclose(sig.hidden[layer], reference[s.sample_id]["hidden"][layer], atol=TOL)


# ------------------------------------------------------------------- the rule's edges, one family


def test_a_single_turn_conversation_is_the_single_answer_rule(llm_tokenizer):
    one = encode_sample(llm_tokenizer, [{"role": "user", "content": "Stop?"}, {"role": "assistant", "content": "yes"}],
                        None, sample_id="c")
    single = encode_sample(llm_tokenizer, "Stop?", "yes", sample_id="s")
    assert np.array_equal(one.input_ids, single.input_ids) and one.turn_starts.tolist() == [single.answer_start]


def test_bad_conversations_are_refused_by_name(llm_tokenizer):
    with pytest.raises(ValueError, match=r"sample 'late'.*messages\[2\] holds an image after the first assistant"):
        render_pieces(llm_tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "<image> c"}, {"role": "assistant", "content": "d"}],
                      None, 1, sample_id="late")
    with pytest.raises(ValueError, match=r"sample 'e'.*assistant turn 1 \(messages\[3\]\) is empty"):
        render_pieces(llm_tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "c"}, {"role": "assistant", "content": " "}],
                      None, 0, sample_id="e")


def test_a_template_that_rewrites_earlier_turns_is_refused(llm_tokenizer):
    """Like Qwen3's, which drops earlier turns' reasoning: one sequence cannot hold what it renders."""
    import copy

    tok = copy.deepcopy(llm_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                         "(hidden)<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "second"}]
    with pytest.raises(ValueError, match=r"sample 'r'.*does not render assistant turn 0 .*rewrites turns"):
        render_pieces(tok, messages, None, 0, sample_id="r")


def test_dataset_rules_for_multi_turn_records(tmp_path):
    from kd.pipeline.common.dataset import DatasetError, load_records

    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rows = [{"id": "ok", "messages": conv, "capability": "planning"},
            {"id": "both", "messages": conv, "answer": "x", "capability": "planning"},
            {"id": "empty", "messages": conv + [{"role": "user", "content": "c"}, {"role": "assistant", "content": ""}],
             "capability": "planning"},
            {"id": "open", "messages": conv + [{"role": "user", "content": "c"}], "capability": "planning"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DatasetError) as e:
        load_records(path)
    msg = str(e.value)
    assert f"{path}:2: messages[1].role: last turn must be 'user'" in msg and "leave out 'answer'" in msg
    assert f"{path}:3: messages[3].content: empty assistant turn" in msg
    assert f"{path}:4: messages[2].role: without 'answer', the last turn must be 'assistant'" in msg
    path.write_text(json.dumps(rows[0]) + "\n")
    (rec,) = load_records(path)
    assert rec.is_multi_turn and rec.final_answer == "b" and "answer" not in rec.as_dict()


# ------------------------------------------------------------------ through the cache and distillation


@pytest.fixture(scope="module")
def conversation_world(tmp_path_factory):
    """A tiny VLM teacher and student, and a dataset mixing conversations and single answers."""
    from kd.pipeline.demo.tiny_models import build_preset

    root = tmp_path_factory.mktemp("multi_turn_world")
    make_image(0).save(root / "front.png")
    make_image(1, 64, 64).save(root / "back.png")
    rows = [{"id": "conv", "images": ["front.png"], "messages": CONVERSATION, "capability": "planning"},
            {"id": "single", "images": ["back.png"], "prompt": "Is the road clear?", "answer": "yes",
             "capability": "perception"},
            {"id": "text-conv", "messages": CONVERSATION[1:5], "capability": "reasoning"},
            {"id": "two-cams", "images": ["front.png", "back.png"], "messages": CONVERSATION[:3],
             "capability": "perception"}]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"root": root, "data": data, "teacher": build_preset("vlm", "teacher", root / "teacher"),
            "student": build_preset("vlm", "student", root / "student", seed=5)}


@pytest.fixture(scope="module")
def conversation_cache(conversation_world):
    from kd.pipeline.build import BuildRequest, build_cache

    w = conversation_world
    return build_cache(BuildRequest(teacher=str(w["teacher"]), data=str(w["data"]), out=str(w["root"] / "caches"),
                                    engine="hf", top_k=8, hidden_layers=(1,), attention_layers=(0,),
                                    attention_kind="both", shard_size=3))


def test_the_cache_holds_every_turn_and_reads_it_back(conversation_world, conversation_cache):
    from transformers import AutoProcessor

    from kd.cache_schema import CacheReader
    from kd.pipeline.common.dataset import load_records
    from kd.pipeline.common.encoding import encode_record

    reader = CacheReader(conversation_cache.path)
    assert reader.schema_version == SCHEMA_VERSION and len(reader) == 4
    processor = AutoProcessor.from_pretrained(conversation_world["teacher"])
    batch = reader.get_batch(["text-conv", "conv", "single"])  # across both shards, out of order
    for b, rec in enumerate(load_records(conversation_world["data"])[i] for i in (2, 0, 1)):
        enc = encode_record(processor, rec.as_dict())
        cached = batch.sample(b)
        assert np.array_equal(cached.turn_starts, enc.turn_starts) and np.array_equal(cached.turn_lengths,
                                                                                     enc.turn_lengths)
        assert np.array_equal(cached.target_ids, enc.answer_ids) and cached.target_positions.tolist() == \
            enc.target_positions.tolist()
        assert cached.attention_full[0].shape == (enc.num_answer_tokens, len(enc.input_ids))
    assert batch.num_turns.tolist() == [2, 3, 1]


def test_distill_trains_on_every_turn_at_its_positions(conversation_world, conversation_cache, tmp_path):
    from kd.pipeline.distill import distill, load_config
    from kd.pipeline.distill.data import DistillDataset, collate, open_teachers
    from kd.pipeline.distill.student import load_student
    from kd.pipeline.common.dataset import load_records

    w = conversation_world
    _, processor = load_student(str(w["student"]))
    records = load_records(w["data"])
    dataset = DistillDataset(records, processor, open_teachers({"planner": conversation_cache.path}))
    batch = collate(dataset.__getitems__([0, 1, 2, 3]))
    assert [len(p) for p in batch["target_positions"]] == batch["num_tokens"].tolist()
    turns = dataset[0]
    assert len(turns.turn_starts) == 3 and batch["target_positions"][0].tolist() == turns.target_positions.tolist()
    cfg = load_config(student=str(w["student"]), data=str(w["data"]), out=str(tmp_path / "run"), quiet=True,
                      teachers={"planner": conversation_cache.path},
                      train={"lr": 1e-3, "warmup_steps": 0, "grad_accum": 1, "batch_size": 4, "max_steps": 2})
    run = distill(cfg)
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert run.steps == 2 and train and all(math.isfinite(v) for r in train for v in r["terms"].values())
    assert {"kd/planner", "hidden/planner", "attn/planner"} <= set(train[0]["terms"]), train[0]["terms"]


def test_a_student_whose_turns_split_otherwise_is_refused(conversation_world, conversation_cache):
    from types import SimpleNamespace

    from transformers import AutoProcessor

    from kd.cache_schema import CacheReader
    from kd.pipeline.common.dataset import load_records
    from kd.pipeline.common.encoding import encode_record
    from kd.pipeline.distill.alignment import AlignmentError
    from kd.pipeline.distill.data import DistillDataset

    processor = AutoProcessor.from_pretrained(conversation_world["teacher"])
    enc = encode_record(processor, load_records(conversation_world["data"])[0].as_dict())
    cached = CacheReader(conversation_cache.path).get("conv")
    src = SimpleNamespace(vocab_map=None, role="planner", url=conversation_cache.path)
    DistillDataset._check("conv", enc, enc.answer_hash, cached, src)  # the same split: accepted
    cached.turn_lengths = np.array([cached.turn_lengths[0] + 1, cached.turn_lengths[1] - 1, cached.turn_lengths[2]])
    with pytest.raises(AlignmentError, match=r"sample 'conv': cached turns of .* other assistant turns \(teacher 'planner'"):
        DistillDataset._check("conv", enc, enc.answer_hash, cached, src)


def test_a_v4_cache_reads_as_one_turn_per_sample(conversation_world, tmp_path):
    """Caches before schema_version 5 have no turn columns: each sample is one turn at answer_start."""
    import shutil

    import pyarrow.parquet as pq

    from kd.cache_schema import CacheReader, checksum_bytes
    from kd.pipeline.build import BuildRequest, build_cache

    w = conversation_world
    data = tmp_path / "single.jsonl"
    data.write_text(w["data"].read_text().splitlines()[1].replace("back.png", str(w["root"] / "back.png")) + "\n")
    res = build_cache(BuildRequest(teacher=str(w["teacher"]), data=str(data), out=str(tmp_path / "c"), engine="hf",
                                   top_k=8, self_check=False))
    old = tmp_path / "old"
    shutil.copytree(res.path, old)
    pq.write_table(pq.read_table(old / "index.parquet").drop(["turn_starts", "turn_lengths"]), old / "index.parquet",
                   compression="zstd")
    blob = (old / "index.parquet").read_bytes()
    doc = json.loads((old / "manifest.json").read_text())
    doc.update(schema_version=4, index={"path": "index.parquet", "size": len(blob), "xxh3_128": checksum_bytes(blob)})
    (old / "manifest.json").write_text(json.dumps(doc))
    new, was = CacheReader(res.path).get("single"), CacheReader(str(old)).get("single")
    assert CacheReader(str(old)).schema_version == 4
    assert was.turn_starts.tolist() == [was.answer_start] == new.turn_starts.tolist()
    assert was.turn_lengths.tolist() == [was.num_tokens] == new.turn_lengths.tolist()
    assert np.array_equal(was.logprobs, new.logprobs)


def test_inspect_counts_the_conversations_and_their_turns(conversation_cache):
    from kd.cache_schema import CacheReader
    from kd.cache_schema.inspection import blocks, inspect_summary

    s = inspect_summary(CacheReader(conversation_cache.path))
    assert (s["n_conversations"], s["n_turns"]) == (2, 7)  # conv: 3 turns, text-conv: 2, two single ones
    sizes = dict(dict(blocks(s))["size"])
    assert sizes["samples"] == "4 in 2 shards (2 of them multi-turn, 7 turns in all)"
