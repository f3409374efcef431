"""kd's hooks into vLLM internals, kept apart from the engine that uses them.

* ``CpuHiddenStatesConnector``: vLLM's example hidden-states KV connector with a synchronous
  device->host copy (its own needs CUDA streams), writing only the positions a request names
  (``kv_transfer_params[POSITIONS_KEY]``). vLLM loads it by module path and class name, so the
  class is built (importing vLLM) only when vLLM asks this module for it.
* ``ArrayPromptLogprobs`` / ``install_array_prompt_logprobs``: tagged requests keep prompt
  log-probs as arrays instead of vLLM's per-position Python lists.
* ``aux_hidden_arch``: architectures that pass aux hidden states through but lack vLLM's marker.

Nothing here imports vLLM at module import time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

CONNECTOR = "CpuHiddenStatesConnector"
ARRAY_TAG = "kd_array_prompt_logprobs"  # SamplingParams.extra_args key marking our requests
POSITIONS_KEY = "kd_positions"  # kv_transfer_params key: the positions whose hidden states the connector keeps


class ArrayPromptLogprobs:
    """Prompt log-probs of one request as arrays, in place of vLLM's per-position Python lists.

    Row ``r`` scores prompt position ``r + 1`` (position 0 has none, as in vLLM): column 0 is the
    actual token, columns ``1..k`` the top-k sorted by log-prob (vLLM's ``gather_logprobs`` layout).
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, tensors: Any) -> None:
        token_ids, logprobs = tensors[0], tensors[1]
        self._chunks.append((_as_numpy(token_ids), _as_numpy(logprobs)))
        self._arrays = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(token_ids [P-1, k+1] int, logprobs [P-1, k+1] float32)``."""
        if self._arrays is None:
            if len(self._chunks) == 1:
                self._arrays = self._chunks[0]
            else:
                self._arrays = (np.concatenate([c[0] for c in self._chunks]), np.concatenate([c[1] for c in self._chunks]))
        return self._arrays

    def __len__(self) -> int:  # positions, counting position 0 like vLLM's containers
        return 1 + sum(c[0].shape[0] for c in self._chunks)


def _as_numpy(t: Any) -> np.ndarray:
    # A copy: the arrays outlive the engine step that produced them (cheap: [positions, k+1]).
    return t.numpy().copy() if isinstance(t, torch.Tensor) else np.array(t)


def install_array_prompt_logprobs() -> bool:
    """Make vLLM's front end keep tagged requests' prompt log-probs as ``ArrayPromptLogprobs``.

    Patches ``LogprobsProcessor`` (vLLM's per-request output-side state) once per process; the
    patch only acts on requests whose ``SamplingParams.extra_args`` carry ``ARRAY_TAG`` and that
    do not detokenize, every other request takes vLLM's own path. Returns False (nothing patched)
    when this vLLM's internals do not look as expected; the engine then reads vLLM's lists.
    """
    try:
        from vllm.v1.engine.logprobs import LogprobsProcessor
    except ImportError:
        return False
    if getattr(LogprobsProcessor, "_kd_array_prompt_logprobs", False):
        return True
    new_request = LogprobsProcessor.__dict__.get("from_new_request")
    update = LogprobsProcessor.__dict__.get("_update_prompt_logprobs")
    if not isinstance(new_request, classmethod) or update is None:
        return False
    orig_new = new_request.__func__

    def from_new_request(cls, tokenizer, request):
        proc = orig_new(cls, tokenizer, request)
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        if extra.get(ARRAY_TAG) and tokenizer is None and proc.prompt_logprobs is not None:
            proc.prompt_logprobs = ArrayPromptLogprobs()
        return proc

    def _update_prompt_logprobs(self, prompt_logprobs_tensors):
        if isinstance(self.prompt_logprobs, ArrayPromptLogprobs):
            self.prompt_logprobs.add(prompt_logprobs_tensors)
        else:
            update(self, prompt_logprobs_tensors)

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_prompt_logprobs = _update_prompt_logprobs
    LogprobsProcessor._kd_array_prompt_logprobs = True
    return True


def _make_connector_class() -> type:
    """``ExampleHiddenStatesConnector`` with a synchronous device->host copy (no CUDA streams/events)."""
    from safetensors.torch import save_file
    from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
        ExampleHiddenStatesConnector, extract_from_kv_cache)

    class _Done:
        def query(self) -> bool:
            return True

        def synchronize(self) -> None:
            pass

    class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
        def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
            # Remember which positions the request wants (the answer-predicting ones): writing only
            # those keeps the file at [answer tokens, layers, H] instead of [prompt tokens, layers, H].
            delay, params = super().request_finished(request, block_ids)
            pending = self._pending_saves.get(request.request_id)
            positions = (request.kv_transfer_params or {}).get(POSITIONS_KEY)
            if pending is not None and positions is not None:
                pending.positions = list(positions)
            return delay, params

        def _submit_async_write(self, pending: Any) -> None:
            if not self._is_tp_rank_zero:
                return
            blocks = torch.tensor(pending.block_ids, dtype=torch.long)
            slots = (torch.arange(self._block_size)[None, :] + blocks[:, None] * self._block_size).flatten()
            n = pending.token_ids.shape[0]
            positions = getattr(pending, "positions", None)
            tensors = {"token_ids": pending.token_ids.clone()}
            if positions is not None:
                pos = torch.tensor(positions, dtype=torch.long)
                slots, n = slots[pos], len(positions)
                tensors["positions"] = pos
            hidden = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), n)
            tensors["hidden_states"] = hidden.to("cpu").contiguous().clone()
            os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
            lock_fd = self._lock_fds.pop(pending.req_id, None)
            try:
                save_file(tensors, pending.filename)
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)
            self._req_copy_events[pending.req_id] = _Done()

    return CpuHiddenStatesConnector


def aux_hidden_arch(arch: str) -> str | None:
    """Make a model class usable with ``extract_hidden_states`` when vLLM lacks only the marker.

    vLLM's Idefics3 forwards its Llama decoder's output unchanged (so aux hidden states flow
    through) but does not declare ``SupportsEagle3``, which the route requires. Register a subclass
    that declares it under a new architecture name (the original registration is untouched) and
    return that name; ``None`` when the class already supports it.
    """
    from vllm import ModelRegistry
    from vllm.model_executor.models.interfaces import SupportsEagle3, supports_eagle3

    cls = ModelRegistry._try_load_model_cls(arch)
    if cls is None:
        raise ValueError(f"vLLM does not know architecture {arch!r}")
    if supports_eagle3(cls):
        return None
    name = f"KdAuxHidden{arch}"
    if name not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(name, type(name, (cls, SupportsEagle3), {}))
    return name


def __getattr__(name: str) -> Any:
    # vLLM loads the connector by module path + class name; build the class only then.
    if name == CONNECTOR:
        cls = _make_connector_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
