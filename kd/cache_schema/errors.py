"""Errors a cache reader or writer raises; each names the cache, shard or file at fault."""


class CacheError(Exception):
    """Base class of every cache error."""


class CachePathError(CacheError):
    """A path from cache metadata is absolute, escapes the cache root, or is a symlink."""


class CacheCorruptError(CacheError):
    """A file's checksum, size or a count disagrees with the manifest."""


class CacheUnsealedError(CacheError):
    """The cache is still being built (no sealed manifest)."""


class SchemaVersionError(CacheError):
    """The cache was written with a schema version this reader does not read."""


class CacheLockedError(CacheError):
    """Another live builder holds the cache's lock."""
