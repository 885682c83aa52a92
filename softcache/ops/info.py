"""``softcache info``: what a cache holds, in one dict."""

from __future__ import annotations

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


SCANNED_BATCHES = 32
"""Batches a summary decodes, at most, to find a sampled cache's widest stored row."""


def summary(cache: Cache) -> dict:
    """What ``softcache info`` prints: kind, sizes, bytes per token and per entry, teacher."""
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
