"""Whole-cache operations behind the CLI: summary, verify, convert, statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .format import CacheFormatError, CorruptShardError, get_backend, load_manifest
from .format.backend import join, shard_digest
from .reader import Cache, decode_batch, open_cache
from .writer import CacheWriter, open_fs


def summary(cache: Cache) -> dict:
    """What ``softcache info`` prints: kind, sizes, bytes per token and per entry, teacher."""
    m = cache.manifest
    tokens, nbytes = cache.num_tokens, cache.num_bytes
    entries = sum(s["entries"] for s in m["shards"]) if all("entries" in s for s in m["shards"]) else 0
    params = cache.params
    out = {
        "path": cache.url,
        "format_version": m["format_version"],
        "targets": m["targets"],
        "k": m["k"],
        "vocab_size": m["vocab_size"],
        "temperatures": m["temperatures"],
        "samples": m.get("samples"),
        "backend": m["backend"],
        "shards": len(m["shards"]),
        "sequences": len(cache),
        "tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": nbytes / tokens if tokens else None,
        "entries_per_token": entries / tokens if tokens and entries else None,
        "bytes_per_entry": nbytes / entries if entries else None,
        "teacher": (m.get("metadata") or {}).get("teacher"),
    }
    if m["targets"] == "topk":
        out["max_logprob_error"] = f"{params.max_logprob_error:.4g} nats / T"
        out["tail_mass_error"] = f"{params.lognorm_step:.1g}"
    return out


@dataclass
class VerifyReport:
    shards_checked: int = 0
    batches_checked: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path_or_url, storage_options: dict | None = None, decode: bool = True, progress=None) -> VerifyReport:
    """Check every shard: present, size and SHA-256 as in the manifest, every batch's CRC, and (with
    ``decode``) that every batch decodes to the counts the manifest records. Problems are collected,
    each naming its shard; the manifest itself must load (else :class:`CacheFormatError`)."""
    fs, root = open_fs(path_or_url, storage_options)
    manifest = load_manifest(fs, root)
    cache = Cache(path_or_url, storage_options=storage_options, max_cached_batches=1)
    report = VerifyReport()
    for s, entry in enumerate(manifest["shards"]):
        name = entry["file"]
        report.shards_checked += 1
        if progress is not None:
            progress(s, name)
        path = join(root, name)
        if not fs.exists(path):
            report.problems.append((name, "missing"))
            continue
        size, digest = shard_digest(fs, path)
        if size != entry["bytes"] or digest != entry.get("sha256"):
            report.problems.append((name, f"checksum mismatch ({size} bytes, manifest says {entry['bytes']})"))
            continue
        try:
            reader = cache._reader(s)
            order = cache._order(s)
            tokens = 0
            for b, n_seqs in enumerate(entry["batches"]):
                streams = reader.read_batch(b)
                if decode:
                    tokens += len(decode_batch(streams, n_seqs, cache, order)["input_ids"])
                report.batches_checked += 1
            if decode and tokens != entry["tokens"]:
                report.problems.append((name, f"holds {tokens} tokens, the manifest says {entry['tokens']}"))
        except (CorruptShardError, ValueError, IndexError) as e:
            report.problems.append((name, str(e)))
    cache.close()
    return report


def convert(src, dst, backend: str, storage_options: dict | None = None, progress=None) -> Cache:
    """Copy the cache at ``src`` to a new cache at ``dst`` stored with ``backend``, losslessly: the
    encoded batches are moved as they are (and their checksums checked on the way)."""
    get_backend(backend)
    cache = open_cache(src, storage_options=storage_options)
    m = cache.manifest
    writer = CacheWriter(
        dst,
        vocab_size=m["vocab_size"],
        k=m["k"],
        targets=m["targets"],
        temperatures=m["temperatures"],
        samples=m.get("samples"),
        backend=backend,
        metadata=m.get("metadata"),
        logprob_step=m["codec"]["logprob_step"],
        storage_options=storage_options,
    )
    if writer.manifest["codec"] != m["codec"]:
        raise CacheFormatError(f"{src}: codec parameters {m['codec']} cannot be reproduced by this softcache")
    if writer.manifest["shards"]:
        raise CacheFormatError(f"{dst} already holds a cache; convert needs a new or empty destination")
    with writer:
        for s, entry in enumerate(m["shards"]):
            if progress is not None:
                progress(s, entry["file"])
            reader = cache._reader(s)
            batches = ((n, reader.read_batch(b)) for b, n in enumerate(entry["batches"]))
            writer.copy_shard(reader.header, batches, entry)
    cache.close()
    return open_cache(dst, storage_options=storage_options)


def position_stats(cache: Cache, temperature: float | None = None, max_tokens: int | None = None) -> dict:
    """Per position (up to ``max_tokens``): teacher mass in the stored ids, tail mass and the entropy
    of the stored distribution with the tail as one extra bin, at ``temperature`` (default: the
    first captured one); also the number of entries stored."""
    temperature = cache.temperatures[0] if temperature is None else temperature
    cache.temperature_index(temperature)  # clear error before any work
    mass, entropy, entries = [], [], []
    seen = 0
    for i in range(len(cache)):
        ids, lp = cache.targets(i, temperature)
        real = ids >= 0
        p = np.where(real, np.exp(lp.astype(np.float64)), 0.0)
        m = p.sum(-1)
        tail = np.clip(1.0 - m, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0).sum(-1) - np.where(tail > 0, tail * np.log(tail), 0)
        mass.append(m)
        entropy.append(h)
        entries.append(real.sum(-1))
        seen += len(ids)
        if max_tokens is not None and seen >= max_tokens:
            break
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    m = cat(mass)
    return {"mass": m, "tail_mass": np.clip(1 - m, 0, 1), "entropy": cat(entropy), "entries": cat(entries)}


def describe(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.quantile(values, [0.05, 0.5, 0.95])
    return {"mean": float(values.mean()), "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2])}


def text_histogram(values: np.ndarray, bins: int = 10, width: int = 40, lo=None, hi=None) -> list[str]:
    if values.size == 0:
        return ["(no data)"]
    lo = float(values.min()) if lo is None else lo
    hi = float(values.max()) if hi is None else hi
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi if hi > lo else lo + 1))
    top = max(1, counts.max())
    return [
        f"{edges[j]:8.3f} – {edges[j + 1]:8.3f} | {'#' * int(round(width * c / top)):<{width}} {c}"
        for j, c in enumerate(counts)
    ]


def plot_stats(stats: dict[str, np.ndarray], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'softcache[plot]'") from None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(
        axes,
        ("mass", "tail_mass", "entropy"),
        ("teacher mass in stored ids", "tail mass", "entropy (nats, tail as one bin)"),
        strict=True,
    ):
        ax.hist(stats[key], bins=50, color="#3b6ea5")
        ax.set_xlabel(label)
        ax.set_ylabel("positions")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["VerifyReport", "convert", "describe", "plot_stats", "position_stats", "summary", "verify"]
