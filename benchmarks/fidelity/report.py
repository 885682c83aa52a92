"""RESULTS.md, fidelity.png and results.json of the fidelity study, from the per-seed measurements of run.py; and
RESULTS_real.md, fidelity_real.png and results_real.json of the real-teacher study (real.py)."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TEMPLATE = """\
# Fidelity: students trained from softcache caches vs the live teacher (issue 7)

{quick}Small-scale version of Anshumann et al. 2025, "Sparse Logit Sampling" (ACL 2025). The shipped demo teacher
(`softcache.demo.teacher_path()`, Llama, V = {vocab}, hidden 128, 3 layers) runs once over the first
{cached_tokens:,} tokens of the demo corpus's train split, packed into {seq_len}-token sequences, and
`softcache.build.build` writes each cache. Students (Llama, hidden 64, 2 layers, same tokenizer, 0.36M parameters)
train for {steps} AdamW steps of {batch} sequences (peak lr {lr}, {warmup_frac:.0%} linear warmup, cosine to 10 %,
grad-norm clip 1; one pass over {train_tokens:,} tokens). Within a seed every run starts from the same weights and
sees the same sequences in the same order (input ids read back from the cache); seeds change both. {seeds}; cells are
mean ± std over seeds.

Losses: **ce** = cross-entropy on the next token; **dense** = KL(teacher ‖ student) over the full vocabulary from the
live teacher (T = 1); **topkK_tail** = `sparse_kl_loss(..., tail=tail, temperature=1)` on that cache. All KD runs are
pure KD (alpha = 1, no hard-label term), as in the paper. **sampledN** (N draws per position at T = 1, stored as
unique ids with counts): one run, because for sampled targets P = Σ c/N = 1, so the bucket tail is empty and
`bucket` and `renormalize` are the same loss and gradient (measured angle between their gradients: {tails}).

Metrics on {eval_tokens:,} held-out positions (the demo corpus's validation split, seen neither by the teacher's
training nor by the students): **held-out CE** = mean −log q(true next token); **KL** = mean KL(teacher ‖ student)
over the full vocabulary at the same positions; **ECE** = expected calibration error of the student's top-1
prediction, 15 equal-width confidence bins; **gap closed** = (CE_ce − CE_run) / (CE_ce − CE_dense) × 100, computed
within each seed (0 % = no better than hard labels, 100 % = as good as dense KD, negative = worse than hard labels),
and the same ratio of the seed-mean CEs; **CE − dense CE** = the run's held-out CE minus the dense-KD student's of
the same seed; **bytes/token** = cache bytes on disk / tokens (`cache.num_bytes / cache.num_tokens`); **ids/position**
and **teacher mass in ids** = mean stored ids per position and the teacher probability they hold (top-k; sampled
caches store counts); **angle** = angle between the gradient of the run's loss and the dense-KD gradient w.r.t. all
student parameters, on a fixed batch of {angle_seqs} cached sequences that no run trains on, at the seed's initial
weights and at the dense-KD student's final weights.

## Results

{table}

CE-only minus dense-KD held-out CE (the gap every percentage divides by): {gap} nats.

![gap closed against bytes per token](fidelity.png)

Other regimes (a confident teacher, hard-label mixing): [RESULTS_regimes.md](RESULTS_regimes.md), written by
`python benchmarks/fidelity/run.py --regimes`.

## Goals

{goals}

## Run

- Command: `{command}`
- Machine: {machine}; 2 cores shared with other jobs while it ran.
- Date: {date}; wall time {minutes:.1f} min, of which cache builds: {builds}.
- Per-seed numbers: `results.json` next to this file.

{last_line}
"""


def gap_closed(ce_only: float, dense: float, ce_run: float) -> float:
    """Share (%) of the held-out CE gap between the CE-only and the dense-KD student that a run closes."""
    return 100.0 * (ce_only - ce_run) / (ce_only - dense)


def summarise(runs, per_seed: list[dict]) -> dict[str, dict]:
    """Per run: mean and std over seeds of every metric, of the gap closed (computed within each seed) and of the
    paired CE difference to dense KD; and the gap closed by the seed-mean CEs (steadier when a seed's gap is small)."""
    table = {}
    for run in runs:
        rows = [seed[run.name] for seed in per_seed]
        gaps = [gap_closed(seed["ce"]["ce"], seed["dense"]["ce"], seed[run.name]["ce"]) for seed in per_seed]
        stats = {
            key: (
                float(np.mean([r[key] for r in rows])),
                float(np.std([r[key] for r in rows], ddof=1)) if len(rows) > 1 else 0.0,
            )
            for key in rows[0]
        }
        stats["gap"] = (float(np.mean(gaps)), float(np.std(gaps, ddof=1)) if len(gaps) > 1 else 0.0)
        kl_gaps = [gap_closed(seed["ce"]["kl"], seed["dense"]["kl"], seed[run.name]["kl"]) for seed in per_seed]
        stats["kl_gap"] = (float(np.mean(kl_gaps)), float(np.std(kl_gaps, ddof=1)) if len(kl_gaps) > 1 else 0.0)
        diffs = [seed[run.name]["ce"] - seed["dense"]["ce"] for seed in per_seed]
        stats["minus_dense"] = (float(np.mean(diffs)), float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0)
        means = [float(np.mean([seed[name]["ce"] for seed in per_seed])) for name in ("ce", "dense", run.name)]
        stats["gap_of_means"] = gap_closed(*means)
        table[run.name] = stats
    return table


def machine(threads: int) -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, torch {torch.__version__} on {threads} thread(s), Python {platform.python_version()}"


def _pm(stat: tuple[float, float], fmt: str, scale: float = 1.0) -> str:
    mean, std = stat
    return f"{mean * scale:{fmt}} ± {std * scale:{fmt}}"


def plot(path: Path, runs, table: dict, bytes_per_token: dict, dense_bytes: float, title: str = "") -> None:
    """Gap closed against bytes/token: one marker per cache run (error bars: std over seeds), dense KD at the cost
    of storing its full logits in bf16. Left: every run; right: the band between hard labels and dense KD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {
        "bucket": ("o", "tab:blue"),
        "renormalize": ("s", "tab:orange"),
        "sampled": ("^", "tab:green"),
        "mixed": ("D", "tab:purple"),
    }
    labels = {
        "bucket": "top-k, bucket tail",
        "renormalize": "top-k, renormalize",
        "sampled": "sampled",
        "mixed": "(1 − α)·CE + α·KD",
    }
    for ax in axes:
        seen = set()
        for run in runs:
            if run.loss != "cache":
                continue
            style = "mixed" if run.alpha is not None else "sampled" if run.cache.startswith("sampled") else run.tail
            mean, std = table[run.name]["gap"]
            x = bytes_per_token[run.cache]
            marker, color = styles[style]
            label = None if style in seen else labels[style]
            ax.errorbar(x, mean, yerr=std, fmt=marker, color=color, capsize=3, label=label)
            seen.add(style)
            name = run.cache if run.alpha is None else run.name
            ax.annotate(name, (x, mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.plot(dense_bytes, 100, "*", color="black", markersize=10, label="dense KD (full logits, bf16)")
        ax.axhline(100, color="black", lw=0.6, ls="--")
        ax.axhline(0, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes per token (log scale)")
    axes[0].set_ylabel("CE → dense-KD gap closed (%), mean ± std over seeds")
    axes[0].set_title("all runs")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[1].set_ylim(-60, 130)
    axes[1].set_title("zoom: between hard labels (0 %) and dense KD (100 %)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def last_line(table: dict, bytes_per_token: dict, *, key: str = "gap_closed", sampled=("sampled50",),
              sampled_bytes: str = "sampled50") -> str:
    """The study's one-line summary: the gap each cache closes and the bytes per token of top-64 and one sampled."""
    gaps = " ".join(f"{name}={table[name]['gap'][0]:.0f}%"
                    for name in ("topk64_bucket", "topk64_renormalize", *sampled))  # fmt: skip
    return (
        f"{key}: dense=100% {gaps} bytes_per_token_topk64={bytes_per_token['topk64']:.1f} "
        f"bytes_per_token_{sampled_bytes}={bytes_per_token[sampled_bytes]:.1f}"
    )


def last_line_real(table: dict, bytes_per_token: dict) -> str:
    """:func:`last_line` of the real-teacher study (two sampled caches, the bytes of the smaller)."""
    return last_line(table, bytes_per_token, key="gap_closed_real", sampled=("sampled12", "sampled50"),
                     sampled_bytes="sampled12")  # fmt: skip


def goals(table: dict, runs, bytes_per_token: dict, key: str = "gap", gap: str = "") -> list[str]:
    """The issue's two goals, checked against the means (and stated with their std) of ``table[run][key]``, the
    share of ``gap`` (default: the held-out CE gap) closed."""
    top = table["topk64_bucket"][key]
    lines = [
        f"- top-64 with the bucket tail closes {_pm(top, '.0f')} % of {gap or 'the gap'} (goal ≥ 90 %): "
        f"**{'met' if top[0] >= 90 else 'not met'}**."
    ]
    budget = bytes_per_token["topk64"] / 10
    cheap = [r for r in runs if r.loss == "cache" and bytes_per_token[r.cache] <= budget]
    if cheap:
        best = max(cheap, key=lambda r: table[r.name][key][0])
        closed = table[best.name][key]
        lines.append(
            f"- best cache at ≤ 1/10 of top-64's bytes ({budget:.1f} B/token): {best.name} at "
            f"{bytes_per_token[best.cache]:.1f} B/token closes {_pm(closed, '.0f')} %"
            f"{' of ' + gap if gap else ''} (goal ≥ 95 %): "
            f"**{'met' if closed[0] >= 95 else 'not met'}**."
        )
    else:
        lines.append(f"- no cache in this run fits in 1/10 of top-64's bytes ({budget:.1f} B/token): goal not tested.")
    return lines


def table_rows(runs, table: dict, stats: dict, vocab_size: int, kl_gap: bool = False) -> list[str]:
    """The results table as Markdown lines, one row per run; ``kl_gap`` adds the share of the KL(teacher ‖ student)
    gap between the CE-only and the dense-KD student that each run closes."""
    dense_bytes = 2.0 * vocab_size
    rows = [
        "| run | bytes/token | ids/position | teacher mass in ids | held-out CE (nats) | KL(teacher‖student) "
        "| ECE (%) | gap closed (%) | gap closed, of mean CEs (%) | CE − dense CE, paired (nats) "
        "| angle to dense grad, init (°) | angle, trained (°) |" + (" KL gap closed (%) |" if kl_gap else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if kl_gap else ""),
    ]
    for run in runs:
        t = table[run.name]
        if run.loss == "cache":
            c = stats[run.cache]
            mass = "1 (counts)" if c["teacher_mass"] is None else f"{c['teacher_mass']:.3f}"
            size = f"{c['bytes_per_token']:.1f} | {c['ids_per_position']:.1f} | {mass}"
        else:
            size = "— | — | —" if run.loss == "ce" else f"{dense_bytes:.0f} (live; bf16 logits) | {vocab_size} | 1"
        rows.append(
            f"| {run.name} | {size} | {_pm(t['ce'], '.4f')} | {_pm(t['kl'], '.4f')} | "
            f"{_pm(t['ece'], '.2f', 100)} | {_pm(t['gap'], '.1f')} | {t['gap_of_means']:.1f} | "
            f"{_pm(t['minus_dense'], '.4f')} | {_pm(t['angle_init'], '.1f')} | "
            f"{_pm(t['angle_trained'], '.1f')} |" + (f" {_pm(t['kl_gap'], '.1f')} |" if kl_gap else "")
        )
    return rows


REGIMES_TEMPLATE = """\
# Fidelity in other regimes (issue 7)

{quick}The study of [RESULTS.md](RESULTS.md) (same students, data, schedule, metrics and columns) with another
teacher or another KD loss, one table per regime. Within a regime, **ce** and **dense** are that regime's
references: **gap closed** is still (CE_ce − CE_run) / (CE_ce − CE_dense) on held-out CE, with dense KD from that
regime's teacher under that regime's alpha. **KL gap closed** is the same ratio on KL(teacher ‖ student): how much of
the way from the hard-label student to the dense-KD student a run gets in matching the regime's teacher.

The **confident teacher** is synthetic: the demo teacher's logits divided by τ_t < 1 (a model folder with the tied
output layer untied and scaled by 1/τ_t, built by `study.sharpened_teacher`), standing in for a real LLM teacher,
whose top-64 ids typically hold 85–95 % of its mass; the demo teacher's top-64 holds about half. That teacher is
the teacher everywhere in its regime: its caches are built from it by `softcache.build.build` (so bytes/token are
those of real softcache caches), dense KD uses it live, and KL and ECE are measured against it. It is sharper, not
better: its own held-out CE is worse than the demo teacher's, so held-out CE against the true next token (and the
CE gap) says less about fidelity in that regime than KL to the teacher does.

{sections}

## Run

- Command: `{command}`
- Machine: {machine}; 2 cores shared with other jobs while it ran.
- Date: {date}; per-seed numbers: `results_regimes.json` next to this file.
"""


def write_regimes(out: Path, sections: list[tuple]) -> Path:
    """Write ``out``/RESULTS_regimes.md (one table per regime) and results_regimes.json. ``sections``: per regime,
    the arguments ``write_results`` takes after ``out``, in the same order."""
    out.mkdir(parents=True, exist_ok=True)
    parts, dump = [], []
    for runs, _caches, per_seed, stats, vocab_size, info in sections:
        bytes_per_token = {name: s["bytes_per_token"] for name, s in stats.items()}
        table = summarise(runs, per_seed)
        ce_gap = [s["ce"]["ce"] - s["dense"]["ce"] for s in per_seed]
        kl_gap = [s["ce"]["kl"] - s["dense"]["kl"] for s in per_seed]
        n = len(per_seed)
        partial = f" (**only {n} of the {info['seeds']} requested finished**)" if n < info["seeds"] else ""
        builds = ", ".join(f"{k} {'reused' if v is None else f'{v:.0f}s'}" for k, v in info["build_seconds"].items())
        parts += [
            f"## {info['title']}",
            "",
            f"Teacher: the demo teacher's logits / {info['teacher_temperature']:g}; KD runs train on "
            f"(1 − α)·CE + α·KD with α = {info['setup']['alpha']:g}. {n} seed(s){partial}; wall time "
            f"{info['wall_seconds'] / 60:.1f} min, of which cache builds: {builds}.",
            "",
            *table_rows(runs, table, stats, vocab_size, kl_gap=True),
            "",
            f"CE-only minus dense-KD held-out CE: {_pm(_mean_std(ce_gap), '.4f')} nats; "
            f"KL(teacher ‖ student): {_pm(_mean_std(kl_gap), '.4f')} nats.",
            "",
            *(
                goals(table, runs, bytes_per_token)
                if np.mean(ce_gap) > 0
                else [
                    "- Goals on the held-out CE gap: **not measurable** here: dense KD ends with a worse held-out CE "
                    "than hard labels (the gap is negative, so its 'gap closed' column ranks runs backwards)."
                ]
            ),
            *goals(table, runs, bytes_per_token, "kl_gap", "the KL gap"),
            "",
        ]
        dump.append({"info": info, "caches": stats, "per_seed": per_seed})
    (out / "results_regimes.json").write_text(json.dumps(dump, indent=1))
    info = sections[0][-1]
    text = REGIMES_TEMPLATE.format(
        quick=quick_note(info),
        sections="\n".join(parts).rstrip("\n"),
        command=info["command"],
        machine=machine(info["threads"]),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    path = out / "RESULTS_regimes.md"
    path.write_text(text)
    return path


def quick_note(info: dict) -> str:
    return "**QUICK MODE: tiny sizes that exercise the code paths; these numbers mean nothing.**\n\n" * info["quick"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Flavour:
    """What a study writes: its Markdown template (formatted with the setup's fields, ``info`` and those that
    ``write_results`` computes), the three file names and the function that makes its summary line."""

    template: str
    markdown: str
    plot: str
    json: str
    summary: Callable[[dict, dict], str]
    plot_title: str = ""


DEMO = Flavour(TEMPLATE, "RESULTS.md", "fidelity.png", "results.json", last_line)


def write_results(
    out: Path, runs, caches, per_seed, stats: dict, vocab_size: int, info: dict, flavour: Flavour = DEMO
) -> Path:
    """Write ``out``/RESULTS.md (table, setup, goals, plot link, and the summary line last), fidelity.png and
    results.json (every per-seed number), or the files that ``flavour`` names. ``stats``: per cache, what
    ``study.cache_stats`` returns."""
    out.mkdir(parents=True, exist_ok=True)
    bytes_per_token = {name: s["bytes_per_token"] for name, s in stats.items()}
    table = summarise(runs, per_seed)
    dense_bytes = 2.0 * vocab_size
    plot(out / flavour.plot, runs, table, bytes_per_token, dense_bytes, flavour.plot_title)
    dump = {"info": info, "caches": stats, "per_seed": per_seed}
    (out / flavour.json).write_text(json.dumps(dump, indent=1))
    setup = info["setup"]
    n = len(per_seed)
    rows = table_rows(runs, table, stats, vocab_size)
    ce_gap = [s["ce"]["ce"] - s["dense"]["ce"] for s in per_seed]
    sampled = [c.name for c in caches if c.targets == "sampled"]
    tails = ", ".join(
        f"{name}: {table[name]['angle_init_bucket_vs_renormalize'][0]:.2g}° at init, "
        f"{table[name]['angle_trained_bucket_vs_renormalize'][0]:.2g}° trained"
        for name in sampled
    )
    partial = f" (**only {n} of the {info['seeds']} requested finished**)" if n < info["seeds"] else ""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    regime_note = (
        ""
        if info.get("teacher_temperature", 1.0) == 1.0 and setup.get("alpha", 1.0) == 1.0
        else f"**Regime: {info['title']}** (the teacher and the KD loss below are those of this regime).\n\n"
    )
    builds = ", ".join(f"{k} {'reused' if v is None else f'{v:.0f}s'}" for k, v in info["build_seconds"].items())
    text = flavour.template.format(
        quick=quick_note(info) + regime_note,
        vocab=vocab_size,
        cached_tokens=info["train_tokens"] + setup["angle_seqs"] * setup["seq_len"],
        train_tokens=info["train_tokens"],
        seeds=f"{n} seed(s){partial}",
        tails=tails,
        eval_tokens=info["eval_tokens"],
        table="\n".join(rows),
        gap=_pm((np.mean(ce_gap), np.std(ce_gap, ddof=1) if n > 1 else 0.0), ".4f"),
        goals="\n".join(goals(table, runs, bytes_per_token)),
        command=info["command"],
        machine=machine(info["threads"]),
        date=date,
        minutes=info["wall_seconds"] / 60,
        builds=builds,
        last_line=flavour.summary(table, bytes_per_token),
        info=info,
        **setup,
    )
    path = out / flavour.markdown
    path.write_text(text)
    return path
