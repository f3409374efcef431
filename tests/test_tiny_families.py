"""Tiny models of every family ``kd models tiny --arch`` builds: they load like hub checkpoints.

Each family's directory must load through the Auto classes with ``trust_remote_code=False``, give
the family's real processor class, expand a chat-templated prompt with one and with two images of
different sizes into exactly the image tokens the model consumes (a forward on prompt + answer runs
and returns logits for every token), honour the size preset, and be byte-identical for equal seeds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from fixtures_models import make_image
from typer.testing import CliRunner

from kd.pipeline.demo.tiny_families import ARCHS, build_tiny
from kd.pipeline.demo.tiny_models import TEACHER, build_preset

VLM_ARCHS = [a for a, f in ARCHS.items() if not f.text_only]
TEXT_ARCHS = [a for a, f in ARCHS.items() if f.text_only]

# The family's real processor / image processor classes (as the hub checkpoints name them).
PROCESSORS = {
    "idefics3": ("Idefics3Processor", "Idefics3ImageProcessor"),
    "smolvlm": ("SmolVLMProcessor", "SmolVLMImageProcessor"),
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor"),
    "internvl": ("InternVLProcessor", "GotOcr2ImageProcessor"),
    "llava": ("LlavaProcessor", "CLIPImageProcessor"),
    "llava_onevision": ("LlavaOnevisionProcessor", "LlavaOnevisionImageProcessor"),
    "gemma3": ("Gemma3Processor", "Gemma3ImageProcessor"),
}
MODELS = {"idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
          "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
          "qwen3_vl": "Qwen3VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration",
          "llava": "LlavaForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
          "gemma3": "Gemma3ForConditionalGeneration", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Families whose token count depends on the image size (grid, tiles, crops, anyres).
DYNAMIC = {"smolvlm", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision"}
# Token-sharing groups: same specials trained first, family tokens appended after the base vocabulary.
QWEN_GROUP = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision", "qwen2")
IDEFICS_GROUP = ("idefics3", "smolvlm", "llama")
SQUARE, WIDE = (64, 64), (48, 96)  # (height, width): a square and a 2:1 image


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every family at the default (student) preset, seed 0."""
    root = tmp_path_factory.mktemp("families")
    return {arch: build_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def loaded(built):
    """arch -> (processor or tokenizer, model), loaded through the Auto classes only."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    out = {}
    for arch, d in built.items():
        if ARCHS[arch].text_only:
            out[arch] = (AutoTokenizer.from_pretrained(d, trust_remote_code=False),
                         AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False, dtype=torch.float32))
        else:
            out[arch] = (AutoProcessor.from_pretrained(d, trust_remote_code=False),
                         AutoModelForImageTextToText.from_pretrained(d, trust_remote_code=False,
                                                                     dtype=torch.float32))
        out[arch][1].eval()
    return out


def _image_token_id(config) -> int:
    token = getattr(config, "image_token_id", None)
    return token if token is not None else config.image_token_index


def _digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def _encode(processor, sizes: list[tuple[int, int]], answer: str = "two cars"):
    content = [{"type": "image"}] * len(sizes) + [{"type": "text", "text": "How many cars are ahead?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    images = [make_image(i, h, w) for i, (h, w) in enumerate(sizes)]
    return processor(text=[prompt + answer], images=[images], return_tensors="pt")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_loads_as_the_family(arch, built, loaded):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(built[arch], trust_remote_code=False)
    processor, model = loaded[arch]
    assert type(model).__name__ == MODELS[arch] == config.architectures[0]
    if arch in PROCESSORS:
        assert (type(processor).__name__, type(processor.image_processor).__name__) == PROCESSORS[arch]
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (64, 2)  # the default STUDENT preset
    assert text.hidden_size // text.num_attention_heads >= 32  # vLLM CPU attention


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_image_tokens_match_the_forward(arch, loaded):
    processor, model = loaded[arch]
    image_id = _image_token_id(model.config)
    counts = {}
    for sizes in ([SQUARE], [WIDE], [SQUARE, WIDE]):
        enc = _encode(processor, sizes)
        ids = enc["input_ids"][0]
        counts[tuple(sizes)] = int((ids == image_id).sum())
        with torch.no_grad():  # the model raises when image tokens and image features disagree
            logits = model(**enc).logits
        assert logits.shape == (1, ids.numel(), model.config.get_text_config().vocab_size)
        assert torch.isfinite(logits).all()
    one, other, both = counts[(SQUARE,)], counts[(WIDE,)], counts[(SQUARE, WIDE)]
    assert one > 0 and other > 0
    assert (one != other) == (arch in DYNAMIC), counts
    if arch == "llava_onevision":  # several images per prompt: base view + newline each, no anyres grid
        assert both == 2 * (processor.num_image_tokens + 1) < min(one, other)
    else:
        assert both == one + other


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_student_chat_and_forward(arch, loaded):
    tok, model = loaded[arch]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Is the road ahead clear?"}],
                                     add_generation_prompt=True, tokenize=False)
    enc = tok([prompt + "yes"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_same_seed_same_bytes(arch, built, tmp_path):
    again = _digests(build_tiny(arch, tmp_path / "again"))
    assert again == _digests(built[arch])
    other = _digests(build_tiny(arch, tmp_path / "seed1", seed=1))
    assert other["model.safetensors"] != again["model.safetensors"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_teacher_preset_is_honoured(arch, tmp_path):
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(build_tiny(arch, tmp_path / arch, preset=TEACHER)).get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.intermediate_size) == (128, 4, 256)


@pytest.mark.parametrize("group", [QWEN_GROUP, IDEFICS_GROUP], ids=["qwen", "idefics"])
def test_shared_base_vocabulary(group, loaded):
    """Families of one group give every base token the same id (cross-family distillation)."""
    def vocab(arch):
        tok = loaded[arch][0]
        return getattr(tok, "tokenizer", tok).get_vocab()

    first = vocab(group[0])
    for arch in group[1:]:
        v = vocab(arch)
        shared = {t: i for t, i in first.items() if t in v}
        assert len(shared) >= len(first) - 2, arch  # at most the family's own tokens differ
        assert all(v[t] == i for t, i in shared.items()), arch


def test_kind_alias_builds_the_same_bytes(tmp_path):
    from kd.cli import app

    runner = CliRunner()
    for kind, arch in (("vlm", "idefics3"), ("llm", "llama")):
        res = runner.invoke(app, ["models", "tiny", "--kind", kind, "--preset", "student", "--out",
                                  str(tmp_path / kind)])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["models", "tiny", "--arch", arch, "--preset", "student", "--out",
                                  str(tmp_path / arch)])
        assert res.exit_code == 0, res.output
        old = _digests(build_preset(kind, "student", tmp_path / f"old-{kind}"))
        assert _digests(tmp_path / kind) == _digests(tmp_path / arch) == old


def test_cli_lists_and_refuses(tmp_path):
    from kd.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "tiny", "--arch", "list"])
    assert listed.exit_code == 0
    assert [line.split("\t")[0] for line in listed.output.splitlines()] == list(ARCHS)
    out = ["--out", str(tmp_path / "m")]
    for args, words in ((["--arch", "paligemma", *out], ["paligemma", "internvl", "llava_onevision"]),
                        (["--kind", "vlm", "--arch", "llama", *out], ["idefics3", "llama"]),
                        (["--arch", "llava", "--preset", "huge", *out], ["huge", "teacher"]),
                        (["--arch", "llava"], ["--out"])):
        res = runner.invoke(app, ["models", "tiny", *args])
        assert res.exit_code != 0, args
        text = " ".join(res.output.split())
        assert all(w in text for w in words), (args, res.output)
    assert not (tmp_path / "m").exists()
