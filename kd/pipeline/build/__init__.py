"""Stage one, `kd cache build`: records -> teacher engine -> sealed cache.

``recipe.build_cache`` is the readable recipe (validate, key, plan, self-check, capture, seal);
``request`` says what a build is asked for, ``shard`` does one shard's work, ``fanout`` runs
shards in-process or on dask, ``engines/`` are the teachers (transformers, vLLM) and
``self_check`` compares a batched capture with a plain forward before anything is written.
"""

from kd.pipeline.build.progress import BuildProgress
from kd.pipeline.build.recipe import BuildResult, build_cache, check_engine_limits, prepare, resolve_engine
from kd.pipeline.build.request import BuildRequest, asdict_request
from kd.pipeline.build.shard import ShardJob, close_warm_engines, run_shard

__all__ = ["BuildProgress", "BuildRequest", "BuildResult", "ShardJob", "asdict_request", "build_cache",
           "check_engine_limits", "close_warm_engines", "prepare", "resolve_engine", "run_shard"]
