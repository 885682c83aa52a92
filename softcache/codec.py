"""Pack and unpack sparse teacher targets into compact byte streams (pure numpy, vectorised).

A *batch* of positions is turned into a few named ``uint8`` streams that a storage backend then
compresses with zstd. Everything is shaped so that zstd's entropy stage finds the redundancy:

* **ids** are replaced by their rank in an :class:`IdOrder` (most frequent id first, fitted once per
  shard), so that the common tokens of a real teacher get small codes, and stored as byte planes
  (all low bytes, then all high bytes): for a real LM the high planes are almost all zero.
* **log-probs** are kept in rank order (descending) and quantised to a grid of step ``logprob_step``:
  ``q = round(-lp / step)`` is non-decreasing along a row, so it is stored as one head value per
  row plus small non-negative deltas (one byte each, 255 escapes to a wider side stream).
* **normalisers**: for each captured temperature ``τ`` the stored ``n_τ`` is not the raw
  ``logsumexp(z/τ) - logsumexp(z)/τ`` but that value corrected for quantisation, so that the head mass
  ``Σ exp(lp̂/τ - n_τ)`` equals the exact one. The tail mass ``1 - Σ p_τ`` is therefore exact (to
  ``lognorm_step``) at every captured temperature, and each decoded tempered log-prob
  ``lp̂/τ - n_τ`` is within ``logprob_step/τ`` nats of the exact value (``logprob_step/(2τ)`` from the
  grid plus at most as much from the correction, a p-weighted mean of the same rounding errors).
* **sampled** targets keep ids and counts: rows are sorted by count (descending), and
  ``N - count`` is non-decreasing, so counts use the same head+delta coder.

Padding slots (``id == -1``) are never stored: each position stores its number of entries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

LOGPROB_FLOOR = -1000.0
"""Log-probs below this are stored as this value (exp(-1000) is 0 in float64)."""

_ESCAPE = 255


@dataclass(frozen=True)
class CodecParams:
    """Quantisation grid of a cache; stored in the manifest."""

    logprob_step: float = 1.0 / 64
    lognorm_step: float = 2.0**-20

    def __post_init__(self) -> None:
        for name, low in (("logprob_step", 1e-4), ("lognorm_step", 1e-9)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and low <= v <= 1):
                raise ValueError(f"codec parameter {name}={v!r} must be a number in [{low:g}, 1]")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def max_logprob_error(self) -> float:
        """Largest error, in nats, of a decoded log-prob at temperature 1 (at τ it is this / τ)."""
        return self.logprob_step


# ---------------------------------------------------------------------------------------------
# Byte planes: unsigned integers as width-major byte planes; the width is whatever the largest
# value of the array needs, and the decoder infers it from the stream length.


def to_planes(values: np.ndarray) -> np.ndarray:
    """Unsigned integers (any shape) → flat uint8: all byte 0s, then all byte 1s, ... (little end first)."""
    v = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    if v.size == 0:
        return np.zeros(0, np.uint8)
    width = max(1, (int(v.max()).bit_length() + 7) // 8)
    return np.ascontiguousarray(v.view(np.uint8).reshape(-1, 8)[:, :width].T).ravel()


def from_planes(stream: np.ndarray, count: int, dtype=np.int64) -> np.ndarray:
    """Inverse of :func:`to_planes` for ``count`` values."""
    stream = np.asarray(stream, dtype=np.uint8)
    if count == 0:
        if stream.size:
            raise ValueError(f"stream of {stream.size} bytes where no values are expected")
        return np.zeros(0, dtype)
    width, rem = divmod(stream.size, count)
    if rem or not 1 <= width <= 8:
        raise ValueError(f"stream of {stream.size} bytes cannot hold {count} values")
    planes = stream.reshape(width, count)
    if width < 4 and np.dtype(dtype).itemsize >= 4 or width == 4 and np.dtype(dtype).itemsize == 8:
        out = planes[width - 1].astype(dtype)  # the value fits: shift in the lower planes, in place
        for b in range(width - 2, -1, -1):
            out <<= 8
            out |= planes[b]
        return out
    if width == 4 and np.dtype(dtype).itemsize == 4:
        out = planes[0].astype(np.uint32)
        for b in range(1, width):
            out |= planes[b].astype(np.uint32) << np.uint32(8 * b)
        if width == 4 and np.dtype(dtype) == np.int32 and out.max() > np.iinfo(np.int32).max:
            raise ValueError("stream value does not fit int32")
        return out.astype(dtype, copy=False)
    wide = np.zeros((count, 8), np.uint8)
    wide[:, :width] = planes.T
    out = wide.view(np.uint64).ravel()
    if np.dtype(dtype).itemsize < 8 and out.max() > np.iinfo(dtype).max:
        raise ValueError(f"stream value does not fit {np.dtype(dtype)}")
    return out.astype(dtype, copy=False)


def zigzag(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.int64)
    return ((x << 1) ^ (x >> 63)).astype(np.uint64)


def unzigzag(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u).astype(np.uint64)
    return (u >> np.uint64(1)).astype(np.int64) ^ -(u & np.uint64(1)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Id order


class IdOrder:
    """A permutation of the vocabulary, most frequent ids first, used to give common ids small codes.

    It is determined by ``head``: the ids seen when it was fitted, most frequent first (ties by id);
    every other id follows in increasing order.
    """

    def __init__(self, head: np.ndarray, vocab_size: int) -> None:
        head = np.asarray(head, np.int64)
        if head.size and (head.min() < 0 or head.max() >= vocab_size or np.unique(head).size != head.size):
            raise ValueError("id order head must hold distinct ids in [0, vocab_size)")
        seen = np.zeros(vocab_size, bool)
        seen[head] = True
        self.head = head
        self.vocab_size = vocab_size
        self.order = np.concatenate([head, np.flatnonzero(~seen)]).astype(np.int32)
        self.rank = np.empty(vocab_size, np.int32)
        self.rank[self.order] = np.arange(vocab_size, dtype=np.int32)

    @classmethod
    def fit(cls, ids: np.ndarray, vocab_size: int) -> IdOrder:
        ids = np.asarray(ids).ravel()
        counts = np.bincount(ids[ids >= 0], minlength=vocab_size)
        order = np.argsort(-counts, kind="stable")
        return cls(order[: np.count_nonzero(counts)], vocab_size)

    def to_bytes(self) -> np.ndarray:
        return self.head.astype("<i4").view(np.uint8)

    @classmethod
    def from_bytes(cls, data: np.ndarray, vocab_size: int) -> IdOrder:
        data = np.asarray(data, np.uint8)
        if data.size % 4:
            raise ValueError(f"id order of {data.size} bytes is not a whole number of int32")
        return cls(data.view("<i4").astype(np.int64), vocab_size)


# ---------------------------------------------------------------------------------------------
# Rows: padded (L, k) arrays, entries first and padding (id −1) last. The streams hold the entries
# only, row-major; a row's entry count is stored once. Full rows (no padding) take fast paths.


def _sort_rows(ids: np.ndarray, values: np.ndarray) -> tuple:
    """Each row in descending ``values`` order (stable), padding last → ids, values, lengths, mask."""
    valid = ids >= 0
    lengths = valid.sum(-1)
    mask = np.arange(ids.shape[1]) < lengths[:, None]
    if not (np.array_equal(valid, mask) and not np.any(np.diff(values, axis=-1)[mask[:, 1:]] > 0)):
        perm = np.argsort(np.where(valid, -values, np.inf), axis=-1, kind="stable")
        ids = np.take_along_axis(ids, perm, -1)
        values = np.take_along_axis(values, perm, -1)
    return ids, values, lengths, mask


def _entries(rows: np.ndarray, mask: np.ndarray, full: bool) -> np.ndarray:
    return rows.ravel() if full else rows[mask]


def _rows(entries: np.ndarray, mask: np.ndarray, full: bool, fill, dtype) -> np.ndarray:
    if full:
        return entries.astype(dtype, copy=False).reshape(mask.shape)
    out = np.full(mask.shape, fill, dtype)
    out[mask] = entries
    return out


def _encode_monotone(q: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of non-decreasing non-negative integers → one head per non-empty row + byte deltas."""
    deltas = np.diff(q, axis=1)[mask[:, 1:]]
    escaped = deltas >= _ESCAPE
    return {
        "q_head": to_planes(q[lengths > 0, 0]) if q.shape[1] else np.zeros(0, np.uint8),
        "q_delta": np.minimum(deltas, _ESCAPE).astype(np.uint8),
        "q_escape": to_planes(deltas[escaped]),
    }


def _decode_monotone(streams: dict[str, np.ndarray], lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """→ (L, k) int32; padding slots repeat their row's last value (callers mask them)."""
    nonempty = lengths > 0
    n_rows = int(nonempty.sum())
    heads = from_planes(streams["q_head"], n_rows, np.int32)
    deltas = np.asarray(streams["q_delta"], np.uint8)
    n_deltas = int(lengths.sum()) - n_rows
    if deltas.size != n_deltas:
        raise ValueError(f"q_delta holds {deltas.size} values, {n_deltas} expected")
    escaped = deltas == _ESCAPE
    if escaped.any():
        deltas = deltas.astype(np.int32)
        deltas[escaped] = from_planes(streams["q_escape"], int(escaped.sum()), np.int32)
    elif streams["q_escape"].size:
        raise ValueError("q_escape holds values but no delta is escaped")
    if n_rows == mask.shape[0] and n_deltas == mask.size - n_rows:  # full rows
        rows = np.empty(mask.shape, np.int32)
        rows[:, 0] = heads
        rows[:, 1:] = deltas.reshape(mask.shape[0], mask.shape[1] - 1)
    else:
        rows = np.zeros(mask.shape, np.int32)
        rows[nonempty, 0] = heads
        rows[:, 1:][mask[:, 1:]] = deltas
    return np.cumsum(rows, axis=1, out=rows)  # int32: numpy's float cumsum is ~5x slower


def _encode_ids(ids: np.ndarray, lengths: np.ndarray, mask: np.ndarray, order: IdOrder) -> dict[str, np.ndarray]:
    flat = _entries(ids, mask, bool(lengths.min(initial=1) == ids.shape[1]))
    if flat.size and flat.max() >= order.vocab_size:
        raise ValueError(f"target id {int(flat.max())} is not < vocab_size={order.vocab_size}")
    return {"n_targets": to_planes(lengths), "target_codes": to_planes(order.rank[flat])}


def _decode_ids(streams: dict[str, np.ndarray], n_positions: int, k: int, order: IdOrder) -> tuple:
    """→ ids (L, k) int32 with −1 padding, lengths (L,), mask (L, k), full (no padding at all)."""
    lengths = from_planes(streams["n_targets"], n_positions, np.int32)
    if lengths.size and lengths.max() > k:
        raise ValueError(f"a position holds {lengths.max()} entries, more than k={k}")
    mask = np.arange(k) < lengths[:, None]
    full = bool(lengths.min(initial=k) == k)
    codes = from_planes(streams["target_codes"], int(lengths.sum()), np.intp)  # take() indexes with intp
    if codes.size and (codes.max() >= order.vocab_size):
        raise ValueError(f"target code {int(codes.max())} is not < vocab_size={order.vocab_size}")
    return _rows(order.order.take(codes), mask, full, -1, np.int32), lengths, mask, full


# ---------------------------------------------------------------------------------------------
# Public batch codec


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", under="ignore"):
        return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def encode_topk(
    target_ids: np.ndarray,
    target_logprobs: np.ndarray,
    lognorm: np.ndarray,
    temperatures,
    order: IdOrder,
    params: CodecParams,
) -> dict[str, np.ndarray]:
    """Encode top-k rows: ids (L, k) with −1 padding, log-probs at T=1 (L, k), exact n_τ (L, n_temps)."""
    lp = np.maximum(np.asarray(target_logprobs, np.float64), LOGPROB_FLOOR)
    ids, lp, lengths, mask = _sort_rows(np.asarray(target_ids, np.int64), lp)
    q = np.where(mask, np.maximum(np.rint(-lp / params.logprob_step), 0), 0).astype(np.int32)
    # Corrected normalisers: the head mass of the quantised log-probs equals the exact head mass,
    # n̂_τ = n_τ + logsumexp(lp̂/τ) − logsumexp(lp/τ) (in log space: no underflow).
    lognorm = np.asarray(lognorm, np.float64)
    tau = np.asarray(temperatures, np.float64)[None, :, None]
    exact = np.where(mask, lp, -np.inf)[:, None, :]
    quant = np.where(mask, q * -params.logprob_step, -np.inf)[:, None, :]
    with np.errstate(invalid="ignore"):  # empty rows: −inf − −inf, replaced just below
        corrected = lognorm + _logsumexp(quant / tau) - _logsumexp(exact / tau)
    corrected = np.where(lengths[:, None] > 0, corrected, lognorm)
    n_q = np.rint(corrected / params.lognorm_step).astype(np.int64)
    streams = _encode_ids(ids, lengths, mask, order)
    streams.update(_encode_monotone(q, lengths, mask))
    streams["lognorm"] = to_planes(zigzag(n_q.T))
    return streams


def decode_topk(streams, n_positions: int, k: int, n_temps: int, order: IdOrder, params: CodecParams):
    """Decode → ids (L, k) int32 with −1 padding, log-probs (L, k) float32 (0 at padding), lognorm (L, n_temps)."""
    ids, lengths, mask, full = _decode_ids(streams, n_positions, k, order)
    lp = _decode_monotone(streams, lengths, mask).astype(np.float32)
    lp *= np.float32(-params.logprob_step)
    if not full:
        lp[~mask] = 0.0
    n_q = unzigzag(from_planes(streams["lognorm"], n_positions * n_temps)).reshape(n_temps, n_positions).T
    return ids, lp, (n_q * params.lognorm_step).astype(np.float32)


def encode_sampled(target_ids: np.ndarray, counts: np.ndarray, samples: int, order: IdOrder) -> dict[str, np.ndarray]:
    """Encode sampled rows: unique ids (L, k) with −1 padding and their counts out of ``samples`` draws."""
    ids = np.asarray(target_ids, np.int64)
    counts = np.asarray(counts, np.int64)
    bad = invalid_count_row(ids, counts, samples)
    if bad is not None:
        raise ValueError(
            f"counts at position {bad}: each drawn id needs a count in [1, samples={samples}] "
            f"and a position's counts may add up to at most {samples}"
        )
    ids, counts, lengths, mask = _sort_rows(ids, counts)
    streams = _encode_ids(ids, lengths, mask, order)
    streams.update(_encode_monotone(np.where(mask, samples - counts, 0).astype(np.int32), lengths, mask))
    return streams


def invalid_count_row(target_ids: np.ndarray, counts: np.ndarray, samples: int) -> int | None:
    """The first position whose counts are impossible for ``samples`` draws (a drawn id counted outside
    [1, samples], or counts adding up to more than samples), or None."""
    real = target_ids >= 0
    bad = (real & ((counts < 1) | (counts > samples))).any(-1) | (np.where(real, counts, 0).sum(-1) > samples)
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None


def decode_sampled(streams, n_positions: int, k: int, samples: int, order: IdOrder):
    """Decode → ids (L, k) int32 with −1 padding, counts (L, k) int32 (0 at padding)."""
    ids, lengths, mask, _ = _decode_ids(streams, n_positions, k, order)
    counts = np.where(mask, samples - _decode_monotone(streams, lengths, mask), 0).astype(np.int32)
    if np.any(mask & ((counts < 1) | (counts > samples))):
        raise ValueError("decoded sample counts out of range")
    return ids, counts


def encode_tokens(values: np.ndarray) -> np.ndarray:
    """Non-negative integers (token ids, lengths) → byte planes."""
    values = np.asarray(values)
    if values.size and values.min() < 0:
        raise ValueError("token ids and lengths must be non-negative")
    return to_planes(values)


def decode_tokens(stream: np.ndarray, count: int) -> np.ndarray:
    return from_planes(stream, count, np.int64)
