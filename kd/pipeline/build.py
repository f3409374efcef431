"""Stage one as one readable recipe: validate data, key the cache, plan shards, capture, seal.

``build_cache`` is what ``kd cache build`` runs. A sealed cache with the same key is reused
without starting a teacher; an unfinished one resumes from its committed shards. Shards run
in-process by default or as dask tasks (``kd.pipeline.fanout``), one task per shard, one
warm engine per worker process.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from kd import __version__
from kd.cache_schema import BuildPlan, CacheBuild, Location, SignalConfig, key_inputs
from kd.cache_schema.manifest import MANIFEST_FILE

from .dataset import Record, RecordTable, dataset_fingerprint, load_records


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
    force: bool = False
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
        from .engines import SignalSpec

        return SignalSpec(
            logits=self.logits,
            top_k=self.top_k,
            sampled_draws=self.sampled_draws,
            hidden_layers=tuple(self.hidden_layers),
            attention_layers=tuple(self.attention_layers),
            attention_kind=self.attention_kind,
            seed=self.seed,
        )


@dataclass
class BuildResult:
    path: str
    key: str
    teacher: str
    samples: int
    tokens: int
    seconds: float
    reused: bool
    shards_built: int
    shards_total: int
    self_check_s: float | None = None  # seconds the self-check took (None: not run)
    self_check_diff: dict[str, float] | None = None  # its largest differences per signal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_engine(name: str, request: BuildRequest) -> str:
    """``auto`` picks vLLM where installed and the signals allow it, else transformers."""
    if name not in ("auto", "vllm", "hf"):
        raise ValueError(f"unknown engine {name!r}: choose 'vllm', 'hf' or 'auto'")
    if name == "vllm" and request.attention_layers:
        raise ValueError("vLLM cannot return attention maps; use --engine hf for --attention-layers")
    if name != "auto":
        return name
    if request.attention_layers:
        return "hf"
    try:
        import importlib.util

        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    except (ImportError, ValueError):
        return "hf"


def teacher_identity(request: BuildRequest) -> tuple[dict[str, Any], str, str]:
    """(teacher identity for the key, tokenizer hash, chat-template hash). Paths never enter."""
    from .engines import engine_identity

    model_dir = Path(request.teacher)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory {model_dir} has no config.json (not a transformers model dir)")
    if not any(model_dir.glob("*.safetensors")) and not request.teacher_revision:
        raise FileNotFoundError(f"teacher directory {model_dir} has no *.safetensors weights")
    name = request.teacher_name or model_dir.resolve().name
    if request.teacher_revision:
        ident = {"name": name, "revision": request.teacher_revision}
        raw = engine_identity(model_dir, hash_weights_below=0)
    else:
        raw = engine_identity(model_dir, hash_weights_below=1 << 62)  # always hash content: no false hits
        ident = {"name": name, "weights_sha256": raw["weights_sha256"]}
    ident["config_sha256"] = raw["config_sha256"]
    template = ""
    for fname in ("chat_template.jinja", "chat_template.json"):
        if (model_dir / fname).is_file():
            template = (model_dir / fname).read_text()
            break
    if not template and (model_dir / "tokenizer_config.json").is_file():
        template = str(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template", ""))
    return ident, raw["tokenizer_sha256"], hashlib.sha256(template.encode()).hexdigest()


def teacher_depth(model_dir: str) -> int | None:
    """Decoder layers of the teacher, recorded so students can map layers without the teacher."""
    from transformers import AutoConfig

    from .engines.base import num_text_layers

    try:
        return num_text_layers(AutoConfig.from_pretrained(model_dir))
    except (OSError, ValueError, AttributeError, KeyError):  # an unknown config only loses a default
        return None


@dataclass
class ShardJob:
    """A self-contained description of one shard's work (sent to dask workers as plain data)."""

    request: dict[str, Any]
    engine: str
    cache_url: str
    key_inputs: dict[str, Any]
    teacher_meta: dict[str, Any]
    shard: int
    sample_ids: list[str]


_WARM_ENGINES: dict[tuple, Any] = {}


def _engine_for(request: BuildRequest, engine: str):
    """One warm engine per process and (engine, model, dtype): workers reuse it across shards."""
    key = (engine, str(Path(request.teacher).resolve()), request.device, request.dtype, tuple(request.hidden_layers))
    if key not in _WARM_ENGINES:
        from .engines import load_engine

        if engine == "vllm":  # vLLM's KV-transfer state is per process: one vLLM engine alive at a time
            for other in [k for k in _WARM_ENGINES if k[0] == "vllm"]:
                _WARM_ENGINES.pop(other).close()

        opts = dict(request.engine_options)
        if engine == "vllm":
            opts.setdefault("hidden_layers", tuple(request.hidden_layers))
        else:
            opts.setdefault("batch_size", request.batch_size)
        _WARM_ENGINES[key] = load_engine(engine, request.teacher, device=request.device, dtype=request.dtype,
                                         trust_remote_code=request.trust_remote_code, **opts)
    return _WARM_ENGINES[key]


class _RecordsById:
    """A dataset's records by id, kept by each build worker across its shards: a ``RecordTable``
    and a ``SampleIdIndex`` (~0.3 KB per record, where a dict of Records took ~0.8 KB)."""

    def __init__(self, records: list[Record], where: str) -> None:
        import pyarrow as pa

        from kd.cache_schema.id_lookup import SampleIdIndex

        self.where = where
        self.table = RecordTable(records)
        self.index = SampleIdIndex(pa.array([r.id for r in records], pa.string()))

    def get(self, sample_ids: list[str]) -> list[Record]:
        rows = self.index.rows(sample_ids)
        if (rows < 0).any():
            missing = sample_ids[int((rows < 0).argmax())]
            raise KeyError(f"sample {missing!r} of the build plan is not in {self.where}")
        return self.table.take(rows.tolist())


_RECORDS: dict[str, _RecordsById] = {}


def _records_by_id(path: str) -> _RecordsById:
    if path not in _RECORDS:
        _RECORDS[path] = _RecordsById(load_records(path, check_images=False), path)
    return _RECORDS[path]


def run_shard(job: ShardJob, on_batch: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Capture and commit one shard; skipping it when another run already committed it."""
    request = BuildRequest(**job.request)
    build = CacheBuild(Location.from_url(request.out), job.key_inputs, job.teacher_meta, request.signal_config())
    if job.shard in build.committed():
        return {"shard": job.shard, "samples": 0, "tokens": 0, "skipped": 1}
    engine = _engine_for(request, job.engine)
    spec = request.signal_spec()
    records = _records_by_id(request.data)
    writer = build.shard_writer(job.shard)
    tokens = 0
    for i in range(0, len(job.sample_ids), request.batch_size):
        batch = records.get(job.sample_ids[i : i + request.batch_size])
        outputs = engine.capture([r.as_dict() for r in batch], spec)
        n_tok = 0
        for record, signals in zip(batch, outputs):
            writer.add(signals, record.capability)
            n_tok += signals.num_tokens
        tokens += n_tok
        if on_batch:
            on_batch(len(batch), n_tok)
    writer.commit()
    return {"shard": job.shard, "samples": len(job.sample_ids), "tokens": tokens, "skipped": 0}


def check_engine_limits(request: BuildRequest, engine: str, records: list[Record]) -> None:
    """Refuse a k or a sample the engine cannot serve, from the teacher's config and tokenizer alone.

    Runs before any cache directory exists: ``--top-k`` above the vocabulary (or vLLM's
    ``max_logprobs``), and samples whose prompt + image tokens + answer exceed the context, are
    errors naming the option or the sample, not a failure hours into the build.
    """
    from .engines.base import check_context, check_top_k, engine_limits, load_config_and_processor

    config, processor = load_config_and_processor(request.teacher, request.trust_remote_code)
    limits = engine_limits(engine, config, request.engine_options, where=f"teacher {request.teacher}")
    check_top_k(request.signal_spec(), limits)
    check_context(records, processor, limits, source=request.data)


def prepare(request: BuildRequest) -> tuple[CacheBuild, list[Record], str]:
    """Validate inputs and derive the cache identity; writes nothing."""
    from .engines.base import vocab_sha256

    records = load_records(request.data)  # raises DatasetError naming line and field; nothing written
    engine = resolve_engine(request.engine, request)
    ident, tok_hash, tmpl_hash = teacher_identity(request)
    check_engine_limits(request, engine, records)
    signals = request.signal_config()
    inputs = key_inputs(
        teacher=ident,
        tokenizer_hash=tok_hash,
        template_hash=tmpl_hash,
        dataset_fingerprint=dataset_fingerprint(records),
        signals=signals,
        engine={"kind": engine, "dtype": request.dtype, "seed": request.seed if request.logits == "sampled" else None},
    )
    meta = {"name": ident["name"], "role": request.role, "engine": engine, "dtype": request.dtype,
            "revision": request.teacher_revision, "num_layers": teacher_depth(request.teacher),
            "tokenizer_sha256": tok_hash, "vocab_sha256": vocab_sha256(request.teacher),
            "model_dir": str(Path(request.teacher).resolve())}
    build = CacheBuild(Location.from_url(request.out), inputs, meta, signals)
    return build, records, engine


def build_cache(request: BuildRequest, progress: BuildProgress | None = None, *,
                lease_timeout: float | None = None) -> BuildResult:
    """Build (or reuse, or resume) the cache for one teacher and return where it is.

    The driver holds the cache's build lease (``kd.cache_schema.lease``) from plan to seal:
    a second builder of the same cache waits for it (at most ``lease_timeout`` seconds, then
    ``CacheLockedError``), then finds the cache sealed and reuses it; a killed builder's
    lease goes stale and is taken over, and the build resumes from its committed shards.
    """
    from kd.cache_schema.lease import LEASE_FILE, BuildLease

    from .fanout import run_jobs

    t0 = time.perf_counter()
    build, records, engine = prepare(request)

    def reused() -> BuildResult:
        m = json.loads(build.location.read_bytes(MANIFEST_FILE))
        return BuildResult(build.location.url, build.key, build.teacher["name"], m["counts"]["samples"],
                           m["counts"]["tokens"], time.perf_counter() - t0, True, 0, m["counts"]["shards"])

    if build.sealed and not request.force:
        return reused()
    with BuildLease(build.location, wait_timeout=lease_timeout) as lease:
        if build.sealed and not request.force:  # the builder we waited for finished it
            return reused()
        if request.force:
            build.clear(keep=[LEASE_FILE])
        check = None
        if request.self_check and not build.committed():
            check = self_check(request, engine, records)  # raises before anything is written
        plan = BuildPlan.from_ids([r.id for r in records], request.shard_size)
        build.start(plan)
        done = build.committed()
        jobs = [
            ShardJob(asdict_request(request), engine, build.location.url, build.inputs, build.teacher, i, ids)
            for i, ids in enumerate(plan.shards)
            if i not in done
        ]
        if progress:
            progress.start(total_samples=len(records), done_samples=sum(e.samples for e in done.values()),
                           total_shards=len(plan.shards), done_shards=len(done))
        stats = run_jobs(jobs, workers=request.workers, scheduler=request.scheduler, progress=progress)
        manifest = build.seal(__version__, lease=lease)
    if progress:
        progress.finish()
    return BuildResult(build.location.url, build.key, build.teacher["name"], manifest.samples, manifest.tokens,
                       time.perf_counter() - t0, False, sum(1 for s in stats if not s["skipped"]), len(plan.shards),
                       check.seconds if check else None, check.max_diff if check else None)


def self_check(request: BuildRequest, engine: str, records: list[Record]):
    """``self_check.run_self_check`` on the build's first batch, with the engine the shards will use.

    In-process builds keep that engine warm for the shards; a distributed build's driver closes
    it again (its workers start their own).
    """
    from .self_check import reference_model, run_self_check

    teacher = _engine_for(request, engine)
    try:
        model = reference_model(teacher, request.teacher, device=request.device, dtype=request.dtype,
                                trust_remote_code=request.trust_remote_code)
        family = json.loads((Path(request.teacher) / "config.json").read_text()).get("architectures", ["?"])[0]
        return run_self_check(teacher, model, [r.as_dict() for r in records[: request.batch_size]],
                              request.signal_spec(), family=family, dtype=request.dtype)
    finally:
        if request.workers or request.scheduler:
            close_warm_engines()


def close_warm_engines() -> None:
    """Close every engine this process keeps warm (frees a vLLM engine's device memory)."""
    while _WARM_ENGINES:
        _WARM_ENGINES.popitem()[1].close()


def asdict_request(request: BuildRequest) -> dict[str, Any]:
    d = asdict(request)
    d["hidden_layers"] = list(request.hidden_layers)
    d["attention_layers"] = list(request.attention_layers)
    return d


class BuildProgress:
    """Rich progress bar: samples, tokens/s, ETA and shards done (silent when not a terminal)."""

    def __init__(self, description: str = "capture", enabled: bool = True):
        self.description = description
        self.enabled = enabled
        self._progress = None
        self._task = None
        self.tokens = 0
        self._t0 = time.perf_counter()
        self.shards_done = 0
        self.total_shards = 0

    def start(self, *, total_samples: int, done_samples: int, total_shards: int, done_shards: int) -> None:
        self.shards_done, self.total_shards = done_shards, total_shards
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("samples"), TextColumn("{task.fields[rate]}"),
                                  TextColumn("shards {task.fields[shards]}"), TimeRemainingColumn())
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total_samples, completed=done_samples,
                                             rate="", shards=f"{done_shards}/{total_shards}")

    def advance(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        if self._progress is not None:
            rate = self.tokens / max(time.perf_counter() - self._t0, 1e-9)
            self._progress.update(self._task, advance=samples, rate=f"{rate:,.0f} tok/s")

    def shard_done(self) -> None:
        self.shards_done += 1
        if self._progress is not None:
            self._progress.update(self._task, shards=f"{self.shards_done}/{self.total_shards}")

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
