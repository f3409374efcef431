"""`kd cache inspect` as plain data: a cache's summary grouped into blocks, and a comparison.

A flat list of some twenty keys, several of them 64-hex hashes, is hard to read: the blocks
put what identifies a cache (teacher, tokenizer, dataset), what it holds (signals) and how
big it is apart, with hashes cut to ``SHORT_HASH`` characters (``--json`` keeps them whole).
Given several caches, ``compare`` says which identity fields differ, naming each cache's
path, which is what decides whether they can be read together. No rich here (see listing.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .errors import CacheError
from .listing import created_minute, human_bytes, short_hash

if TYPE_CHECKING:
    from .reader import CacheReader

Block = tuple[str, list[tuple[str, str]]]  # (title, [(label, value), ...])


def inspect_summary(reader: "CacheReader") -> dict[str, Any]:
    """``reader.summary()`` plus the cache's name, role, kd version and teacher metadata.

    The keys of ``summary()`` are kept as they are (scripts read them from ``--json``).
    """
    m = reader.manifest
    if m is None:
        raise CacheError(f"{reader.location.url}: unsealed caches have no summary")
    s = dict(reader.summary())
    s["name"] = reader.location.url.rstrip("/").rsplit("/", 1)[-1]
    s["role"] = m.teacher.get("role")
    s["kd_version"] = m.kd_version
    s["teacher_meta"] = dict(m.teacher)
    turns = reader.num_turns
    s["n_conversations"] = int((turns > 1).sum())  # samples supervising several assistant turns
    s["n_turns"] = int(turns.sum())
    return s


def _coded(what: str, layers: Sequence[int], coding: str) -> str:
    word = "layer" if len(layers) == 1 else "layers"
    return f"{what}{word} {','.join(str(x) for x in layers)} ({coding})"


def signal_rows(sig: Mapping[str, Any]) -> list[tuple[str, str]]:
    """One line per signal kind, spelled out (the `ls` table has the compact form)."""
    if sig.get("logits") == "sampled":
        logits = f"sampled: {sig.get('sampled_draws')} draws, up to {sig.get('top_k')} ids per token"
    else:
        logits = f"top-{sig.get('top_k')} log-probs + tail mass"
    rows = [("logits", f"{logits} ({sig.get('value_coding')})")]
    if sig.get("hidden_layers"):
        rows.append(("hidden", _coded("", sig["hidden_layers"], sig.get("hidden_coding", "fp16"))))
    if sig.get("attention_layers"):
        kinds = " + ".join(sig.get("attention_kinds") or [])
        rows.append(("attention", _coded(f"{kinds}, ", sig["attention_layers"], sig.get("attention_coding", "fp16"))))
    return rows


def _engine(engine: Any) -> str:
    if not isinstance(engine, Mapping):
        return str(engine or "")
    text = " ".join(str(engine[k]) for k in ("kind", "dtype") if engine.get(k))
    return text + (f", seed {engine['seed']}" if engine.get("seed") is not None else "")


def _teacher_identity(ident: Any) -> str:
    """The teacher's identity in the key on one line (for comparisons): name, then each hash, shortened."""
    rows = _identity_rows(ident)
    return " · ".join(v for _, v in rows)


def _identity_rows(ident: Any) -> list[tuple[str, str]]:
    """The teacher's identity in the key, one row per part: ``weights_sha256`` reads ``weights``."""
    if not isinstance(ident, Mapping):
        return [("weights", short_hash(str(ident or "")))]
    return [(k.removesuffix("_sha256"), short_hash(str(v))) for k, v in ident.items() if k != "name" and v]


def blocks(s: Mapping[str, Any]) -> list[Block]:
    """The `kd cache inspect` view of one ``inspect_summary``: cache, identity, signals, sizes."""
    meta = s.get("teacher_meta") or {}
    state = "sealed" if s.get("sealed") else "not sealed"
    cache = [("name", str(s.get("name", ""))), ("path", str(s.get("path", ""))),
             ("state", f"{state}, created {created_minute(s.get('created'))} UTC, schema v{s.get('schema_version')}"
              + (f", kd {s['kd_version']}" if s.get("kd_version") else ""))]
    identity = [("key", short_hash(s.get("key"))),
                ("teacher", str(s.get("teacher") or "")),
                ("role", str(s.get("role") or "-")),
                *_identity_rows(s.get("teacher_identity")),
                ("engine", _engine(s.get("engine"))),
                ("tokenizer", short_hash(s.get("tokenizer_hash"))),
                ("template", short_hash(s.get("template_hash"))),
                ("dataset", short_hash(s.get("dataset_fingerprint")))]
    if meta.get("model_dir"):
        identity.insert(3, ("model dir", str(meta["model_dir"])))
    n_tokens = s.get("n_tokens")
    per_token = s.get("bytes_per_token")
    conversations = (f" ({s['n_conversations']:,} of them multi-turn, {s.get('n_turns', 0):,} turns in all)"
                     if s.get("n_conversations") else "")
    sizes = [("samples", f"{s.get('n_samples', 0):,} in {s.get('n_shards', 0)} shards{conversations}"),
             ("tokens", f"{n_tokens:,}" if isinstance(n_tokens, int) else str(n_tokens)),
             ("on disk", human_bytes(s.get("bytes_on_disk")) + (f" ({per_token} B/token)" if per_token else ""))]
    out = [("cache", cache), ("identity", identity), ("signals", signal_rows(s.get("signals") or {})), ("size", sizes)]
    lineage = lineage_rows(s)
    if lineage:
        out.append(("lineage", lineage))
    return out


def lineage_rows(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A child cache's parent and the chain it reads (SPEC.md section 11); none for a full cache."""
    parent = s.get("parent")
    if not parent:
        return []
    rows = [("parent", f"{parent['name']} (key {short_hash(parent['key'])})"),
            ("serves", f"{s.get('n_samples_served', 0):,} samples: {s.get('n_samples', 0):,} here, "
                       f"{parent['samples']:,} from the parent chain"
                       + (f", {parent['dropped']['samples']:,} of its samples dropped" if parent.get("dropped") else ""))]
    chain = s.get("chain") or []
    if len(chain) > 1:
        rows.append(("chain", " <- ".join(f"{c['name']} ({c['samples']:,})" for c in chain)))
    return rows


# Fields compared between caches, with the label shown; values shortened like the blocks'.
_COMPARED: tuple[tuple[str, str], ...] = (
    ("teacher", "teacher"), ("role", "role"), ("teacher_identity", "weights"), ("engine", "engine"),
    ("tokenizer_hash", "tokenizer"), ("template_hash", "template"), ("dataset_fingerprint", "dataset"),
    ("signals", "signals"), ("n_samples", "samples"),
)


def _shown(field: str, value: Any) -> str:
    if field == "teacher_identity":
        return _teacher_identity(value)
    if field == "engine":
        return _engine(value)
    if field == "signals":
        from .listing import signals_compact

        return signals_compact(value)
    if field.endswith("_hash") or field == "dataset_fingerprint":
        return short_hash(value)
    return "-" if value is None else str(value)


def compare(summaries: Sequence[Mapping[str, Any]]) -> Block:
    """Which identity fields agree across ``summaries`` and, for each one that differs, every
    cache's value next to its path (the caches are numbered in the order given)."""
    if len(summaries) < 2:
        raise ValueError("compare needs at least two caches")
    rows = [(f"#{i + 1}", str(s.get("path", ""))) for i, s in enumerate(summaries)]
    same, differ = [], []
    for field_name, label in _COMPARED:
        values = [s.get(field_name) for s in summaries]
        (same if all(v == values[0] for v in values) else differ).append((field_name, label, values))
    rows.append(("same", ", ".join(label for _, label, _ in same) or "nothing"))
    for field_name, label, values in differ:
        for i, v in enumerate(values):
            rows.append((label if i == 0 else "", f"#{i + 1} {_shown(field_name, v)}"))
    return (f"compared ({len(summaries)} caches)", rows)
