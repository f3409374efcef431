"""The transformers teacher engine: one teacher-forced forward per batch, on any torch device.

It is the reference engine (the vLLM one is tested against it) and the only one that can give
attention maps: those need eager attention, where the softmax weights are materialised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.pipeline.build.engines.head_kernels import TiledHead
from kd.pipeline.build.engines.vllm_head import HEAD_MODIFIERS
from kd.pipeline.common.encoding import EncodedSample
from kd.pipeline.common.model_inputs import batch_model_inputs
from kd.pipeline.build.engines.base import Batch, SignalSpec, ensure_encoded, sample_seed, sample_sparse, tail_logmass
from kd.pipeline.build.engines.limits import check_layers, check_top_k, engine_limits
from kd.pipeline.common.model_files import engine_identity, num_text_layers
from kd.pipeline.build.signals import TeacherSignals, sample_fields


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


def stack_model_inputs(samples: list[EncodedSample], padding_side: str = "right") -> dict[str, np.ndarray] | None:
    """The samples' extra processor inputs as one batch (``model_inputs.batch_model_inputs``);
    ``None`` when they cannot share a forward."""
    return batch_model_inputs([s.model_inputs for s in samples], [len(s.input_ids) for s in samples],
                              padding_side=padding_side)


def plain_lm_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head when the model's logits are exactly ``head(base model's last hidden state)``, else None.

    True of every family kd tests (Llama, Qwen2 / 2.5 / 3-VL, InternVL, LLaVA, Idefics3, SmolVLM,
    Gemma 3 without soft-capping); a config that scales or soft-caps logits after the head
    (``vllm_head.HEAD_MODIFIERS``), or a model without a ``.model`` base, keeps the model's forward.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not isinstance(getattr(model, "model", None), torch.nn.Module):
        return None
    config = model.config
    configs = [config.to_dict()] + ([config.get_text_config().to_dict()] if hasattr(config, "get_text_config") else [])
    for name, neutral in HEAD_MODIFIERS.items():
        if any(c.get(name) is not None and c.get(name) != neutral for c in configs):
            return None
    return head


class HFEngine:
    """Teacher-forced transformers forward: top-k (or sampled) log-probs, hidden states, attention maps."""

    name = "hf"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", dtype: str | torch.dtype = "float32",
                 trust_remote_code: bool = False, batch_size: int = 8, base_dir: str | Path | None = None) -> None:
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor, AutoTokenizer)

        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = _torch_dtype(dtype)
        self.batch_size = batch_size
        self.base_dir = base_dir
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.is_vlm = getattr(config, "vision_config", None) is not None
        model_cls = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        proc_cls = AutoProcessor if self.is_vlm else AutoTokenizer
        self.processor = proc_cls.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = model_cls.from_pretrained(model_dir, dtype=self.dtype, trust_remote_code=trust_remote_code,
                                               attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self._attn_impl = "sdpa"
        head = plain_lm_head(self.model)
        # A plain float32 head is scored by kd's kernel on each sample's own rows; else the model's forward.
        self._kernel = TiledHead(head.weight, head.bias) if head is not None and head.weight.dtype == torch.float32 \
            else None
        self.num_layers = num_text_layers(config)
        self.limits = engine_limits(self.name, config, where=f"teacher {self.model_dir}")
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def identity(self) -> dict[str, Any]:
        import transformers

        return {"engine": self.name, "transformers": transformers.__version__, "torch": torch.__version__,
                "dtype": str(self.dtype).removeprefix("torch."), **engine_identity(self.model_dir)}

    def encode(self, batch: Batch) -> list[EncodedSample]:
        return ensure_encoded(self.processor, batch, self.base_dir)

    def capture(self, batch: Batch, spec: SignalSpec) -> list[TeacherSignals]:
        """Teacher signals for each sample of ``batch``, in order."""
        check_layers(spec, self.num_layers)
        check_top_k(spec, self.limits)
        samples = self.encode(batch)
        if spec.attention_layers and self._attn_impl != "eager":
            self.model.set_attn_implementation("eager")  # only eager materialises attention weights
            self._attn_impl = "eager"
        out: list[TeacherSignals] = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            stacked = stack_model_inputs(chunk)
            if stacked is None:  # inputs that cannot share a forward: one sample at a time, with its own
                for s in chunk:
                    out.extend(self._forward([s], spec, stack_model_inputs([s])))
            else:
                out.extend(self._forward(chunk, spec, stacked))
        return out

    def _attention_hooks(self, layers: tuple[int, ...], keep: torch.Tensor, store: dict[int, torch.Tensor]):
        decoder_layers = self.model.get_decoder().layers

        def make(layer: int):
            def hook(_mod, _inp, output):
                weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
                if weights is None:
                    raise RuntimeError("attention weights were not returned; eager attention is required")
                # Head-average in fp32 and keep only the answer-predicting rows: [B, |keep|, S].
                store[layer] = weights.float().mean(dim=1)[:, keep, :]
            return hook

        return [decoder_layers[i].self_attn.register_forward_hook(make(i)) for i in layers]

    @torch.inference_mode()
    def _forward(self, samples: list[EncodedSample], spec: SignalSpec,
                 stacked: dict[str, np.ndarray] | None) -> list[TeacherSignals]:
        lengths = [len(s.input_ids) for s in samples]
        smax = max(lengths)
        ids = torch.full((len(samples), smax), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), smax), dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, : lengths[b]] = torch.from_numpy(s.input_ids.astype(np.int64))
            mask[b, : lengths[b]] = 1
        if stacked is None:  # capture() groups samples that can share a forward; never drop their inputs
            raise ValueError(f"samples {[s.sample_id for s in samples]}: processor inputs cannot share one forward")
        extra = {}
        for name, arr in stacked.items():
            t = torch.from_numpy(arr)
            extra[name] = (t.to(self.dtype) if t.is_floating_point() else t).to(self.device)
        # Only the answer-predicting positions go through the LM head.
        keep_np = np.unique(np.concatenate([s.target_positions for s in samples]))
        keep = torch.from_numpy(keep_np).to(self.device)
        attn: dict[int, torch.Tensor] = {}
        hooks = self._attention_hooks(spec.attention_layers, keep, attn) if spec.attention_layers else []
        positions = [torch.from_numpy(s.target_positions).to(self.device) for s in samples]
        try:
            scores, outputs = self._answer_scores(ids.to(self.device), mask.to(self.device), extra, keep, positions,
                                                  spec)
        finally:
            for h in hooks:
                h.remove()
        results = []
        for b, s in enumerate(samples):
            rows = torch.from_numpy(np.searchsorted(keep_np, s.target_positions)).to(self.device)
            signals = self._logit_signals(s, scores[b], spec)
            pos = positions[b]
            for layer in spec.hidden_layers:
                signals.hidden[layer] = outputs.hidden_states[layer][b, pos].float().cpu().numpy()
            for layer in spec.attention_layers:
                maps = attn[layer][b, rows, : lengths[b]]  # [T, S]
                if spec.attention_kind in ("full", "both"):
                    signals.attention_full[layer] = maps.cpu().numpy()
                if spec.attention_kind in ("t2v", "both"):
                    cols = torch.from_numpy(np.flatnonzero(s.image_token_mask)).to(self.device)
                    signals.attention_t2v[layer] = maps[:, cols].cpu().numpy()
            results.append(signals)
        return results

    def _answer_scores(self, ids: torch.Tensor, mask: torch.Tensor, extra: dict[str, torch.Tensor], keep: torch.Tensor,
                       positions: list[torch.Tensor], spec: SignalSpec) -> tuple[list[Any], Any]:
        """Per sample, its answer rows' ``(logprobs [T, k], ids [T, k])`` (top-k) or dense ``[T, V]``
        log-probs (sampling); and the model outputs.

        With a plain float32 head (``plain_lm_head``) the base model runs and ``TiledHead`` scores
        each sample's own rows: a right-padded batch's union of answer positions is ~B times more
        rows, and at a 152k vocabulary the head over it dominated the forward. The kernel's result
        for a row does not depend on the rows scored beside it or on the thread count (a plain
        matmul's does, at small row counts: tests/test_cluster.py's dask build then differed from
        the in-process one in the last bit). Other heads: the model's own forward at the union
        (``logits_to_keep``), which keeps any logit scaling or soft-capping, then a log-softmax on
        each sample's rows.
        """
        hidden, sizes = bool(spec.hidden_layers), [len(p) for p in positions]
        if self._kernel is not None:
            outputs = self.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden,
                                       use_cache=False, **extra)
            width = ids.shape[1]
            rows = outputs.last_hidden_state.flatten(0, 1)[torch.cat([p + b * width for b, p in enumerate(positions)])]
            if spec.logits == "sampled":
                return list(torch.split(self._kernel.logprobs(rows), sizes)), outputs
            vals, idx = self._kernel.topk(rows, spec.top_k)
            return list(zip(torch.split(vals, sizes), torch.split(idx, sizes))), outputs
        outputs = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, use_cache=False,
                             logits_to_keep=keep, **extra)
        rows = [torch.searchsorted(keep, p) for p in positions]
        logprobs = torch.log_softmax(torch.cat([outputs.logits[b, r] for b, r in enumerate(rows)]).float(), dim=-1)
        dense = list(torch.split(logprobs, sizes))
        if spec.logits == "sampled":
            return dense, outputs
        return [tuple(torch.topk(lp, spec.top_k, dim=-1, sorted=True)) for lp in dense], outputs

    def _logit_signals(self, s: EncodedSample, scored: Any, spec: SignalSpec) -> TeacherSignals:
        common = sample_fields(s)
        if spec.logits == "sampled":
            ids, vals, counts = sample_sparse(scored, spec.sampled_draws, sample_seed(spec.seed, s))
            tail = tail_logmass(torch.from_numpy(vals)).numpy()
            return TeacherSignals(ids=ids, logprobs=vals, tail_logmass=tail, counts=counts, **common)
        vals, idx = scored
        return TeacherSignals(ids=idx.to(torch.int32).cpu().numpy(), logprobs=vals.float().cpu().numpy(),
                              tail_logmass=tail_logmass(vals.float()).cpu().numpy(), **common)

    def close(self) -> None:
        self.model, self._kernel = None, None  # the kernel holds the head's weight
