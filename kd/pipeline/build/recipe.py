"""Stage one as one readable recipe: validate data, key the cache, plan shards, capture, seal.

``build_cache`` is what ``kd cache build`` runs. A sealed cache with the same key is reused
without starting a teacher; an unfinished one resumes from its committed shards. A grown (or
edited) dataset grows a sealed cache of the same teacher and signals under the same root
(``kd.cache_schema.lineage``): only the samples that cache lacks are captured, into a child cache
naming it as its parent (``reuse=False`` or ``force``: a full build). Shards run
in-process by default or as dask tasks (``fanout``), one task per shard (``shard.run_shard``),
one warm engine per worker process, each shard committed behind the next one's capture
(``commits``); ``run_jobs`` returns once every commit is durable, so the seal counts only
committed shards. What a build is asked for lives in ``request``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kd import __version__
from kd.cache_schema import BuildPlan, CacheBuild, CacheReader, Location, key_inputs
from kd.cache_schema.lineage import ParentChoice, coverage, find_parent
from kd.cache_schema.manifest import MANIFEST_FILE, Manifest
from kd.pipeline.build.fanout import run_jobs
from kd.pipeline.build.progress import BuildProgress
from kd.pipeline.build.request import BuildRequest, asdict_request
from kd.pipeline.build.shard import ShardJob, close_warm_engines, drop_captured, keep_captured, warm_engine
from kd.pipeline.common.dataset import Record, fingerprint_and_hashes, load_records


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
    parent: str | None = None  # the cache this one grows (its name under the same root), if any
    reused_samples: int = 0  # of ``samples``, those served from the parent chain (not captured)

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
    from kd.pipeline.build.engines import engine_identity

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

    from kd.pipeline.common.model_files import num_text_layers

    try:
        return num_text_layers(AutoConfig.from_pretrained(model_dir))
    except (OSError, ValueError, AttributeError, KeyError):  # an unknown config only loses a default
        return None


def check_engine_limits(request: BuildRequest, engine: str, records: list[Record]) -> None:
    """Refuse a k or a sample the engine cannot serve, from the teacher's config and tokenizer alone.

    Runs before any cache directory exists: ``--top-k`` above the vocabulary (or vLLM's
    ``max_logprobs``), and samples whose prompt + image tokens + answer exceed the context, are
    errors naming the option or the sample, not a failure hours into the build.
    """
    from kd.pipeline.build.engines.limits import check_context, check_top_k, engine_limits
    from kd.pipeline.common.model_files import load_config_and_processor

    config, processor = load_config_and_processor(request.teacher, request.trust_remote_code)
    limits = engine_limits(engine, config, request.engine_options, where=f"teacher {request.teacher}")
    check_top_k(request.signal_spec(), limits)
    check_context(records, processor, limits, source=request.data)


@dataclass
class Prepared:
    """A build's validated inputs: the cache it makes, its records, their content hashes, the engine."""

    build: CacheBuild
    records: list[Record]
    content_hashes: list[str]
    engine: str
    root: Location


def prepare(request: BuildRequest) -> tuple[CacheBuild, list[Record], str]:
    """Validate inputs and derive the cache identity; writes nothing."""
    p = prepare_build(request)
    return p.build, p.records, p.engine


def prepare_build(request: BuildRequest) -> Prepared:
    """``prepare``, keeping each record's content hash (what a child cache is planned from)."""
    from kd.pipeline.common.model_files import vocab_sha256

    records = load_records(request.data)  # raises DatasetError naming line and field; nothing written
    engine = resolve_engine(request.engine, request)
    ident, tok_hash, tmpl_hash = teacher_identity(request)
    check_engine_limits(request, engine, records)
    signals = request.signal_config()
    fingerprint, hashes = fingerprint_and_hashes(records)
    inputs = key_inputs(
        teacher=ident,
        tokenizer_hash=tok_hash,
        template_hash=tmpl_hash,
        dataset_fingerprint=fingerprint,
        signals=signals,
        engine={"kind": engine, "dtype": request.dtype, "seed": request.seed if request.logits == "sampled" else None},
    )
    meta = {"name": ident["name"], "role": request.role, "engine": engine, "dtype": request.dtype,
            "revision": request.teacher_revision, "num_layers": teacher_depth(request.teacher),
            "tokenizer_sha256": tok_hash, "vocab_sha256": vocab_sha256(request.teacher),
            "model_dir": str(Path(request.teacher).resolve())}
    root = Location.from_url(request.out)
    return Prepared(CacheBuild(root, inputs, meta, signals), records, hashes, engine, root)


def choose_parent(request: BuildRequest, p: Prepared) -> ParentChoice | None:
    """The cache this build grows: the one its unfinished plan names (a resume), else the best under
    the same root (``lineage.find_parent``), none with ``reuse=False`` or ``force``."""
    build, ids = p.build, [r.id for r in p.records]
    if build.has_plan():
        planned = build.planned_parent()
        if not planned:
            return None
        reader = CacheReader(p.root.child(planned["name"]).url)  # a parent that went away: an error naming it
        return coverage(reader, ids, p.content_hashes)
    if request.force or not request.reuse:
        return None
    return find_parent(p.root, build.inputs, build.name, ids, p.content_hashes)


def _chained(build: CacheBuild) -> bool:
    m = json.loads(build.location.read_bytes(MANIFEST_FILE))
    return bool(m.get("parent"))


def build_cache(request: BuildRequest, progress: BuildProgress | None = None, *,
                lease_timeout: float | None = None) -> BuildResult:
    """Build (or reuse, or resume) the cache for one teacher and return where it is.

    The driver holds the cache's build lease (``kd.cache_schema.lease``) from plan to seal:
    a second builder of the same cache waits for it (at most ``lease_timeout`` seconds, then
    ``CacheLockedError``), then finds the cache sealed and reuses it; a killed builder's
    lease goes stale and is taken over, and the build resumes from its committed shards.
    """
    from kd.cache_schema.lease import LEASE_FILE, BuildLease

    t0 = time.perf_counter()
    prepared = prepare_build(request)
    build, records, engine = prepared.build, prepared.records, prepared.engine

    def keep_sealed() -> bool:  # --no-reuse turns a sealed child into a full cache
        return build.sealed and not request.force and (request.reuse or not _chained(build))

    def reused() -> BuildResult:
        m = Manifest.from_json(build.location.read_bytes(MANIFEST_FILE), f"{build.location.url}/{MANIFEST_FILE}")
        if m.parent is not None:
            CacheReader(build.location.url)  # the chain must still read: a missing parent is named here
        extra = (m.parent.samples, m.parent.tokens) if m.parent else (0, 0)
        return BuildResult(build.location.url, build.key, build.teacher["name"], m.samples + extra[0],
                           m.tokens + extra[1], time.perf_counter() - t0, True, 0, len(m.shards),
                           parent=m.parent.name if m.parent else None, reused_samples=extra[0])

    if keep_sealed():
        return reused()
    with BuildLease(build.location, wait_timeout=lease_timeout) as lease:
        if keep_sealed():  # the builder we waited for finished it
            return reused()
        if request.force or build.sealed:
            build.clear(keep=[LEASE_FILE])
        parent = choose_parent(request, prepared)
        todo = records if parent is None else [records[i] for i in parent.todo]
        hashes = dict(zip((r.id for r in records), prepared.content_hashes))
        check = None
        if request.self_check and todo and not build.committed():
            check = self_check(request, engine, todo, hashes)  # raises before anything is written
        plan = BuildPlan.from_ids([r.id for r in todo], request.shard_size)
        build.start(plan, parent.plan_entry() if parent else None)
        done = build.committed()
        jobs = [
            ShardJob(asdict_request(request), engine, build.location.url, build.inputs, build.teacher, i, ids,
                     [hashes[sid] for sid in ids])
            for i, ids in enumerate(plan.shards)
            if i not in done
        ]
        if progress:
            progress.start(total_samples=len(todo), done_samples=sum(e.samples for e in done.values()),
                           total_shards=len(plan.shards), done_shards=len(done))
        try:
            stats = run_jobs(jobs, workers=request.workers, scheduler=request.scheduler, progress=progress)
        finally:
            drop_captured()  # the self-check's batch, if no shard took it
        manifest = build.seal(__version__, lease=lease)
    if progress:
        progress.finish()
    extra = (parent.reused, parent.tokens) if parent else (0, 0)
    return BuildResult(build.location.url, build.key, build.teacher["name"], manifest.samples + extra[0],
                       manifest.tokens + extra[1], time.perf_counter() - t0, False,
                       sum(1 for s in stats if not s["skipped"]), len(plan.shards),
                       check.seconds if check else None, check.max_diff if check else None,
                       parent.name if parent else None, extra[0])


def self_check(request: BuildRequest, engine: str, records: list[Record], content_hashes: dict[str, str]):
    """``self_check.run_self_check`` on the first batch of the samples the build captures (a child
    cache's new ones), with the engine the shards will use; an in-process build's first shard then
    writes that capture instead of repeating it (``shard.keep_captured``).

    In-process builds keep that engine warm for the shards; a distributed build's driver closes
    it again (its workers start their own).
    """
    from kd.pipeline.build.self_check import reference_model, run_self_check

    teacher = warm_engine(request, engine)
    distributed = bool(request.workers or request.scheduler)
    try:
        def load():  # loaded (and let go) before the engine's first capture: see run_self_check
            return reference_model(teacher, request.teacher, device=request.device, dtype=request.dtype,
                                   trust_remote_code=request.trust_remote_code)

        family = json.loads((Path(request.teacher) / "config.json").read_text()).get("architectures", ["?"])[0]
        report = run_self_check(teacher, load, [r.as_dict() for r in records[: request.batch_size]],
                                request.signal_spec(), family=family, dtype=request.dtype)
        if not distributed:  # the first shard runs here, on this engine
            keep_captured(teacher, list(report.captured), tuple(content_hashes[s.sample_id] for s in report.captured),
                          request.signal_spec())
        return report
    finally:
        if distributed:
            close_warm_engines()
