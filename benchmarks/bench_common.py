"""Helpers shared by the benchmark scripts: the synthetic teacher, the machine's name, tables and timing.

The scripts import it plainly (``from bench_common import ...``): a script run as ``python benchmarks/x.py``
has its own folder first on ``sys.path``. Nothing here imports torch at module level, so the numpy-only
benchmarks (codec) stay light; the torch helpers import it when called.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------------------------------------
# Synthetic teacher outputs (float64, chunked): see benchmarks/codec.py's docstring for the two distributions

SIGMA = 2.0
"""Standard deviation of the ``gauss`` logits."""
TEMPS = (1.0, 2.0)
"""Capture temperatures of the synthetic top-k targets (their normalisers n_τ)."""
SAMPLES = 50
"""Draws per position of the synthetic sampled targets."""


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


class Zipf:
    """A synthetic LM: Zipf(1.1) unigram prior over a random id permutation, per-position noise, context boosts
    and a sharpness per position."""

    def __init__(self, vocab: int, rng: np.random.Generator) -> None:
        perm = rng.permutation(vocab)
        self.logprior = np.empty(vocab)
        self.logprior[perm] = -1.1 * np.log(np.arange(1, vocab + 1))
        prior = np.exp(self.logprior)
        self.cdf = np.cumsum(prior / prior.sum())

    def logits(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        vocab = self.logprior.size
        z = self.logprior[None, :] + rng.standard_normal((rows, vocab))
        ctx = np.minimum(np.searchsorted(self.cdf, rng.random((rows, 16))), vocab - 1)
        np.add.at(z, (np.arange(rows)[:, None], ctx), rng.uniform(0.0, 6.0, (rows, 16)))
        z *= np.exp(rng.uniform(math.log(0.65), math.log(1.2), (rows, 1)))
        return z


def make_data(dist: str, vocab: int, n_pos: int, kmax: int, seed: int) -> dict:
    """Exact top-``kmax`` (sorted), n_τ, and N=50 sampled ids/counts for ``n_pos`` positions of ``dist``
    (``gauss`` or ``zipf``)."""
    rng = np.random.default_rng(seed)
    zipf = Zipf(vocab, rng) if dist == "zipf" else None
    chunk = max(1, (1 << 23) // vocab)
    ids, lps, norms, s_ids, s_cnt = [], [], [], [], []
    for start in range(0, n_pos, chunk):
        rows = min(chunk, n_pos - start)
        z = SIGMA * rng.standard_normal((rows, vocab)) if zipf is None else zipf.logits(rows, rng)
        lse = logsumexp_rows(z)
        norms.append(np.stack([logsumexp_rows(z / t) - lse / t for t in TEMPS], 1))
        top = np.argpartition(-z, kmax - 1, axis=1)[:, :kmax]
        zt = np.take_along_axis(z, top, 1)
        o = np.argsort(-zt, axis=1, kind="stable")
        ids.append(np.take_along_axis(top, o, 1))
        lps.append(np.take_along_axis(zt, o, 1) - lse[:, None])
        # N draws with replacement at T=1: inverse CDF, one flat searchsorted with per-row offsets
        cdf = np.cumsum(np.exp(z - lse[:, None]), 1)
        cdf /= cdf[:, -1:]
        off = 2.0 * np.arange(rows)[:, None]
        draws = np.searchsorted((cdf + off).ravel(), (rng.random((rows, SAMPLES)) + off).ravel())
        draws = np.minimum(draws.reshape(rows, SAMPLES) - vocab * np.arange(rows)[:, None], vocab - 1)
        for row in draws:
            u, c = np.unique(row, return_counts=True)
            o = np.argsort(-c, kind="stable")
            s_ids.append(u[o])
            s_cnt.append(c[o])
    width = max(len(u) for u in s_ids)
    sid = np.full((n_pos, width), -1, np.int64)
    scnt = np.zeros((n_pos, width), np.int64)
    for i, (u, c) in enumerate(zip(s_ids, s_cnt, strict=True)):
        sid[i, : len(u)] = u
        scnt[i, : len(c)] = c
    return {
        "ids": np.concatenate(ids),
        "lp": np.concatenate(lps),
        "lognorm": np.concatenate(norms),
        "s_ids": sid,
        "s_cnt": scnt,
        "input_ids": rng.integers(0, vocab, n_pos),
    }


# ---------------------------------------------------------------------------------------------
# Peer layouts and shard accounting, shared by the synthetic and the real-teacher codec benchmarks


def parquet_bytes(columns: dict[str, np.ndarray]) -> tuple[int, float]:
    """Bytes of zstd Parquet files with these flat columns (one file per column length), and the seconds
    to read them back to numpy."""
    groups: dict[int, dict[str, np.ndarray]] = {}
    for n, v in columns.items():
        groups.setdefault(v.size, {})[n] = v
    size, seconds = 0, 0.0
    for cols in groups.values():
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({n: pa.array(v) for n, v in cols.items()}), sink, compression="zstd")
        buf = sink.getvalue()
        t0 = time.process_time()
        table = pq.read_table(pa.BufferReader(buf), use_threads=False)
        for c in table.columns:
            c.to_numpy()
        seconds += time.process_time() - t0
        size += buf.size
    return size, seconds


def pack_bits(ids: np.ndarray, bits: int) -> np.ndarray:
    ids = ids.astype(np.uint32).ravel()
    planes = ((ids[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel())


def peers(kind: str, vocab: int, k: int, data: dict, samples: int = SAMPLES) -> dict:
    """Bytes (and errors) of the naive and DistillKit-style layouts of the same targets (see benchmarks/codec.py)."""
    bits = max(1, math.ceil(math.log2(vocab)))
    if kind == "topk":
        ids = data["ids"][:, :k]
        lp = data["lp"][:, :k]
        n_pos = ids.shape[0]
        naive = {"ids": ids.astype(np.int32).ravel(), "lp": lp.astype(np.float32).ravel()}
        hi = lp.max(1, keepdims=True).astype(np.float32)
        lo = lp.min(1, keepdims=True).astype(np.float32)
        span = np.maximum(hi - lo, np.float32(1e-30)).astype(np.float64)
        q = np.rint((lp - lo) / span * 255).astype(np.uint8)
        deq = lo + q * (span / 255)
        err = np.abs(deq - lp)
        tail2 = 1.0 - np.exp(lp / 2.0 - data["lognorm"][:, 1:2]).sum(1)
        packed = pack_bits(ids, bits)
        dk = {"ids": packed, "q": q.ravel()}
        dk_cols = {"ids": packed, "q": q.ravel(), "lo": lo.ravel(), "hi": hi.ravel()}
        dk_raw = packed.size + q.size + 8 * n_pos
        out = {"dk_err_mean": err.mean(), "dk_err_max": err.max(), "dk_tail": np.abs(tail2).mean()}
    else:
        valid = data["s_ids"] >= 0
        n_pos = valid.shape[0]
        cnt = data["s_cnt"][valid]
        lens = valid.sum(1).astype(np.uint8)
        naive = {"ids": data["s_ids"][valid].astype(np.int32), "lp": np.log(cnt / samples).astype(np.float32)}
        naive["n"] = lens
        packed = pack_bits(data["s_ids"][valid], bits)
        dk = {"ids": packed, "c": cnt.astype(np.uint8), "n": lens}
        dk_cols = dk
        dk_raw = sum(v.size for v in dk.values())
        out = {"dk_err_mean": 0.0, "dk_err_max": 0.0, "dk_tail": float("nan")}
    naive_raw = sum(v.nbytes for v in naive.values())
    pq_naive, t_pq = parquet_bytes(naive)
    pq_dk, _ = parquet_bytes(dk_cols)
    out.update(naive=naive_raw, naive_pq=pq_naive, naive_pq_read_tps=n_pos / t_pq, dk=dk_raw, dk_pq=pq_dk)
    return out


def header_bytes(cache, path: str) -> int:
    """Bytes the id-order headers take in the shard files: their zstd blob as the Arrow backend stores it,
    times the number of copies in the file (the Arrow IPC file format writes the schema, and so its
    metadata, twice: at the start of the stream and again in the footer)."""
    total = 0
    for s, shard in enumerate(cache.manifest["shards"]):
        head = cache.shard(s).header["id_order"]
        blob = pa.compress(np.ascontiguousarray(head), "zstd", asbytes=True)
        with open(os.path.join(path, shard["file"]), "rb") as f:
            total += len(blob) * f.read().count(blob)
    return total


# ---------------------------------------------------------------------------------------------
# Machine and tables


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else lscpu, else the platform module)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def rate(x: float) -> str:
    """A count per second, short: 1.23M, 456k, 78.9."""
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.0f}k"
    return f"{x:.3g}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# torch: the eager peer loss and a timer (torch is imported when these are used)

LOG_EPS = math.log(1e-12)


def eager_loss(logits, ids, lps, temperature):
    """forward_kl with the bucket tail, mean over rows, times T^2: the loss softcache computes, in plain PyTorch."""
    import torch

    logq = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = ids >= 0
    lq = logq.gather(-1, ids.clamp_min(0).long())
    lq = torch.where(valid, lq, torch.full_like(lq, -math.inf))
    p = torch.where(valid, lps.exp(), torch.zeros_like(lps))
    p_t = (1 - p.sum(-1)).clamp_min(0)
    q_t = (-torch.expm1(torch.logsumexp(lq, -1))).clamp_min(0)
    kl = (p * (lps.clamp_min(LOG_EPS) - lq.clamp_min(LOG_EPS))).sum(-1)
    kl = kl + p_t * (p_t.clamp_min(1e-12).log() - q_t.clamp_min(1e-12).log())
    return kl.mean() * temperature**2


class Timer:
    """Median milliseconds and peak extra CUDA memory of a callable (CUDA events on a GPU, perf_counter on CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def measure(self, fn, warmup, reps):
        """Median milliseconds of fn() and the peak memory it allocated beyond what existed before (MiB)."""
        import torch

        for _ in range(warmup):
            fn()
        self.sync()
        base = 0
        if self.cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else float("nan")
        return statistics.median(times), peak
