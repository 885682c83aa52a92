"""Loader benchmark: tokens/s through decode + temper + collate, softcache beside a naive memory-mapped loader.

Prints ONE table, every row measured in the same run, with the ratio to the naive loader at the same
number of DataLoader workers.

Data: the codec benchmark's synthetic LM (``benchmarks/bench_common.py``, ``zipf``: Zipf(1.1) prior + noise +
context boosts, V=32000), exact top-64 with normalisers at T ∈ {1, 2}. Generating float64 logits for
every position would take minutes, so a pool of ``--pool`` positions is generated and the cache's
``--tokens`` positions are drawn from it at random (each position keeps its own targets; decode cost
per token does not depend on repeats). Sequences of 1024 tokens, the writer's default 4096-token batches.

Loaders, each into ``DataLoader(batch_size=8 sequences, collate_fn=softcache.collate, persistent_workers)``
and iterated over the whole cache: one untimed pass (starts the workers), then the best of ``--repeats``
timed passes. Rates: wall clock (what a training loop sees; on a shared machine it depends on the other
load), and tokens per CPU-second of the main process plus its workers (user + system time from /proc:
the cost, robust to other load). ``workers=0`` runs in the main process: no transfer between processes.

* ``naive``: int32 ids + float32 log-probs (already at the training temperature, so nothing to temper) as
  uncompressed ``.npy`` files, memory-mapped, sliced per sequence; shuffled map-style dataset. It is the
  floor for "read the targets and collate them".
* ``map shuffled``: ``SoftTargetDataset`` with ``shuffle=True``: random access, so a stored batch of 4
  sequences is decoded up to 4 times (the reader keeps the last 4 decoded batches).
* ``map BatchGroupedSampler``: ``SoftTargetDataset`` with ``softcache.data.BatchGroupedSampler`` (stored
  batches shuffled, then sequences within groups of 4 batches): each batch decoded once per process.
* ``map in order``: ``SoftTargetDataset``, ``shuffle=False``: each stored batch decoded once.
* ``streaming``: ``StreamingSoftTargetDataset`` (unit shuffle + shuffle buffer), each batch decoded once.

softcache rows run at T=2 (exact tempering ``lp/2 − n₂``); the naive loader stores T=2 log-probs.

Run: ``.venv/bin/python benchmarks/loader.py`` (≈ 1–2 min on 2 cores) or ``--quick`` (seconds).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from bench_common import cpu_name, make_data, markdown_table
from torch.utils.data import DataLoader, Dataset

import softcache
from softcache import CacheWriter, SoftTargetDataset, StreamingSoftTargetDataset
from softcache.data import BatchGroupedSampler

VOCAB, K, TEMPS, T, SEQ_LEN, BATCH = 32000, 64, (1.0, 2.0), 2.0, 1024, 8


class NaiveDataset(Dataset):
    """int32 ids + float32 log-probs in memory-mapped .npy files; items as SoftTargetDataset makes them."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.offsets = np.load(os.path.join(root, "offsets.npy"))
        self._arrays = None

    def arrays(self):
        if self._arrays is None:  # opened in each worker
            self._arrays = [np.load(os.path.join(self.root, f"{n}.npy"), mmap_mode="r") for n in ("tok", "ids", "lp")]
        return self._arrays

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        tok, ids, lp = self.arrays()
        a, b = self.offsets[i], self.offsets[i + 1]
        input_ids = np.array(tok[a:b], np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids),
            "labels": input_ids.copy(),
            "target_ids": np.array(ids[a:b]),
            "target_logprobs": np.array(lp[a:b]),
        }


def build(tmp: str, n_tokens: int, pool: int, seed: int) -> tuple[str, str]:
    data = make_data("zipf", VOCAB, pool, K, seed)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, pool, n_tokens)
    ids, lp, lognorm = data["ids"][pick], data["lp"][pick], data["lognorm"][pick]
    tokens = rng.integers(0, VOCAB, n_tokens)
    cache_dir, naive_dir = os.path.join(tmp, "cache"), os.path.join(tmp, "naive")
    os.makedirs(naive_dir)
    with CacheWriter(cache_dir, vocab_size=VOCAB, k=K, temperatures=TEMPS) as w:
        for a in range(0, n_tokens, SEQ_LEN):
            b = min(a + SEQ_LEN, n_tokens)
            w.write_targets(tokens[a:b], ids[a:b], lp[a:b], lognorm=lognorm[a:b])
    # the naive layout holds what softcache decodes (same ids, same T=2 log-probs), uncompressed
    cache = softcache.open_cache(cache_dir)
    recs = [cache.targets(i, T) for i in range(len(cache))]
    np.save(os.path.join(naive_dir, "tok.npy"), tokens.astype(np.int32))
    np.save(os.path.join(naive_dir, "ids.npy"), np.concatenate([r[0] for r in recs]))
    np.save(os.path.join(naive_dir, "lp.npy"), np.concatenate([r[1] for r in recs]))
    np.save(os.path.join(naive_dir, "offsets.npy"), np.arange(0, n_tokens + SEQ_LEN, SEQ_LEN).clip(max=n_tokens))
    return cache_dir, naive_dir


def cpu_seconds(loader) -> float:
    """CPU time (user + system) of this process and the loader's live worker processes (Linux /proc)."""
    total = time.process_time()
    workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
    for w in workers:
        with open(f"/proc/{w.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tokens_per_second(loader, repeats: int) -> tuple[float, float, int]:
    """Best wall-clock and best per-CPU-second rates of ``repeats`` timed passes after one untimed pass
    (which starts the persistent workers)."""
    wall, per_cpu, tokens = 0.0, 0.0, 0
    for n in range(repeats + 1):
        c0, t0 = cpu_seconds(loader), time.perf_counter()
        tokens = sum(int(b["attention_mask"].sum()) for b in loader)
        if n:
            wall = max(wall, tokens / (time.perf_counter() - t0))
            per_cpu = max(per_cpu, tokens / (cpu_seconds(loader) - c0))
    return wall, per_cpu, tokens


def stages(cache_dir: str, repeats: int) -> dict[str, float]:
    """CPU µs per token of each stage of the in-order map-style path, in this process (best of ``repeats``):
    the reader (batch read + zstd + CRC + codec decode), items (slices, copies, tempering), collate."""
    ds = SoftTargetDataset(cache_dir, temperature=T)
    cache = ds.cache
    units = [(s, b) for s, shard in enumerate(cache.manifest["shards"]) for b in range(len(shard["batches"]))]
    best = {"read + decode": np.inf, "items + temper": np.inf, "collate": np.inf}
    for _ in range(repeats):
        spent = dict.fromkeys(best, 0.0)
        for s, b in units:
            cache._decoded.clear()
            t0 = time.process_time()
            decoded = cache.decoded_batch(s, b)
            t1 = time.process_time()
            items = [ds.item_from_batch(decoded, j) for j in range(len(decoded["offsets"]) - 1)]
            t2 = time.process_time()
            softcache.collate(items)
            t3 = time.process_time()
            for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                spent[key] += dt
        best = {key: min(best[key], spent[key] * 1e6 / cache.num_tokens) for key in best}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--pool", type=int, default=16384, help="distinct generated positions")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0: in the main process")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.pool, args.repeats = 20_000, 2048, 1
    torch.set_num_threads(1)

    tmp = tempfile.mkdtemp(prefix="softcache-loader-bench-")
    try:
        t0 = time.perf_counter()
        cache_dir, naive_dir = build(tmp, args.tokens, args.pool, args.seed)
        cache = softcache.open_cache(cache_dir)
        naive_mb = sum(os.path.getsize(os.path.join(naive_dir, f)) for f in os.listdir(naive_dir)) / 1e6
        prep = time.perf_counter() - t0
        print(f"# data: {args.tokens} tokens, {len(cache)} sequences, zipf V={VOCAB} k={K}, T={T}; "
              f"softcache {cache.num_bytes / 1e6:.1f} MB, naive {naive_mb:.1f} MB; prep {prep:.0f}s")  # fmt: skip

        def grouped():
            ds = SoftTargetDataset(cache_dir, temperature=T)
            return ds, {"sampler": BatchGroupedSampler(ds)}

        loaders = {  # name → () → (dataset, DataLoader options)
            "naive (mmap .npy)": lambda: (NaiveDataset(naive_dir), {"shuffle": True}),
            "softcache map shuffled": lambda: (SoftTargetDataset(cache_dir, temperature=T), {"shuffle": True}),
            "softcache map BatchGroupedSampler": grouped,
            "softcache map in order": lambda: (SoftTargetDataset(cache_dir, temperature=T), {}),
            "softcache streaming": lambda: (StreamingSoftTargetDataset(cache_dir, T, shuffle_buffer=64), {}),
        }
        breakdown = stages(cache_dir, args.repeats)
        rows = []
        for workers in args.workers:
            naive_tps = naive_cpu = None
            for name, make in loaders.items():
                ds, options = make()
                loader = DataLoader(ds, batch_size=BATCH, num_workers=workers, persistent_workers=workers > 0,
                                    collate_fn=softcache.collate, **options)  # fmt: skip
                tps, per_cpu, tokens = tokens_per_second(loader, args.repeats)
                del loader
                assert tokens == args.tokens, (name, tokens)
                naive_tps, naive_cpu = naive_tps or tps, naive_cpu or per_cpu
                rows.append((name, workers, tps, tps / max(workers, 1), tps / naive_tps, per_cpu, per_cpu / naive_cpu))
                print(f"# {name}, {workers} workers: {tps / 1e6:.2f}M tokens/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"# {time.strftime('%Y-%m-%d')}  CPU: {cpu_name()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}"
          f"  python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}")  # fmt: skip
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# DataLoader(batch_size={BATCH} sequences of {SEQ_LEN} tokens, collate_fn=softcache.collate); "
          f"persistent workers; best of {args.repeats} full passes after a warm-up pass, wall clock")  # fmt: skip
    print()
    header = ["loader", "workers", "tokens/s (wall)", "per worker", "× naive", "tokens per CPU-s", "× naive"]
    cells = [
        [name, str(workers), f"{tps / 1e6:.2f}M", f"{per / 1e6:.2f}M", f"{ratio:.2f}", f"{per_cpu / 1e6:.2f}M",
         f"{cpu_ratio:.2f}"]
        for name, workers, tps, per, ratio, per_cpu, cpu_ratio in rows
    ]  # fmt: skip
    print(markdown_table(header, cells))
    print()
    print("CPU µs per token, in-order path in one process: "
          + ", ".join(f"{key} {us:.2f}" for key, us in breakdown.items()))  # fmt: skip
    worst = min(r[3] for r in rows if "shuffled" not in r[0] and "naive" not in r[0])
    print(
        f"Goal ≥ 1M tokens/s per worker (decode once per batch): worst {worst / 1e6:.2f}M — "
        f"{'PASS' if worst >= 1e6 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
