"""The vLLM teacher engine: the teacher-forced sequence through ``vllm.LLM``, scored at the answer rows.

Two ways to get the answer rows' log-probs, chosen per model (``VLLMEngine.head_choice``, decided by
``vllm_head.choose_head_path`` from the config and weight names; ``head=`` forces one):

* **answer_only** (Llama / Mistral / Qwen2 / Qwen3 text models, alone or inside a VLM): one
  ``generate`` call with ``max_tokens=1`` and no prompt log-probs, i.e. a plain prefill, that also
  captures the residual stream before the final norm (aux layer ``num_layers``) at the
  answer-predicting positions; kd then applies the final RMSNorm, the LM head and log-softmax /
  top-k in float32 (``vllm_head.AnswerHead``), on those ~1% of rows only.
* **prompt_logprobs** (every other head: Gemma's soft-capping, Cohere's logit scale, unknown norms,
  ...): ``prompt_logprobs=k`` makes vLLM score every prompt position (log-softmax and top-k over the
  whole vocabulary each time, ~500x a prefill at a 152k vocabulary); the answer rows are kept.

Hidden states (and the answer-only residuals) come through vLLM's ``extract_hidden_states``
speculative method, whose KV connector writes one safetensors file per request; vLLM's own
connector needs CUDA streams, so a subclass (``vllm_plumbing``) copies synchronously and writes only
the positions the request names (the answer-predicting ones), not the whole prompt. vLLM never materialises attention maps: those need the transformers engine.

vLLM turns prompt log-probs into Python lists for every prompt position (k+1 entries each), although
only the answer rows are kept; on a small model that costs more than the forward pass. Our requests
are tagged so that vLLM's front end keeps the tensors it already has as arrays instead
(``vllm_plumbing.install_array_prompt_logprobs``); without that hook (another vLLM version) the lists are used.

vLLM is imported only when an engine is built, so this module imports without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd.pipeline.common.encoding import EncodedSample
from kd.pipeline.build.engines.base import Batch, SignalSpec, ensure_encoded, sample_seed, sample_sparse, tail_logmass
from kd.pipeline.build.engines.limits import check_layers, check_top_k, engine_limits
from kd.pipeline.common.file_hashes import kd_cache_dir
from kd.pipeline.common.model_files import engine_identity, num_text_layers
from kd.pipeline.build.engines.vllm_head import AnswerHead, HeadChoice, choose_for_model, final_rms_norm
from kd.pipeline.build.engines import vllm_plumbing, vllm_process
from kd.pipeline.build.engines.vllm_plumbing import (ARRAY_TAG, CONNECTOR, POSITIONS_KEY, ArrayPromptLogprobs,
                                                     aux_hidden_arch, install_array_prompt_logprobs)
from kd.pipeline.build.engines.weight_names import vllm_model_dir
from kd.pipeline.build.signals import TeacherSignals, sample_fields

# Measured defaults for the CPU build (see /work/shared/notes/vllm-on-cpu.md): a 1 GiB KV cache
# instead of ~20 GiB, and the in-process engine (2 s start instead of 14 s). The user's values win.
_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def default_weights_dir() -> Path:
    """Where renamed vLLM checkpoints go by default: ``$KD_CACHE_DIR`` or ``~/.cache/kd``."""
    return kd_cache_dir() / "vllm-checkpoints"


class VLLMEngine:
    """Teacher capture through the offline ``vllm.LLM`` API (top-k or sampled log-probs, hidden states).

    ``hidden_layers`` are fixed when vLLM starts (first ``capture`` if not given here); ``device`` is
    informational, vLLM picks its own platform. ``max_logprobs=-1`` lets each capture choose its k;
    ``logits="sampled"`` asks vLLM for the full vocabulary at every prompt position (slow for big vocabularies).
    ``array_prompt_logprobs`` (default on) reads prompt log-probs as arrays (see the module docstring);
    off, vLLM's per-position lists are read. ``head``: "auto" (answer-only scoring where the model's
    head allows it, see ``head_choice``), "answer_only" (an error where it does not) or
    "prompt_logprobs" (vLLM scores every prompt position: the old path, kept for comparison).
    ``weights_dir``: where a renamed copy of a checkpoint whose weight names vLLM cannot load goes
    (LLaVA-style towers saved by transformers 5, see ``weight_names``); default
    ``$KD_CACHE_DIR`` or ``~/.cache/kd``, ``/vllm-checkpoints``, reused while the model is unchanged.
    """

    name = "vllm"

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 trust_remote_code: bool = False, hidden_layers: tuple[int, ...] | None = None,
                 max_model_len: int | None = None, max_images_per_prompt: int = 4,
                 base_dir: str | Path | None = None, array_prompt_logprobs: bool = True,
                 head: str = "auto", weights_dir: str | Path | None = None, **llm_kwargs: Any) -> None:
        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from transformers import AutoConfig, AutoProcessor, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device, self.dtype, self.base_dir = device, str(dtype).removeprefix("torch."), base_dir
        self.trust_remote_code = trust_remote_code
        self.array_prompt_logprobs = array_prompt_logprobs
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.is_vlm = getattr(config, "vision_config", None) is not None
        self.num_layers = num_text_layers(config)
        proc_cls = AutoProcessor if self.is_vlm else AutoTokenizer
        self.processor = proc_cls.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self._llm_kwargs = dict(max_model_len=max_model_len, **llm_kwargs)
        self.limits = engine_limits(self.name, config, self._llm_kwargs, where=f"teacher {self.model_dir}")
        if self.is_vlm:
            self._llm_kwargs.update(limit_mm_per_prompt={"image": max_images_per_prompt}, mm_processor_cache_gb=0)
        self._hidden_layers = None if hidden_layers is None else tuple(sorted(set(hidden_layers)))
        self._llm = None
        self._tmp: str | None = None
        self._tmp_cleanup: weakref.finalize | None = None
        self._final_norm: tuple[torch.Tensor, float] | None = None
        self.head_choice: HeadChoice = choose_for_model(self.model_dir, head)
        self.weights_dir = Path(weights_dir) if weights_dir else default_weights_dir()
        self._head: AnswerHead | None = None

    @property
    def head_path(self) -> str:
        """"answer_only" (kd applies the head to the answer rows) or "prompt_logprobs" (vLLM scores all rows)."""
        return self.head_choice.path

    def identity(self) -> dict[str, Any]:
        import vllm

        return {"engine": self.name, "vllm": vllm.__version__, "dtype": self.dtype, "head_path": self.head_path,
                "head_reason": self.head_choice.reason, **engine_identity(self.model_dir)}

    def encode(self, batch: Batch) -> list[EncodedSample]:
        return ensure_encoded(self.processor, batch, self.base_dir)

    @property
    def running(self) -> bool:
        """Whether vLLM has started (at the first capture) and not been closed."""
        return self._llm is not None

    def aux_layer_ids(self) -> list[int]:
        """The aux hidden-state layer ids vLLM is asked for (empty: no hidden-states connector)."""
        # vLLM aux id i == transformers hidden_states[i] for i < L; id L is the residual stream
        # *before* the final norm, which transformers' hidden_states[L] is after (applied here).
        # The answer-only head needs id L whatever the hidden layers.
        ids = set(self._hidden_layers or ())
        if self.head_path == "answer_only":
            ids.add(self.num_layers)
        return sorted(ids)

    def _architecture(self) -> str:
        return json.loads((self.model_dir / "config.json").read_text())["architectures"][0]

    def _ensure_llm(self, spec: SignalSpec) -> Any:
        if self._hidden_layers is None:  # the first spec decides, since vLLM fixes them at start
            self._hidden_layers = spec.hidden_layers
        missing = sorted(set(spec.hidden_layers) - set(self._hidden_layers))
        if missing:
            raise ValueError(f"hidden layers {missing} were not requested when this vLLM engine started "
                             f"(it captures {list(self._hidden_layers)}); pass hidden_layers= to load_engine")
        if self._llm is None:
            from vllm import LLM

            vllm_process.refuse_beside_running(self)
            load_dir = vllm_model_dir(self.model_dir, self.weights_dir)  # the model's own unless renamed
            kwargs = dict(model=str(load_dir), dtype=self.dtype, max_logprobs=-1,
                          logprobs_mode="raw_logprobs", enforce_eager=True, enable_prefix_caching=False,
                          trust_remote_code=self.trust_remote_code, seed=0)
            if self.aux_layer_ids():
                arch = self._architecture()
                override = aux_hidden_arch(arch)
                if override is not None:
                    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
                        raise RuntimeError(f"hidden states of {arch} need vLLM's in-process engine "
                                           "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
                    kwargs["hf_overrides"] = {"architectures": [override]}
                self._tmp = tempfile.mkdtemp(prefix="kd-vllm-hidden-")
                # Deleted by close(), else when the engine is collected or the interpreter exits
                # (build workers keep their engine warm until then).
                self._tmp_cleanup = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
                kwargs["speculative_config"] = {
                    "method": "extract_hidden_states", "num_speculative_tokens": 1,
                    "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": self.aux_layer_ids()}},
                }
                kwargs["kv_transfer_config"] = {
                    "kv_connector": CONNECTOR, "kv_connector_module_path": vllm_plumbing.__name__, "kv_role": "kv_producer",
                    "kv_connector_extra_config": {"shared_storage_path": self._tmp},
                }
            kwargs.update({k: v for k, v in self._llm_kwargs.items() if v is not None})
            try:
                self._llm = LLM(**kwargs)
                vllm_process.mark_running(self)
            except BaseException as e:
                self.close()  # no scratch folder left behind by an engine that never started
                if not isinstance(e, RuntimeError) or "application context" not in str(e):
                    raise
                # vLLM's start-up scan of every module's globals trips over flask's context-local proxies.
                raise RuntimeError("vLLM cannot start in a process that has imported flask/werkzeug (its kernel "
                                   "override scan touches flask's context-local proxies): run the build in its "
                                   "own process, or use --engine hf") from e
        return self._llm

    def capture(self, batch: Batch, spec: SignalSpec) -> list[TeacherSignals]:
        """Teacher signals for each sample of ``batch``, in order."""
        if spec.attention_layers:
            raise ValueError("attention maps are not available from vLLM (its kernels never materialise them); "
                             "use the transformers engine (--engine hf) for attention_layers")
        check_layers(spec, self.num_layers)
        check_top_k(spec, self.limits)
        samples = self.encode(batch)
        llm = self._ensure_llm(spec)
        outputs = llm.generate(tokens_prompts(samples), self._sampling_params(samples, spec), use_tqdm=False)
        # With aux layers configured, vLLM writes a file for every request: read what the spec asks
        # for, then delete them all.
        paths = self._drain(llm, outputs) if self._tmp else [None] * len(outputs)
        try:
            for s, o in zip(samples, outputs):
                self._check_prompt(s, o)
            hidden = [self._read_hidden(s, p) if p else None for s, p in zip(samples, paths)]
            if self.head_path == "answer_only":
                scored = self._score_answers(samples, hidden, spec)
            else:
                scored = [self._prompt_logprob_rows(s, o) for s, o in zip(samples, outputs)]
            return [self._signals(s, rows, spec, h) for s, rows, h in zip(samples, scored, hidden)]
        finally:
            for path in paths:
                for f in (path, f"{path}.lock") if path else ():
                    if os.path.exists(f):
                        os.remove(f)

    def _sampling_params(self, samples: list[EncodedSample], spec: SignalSpec) -> list[Any]:
        """One ``SamplingParams`` per request: prompt log-probs only on the prompt_logprobs path, and
        (with aux layers) the positions whose hidden states the connector should keep. Greedy: the
        one token vLLM must generate is thrown away, and sampling it (temperature 1) drew a random
        number per vocabulary id, ~4 ms per request at 152k ids on one CPU core."""
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if self.head_path == "answer_only":
            k = None  # a plain prefill: kd scores the answer rows itself
        else:
            k = -1 if spec.logits == "sampled" else spec.top_k  # sampling needs the full distribution
            if self.array_prompt_logprobs and install_array_prompt_logprobs():
                extra[ARRAY_TAG] = True
        params = []
        for s in samples:
            args = dict(extra)
            if self._tmp:
                args["kv_transfer_params"] = {POSITIONS_KEY: s.target_positions.tolist()}
            params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False,
                                         flat_logprobs=True, extra_args=args or None))
        return params

    @staticmethod
    def _check_prompt(s: EncodedSample, out: Any) -> None:
        used = np.asarray(out.prompt_token_ids, dtype=np.int32)
        if not np.array_equal(used, s.input_ids):
            raise RuntimeError(f"sample {s.sample_id!r}: vLLM expanded the prompt to {len(used)} ids that differ "
                               f"from ours ({len(s.input_ids)}); image placeholders are not handled identically (vLLM and "
                               f"transformers expand this sample's images differently): use --engine hf")

    def _answer_head(self) -> AnswerHead:
        if self._head is None:
            device = self.device if self.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
            self._head = AnswerHead.from_model(self.model_dir, self.head_choice, device)
        return self._head

    def _score_answers(self, samples: list[EncodedSample], hidden: list[torch.Tensor | None],
                       spec: SignalSpec) -> list[Any]:
        """Answer-only path: the head on every sample's pre-norm residual rows, batched over the samples.

        Returns per sample ``(ids [T, k], logprobs [T, k])`` for top-k, or dense ``[T, V]`` log-probs
        for sampling (which draws from the whole distribution).
        """
        head = self._answer_head()
        col = self.aux_layer_ids().index(self.num_layers)
        rows = []
        for s, h in zip(samples, hidden):
            if h is None:
                raise RuntimeError(f"sample {s.sample_id!r}: vLLM wrote no hidden states file for the answer rows")
            rows.append(h[:, col])
        if spec.logits == "sampled":
            return [head.logprobs(r) for r in rows]
        vals, ids = head.topk(torch.cat(rows), spec.top_k)
        out, start = [], 0
        for r in rows:
            out.append((ids[start : start + len(r)].numpy(), vals[start : start + len(r)].numpy()))
            start += len(r)
        return out

    def _prompt_logprob_rows(self, s: EncodedSample, out: Any) -> tuple[np.ndarray, np.ndarray]:
        """prompt_logprobs path: the answer rows' ``(ids, logprobs)`` sorted by log-prob, from vLLM's output."""
        pl = out.prompt_logprobs
        if isinstance(pl, ArrayPromptLogprobs):
            # Row r predicts token r + 1; column 0 is the actual token, then the top-k in order.
            all_ids, all_lps = pl.arrays()
            sel = s.target_positions
            if all_ids.shape[0] != len(s.input_ids) - 1 or not np.array_equal(all_ids[sel, 0], s.answer_ids):
                raise RuntimeError(f"sample {s.sample_id!r}: vLLM's prompt log-prob rows do not line up with the "
                                   f"answer tokens (layout changed?); "
                                   "array_prompt_logprobs=False makes the engine read vLLM's lists instead")
            return all_ids[sel, 1:], all_lps[sel, 1:]
        # Entry i holds the distribution that predicts token i (entry 0 is empty).
        rows = [self._row(pl, int(p) + 1) for p in s.target_positions]
        width = min(len(r[0]) for r in rows)
        return (np.asarray([r[0][:width] for r in rows], dtype=np.int64),
                np.asarray([r[1][:width] for r in rows], dtype=np.float32))

    def _signals(self, s: EncodedSample, scored: Any, spec: SignalSpec, hidden: torch.Tensor | None) -> TeacherSignals:
        common = sample_fields(s)
        if spec.logits == "sampled":
            if isinstance(scored, torch.Tensor):
                dense = scored.double()
            else:  # the full vocabulary from vLLM, as sparse rows
                row_ids, row_lps = scored
                vocab = int(row_ids.max()) + 1
                dense = torch.full((len(row_ids), vocab), -torch.inf, dtype=torch.float64)
                dense.scatter_(1, torch.from_numpy(row_ids.astype(np.int64)), torch.from_numpy(row_lps).double())
            ids, vals, counts = sample_sparse(dense, spec.sampled_draws, sample_seed(spec.seed, s))
            signals = TeacherSignals(ids=ids, logprobs=vals, tail_logmass=tail_logmass(torch.from_numpy(vals)).numpy(),
                                     counts=counts, **common)
        else:
            row_ids, row_lps = scored
            ids = np.ascontiguousarray(row_ids[:, : spec.top_k], dtype=np.int32)
            vals = torch.from_numpy(np.ascontiguousarray(row_lps[:, : spec.top_k], dtype=np.float32))
            signals = TeacherSignals(ids=ids, logprobs=vals.numpy(), tail_logmass=tail_logmass(vals).numpy(), **common)
        if spec.hidden_layers:
            signals.hidden = self._hidden(s, hidden, spec.hidden_layers)
        return signals

    @staticmethod
    def _drain(llm: Any, outputs: list[Any], max_steps: int = 1000) -> list[str]:
        """Step the engine until every hidden-states file is written.

        The connector writes a request's file one scheduler step after the request finished, and
        ``generate`` returns as soon as the outputs are out; the extra steps run no model work.
        """
        paths = [(o.kv_transfer_params or {}).get("hidden_states_path") for o in outputs]
        for _ in range(max_steps):
            if all(p and os.path.exists(p) for p in paths):
                return paths
            llm.llm_engine.step()
        raise RuntimeError(f"vLLM did not write hidden states files: {[p for p in paths if not p or not os.path.exists(p)]}")

    @staticmethod
    def _row(pl: Any, position: int) -> tuple[list[int], list[float]]:
        """The top-k of one position sorted by log-prob, without the actual-token entry vLLM prepends."""
        start, end = pl.start_indices[position], pl.end_indices[position]
        ids, lps, ranks = pl.token_ids[start:end], pl.logprobs[start:end], pl.ranks[start:end]
        # vLLM puts the actual token first (with its true rank), then the top-k with ranks 1..k.
        if len(ranks) > 1 and ranks[1] == 1:
            ids, lps = ids[1:], lps[1:]
        else:  # no duplicate scheme: deduplicate by id and sort
            seen = dict(sorted(zip(ids, lps), key=lambda t: -t[1]))
            ids, lps = list(seen), list(seen.values())
        order = sorted(range(len(ids)), key=lambda i: -lps[i])
        return [ids[i] for i in order], [lps[i] for i in order]

    def _read_hidden(self, s: EncodedSample, path: str) -> torch.Tensor:
        """The aux hidden states at the answer-predicting positions, ``[T, n_aux, H]``, from vLLM's file."""
        from safetensors.torch import load_file

        if not os.path.exists(path):
            raise RuntimeError(f"sample {s.sample_id!r}: vLLM wrote no hidden states file ({path!r})")
        data = load_file(path)
        if not torch.equal(data["token_ids"].long(), torch.from_numpy(s.input_ids).long()):
            raise RuntimeError(f"sample {s.sample_id!r}: hidden states file does not match the prompt")
        hs, pos = data["hidden_states"], torch.from_numpy(s.target_positions)
        if "positions" in data:  # our connector kept only the positions the request named
            if not torch.equal(data["positions"].long(), pos) or hs.shape[0] != len(pos):
                raise RuntimeError(f"sample {s.sample_id!r}: hidden states file holds other positions")
            return hs
        if hs.shape[0] != len(s.input_ids):
            raise RuntimeError(f"sample {s.sample_id!r}: hidden states file does not match the prompt")
        return hs[pos]

    def _hidden(self, s: EncodedSample, hs: torch.Tensor | None, layers: tuple[int, ...]) -> dict[int, np.ndarray]:
        if hs is None:
            raise RuntimeError(f"sample {s.sample_id!r}: vLLM wrote no hidden states file")
        aux = self.aux_layer_ids()
        result = {}
        for layer in layers:
            h = hs[:, aux.index(layer)].float()
            if layer == self.num_layers:
                if self._final_norm is None:
                    self._final_norm = final_rms_norm(self.model_dir)
                w, eps = self._final_norm
                h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w
            result[layer] = h.numpy()
        return result

    def close(self) -> None:
        """Stop the vLLM engine and delete the hidden-states scratch folder."""
        if self._llm is not None:
            core = getattr(self._llm.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            self._llm = None
        vllm_process.mark_stopped(self)
        if self._tmp_cleanup is not None:
            self._tmp_cleanup()  # rmtree, once
            self._tmp, self._tmp_cleanup = None, None


def tokens_prompts(samples) -> list:
    """vLLM prompts of encoded samples: exact token ids (no re-tokenisation) plus their images."""
    from vllm.inputs import TokensPrompt

    prompts = []
    for s in samples:
        p = TokensPrompt(prompt_token_ids=list(s.vllm_prompt_ids))
        if s.images:
            p["multi_modal_data"] = {"image": list(s.images)}
        prompts.append(p)
    return prompts
