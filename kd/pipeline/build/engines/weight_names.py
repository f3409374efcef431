"""Checkpoint weight names vLLM loads, for checkpoints written by transformers 5.

transformers 5 holds a CLIP / SigLIP vision tower flat (``vision_tower.embeddings.*``) and saves
it that way, while the hub checkpoints, and vLLM's model code (vllm 0.32: LLaVA, LLaVA-NeXT,
LLaVA-OneVision, Gemma 3, PaliGemma ...), nest it one level down as
``vision_tower.vision_model.*``. vLLM then refuses the checkpoint ("There is no module or
parameter named 'vision_tower.embeddings'"). transformers 5 loads both layouts to the same
state dict, so renaming the saved keys to the nested layout fixes vLLM and changes nothing for
transformers.

vLLM has no user-facing option for weight names (``hf_overrides`` only edits the config), so the
fix is a renamed copy of the weights: ``vllm_model_dir`` gives the directory vLLM should load (the
model's own when nothing needs renaming), ``vllm_weight_renames`` says what it would rename.
Towers of other families (Idefics3 / SmolVLM's ``model.vision_model``, InternVL, Qwen-VL) load
as saved and are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

__all__ = ["WeightNamesError", "vllm_model_dir", "vllm_weight_renames", "write_vllm_checkpoint"]

# Vision towers vLLM builds as ``CLIPVisionModel`` / ``SiglipVisionModel`` (weights under ``vision_model``).
_NESTED_TOWERS = ("clip_vision_model", "siglip_vision_model")
# Where VLM checkpoints keep their tower: the legacy layout transformers 5 saves, and its own.
_TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
_NESTED = "vision_model."
_INDEX = "model.safetensors.index.json"


class WeightNamesError(RuntimeError):
    """A checkpoint whose weight names vLLM cannot load, with what to do about it."""


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise WeightNamesError(f"{model_dir}: no config.json (not a transformers model directory)")
    return json.loads(path.read_text())


def _shards(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights, in index order when sharded."""
    index = model_dir / _INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def _weight_names(model_dir: Path) -> list[str]:
    """Every weight name, read from the safetensors headers (no tensor is loaded)."""
    from safetensors import safe_open

    shards = _shards(model_dir)
    if not shards:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())) or "nothing"
        raise WeightNamesError(f"{model_dir}: no *.safetensors weights (found {found}); vLLM and kd read "
                               "safetensors: re-save the model with save_pretrained(..., safe_serialization=True)")
    names: list[str] = []
    for shard in shards:
        with safe_open(shard, "pt") as f:
            names.extend(f.keys())
    return names


def vllm_weight_renames(model_dir: str | Path) -> dict[str, str]:
    """Key-prefix renames (checkpoint -> vLLM) the weights in ``model_dir`` need; ``{}`` when vLLM
    loads them as saved.

    Today the one case: a CLIP / SigLIP tower saved flat by transformers 5
    (``vision_tower.embeddings.*`` -> ``vision_tower.vision_model.embeddings.*``).
    """
    model_dir = Path(model_dir)
    vision = _config(model_dir).get("vision_config") or {}
    if vision.get("model_type") not in _NESTED_TOWERS:
        return {}
    renames: dict[str, str] = {}
    for name in _weight_names(model_dir):
        for prefix in _TOWER_PREFIXES:
            if name.startswith(prefix) and not name.startswith(prefix + _NESTED):
                child = name[len(prefix):].split(".", 1)[0] + "."
                renames[prefix + child] = prefix + _NESTED + child
    return dict(sorted(renames.items()))


def _rename(name: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def write_vllm_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``model_dir`` into ``out_dir`` with the weights renamed as ``vllm_weight_renames`` says.

    Every other file (config, tokenizer, processor, chat template) is hard-linked where the file
    system allows, else copied. The tensors' bytes are unchanged; one shard is in memory at a time.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(model_dir), Path(out_dir)
    renames = vllm_weight_renames(src)
    shards = set(_shards(src))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path in shards:
            with safe_open(path, "pt") as f:
                tensors = {_rename(k, renames): f.get_tensor(k) for k in f.keys()}
                metadata = f.metadata() or {"format": "pt"}
            save_file(tensors, tmp / path.name, metadata=metadata)
        elif path.name == _INDEX:
            index = json.loads(path.read_text())
            index["weight_map"] = {_rename(k, renames): v for k, v in index["weight_map"].items()}
            (tmp / path.name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        elif path.is_file():
            _link_or_copy(path, tmp / path.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fingerprint(model_dir: Path) -> str:
    """Names, sizes and mtimes of the model's files: a changed checkpoint gets a fresh copy."""
    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def vllm_model_dir(model_dir: str | Path, scratch_dir: str | Path | None = None) -> Path:
    """The directory to pass as ``vllm.LLM(model=...)`` for ``model_dir``.

    ``model_dir`` itself when vLLM loads its weight names as saved. Otherwise a renamed copy (see
    ``write_vllm_checkpoint``) under ``scratch_dir``, reused while ``model_dir``'s files are
    unchanged; without a ``scratch_dir`` a ``WeightNamesError`` says what to rename and how.
    """
    model_dir = Path(model_dir)
    renames = vllm_weight_renames(model_dir)
    if not renames:
        return model_dir
    if scratch_dir is None:
        shown = ", ".join(f"{old}* -> {new}*" for old, new in renames.items())
        raise WeightNamesError(
            f"{model_dir}: vLLM cannot load these weight names (saved by transformers 5 with a flat "
            f"vision tower): it needs {shown}. transformers loads the renamed layout too. Fix: "
            f"kd.pipeline.build.engines.weight_names.write_vllm_checkpoint({str(model_dir)!r}, OUT_DIR) and "
            f"give vLLM OUT_DIR, or call vllm_model_dir(model_dir, scratch_dir) to do it on the fly")
    out = Path(scratch_dir) / f"{model_dir.name}-vllm-{_fingerprint(model_dir)}"
    if not (out / "config.json").is_file():
        write_vllm_checkpoint(model_dir, out)
    return out
