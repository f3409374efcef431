"""Answer-only scoring for the vLLM engine: the teacher's LM head applied in kd, to the answer rows only.

vLLM's ``prompt_logprobs=k`` runs log-softmax and top-k over the whole vocabulary at *every* prompt
position, while a cache keeps only the ~1% of rows that predict answer tokens: at a 152k vocabulary
that is ~500x the cost of the prefill itself. The answer-only path instead asks vLLM (through the
``extract_hidden_states`` route the engine already uses for hidden layers) for the residual stream
before the final norm (aux layer id ``num_layers``) at the answer-predicting positions, and applies
here, in float32 and batched: the final RMSNorm ``x * rsqrt(mean(x^2) + eps) * w``, the LM head
(``lm_head.weight``, or ``embed_tokens`` when the embeddings are tied) and log-softmax / top-k.

That is only the model's own head when the head is exactly ``norm -> linear``: ``choose_head_path``
decides, from ``config.json`` and the safetensors key names alone (no weights loaded), and says why.

* **answer_only**: text models of type llama, mistral, qwen2 or qwen3 (plain RMSNorm, no logit
  scaling or soft-capping), alone or as the text model of a VLM whose weights sit under
  ``model.*``, ``model.language_model.*``, ``language_model.model.*`` or ``model.text_model.*``
  (lm_head as ``lm_head.weight`` or ``language_model.lm_head.weight``), tied or untied embeddings.
  E.g. Llama 2/3, Mistral, Qwen2/2.5/3, Idefics3 / SmolVLM, LLaVA on those, InternVL (HF format).
* **prompt_logprobs** (vLLM scores every prompt position, as before): everything else, e.g. Gemma
  (``1 + w`` norm, ``final_logit_softcapping``), Cohere (``logit_scale``), Granite
  (``logits_scaling``), MiniCPM, unknown model types, a missing norm or head weight, and any
  model when the engine is built with ``head="prompt_logprobs"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from kd.pipeline.build.engines.head_kernels import TiledHead

HeadPath = Literal["answer_only", "prompt_logprobs"]

# Text model types whose final norm is y = x / rms(x) * w (not Gemma's 1 + w) and whose logits are
# lm_head(y) with nothing after it (vLLM's Llama applies config.logit_scale: checked separately).
PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text",
                    "qwen3_vl", "qwen3_vl_text")
# Config keys that change the logits after the linear head, with the value that leaves them alone.
HEAD_MODIFIERS: dict[str, Any] = {"final_logit_softcapping": None, "logit_softcapping": None, "logit_scale": 1.0,
                                  "logits_scaling": 1.0, "scale_emb": 1.0, "dim_model_base": None,
                                  "output_multiplier_scale": 1.0}
# Where the text model's weights live in the checkpoints transformers writes (LLM, then VLM layouts).
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "model.text_model.")
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")
FINAL_NORM_KEYS = tuple(p + "norm.weight" for p in TEXT_PREFIXES)  # the text model's final norm, by layout


@dataclass(frozen=True)
class HeadChoice:
    """Which path scores the answer rows, and why (for logs, ``identity()`` and error messages)."""

    path: HeadPath
    reason: str
    norm_key: str | None = None
    head_key: str | None = None


def text_config_dict(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a raw ``config.json`` (a VLM's ``text_config``, else the config)."""
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), Mapping):
            return config[key]
    return config


def _tied(config: Mapping[str, Any]) -> bool:
    # transformers' PretrainedConfig default is True, but Llama / Mistral / Qwen configs default to False
    # unless written; the text config's own value wins over the top level's.
    text = text_config_dict(config)
    if "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", False))


def choose_head_path(config: Mapping[str, Any], weight_keys: Iterable[str], *,
                     requested: str = "auto") -> HeadChoice:
    """Decide whether kd may apply the head itself (``answer_only``) or vLLM must (``prompt_logprobs``).

    ``requested``: "auto" picks answer_only whenever the head is provably ``RMSNorm -> linear``;
    "prompt_logprobs" forces the old path; "answer_only" raises ``ValueError`` (with the reason)
    when the model does not qualify, instead of silently scoring every position.
    """
    if requested not in ("auto", "answer_only", "prompt_logprobs"):
        raise ValueError(f"head must be 'auto', 'answer_only' or 'prompt_logprobs', got {requested!r}")
    if requested == "prompt_logprobs":
        return HeadChoice("prompt_logprobs", "forced by head='prompt_logprobs'")
    choice = _answer_only_or_why_not(config, set(weight_keys))
    if requested == "answer_only" and choice.path != "answer_only":
        raise ValueError(f"head='answer_only' is not possible for this model: {choice.reason}")
    return choice


def _answer_only_or_why_not(config: Mapping[str, Any], keys: set[str]) -> HeadChoice:
    text = text_config_dict(config)
    model_type = text.get("model_type", config.get("model_type"))
    if model_type not in PLAIN_HEAD_TYPES:
        return HeadChoice("prompt_logprobs", f"text model type {model_type!r} is not one with a plain "
                                             f"RMSNorm + linear head ({', '.join(PLAIN_HEAD_TYPES)})")
    for name, neutral in HEAD_MODIFIERS.items():
        for where, cfg in (("text config", text), ("config", config)):
            if name in cfg and cfg[name] is not None and cfg[name] != neutral:
                return HeadChoice("prompt_logprobs", f"{where} sets {name}={cfg[name]!r}, which changes the logits "
                                                     "after the linear head")
    if "rms_norm_eps" not in text:
        return HeadChoice("prompt_logprobs", "the text config has no rms_norm_eps")
    norms = [k for k in FINAL_NORM_KEYS if k in keys]
    if len(norms) != 1:
        return HeadChoice("prompt_logprobs", f"expected one final norm weight among {list(FINAL_NORM_KEYS)}, "
                                             f"found {norms}")
    prefix = norms[0][: -len("norm.weight")]
    if _tied(config):
        head = prefix + "embed_tokens.weight"
        if head not in keys:
            return HeadChoice("prompt_logprobs", f"tied embeddings but no {head} in the weights")
    else:
        heads = [k for k in LM_HEAD_KEYS if k in keys]
        if len(heads) != 1:
            return HeadChoice("prompt_logprobs",
                              f"expected one LM head weight among {list(LM_HEAD_KEYS)}, found {heads}")
        head = heads[0]
    return HeadChoice("answer_only", f"{model_type} text model: RMSNorm ({norms[0]}) then linear head ({head})",
                      norm_key=norms[0], head_key=head)


def safetensors_keys(model_dir: str | Path) -> list[str]:
    """Tensor names of a checkpoint, from the shard index or the safetensors headers (no weights read)."""
    from safetensors import safe_open

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    keys: list[str] = []
    for path in sorted(d.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            keys.extend(f.keys())
    return keys


def choose_for_model(model_dir: str | Path, requested: str = "auto") -> HeadChoice:
    """``choose_head_path`` for a model directory (its config.json and safetensors key names)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return choose_head_path(config, safetensors_keys(model_dir), requested=requested)


def _read_tensor(model_dir: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    raise KeyError(f"{key} not found in {model_dir}/*.safetensors")


def final_rms_norm(model_dir: str | Path) -> tuple[torch.Tensor, float]:
    """The final RMSNorm's float32 weight and eps of a plain-head text model, read with safetensors:
    vLLM's last aux layer is the residual before it, transformers' last hidden state after it."""
    d = Path(model_dir)
    text = text_config_dict(json.loads((d / "config.json").read_text()))
    if text.get("model_type", "llama") not in PLAIN_HEAD_TYPES or "rms_norm_eps" not in text:
        raise ValueError(f"hidden layer num_layers (after the final norm) is only supported for {PLAIN_HEAD_TYPES} "
                         "text models on vLLM; ask for layers < num_layers or use --engine hf")
    keys = set(safetensors_keys(d))
    norms = [k for k in FINAL_NORM_KEYS if k in keys]
    if not norms:
        raise ValueError(f"no final norm weight ({' / '.join(FINAL_NORM_KEYS)}) in {d}")
    return _read_tensor(d, norms[0]).float(), float(text["rms_norm_eps"])


class AnswerHead:
    """The teacher's final norm + LM head in float32, applied to residual-stream rows.

    The rows are normed here and scored by ``head_kernels.TiledHead`` (the top-k and logsumexp
    taken tile by tile, so no ``[rows, vocab]`` log-softmax is written, and each row's result is
    independent of the rows scored with it and of the thread count); ``logprobs`` gives the dense
    rows for sparse sampling.
    """

    def __init__(self, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, device: str | torch.device = "cpu",
                 rows_per_chunk: int | None = None) -> None:
        self.device = torch.device(device)
        self.norm_weight = norm_weight.to(self.device, torch.float32)
        self.eps = float(eps)
        self.weight = weight.to(self.device, torch.float32).contiguous()  # [V, H]
        self.kernel = TiledHead(self.weight, rows=rows_per_chunk, prepare=self._normed)

    @classmethod
    def from_model(cls, model_dir: str | Path, choice: HeadChoice, device: str | torch.device = "cpu") -> AnswerHead:
        """Read the final norm and head weights ``choice`` names (safetensors, only those two tensors)."""
        if choice.path != "answer_only" or not choice.norm_key or not choice.head_key:
            raise ValueError(f"no answer-only head for this model: {choice.reason}")
        d = Path(model_dir)
        text = text_config_dict(json.loads((d / "config.json").read_text()))
        return cls(_read_tensor(d, choice.norm_key), float(text["rms_norm_eps"]), _read_tensor(d, choice.head_key),
                   device)

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def rows_per_chunk(self) -> int:
        """Rows per block of the kernel (every block is padded to it)."""
        return self.kernel.rows

    @rows_per_chunk.setter
    def rows_per_chunk(self, rows: int) -> None:
        self.kernel.rows = rows

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm of a block of float32 rows."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight

    @torch.inference_mode()
    def topk(self, residual: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs [N, k] float32, ids [N, k] int64)`` sorted by descending log-prob, on the CPU."""
        return self.kernel.topk(residual, k)

    @torch.inference_mode()
    def logprobs(self, residual: torch.Tensor) -> torch.Tensor:
        """Dense ``[N, V]`` float32 log-probs (for sparse sampling, which needs the whole distribution)."""
        return self.kernel.logprobs(residual)
