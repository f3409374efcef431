"""What one teacher's build is asked for: ``BuildRequest`` (the fields of `kd cache build`), as the
signals the cache will hold and the capture the engine will run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kd.cache_schema import SignalConfig


@dataclass
class BuildRequest:
    """Everything `kd cache build` needs for one teacher (one cache)."""

    teacher: str  # model directory in the transformers layout
    data: str  # stage-one JSONL
    out: str  # cache root: local path or fsspec URL
    engine: str = "auto"  # "auto" | "vllm" | "hf"
    logits: str = "topk"
    top_k: int = 64
    sampled_draws: int = 12
    value_coding: str = "fp16"
    hidden_layers: tuple[int, ...] = ()
    hidden_coding: str = "fp16"
    attention_layers: tuple[int, ...] = ()
    attention_kind: str = "t2v"  # "t2v" | "full" | "both"
    shard_size: int = 256  # samples per shard: the unit of work, commit and resume
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    teacher_name: str | None = None
    teacher_revision: str | None = None  # with a revision, weights are identified by name + revision
    role: str | None = None
    trust_remote_code: bool = False
    workers: int = 0  # 0: in-process; N: a dask LocalCluster of N worker processes
    scheduler: str | None = None  # address of an existing dask scheduler
    force: bool = False  # rebuild from scratch (a full cache, no parent) even if a sealed one exists
    reuse: bool = True  # grow a sealed cache of the same teacher and signals under `out` (a child cache)
    self_check: bool = True  # before the first shard, compare a batched capture with a plain forward
    engine_options: dict[str, Any] = field(default_factory=dict)

    def signal_config(self) -> SignalConfig:
        kinds = {"t2v": ("t2v",), "full": ("full",), "both": ("t2v", "full")}[self.attention_kind]
        return SignalConfig(
            logits=self.logits,
            top_k=self.top_k if self.logits == "topk" else self.sampled_draws,
            value_coding=self.value_coding,
            sampled_draws=self.sampled_draws if self.logits == "sampled" else 0,
            hidden_layers=tuple(sorted(set(self.hidden_layers))),
            hidden_coding=self.hidden_coding,
            attention_layers=tuple(sorted(set(self.attention_layers))),
            attention_kinds=kinds if self.attention_layers else (),
            attention_coding="fp16",
        )

    def signal_spec(self):
        from kd.pipeline.build.engines import SignalSpec

        return SignalSpec(
            logits=self.logits,
            top_k=self.top_k,
            sampled_draws=self.sampled_draws,
            hidden_layers=tuple(self.hidden_layers),
            attention_layers=tuple(self.attention_layers),
            attention_kind=self.attention_kind,
            seed=self.seed,
        )


def asdict_request(request: BuildRequest) -> dict[str, Any]:
    d = asdict(request)
    d["hidden_layers"] = list(request.hidden_layers)
    d["attention_layers"] = list(request.attention_layers)
    return d
