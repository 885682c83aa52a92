"""Fidelity study: do students trained from a softcache cache match students trained on the live teacher?

The small-scale version of Anshumann et al. 2025 ("Sparse Logit Sampling"). The shipped demo teacher runs once over
the demo corpus's train split into top-k caches (k = 4, 16, 64) and sampled caches (N = 12, 50); identical students
then train with hard CE, dense KD from the live teacher, and each cache under each tail (sampled caches: one run, as
both tails are the same loss there, see RESULTS.md). Held-out CE, KL(teacher ‖ student), ECE, the share of the
CE → dense-KD gap closed, bytes/token and gradient angles go to RESULTS.md (see report.py)::

    .venv/bin/python benchmarks/fidelity/run.py                 # the full study (26 min on the shared 2-core CPU)
    .venv/bin/python benchmarks/fidelity/run.py --quick --out /tmp/fidelity   # every code path, tiny, 20-60 s

``--teacher-temperature`` and ``--alpha`` run the whole study in another regime (a sharpened teacher, hard-label
mixing); ``--regimes`` runs the preset set ``REGIMES`` instead and writes RESULTS_regimes.md and
results_regimes.json (one table per regime; 27 min for 2 seeds, the flat teacher's caches reused).
"""

from __future__ import annotations

import argparse
import copy
import functools
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from report import write_regimes, write_results
from study import (
    CacheSpec,
    Corpus,
    Run,
    Setup,
    angle_degrees,
    build_caches,
    cache_stats,
    evaluate,
    flat_grad,
    held_out,
    load_targets,
    load_teacher,
    make_student,
    sharpened_teacher,
    teacher_metrics,
    train,
)

import softcache

FULL_CACHES = [
    CacheSpec("topk4", "topk", 4),
    CacheSpec("topk16", "topk", 16),
    CacheSpec("topk64", "topk", 64),
    CacheSpec("sampled12", "sampled", 12, samples=12),
    CacheSpec("sampled50", "sampled", 50, samples=50),
]
QUICK_CACHES = [CacheSpec("topk64", "topk", 64), CacheSpec("sampled50", "sampled", 50, samples=50)]
TAILS = ("bucket", "renormalize")


@dataclass(frozen=True)
class Regime:
    """A teacher (the demo teacher's logits / ``teacher_temperature``), a KD mix ``alpha`` and the runs to train."""

    title: str
    teacher_temperature: float
    alpha: float
    runs: tuple[str, ...]


REGIMES = [
    Regime(
        "Confident teacher (demo teacher's logits / 0.55), pure KD",
        0.55,
        1.0,
        (
            "ce",
            "dense",
            "topk4_bucket",
            "topk16_bucket",
            "topk64_bucket",
            "topk64_renormalize",
            "sampled12",
            "sampled50",
        ),
    ),
    Regime(
        "Flat teacher (the demo teacher), alpha = 0.5: (1 − α)·CE + α·KD",
        1.0,
        0.5,
        ("ce", "dense", "topk16_bucket", "topk64_bucket", "sampled12"),
    ),
]


def plan_runs(caches: list[CacheSpec]) -> list[Run]:
    """CE and dense first (every other run is measured against them), then each cache under each tail."""
    runs = [Run("ce", "ce"), Run("dense", "dense")]
    for spec in caches:
        if spec.targets == "sampled":
            runs.append(Run(spec.name, "cache", spec.name, "renormalize"))
        else:
            runs += [Run(f"{spec.name}_{tail}", "cache", spec.name, tail) for tail in TAILS]
    return runs


def run_seed(seed, runs, caches, input_ids, held, teacher, setup, workdir) -> dict[str, dict]:
    """Train every run from the seed's initial weights in the seed's data order; measure each on held-out text.

    Gradient angles against dense KD are taken on the angle batch (sequences no run trains on), at the initial
    weights and at the dense-KD student's final weights.
    """
    n_train = len(input_ids) - setup.angle_seqs
    order = np.random.default_rng(seed).permutation(n_train)[: setup.steps * setup.batch]
    angle_rows = np.arange(n_train, len(input_ids))
    initial = make_student(teacher.config.vocab_size, setup.seq_len, seed, setup.hidden, setup.layers, setup.device)
    results, angle_targets, loaded = {}, {}, {}
    for run in runs:
        targets = None
        if run.loss == "cache":
            if run.cache not in loaded:
                cache = softcache.open_cache(f"{workdir}/{run.cache}")
                ids, logprobs = load_targets(cache, np.arange(len(input_ids)), input_ids.cpu())
                loaded = {run.cache: (ids.to(setup.device), logprobs.to(setup.device))}  # one cache in memory
            targets = loaded[run.cache]
            angle_targets[run.cache] = (targets[0][angle_rows], targets[1][angle_rows])
        t0 = time.perf_counter()
        student = train(run, copy.deepcopy(initial), order, input_ids, setup, teacher, targets)
        results[run.name] = {**evaluate(student, held), "seconds": time.perf_counter() - t0}
        if run.loss == "dense":
            dense_student = student
        r = results[run.name]
        print(
            f"seed {seed} {run.name:>22}: CE {r['ce']:.4f}  KL {r['kl']:.4f}  ECE {100 * r['ece']:.2f}%  "
            f"{r['seconds']:.0f}s",
            flush=True,
        )

    batch = input_ids[angle_rows]
    for where, model in (("angle_init", initial), ("angle_trained", dense_student)):
        dense = flat_grad(Run("dense", "dense"), model, batch, teacher, alpha=setup.alpha)
        for run in runs:
            grad = flat_grad(run, model, batch, teacher, angle_targets.get(run.cache), run.mix(setup))
            results[run.name][where] = angle_degrees(grad, dense)
        for spec in caches:
            if spec.targets == "sampled":
                grads = [
                    flat_grad(Run("", "cache", spec.name, t), model, batch, None, angle_targets[spec.name], setup.alpha)
                    for t in TAILS
                ]
                results[spec.name][f"{where}_bucket_vs_renormalize"] = angle_degrees(*grads)
    return results


def run_regime(regime: Regime, caches, setup: Setup, seeds: int, workdir: str, info: dict, write) -> None:
    """Build the regime's caches from its teacher, train its runs for ``seeds`` seeds and call ``write(runs, caches,
    per_seed, stats, vocab_size, info)`` after every seed, so that a run stopped early leaves its finished seeds."""
    runs = [run for run in plan_runs(caches) if run.name in regime.runs]
    tau = regime.teacher_temperature
    teacher_dir = sharpened_teacher(workdir, tau)
    cache_dir = workdir if tau == 1.0 else f"{workdir}/t{tau:g}"
    info = {**info, "title": regime.title, "teacher_temperature": tau}
    run_study(runs, caches, setup, seeds, cache_dir, teacher_dir, info, write)


def run_study(
    runs: list[Run],
    caches: list[CacheSpec],
    setup: Setup,
    seeds: int,
    cache_dir: str,
    teacher_dir: str,
    info: dict,
    write,
    corpus: Corpus | None = None,
    teacher_dtype: str | None = None,
) -> None:
    """Build the caches that ``runs`` use in ``cache_dir`` from the teacher in ``teacher_dir`` over ``corpus``
    (default: the demo corpus), train ``runs`` for ``seeds`` seeds on ``setup.device`` and call ``write(runs, caches,
    per_seed, stats, vocab_size, info)`` after every seed. The teacher runs in ``teacher_dtype`` (default: float32;
    the builds: bf16 on CUDA) everywhere: in the cache builds, in dense KD and on the held-out text."""
    t0 = time.perf_counter()
    caches = [spec for spec in caches if any(run.cache == spec.name for run in runs)]
    n_seqs = setup.steps * setup.batch + setup.angle_seqs
    build_seconds = build_caches(
        caches, cache_dir, setup.seq_len, n_seqs, teacher_dir, corpus, teacher_dtype, setup.device
    )
    reference = softcache.open_cache(f"{cache_dir}/{caches[0].name}")
    input_ids = torch.from_numpy(np.stack([reference[i]["input_ids"] for i in range(n_seqs)])).to(setup.device)
    teacher = load_teacher(teacher_dir, teacher_dtype, setup.device)
    held = held_out(setup.eval_seqs, setup.seq_len, teacher, corpus=corpus)
    stats = {spec.name: cache_stats(softcache.open_cache(f"{cache_dir}/{spec.name}"), n_seqs) for spec in caches}
    info = {
        **info,
        "teacher_eval": teacher_metrics(held),
        "setup": setup.__dict__,
        "seeds": seeds,
        "build_seconds": build_seconds,
        "train_tokens": int(n_seqs - setup.angle_seqs) * setup.seq_len,
        "eval_tokens": int(held.ids[:, 1:].numel()),
        "workdir": cache_dir,
    }
    per_seed = []
    for seed in range(seeds):
        per_seed.append(run_seed(seed, runs, caches, input_ids, held, teacher, setup, cache_dir))
        info["wall_seconds"] = time.perf_counter() - t0
        write(runs, caches, per_seed, stats, teacher.config.vocab_size, info)


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed, caches topk64 and sampled50 only")
    parser.add_argument("--out", default=str(here), help="where RESULTS.md, fidelity.png and results.json go")
    parser.add_argument("--workdir", default=None, help="where the caches are built (reused if complete)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 120; quick 12)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; quick 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; quick 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup + cosine)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a CPU shared with other jobs, a second "
        "OpenMP thread that gets descheduled stalls every op at the barrier, measured 2-15x slower per step)",
    )
    parser.add_argument("--eval-seqs", type=int, default=None, help="held-out sequences (default 256; quick 8)")
    parser.add_argument(
        "--teacher-temperature",
        type=float,
        default=1.0,
        help="the teacher is the demo teacher with its logits divided by this (default 1; < 1 is sharper)",
    )
    parser.add_argument("--alpha", type=float, default=1.0, help="KD runs train on (1 − alpha)·CE + alpha·KD")
    parser.add_argument(
        "--regimes",
        action="store_true",
        help="run the preset regimes (REGIMES in run.py) into RESULTS_regimes.md instead of the study",
    )
    args = parser.parse_args(argv)
    if not 0 < args.alpha <= 1:
        parser.error(f"--alpha must be in (0, 1], got {args.alpha}")
    if args.teacher_temperature <= 0:
        parser.error(f"--teacher-temperature must be > 0, got {args.teacher_temperature}")
    quick = dict(seeds=1, steps=12, batch=4, seq_len=32, eval_seqs=8)
    full = dict(seeds=3, steps=120, batch=16, seq_len=128, eval_seqs=256)
    sizes = {
        key: getattr(args, key) if getattr(args, key) is not None else value
        for key, value in (quick if args.quick else full).items()
    }
    setup = Setup(
        steps=sizes["steps"],
        batch=sizes["batch"],
        seq_len=sizes["seq_len"],
        lr=args.lr,
        eval_seqs=sizes["eval_seqs"],
        angle_seqs=4 if args.quick else 16,
    )
    caches = QUICK_CACHES if args.quick else FULL_CACHES
    torch.set_num_threads(args.threads)

    workdir = args.workdir or tempfile.mkdtemp(prefix="softcache-fidelity-")
    info = {
        "command": shlex.join(["python", "benchmarks/fidelity/run.py", *(sys.argv[1:] if argv is None else argv)]),
        "threads": args.threads,
        "quick": args.quick,
    }
    out = Path(args.out)
    if args.regimes:
        sections = []
        for index, regime in enumerate(REGIMES):
            write = functools.partial(write_section, out, sections, index)
            run_regime(regime, caches, replace(setup, alpha=regime.alpha), sizes["seeds"], workdir, info, write)
        path = out / "RESULTS_regimes.md"
    else:
        title = f"teacher logits / {args.teacher_temperature:g}, alpha = {args.alpha:g}"
        regime = Regime(title, args.teacher_temperature, args.alpha, tuple(run.name for run in plan_runs(caches)))
        write = functools.partial(write_results, out)
        run_regime(regime, caches, replace(setup, alpha=args.alpha), sizes["seeds"], workdir, info, write)
        path = out / "RESULTS.md"
    print(f"wrote {path}")


def write_section(out: Path, sections: list, index: int, *section) -> Path:
    """Set regime ``index``'s results in ``sections`` to ``section`` and rewrite RESULTS_regimes.md."""
    sections[index:] = [section]
    return write_regimes(out, sections)


if __name__ == "__main__":
    main()
