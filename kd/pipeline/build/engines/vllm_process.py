"""One vLLM engine per process while the hidden-states connector is in use.

vLLM's KV-transfer group, the route of hidden states and of the answer-only head's residuals, is
process-global: a second engine started beside one that has it fails deep inside vLLM ("Expected 1
CacheOnlyAttentionLayer, got 0"). ``VLLMEngine`` checks here before it starts vLLM, so the error
names the engine that runs and what to do. ``kd cache build`` keeps one vLLM engine per process and
closes the previous one itself (``build.shard.warm_engine``).
"""

from __future__ import annotations

import weakref
from typing import Any

_RUNNING: weakref.WeakSet[Any] = weakref.WeakSet()  # started VLLMEngines of this process


def refuse_beside_running(engine: Any) -> None:
    """Raise ``RuntimeError`` when ``engine`` (about to start) and a running one cannot share the process:
    when either uses the connector (``aux_layer_ids()`` not empty)."""
    for other in list(_RUNNING):
        if other is not engine and other.running and (engine.aux_layer_ids() or other.aux_layer_ids()):
            raise RuntimeError(
                f"cannot start a vLLM engine for {engine.model_dir} while another one runs in this process "
                f"({other.model_dir}, head {other.head_path}, aux layers {other.aux_layer_ids()}): vLLM's "
                "KV-transfer state, the route of hidden states and answer-only scoring, is per process. close() "
                "the other engine first (kd cache build keeps one vLLM engine per process and does this itself)")


def mark_running(engine: Any) -> None:
    _RUNNING.add(engine)


def mark_stopped(engine: Any) -> None:
    _RUNNING.discard(engine)
