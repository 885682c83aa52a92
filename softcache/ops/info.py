"""``softcache info``: what a cache holds, in one dict."""

from __future__ import annotations

from ..extras import Attentions, HiddenStates, LossMask
from ..format.manifest import Manifest
from ..reader import Cache

INCOMPLETE = "no (interrupted build; rerun the same command to finish)"


def completeness(manifest: Manifest) -> str:
    """Whether the cache holds everything it was meant to: ``softcache build`` records it in the manifest's
    build_state (false until the last sequence is committed); a cache written with CacheWriter directly is no build."""
    state = manifest.build_state
    if state is None:
        return "yes (written by CacheWriter, not a build)"
    return "yes" if state.complete else INCOMPLETE


def extras_summary(manifest: Manifest) -> dict:
    """The extra streams the cache holds (:mod:`softcache.extras`), in the manifest's order: name → its settings and,
    where the manifest fixes it, ``bytes_per_token`` before zstd (attentions: ``"N × L"``, L the sequence's length;
    none for MLM labels, entropy-coded ids whose size depends on the data). ``{}`` when there are none."""
    out = {}
    for extra in manifest.configured_extras():
        entry = dict(extra.settings())
        if isinstance(extra, LossMask):
            entry["bytes_per_token"] = 1 / 8
        elif isinstance(extra, HiddenStates):
            entry["bytes_per_token"] = extra.bytes_per_token()
        elif isinstance(extra, Attentions):  # (heads, L, L) per sequence: per token it grows with the length
            entry["max_length"] = extra.MAX_LENGTH
            entry["bytes_per_token"] = f"{extra.bytes_per_token(1):,} × L"
        out[extra.name] = entry
    return out


def describe_extras(extras: dict) -> list[str]:
    """:func:`extras_summary` as lines of text, one per extra (``["none"]`` when there are none)."""
    lines = []
    for name, entry in extras.items():
        parts = [f"projected from {value['from']} (seed {value['seed']})" if key == "projection" else f"{key} {value}"
                 for key, value in entry.items() if key != "bytes_per_token"]  # fmt: skip
        size = entry.get("bytes_per_token")
        if isinstance(size, str):
            size = f"{size} B/token before zstd (L: the sequence's length)"
        elif size is not None:
            size = f"{size:,} B/token before zstd"
        lines.append(f"{name}: " + "; ".join(filter(None, [", ".join(parts), size])))
    return lines or ["none"]


SCANNED_BATCHES = 32
"""Batches a summary decodes, at most, to find a sampled cache's widest stored row."""


def summary(cache: Cache) -> dict:
    """What ``softcache info`` prints: kind, extra streams, sizes, bytes per token and per entry, teacher."""
    m = cache.manifest
    tokens, nbytes = cache.num_tokens, cache.num_bytes
    entries = sum(s.entries for s in m.shards) if all(s.entries is not None for s in m.shards) else 0
    params = cache.params
    out = {
        "path": cache.url,
        "complete": completeness(m),
        "format_version": m.format_version,
        "targets": m.targets,
        "k": m.k,
        "vocab_size": m.vocab_size,
        "temperatures": m.temperatures,
        "samples": m.samples,
        "extras": extras_summary(m),
        "backend": m.backend,
        "shards": len(m.shards),
        "sequences": len(cache),
        "tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": nbytes / tokens if tokens else None,
        "entries_per_token": entries / tokens if tokens and entries else None,
        "bytes_per_entry": nbytes / entries if entries else None,
        "teacher": m.metadata.get("teacher"),
        "manifest_checksum": "verified" if m.checksummed else "none (written before manifests were checksummed)",
    }
    if not cache.kind.can_retemper:  # rows hold at most `samples` distinct ids of the k slots; how many at most here
        units = [(s, b) for s, shard in enumerate(m.shards) for b in range(len(shard.batches))]
        seen = units[:: max(1, -(-len(units) // SCANNED_BATCHES))]  # spread over the cache; info stays quick
        widest = max((int((cache.decoded_batch(s, b)["target_ids"] >= 0).sum(1).max(initial=0)) for s, b in seen),
                     default=0)  # fmt: skip
        scanned = "" if len(seen) == len(units) else f", in {len(seen)} of {len(units)} batches"
        out["widest_row"] = f"{widest} of {m.k} slots ({m.samples} draws per position{scanned})"
    if cache.kind.can_retemper:  # stored log-probs are quantised (sampled counts are exact)
        out["max_logprob_error"] = f"{params.max_logprob_error:.4g} nats / T"
        out["tail_mass_error"] = f"{params.lognorm_step:.1g}"
    return out
