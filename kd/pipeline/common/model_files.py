"""A model directory's identity and shape, read from its files without loading weights: which
layers its text model has, the hashes that key caches (config, tokenizer, vocabulary, weights),
and its config + processor. Both stages need them: the build keys caches, the student proves its
tokenizer matches a cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd.pipeline.common.file_hashes import sha256_file


def text_config(config: Any) -> Any:
    """The language model's config (the text config of a VLM, the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_text_layers(config: Any) -> int:
    """Decoder layers of the language model (the text config of a VLM)."""
    return int(text_config(config).num_hidden_layers)


def load_config_and_processor(model_dir: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The model's config and its processor (VLM) or tokenizer (LLM), as the engines load them; no weights."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    is_vlm = getattr(config, "vision_config", None) is not None
    proc_cls = AutoProcessor if is_vlm else AutoTokenizer
    return config, proc_cls.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json")


# The files that define token ids alone (no template, no image processing): equal hashes, equal ids.
VOCAB_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
               "special_tokens_map.json")


def _files_sha256(model_dir: str | Path, names: Sequence[str]) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in names:
        if (d / name).exists():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    return h.hexdigest()


def tokenizer_sha256(model_dir: str | Path) -> str:
    """Hash of a model directory's tokenizer, chat template and processor files (a cache key input)."""
    return _files_sha256(model_dir, TOKENIZER_FILES)


def vocab_sha256(model_dir: str | Path) -> str:
    """Hash of the files that map text to token ids, so a student can tell "another tokenizer" apart
    from "another chat template or image processor" when its answer ids disagree with a cache."""
    return _files_sha256(model_dir, VOCAB_FILES)


def engine_identity(model_dir: str | Path, *, hash_weights_below: int = 1 << 30) -> dict[str, Any]:
    """What identifies a teacher for cache keys: config, tokenizer and weight hashes.

    Weights are content-hashed when their total size is under ``hash_weights_below`` bytes; larger
    checkpoints hash only the safetensors headers (names, dtypes, shapes) and sizes, and say so.
    """
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    config.pop("transformers_version", None)
    ident: dict[str, Any] = {
        "model_dir": str(d.resolve()),
        "architectures": config.get("architectures"),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
    }
    ident["tokenizer_sha256"] = tokenizer_sha256(d)
    ident["vocab_sha256"] = vocab_sha256(d)
    weights = sorted(d.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in weights)
    w = hashlib.sha256()
    for p in weights:
        if total < hash_weights_below:
            w.update(p.name.encode() + bytes.fromhex(sha256_file(p)))
        else:
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                w.update(p.name.encode() + f.read(n) + str(p.stat().st_size).encode())
    ident["weights_sha256"] = w.hexdigest()
    ident["weights_hash_kind"] = "content" if total < hash_weights_below else "header"
    return ident
