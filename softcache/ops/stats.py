"""``softcache stats``: per-position teacher mass in the stored ids, tail mass and entropy bounds (top-k), distinct ids
and the largest count share (sampled); text and png histograms."""

from __future__ import annotations

import numpy as np

from ..reader import Cache


def position_stats(cache: Cache, temperature: float | None = None, max_tokens: int | None = None) -> dict:
    """Per position that stores targets (up to ``max_tokens``), at ``temperature`` (default: the first captured).

    top-k: ``mass`` (teacher mass in the stored ids), ``tail_mass``, ``entries`` (ids stored), and the entropy,
    which the stored head alone does not fix: ``entropy_lower`` (every tail id is at most as likely as the smallest
    stored one, and at most the tail mass: ``H_head + t·(−log min(p_min, t))``), ``entropy_upper`` (the tail spread
    evenly over the ``V − n`` ids not stored: ``H_head − t·log t + t·log(V − n)``) and ``entropy_one_bin`` (the tail
    as one extra bin, a looser lower bound). sampled (``c/N`` estimates): ``distinct`` (distinct ids drawn) and
    ``top_share`` (the largest count over N). Positions outside a loss mask store nothing and are left out.
    """
    temperature = cache.temperatures[0] if temperature is None else temperature
    cache.temperature_index(temperature)  # clear error before any work
    sampled = not cache.kind.can_retemper
    keys = ("distinct", "top_share") if sampled else ("mass", "entries", "entropy_lower", "entropy_upper",
                                                       "entropy_one_bin")  # fmt: skip
    out: dict[str, list] = {key: [] for key in keys}
    seen = 0
    for i in range(len(cache)):
        ids, lp = cache.targets(i, temperature)
        real = ids >= 0
        keep = real.any(-1)
        real, lp = real[keep], lp[keep].astype(np.float64)
        p = np.where(real, np.exp(lp), 0.0)
        n = real.sum(-1)
        if sampled:
            out["distinct"].append(n)
            out["top_share"].append(p.max(-1, initial=0.0))
        else:
            mass = p.sum(-1)
            tail = np.clip(1.0 - mass, 0.0, 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                head = -np.where(p > 0, p * np.log(p), 0).sum(-1)
                smallest = np.minimum(np.where(real, p, np.inf).min(-1), tail)
                lower = np.where(tail > 0, tail * -np.log(np.maximum(smallest, 1e-300)), 0.0)
                one_bin = np.where(tail > 0, -tail * np.log(np.maximum(tail, 1e-300)), 0.0)
                spread = np.where(tail > 0, tail * np.log(np.maximum(cache.vocab_size - n, 1)), 0.0)
            out["mass"].append(mass)
            out["entries"].append(n)
            out["entropy_lower"].append(head + lower)
            out["entropy_upper"].append(head + one_bin + spread)
            out["entropy_one_bin"].append(head + one_bin)
        seen += len(ids)
        if max_tokens is not None and seen >= max_tokens:
            break
    stats = {key: np.concatenate(values) if values else np.zeros(0) for key, values in out.items()}
    if not sampled:
        stats["tail_mass"] = np.clip(1 - stats["mass"], 0, 1)
    return stats


def panels(stats: dict[str, np.ndarray]) -> list[tuple[str, str, float | None, float | None]]:
    """What ``softcache stats`` shows of :func:`position_stats`: (key, label, low, high) per histogram."""
    if "distinct" in stats:
        return [("distinct", "distinct ids per position", None, None), ("top_share", "largest count share", 0.0, 1.0)]
    return [
        ("mass", "teacher mass in stored ids", 0.0, 1.0),
        ("tail_mass", "tail mass", 0.0, 1.0),
        ("entropy_lower", "entropy lower bound (nats; tail ids no likelier than the last stored)", None, None),
        ("entropy_upper", "entropy upper bound (nats; tail spread evenly over the ids not stored)", None, None),
        ("entropy_one_bin", "entropy with the tail as one bin (nats; a looser lower bound)", None, None),
        ("entries", "entries per position", None, None),
    ]


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
    """Histograms of :func:`position_stats` to a PNG: top-k mass, tail mass and the entropy bounds; sampled distinct
    ids and the largest count share."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'softcache[plot]'") from None
    sampled = "distinct" in stats
    if sampled:
        plots = [(("distinct",), "distinct ids per position", None), (("top_share",), "largest count share", (0, 1))]
    else:
        plots = [
            (("mass",), "teacher mass in stored ids", (0, 1)),
            (("tail_mass",), "tail mass", (0, 1)),
            (("entropy_lower", "entropy_upper"), "entropy (nats)", None),
        ]
    fig, axes = plt.subplots(1, len(plots), figsize=(4.4 * len(plots), 3.6))
    for ax, (keys, label, limits) in zip(np.atleast_1d(axes), plots, strict=True):
        for key, color in zip(keys, ("#3b6ea5", "#d9822b"), strict=False):
            values = stats[key]
            if key == "distinct" and values.size:
                bins = np.arange(values.min(), values.max() + 2) - 0.5
            else:
                bins = np.linspace(*limits, 51) if limits else 50
            name = {"entropy_lower": "lower bound", "entropy_upper": "upper bound"}.get(key)
            ax.hist(values, bins=bins, color=color, alpha=0.75 if len(keys) > 1 else 1.0, label=name)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if limits:
            ax.set_xlim(*limits)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=keys == ("distinct",)))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.set_xlabel(label)
        ax.set_ylabel("positions")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
