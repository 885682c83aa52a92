"""``softcache stats``: per-position teacher mass in the stored ids, tail mass and entropy; text and png histograms."""

from __future__ import annotations

import numpy as np

from ..reader import Cache


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
