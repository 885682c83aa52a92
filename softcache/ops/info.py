"""``softcache info``: what a cache holds, in one dict."""

from __future__ import annotations

from ..reader import Cache


def summary(cache: Cache) -> dict:
    """What ``softcache info`` prints: kind, sizes, bytes per token and per entry, teacher."""
    m = cache.manifest
    tokens, nbytes = cache.num_tokens, cache.num_bytes
    entries = sum(s.entries for s in m.shards) if all(s.entries is not None for s in m.shards) else 0
    params = cache.params
    out = {
        "path": cache.url,
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
    if cache.kind.can_retemper:  # stored log-probs are quantised (sampled counts are exact)
        out["max_logprob_error"] = f"{params.max_logprob_error:.4g} nats / T"
        out["tail_mass_error"] = f"{params.lognorm_step:.1g}"
    return out
