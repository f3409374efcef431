"""The on-disk contract for teacher-output caches (format v5; v1 to v4 caches still read) and the library that implements it.

Depends on numpy, zarr, pyarrow, fsspec and xxhash only: no torch and no ``kd.pipeline``, so
any tool can read a cache. SPEC.md beside this file specifies the bytes.
"""

from .codecs import HIDDEN_CODINGS, VALUE_CODINGS, decode_logprobs, encode_logprobs, kl_topk_buckets
from .errors import (
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    CachePathError,
    CacheUnsealedError,
    SchemaVersionError,
)
from .summary import list_caches, manifest_summary
from .key import cache_dir_name, cache_key, canonical_json, key_inputs
from .manifest import SCHEMA_VERSION, Manifest, SignalConfig
from .reader import CachedBatch, CachedSample, CacheReader, JoinedReader, SampleRows, open_cache
from .storage import Location, checksum_bytes
from .verify import VerifyReport, verify_cache
from .writer import BuildPlan, CacheBuild, ShardWriter, hash_ids

__all__ = [
    "BuildPlan", "CacheBuild", "CacheCorruptError", "CacheError", "CacheLockedError", "CachePathError",
    "CacheReader", "CacheUnsealedError", "CachedBatch", "CachedSample", "HIDDEN_CODINGS", "JoinedReader", "Location",
    "Manifest", "SCHEMA_VERSION", "SampleRows", "SchemaVersionError", "ShardWriter", "SignalConfig", "VALUE_CODINGS",
    "VerifyReport", "cache_dir_name", "cache_key", "canonical_json", "checksum_bytes", "decode_logprobs",
    "encode_logprobs", "hash_ids", "key_inputs", "kl_topk_buckets", "list_caches", "manifest_summary",
    "open_cache", "verify_cache",
]
