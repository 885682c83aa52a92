"""Property tests of softcache.codec against float64 references computed here from the definitions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softcache import codec
from softcache.codec import LOGPROB_FLOOR, CodecParams, IdOrder

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**32 - 1)


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def lognorm64(z: np.ndarray, temperatures) -> np.ndarray:
    """n_τ = logsumexp(z/τ) − logsumexp(z)/τ, float64, (L, n_temps)."""
    z = np.asarray(z, np.float64)

    def lse(x):
        m = x.max(-1)
        return m + np.log(np.exp(x - m[:, None]).sum(-1))

    return np.stack([lse(z / t) - lse(z) / t for t in temperatures], -1)


# ---------------------------------------------------------------------------------------------
# Byte planes and zigzag


@SETTINGS
@given(st.lists(st.integers(0, 2**64 - 1), max_size=40))
def test_planes_round_trip_uint64(values):
    v = np.array(values, np.uint64)
    stream = codec.to_planes(v)
    assert stream.dtype == np.uint8
    width = max([1] + [(x.bit_length() + 7) // 8 for x in values])
    assert stream.size == (len(values) * width if values else 0)
    back = codec.from_planes(stream, len(values), np.uint64)
    assert back.tolist() == values


@SETTINGS
@given(st.lists(st.integers(0, 2**63 - 1), max_size=40), st.sampled_from([(2, 3), (7,), (1, 5)]))
def test_planes_round_trip_int64_any_shape(values, shape):
    n = int(np.prod(shape))
    values = (values * n)[:n] if values else [0] * n
    v = np.array(values, np.int64).reshape(shape)
    back = codec.from_planes(codec.to_planes(v), n)
    assert back.dtype == np.int64
    assert back.tolist() == values


def test_planes_extremes_and_empty():
    v = np.array([0, 1, 255, 256, 2**32, 2**63 - 1, 2**63, 2**64 - 1], np.uint64)
    assert codec.from_planes(codec.to_planes(v), v.size, np.uint64).tolist() == v.tolist()
    zeros = np.zeros(5, np.uint64)
    assert codec.to_planes(zeros).size == 5  # at least one plane
    assert codec.from_planes(codec.to_planes(zeros), 5).tolist() == [0] * 5
    assert codec.to_planes(np.zeros(0, np.int64)).size == 0
    assert codec.from_planes(np.zeros(0, np.uint8), 0).size == 0


def test_planes_wrong_length_raises():
    with pytest.raises(ValueError):
        codec.from_planes(np.zeros(5, np.uint8), 2)
    with pytest.raises(ValueError):
        codec.from_planes(np.zeros(9, np.uint8), 1)  # 9 bytes per value: wider than uint64
    with pytest.raises(ValueError):
        codec.from_planes(np.zeros(3, np.uint8), 0)
    with pytest.raises(ValueError):
        codec.from_planes(np.zeros(0, np.uint8), 3)


@SETTINGS
@given(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40))
def test_zigzag_round_trip_full_int64(values):
    x = np.array(values, np.int64)
    z = codec.zigzag(x)
    assert z.dtype == np.uint64
    # definition: 0, -1, 1, -2, 2, ... ↦ 0, 1, 2, 3, 4, ...
    assert z.tolist() == [2 * a if a >= 0 else -2 * a - 1 for a in values]
    assert codec.unzigzag(z).tolist() == values


def test_zigzag_round_trip_large_magnitudes():
    values = [0, 1, -1, 2**62 - 1, -(2**62), 2**62, -(2**62) - 1, 2**63 - 1, -(2**63)]
    assert codec.unzigzag(codec.zigzag(np.array(values, np.int64))).tolist() == values


@SETTINGS
@given(st.lists(st.integers(-(2**20), 2**20), max_size=40))
def test_zigzag_through_planes(values):
    x = np.array(values, np.int64)
    back = codec.unzigzag(codec.from_planes(codec.to_planes(codec.zigzag(x)), len(values)))
    assert back.tolist() == values


# ---------------------------------------------------------------------------------------------
# IdOrder


@SETTINGS
@given(SEEDS, st.integers(1, 300), st.integers(0, 200))
def test_id_order_fit_round_trip(seed, vocab, n):
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, vocab, size=n)  # −1 is padding and is ignored
    hot = rng.random(n) < 0.5  # repeated ids, so that counts differ and ties occur
    ids[hot] = rng.integers(0, max(1, vocab // 10), size=int(hot.sum()))
    order = IdOrder.fit(ids, vocab)
    # reference: most frequent first, ties by id, then every unseen id in increasing order
    counts = Counter(int(i) for i in ids if i >= 0)
    head = sorted(counts, key=lambda i: (-counts[i], i))
    expected = head + [i for i in range(vocab) if i not in counts]
    assert order.order.tolist() == expected
    assert np.array_equal(order.rank[order.order], np.arange(vocab))
    assert np.array_equal(order.order[order.rank], np.arange(vocab))
    back = IdOrder.from_bytes(order.to_bytes(), vocab)
    assert np.array_equal(back.order, order.order)
    assert np.array_equal(back.rank, order.rank)


def test_id_order_bad_bytes():
    with pytest.raises(ValueError):
        IdOrder.from_bytes(np.zeros(7, np.uint8), 10)
    with pytest.raises(ValueError):
        IdOrder(np.array([3, 3]), 10)
    with pytest.raises(ValueError):
        IdOrder(np.array([10]), 10)
    with pytest.raises(ValueError):
        IdOrder.from_bytes(np.array([5, 0, 0, 0, 5, 0, 0, 0], np.uint8), 10)  # duplicate id


# ---------------------------------------------------------------------------------------------
# top-k


def _random_topk(rng, length, vocab, k, scale):
    """Continuous random logits → exact top-k ids with random padding per row, in shuffled column order."""
    z = rng.standard_normal((length, vocab)) * scale
    lp = log_softmax64(z)
    top = np.argsort(-lp, axis=-1)[:, :k]
    kept = rng.integers(0, k + 1, size=length)
    kept[rng.random(length) < 0.2] = 0  # all-padding rows
    kept[rng.random(length) < 0.3] = k  # full rows
    ids = np.where(np.arange(k) < kept[:, None], top, -1)
    perm = np.argsort(rng.random((length, k)), axis=-1)  # the encoder must not rely on the column order
    ids = np.take_along_axis(ids, perm, -1)
    lps = np.where(ids >= 0, np.take_along_axis(lp, np.maximum(ids, 0), -1), -np.inf)
    return z, ids, lps, kept


@SETTINGS
@given(
    SEEDS,
    st.integers(0, 23),
    st.integers(1, 301),
    st.integers(1, 9),
    st.sampled_from([(1.0,), (1.0, 2.0), (0.5, 1.0, 3.0), (2.0, 4.0, 1.0)]),
    st.sampled_from([1 / 64, 1 / 16, 0.1, 0.37]),
    st.sampled_from([0.5, 3.0, 30.0]),
    st.booleans(),
)
def test_topk_round_trip(seed, length, vocab, k, temps, step, scale, fit_on_data):
    k = min(k, vocab)
    rng = np.random.default_rng(seed)
    z, ids, lps, kept = _random_topk(rng, length, vocab, k, scale)
    n_exact = lognorm64(z, temps) if length else np.zeros((0, len(temps)))
    order = IdOrder.fit(ids if fit_on_data else rng.integers(0, vocab, size=50), vocab)
    params = CodecParams(logprob_step=step)
    streams = codec.encode_topk(ids, lps, n_exact, temps, order, params)
    assert all(s.dtype == np.uint8 and s.ndim == 1 for s in streams.values())
    d_ids, d_lp, d_norm = codec.decode_topk(streams, length, k, len(temps), order, params)
    assert d_ids.shape == (length, k) and d_lp.shape == (length, k) and d_norm.shape == (length, len(temps))

    lp_full = log_softmax64(z)
    for r in range(length):
        m = int(kept[r])
        real = d_ids[r] >= 0
        assert real.tolist() == [True] * m + [False] * (k - m), "padding must come last"
        assert set(d_ids[r, :m].tolist()) == set(ids[r][ids[r] >= 0].tolist())
        # descending teacher probability (continuous logits: no ties)
        exact_lp = lp_full[r, d_ids[r, :m]]
        assert np.all(np.diff(exact_lp) < 0)
        assert np.all(d_lp[r, m:] == 0)
        # quantised log-probs at T=1: within step/2 of the exact value (float32 slack)
        err = np.abs(d_lp[r, :m].astype(np.float64) - np.maximum(exact_lp, LOGPROB_FLOOR))
        assert np.all(err <= step / 2 + 1e-6 * (1 + np.abs(exact_lp))), err.max()
        for c, tau in enumerate(temps):
            exact_tempered = log_softmax64(z[r] / tau)[d_ids[r, :m]]
            got = d_lp[r, :m].astype(np.float64) / tau - np.float64(d_norm[r, c])
            bound = step / tau + 1e-5 * (1 + np.abs(exact_tempered))
            assert np.all(np.abs(got - exact_tempered) <= bound), np.abs(got - exact_tempered).max()
            # head mass at τ (hence the tail mass) matches the exact one
            assert abs(np.exp(got).sum() - np.exp(exact_tempered).sum()) <= 1e-5
            if m == 0:
                assert abs(d_norm[r, c] - n_exact[r, c]) <= 1e-5 * (1 + abs(n_exact[r, c]))
    # documented dtypes (checked last so that a value error is reported first)
    assert (d_ids.dtype, d_lp.dtype, d_norm.dtype) == (np.int32, np.float32, np.float32)


def codec_head_mass(lp, ids, lognorm, temps):
    lp = np.where(ids >= 0, np.asarray(lp, np.float64), -np.inf)
    n = np.asarray(lognorm, np.float64)
    return np.stack([np.exp(lp / t - n[:, c : c + 1]).sum(-1) for c, t in enumerate(temps)], -1)


def test_topk_extreme_logprobs():
    rng = np.random.default_rng(7)
    vocab, k, temps = 97, 5, (1.0, 3.0)
    ids = np.array([[4, 9, 1, -1, -1], [-1, -1, -1, -1, -1], [2, 3, 5, 7, 11], [50, -1, 60, -1, 70]])
    lp = np.array(
        [
            [-0.01, -1e4, -np.inf, -np.inf, -np.inf],
            [-np.inf] * 5,
            [-1e4, -2e4, -1e30, -1001.0, -999.0],
            [-5.0, -np.inf, -np.inf, 0.0, -1e4],
        ]
    )
    lognorm = rng.standard_normal((4, 2))
    lognorm[:, 0] = 0.0
    order = IdOrder.fit(ids, vocab)
    params = CodecParams()
    streams = codec.encode_topk(ids, lp, lognorm, temps, order, params)
    d_ids, d_lp, d_norm = codec.decode_topk(streams, 4, k, 2, order, params)
    assert np.isfinite(d_lp).all() and np.isfinite(d_norm).all()
    assert d_ids[0].tolist() == [4, 9, 1, -1, -1]  # -1e4 and a real id's -inf are both floored, ties by id
    assert d_lp[0, 1] == LOGPROB_FLOOR and d_lp[0, 2] == LOGPROB_FLOOR
    assert d_ids[1].tolist() == [-1] * 5 and np.all(d_lp[1] == 0)
    assert d_ids[2, 0] == 11 and set(d_ids[2, 1:].tolist()) == {2, 3, 5, 7}  # ties at the floor: any order
    assert d_lp[2, 0] == pytest.approx(-999.0, abs=params.logprob_step / 2)
    assert np.all(d_lp[2, 1:] == LOGPROB_FLOOR)
    assert d_ids[3, 0] == 50 and set(d_ids[3, 1:3].tolist()) == {60, 70} and d_ids[3, 3:].tolist() == [-1, -1]
    assert abs(d_lp[3, 0] + 5.0) <= params.logprob_step / 2 and np.all(d_lp[3, 1:3] == LOGPROB_FLOOR)
    assert np.all(d_lp[3, 3:] == 0)
    # the stored normalisers keep the head mass of what was given (floored entries weigh nothing)
    mass = codec_head_mass(d_lp, d_ids, d_norm, temps)
    exact = codec_head_mass(np.maximum(np.where(ids >= 0, lp, -np.inf), LOGPROB_FLOOR), ids, lognorm, temps)
    assert np.allclose(mass, exact, rtol=1e-5, atol=1e-7)


@SETTINGS
@given(SEEDS, st.integers(2, 20), st.integers(2, 200), st.integers(2, 7))
def test_topk_wrong_stream_length_raises(seed, length, vocab, k):
    k = min(k, vocab)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((length, vocab))
    lp = log_softmax64(z)
    ids = np.argsort(-lp, -1)[:, :k]
    lps = np.take_along_axis(lp, ids, -1)
    temps = (1.0, 2.0)
    order = IdOrder.fit(ids, vocab)
    params = CodecParams()
    streams = codec.encode_topk(ids, lps, lognorm64(z, temps), temps, order, params)
    for name in ("n_targets", "target_codes", "q_head", "q_delta", "lognorm"):
        broken = dict(streams, **{name: streams[name][:-1]})
        with pytest.raises(ValueError):
            codec.decode_topk(broken, length, k, len(temps), order, params)
        longer = dict(streams, **{name: np.concatenate([streams[name], [0]]).astype(np.uint8)})
        with pytest.raises(ValueError):
            codec.decode_topk(longer, length, k, len(temps), order, params)
    if k > 1:
        with pytest.raises(ValueError):  # a full row holds more entries than the k it is decoded with
            codec.decode_topk(streams, length, k - 1, len(temps), order, params)


# ---------------------------------------------------------------------------------------------
# sampled


@SETTINGS
@given(SEEDS, st.integers(0, 23), st.integers(1, 301), st.integers(1, 60), st.integers(1, 11))
def test_sampled_round_trip(seed, length, vocab, samples, k):
    rng = np.random.default_rng(seed)
    k = min(k, vocab)
    ids = np.full((length, k), -1, np.int64)
    counts = np.zeros((length, k), np.int64)
    for r in range(length):
        m = int(rng.integers(0, min(k, samples) + 1))
        if m:
            ids[r, :m] = rng.choice(vocab, size=m, replace=False)
            # m positive counts whose sum is at most `samples`
            cuts = np.sort(rng.choice(np.arange(1, samples + 1), size=m, replace=False))
            counts[r, :m] = np.diff(np.concatenate([[0], cuts]))
        perm = rng.permutation(k)
        ids[r], counts[r] = ids[r, perm], counts[r, perm]
    order = IdOrder.fit(ids, vocab)
    streams = codec.encode_sampled(ids, counts, samples, order)
    d_ids, d_counts = codec.decode_sampled(streams, length, k, samples, order)
    assert d_ids.shape == (length, k) and d_ids.dtype == np.int32
    assert d_counts.shape == (length, k) and d_counts.dtype == np.int32
    for r in range(length):
        real = ids[r] >= 0
        m = int(real.sum())
        assert (d_ids[r] >= 0).tolist() == [True] * m + [False] * (k - m)
        assert dict(zip(d_ids[r, :m].tolist(), d_counts[r, :m].tolist(), strict=True)) == dict(
            zip(ids[r][real].tolist(), counts[r][real].tolist(), strict=True)
        )
        assert np.all(np.diff(d_counts[r, :m]) <= 0), "sorted by count, largest first"
        assert np.all(d_counts[r, m:] == 0)


def test_sampled_bad_counts_raise():
    order = IdOrder.fit(np.arange(5), 5)
    ids = np.array([[0, 1, -1]])
    with pytest.raises(ValueError):
        codec.encode_sampled(ids, np.array([[0, 3, 0]]), 10, order)
    with pytest.raises(ValueError):
        codec.encode_sampled(ids, np.array([[6, 5, 0]]), 10, order)  # sum 11 > 10
    with pytest.raises(ValueError):
        codec.encode_sampled(ids, np.array([[11, 1, 0]]), 10, order)
    streams = codec.encode_sampled(ids, np.array([[6, 4, 0]]), 10, order)
    with pytest.raises(ValueError):
        codec.decode_sampled(dict(streams, q_delta=np.zeros(0, np.uint8)), 1, 3, 10, order)
    with pytest.raises(ValueError):
        codec.decode_sampled(dict(streams, n_targets=np.zeros(3, np.uint8)), 2, 3, 10, order)
