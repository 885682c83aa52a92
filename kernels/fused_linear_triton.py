"""Triton kernels of the fused output layer + sparse distillation loss: logits ``z = h W^T + b`` exist only as tiles.

Forward (``_fused_forward_kernel``). A program owns ``BLOCK_M`` rows and a contiguous range of vocabulary tiles
(a "split"; splits give the GPU enough programs when N is small). For each ``BLOCK_M x BLOCK_N`` tile it
computes ``z`` with ``tl.dot`` over H in ``BLOCK_H`` steps (fp32 accumulator), then

- updates a per-row online max/sum of ``s = z / T`` (and of ``z`` at T = 1 when a cross-entropy is mixed in
  and cannot share the first one), kept in registers across the split's tiles and written once per split;
- copies out the logits at the K target ids and the label (the "gathered" logits, ``(N, K + 1)``); each id
  falls into exactly one tile, so every slot is written by exactly one program and no atomics are needed.

The per-split partial sums are merged into ``lse_s``/``lse_z`` on the host side of the launcher (an ``(S, N)``
logsumexp). Everything else the loss needs follows from these per-row numbers (``fused_linear.py``).

Backward (``_fused_backward_kernel``). One program per (row block, vocabulary tile) recomputes ``z`` and forms

    dZ = dense_s * softmax(z / T) + dense_z * softmax(z) + sum_k coef_k * 1(j = id_k)

from per-row coefficients (already multiplied by grad_output), where with tail='bucket' (``SUPPORT``) dense_s at
a target id is the slot's own coefficient cin_k instead: the tile's softmax(z / T) is taken at those columns into
dZ with cin_k and then zeroed, before dense_s multiplies the rest (a selection, so the large dense_s and cin_k of a
tiny student tail never cancel; duplicates share one cin and the first takes it). It then consumes dZ at once:
``dH[rows] += dZ W[tile]`` and ``dW[tile] += dZ^T H[rows]`` in ``BLOCK_H`` steps, and ``db[tile] += sum_rows dZ``,
all accumulated with fp32 atomics (the order of additions, hence the last bits, is not deterministic).
``dZ`` is cast to the inputs' dtype for the two products, as the gradient of materialised logits would be.
Tiles without a dense term and without a target id (tail='restrict' without cross-entropy) are exactly zero and
skipped before any matmul; with ``skip_eps`` > 0, tiles whose softmax probabilities are all below it and that hold
no target id are skipped too (the Cut Cross-Entropy filter; off by default).

The weight gradient is accumulated in fp32 over slices of the vocabulary (``SLICE_ELEMENTS`` per slice), so the
fp32 buffer stays small when the weight is bf16; dH is accumulated in one fp32 (N, H) buffer.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# fp32 elements of the per-slice weight-gradient accumulator (128 MiB); slices are whole tiles.
SLICE_ELEMENTS = 1 << 25
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter only): triton 3.9's interpreter multiplies bf16 operands wrongly, so they
    are widened to fp32 first, which is exact for the products of bf16 numbers."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(
    h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, row_in, cols, V, H, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """fp32 tile z[rows, cols] = h[rows] . w[cols] (+ b[cols]); rows outside ``row_in`` and cols >= V read as 0."""
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + offs_h
        a = tl.load(h_ptr + rows[:, None] * h_stride + hh[None, :], mask=row_in[:, None] & (hh[None, :] < H),
                    other=0.0)  # fmt: skip
        b = tl.load(w_ptr + cols[None, :] * w_stride + hh[:, None], mask=(cols[None, :] < V) & (hh[:, None] < H),
                    other=0.0)  # fmt: skip
        acc = _dot(a, b, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _online_lse(m, d, x):
    """Merge the rows of tile x (-inf where masked) into running max m and sum d of exp(x - m)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, d


@triton.jit
def _online_lse_tail(m, d, t, x, outside):
    """``_online_lse`` that also keeps t, the running sum of exp(x - m) * outside (the bucket's tail)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    rescale = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe[:, None])
    return m_new, d * rescale + tl.sum(e, axis=1), t * rescale + tl.sum(e * outside, axis=1)


@triton.jit
def _fused_forward_kernel(
    h_ptr, h_stride, w_ptr, w_stride, b_ptr, ids_ptr, ids_stride, zg_ptr, part_ptr,
    N, V, H, K1, K_T, tiles_per_split, inv_t,
    HAS_BIAS: tl.constexpr, NEED_S: tl.constexpr, NEED_Z: tl.constexpr, TAIL_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < N
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    d_s = tl.zeros((BLOCK_M,), tl.float32)
    m_z = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    d_z = tl.zeros((BLOCK_M,), tl.float32)
    t_s = tl.zeros((BLOCK_M,), tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, tl.cdiv(V, BLOCK_N))
    for t in range(t_begin, t_end):
        v0 = t * BLOCK_N
        cols = (v0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        z = _logits_tile(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, row_ok, cols, V, H, HAS_BIAS,
                         BLOCK_M, BLOCK_N, BLOCK_H, PRECISION, UPCAST)  # fmt: skip
        z = tl.where(cols[None, :] < V, z, NEG_INF)
        # TAIL_SUM (bucket): outside = 1 - (target slots holding the column), so t_s sums the tail exactly
        outside = tl.full((BLOCK_M, BLOCK_N), 1.0, tl.float32)
        for k in range(0, K1):
            idk = tl.load(ids_ptr + rows * ids_stride + k, mask=row_ok, other=-1).to(tl.int64)
            hit = (idk >= v0) & (idk < v0 + BLOCK_N)
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                at = cols[None, :] == idk[:, None]
                val = tl.sum(tl.where(at, z, 0.0), axis=1)
                tl.store(zg_ptr + rows * K1 + k, val, mask=hit)
                if TAIL_SUM:
                    if k < K_T:
                        outside -= tl.where(at, 1.0, 0.0)
        if NEED_S:
            if TAIL_SUM:
                m_s, d_s, t_s = _online_lse_tail(m_s, d_s, t_s, z * inv_t, outside)
            else:
                m_s, d_s = _online_lse(m_s, d_s, z * inv_t)
        if NEED_Z:
            m_z, d_z = _online_lse(m_z, d_z, z)
    # part[(0..3), split, row] = m_s, d_s, m_z, d_z
    out = part_ptr + split * N + rows
    stride = n_splits * N
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + stride, d_s, mask=row_ok)
    tl.store(out + 2 * stride, m_z, mask=row_ok)
    tl.store(out + 3 * stride, d_z, mask=row_ok)
    tl.store(out + 4 * stride, t_s, mask=row_ok)


@triton.jit
def _fused_backward_kernel(
    h_ptr, h_stride, w_ptr, w_stride, b_ptr, ids_ptr, ids_stride, coef_ptr, row_ptr, cin_ptr,
    dh_ptr, dh_stride, dw_ptr, dw_stride, db_ptr,
    N, V, H, K1, K_T, v_begin, v_end, inv_t, skip_eps,
    HAS_BIAS: tl.constexpr, DENSE_S: tl.constexpr, DENSE_Z: tl.constexpr, SUPPORT: tl.constexpr, SKIP: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # Grouped program order: GROUP_M row blocks sweep the slice's tiles together, so W tiles are reused from L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(N, BLOCK_M)
    n_n = tl.cdiv(v_end - v_begin, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    v0 = v_begin + pid_n * BLOCK_N
    cols = (v0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < v_end
    # Rows that do not count have no gradient; their hidden states read as 0, so a NaN there cannot reach dW.
    row_in = row_ok & (tl.load(row_ptr + 6 * N + rows, mask=row_ok, other=0.0) != 0.0)

    # Count the target ids in the tile first: a tile without any can be skipped (no dense term, or SKIP).
    n_hits = 0
    for k in range(0, K1):
        idk = tl.load(ids_ptr + rows * ids_stride + k, mask=row_ok, other=-1).to(tl.int64)
        n_hits += tl.sum(((idk >= v0) & (idk < v0 + BLOCK_N)).to(tl.int32), axis=0)

    work = n_hits
    if DENSE_S or DENSE_Z:
        work = 1
    if work > 0:
        z = _logits_tile(h_ptr, h_stride, w_ptr, w_stride, b_ptr, rows, row_in, cols, V, H, HAS_BIAS,
                         BLOCK_M, BLOCK_N, BLOCK_H, PRECISION, UPCAST)  # fmt: skip
        dz = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        p_max = 0.0
        # row_ptr holds (7, N): max_s, logsum_s, c_s, max_z, logsum_z, c_z, counted; max = +inf where not counted.
        if DENSE_S:
            if not SUPPORT:
                m_s = tl.load(row_ptr + rows, mask=row_ok, other=float("inf"))
                l_s = tl.load(row_ptr + N + rows, mask=row_ok, other=0.0)
                c_s = tl.load(row_ptr + 2 * N + rows, mask=row_ok, other=0.0)
                p_s = tl.exp((z * inv_t - m_s[:, None]) - l_s[:, None])
                dz += c_s[:, None] * p_s
                if SKIP:
                    p_max = tl.max(tl.max(p_s, axis=1), axis=0)
        if DENSE_Z:
            m_z = tl.load(row_ptr + 3 * N + rows, mask=row_ok, other=float("inf"))
            l_z = tl.load(row_ptr + 4 * N + rows, mask=row_ok, other=0.0)
            c_z = tl.load(row_ptr + 5 * N + rows, mask=row_ok, other=0.0)
            p_z = tl.exp((z - m_z[:, None]) - l_z[:, None])
            dz += c_z[:, None] * p_z
            if SKIP:
                p_max = tl.maximum(p_max, tl.max(tl.max(p_z, axis=1), axis=0))
        if SUPPORT:  # softmax(z / T) waits for the fix-ups below, which take it at the target ids (z is dead after)
            m_s = tl.load(row_ptr + rows, mask=row_ok, other=float("inf"))
            l_s = tl.load(row_ptr + N + rows, mask=row_ok, other=0.0)
            p_s = tl.exp((z * inv_t - m_s[:, None]) - l_s[:, None])
            if SKIP:
                p_max = tl.maximum(p_max, tl.max(tl.max(p_s, axis=1), axis=0))
        if n_hits > 0:  # the K (+ label) sparse fix-ups; duplicate ids add up
            for k in range(0, K1):
                idk = tl.load(ids_ptr + rows * ids_stride + k, mask=row_ok, other=-1).to(tl.int64)
                hit = (idk >= v0) & (idk < v0 + BLOCK_N)
                if tl.sum(hit.to(tl.int32), axis=0) > 0:
                    at = cols[None, :] == idk[:, None]
                    ck = tl.load(coef_ptr + rows * K1 + k, mask=hit, other=0.0)
                    if SUPPORT:
                        if k < K_T:  # a target id: its own dense coefficient, taken once (p_s then reads 0 there)
                            cin = tl.load(cin_ptr + rows * K_T + k, mask=hit, other=0.0)
                            dz += tl.where(at, ck[:, None] + cin[:, None] * p_s, 0.0)
                            p_s = tl.where(at, 0.0, p_s)
                        else:
                            dz += tl.where(at, ck[:, None], 0.0)
                    else:
                        dz += tl.where(at, ck[:, None], 0.0)
        if SUPPORT:
            c_s = tl.load(row_ptr + 2 * N + rows, mask=row_ok, other=0.0)
            dz += c_s[:, None] * p_s
        tile_ok = row_in[:, None] & col_ok[None, :]
        dz = tl.where(tile_ok, dz, 0.0)
        keep = 1
        if SKIP:  # rows past N have probability 0; columns past the slice can only keep a tile, never drop one
            keep = tl.maximum((p_max >= skip_eps).to(tl.int32), (n_hits > 0).to(tl.int32))
        if keep > 0:
            if COMPUTE_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
            dz_mm = dz.to(h_ptr.dtype.element_ty)
            offs_h = tl.arange(0, BLOCK_H)
            for h0 in range(0, H, BLOCK_H):
                hh = h0 + offs_h
                h_ok = hh < H
                if COMPUTE_DH:
                    w = tl.load(w_ptr + cols[:, None] * w_stride + hh[None, :], mask=col_ok[:, None] & h_ok[None, :],
                                other=0.0)  # fmt: skip
                    dh = _dot(dz_mm, w, tl.zeros((BLOCK_M, BLOCK_H), tl.float32), PRECISION, UPCAST)
                    tl.atomic_add(dh_ptr + rows[:, None] * dh_stride + hh[None, :], dh,
                                  mask=row_ok[:, None] & h_ok[None, :], sem="relaxed")  # fmt: skip
                if COMPUTE_DW:
                    a = tl.load(h_ptr + rows[:, None] * h_stride + hh[None, :], mask=row_in[:, None] & h_ok[None, :],
                                other=0.0)  # fmt: skip
                    dw = _dot(tl.trans(dz_mm), a, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), PRECISION, UPCAST)
                    tl.atomic_add(dw_ptr + (cols - v_begin)[:, None] * dw_stride + hh[None, :], dw,
                                  mask=col_ok[:, None] & h_ok[None, :], sem="relaxed")  # fmt: skip


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(hidden: torch.Tensor) -> dict:
    """Tile sizes. Untuned starting points on Hopper (no GPU was available when they were chosen); tiny under
    the interpreter so that CPU tests cover several tiles, splits and H steps."""
    if _interpreted():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_H=16, num_warps=4)
    block_h = 64 if hidden.dtype != torch.float32 else 32
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_H=block_h, num_warps=8, num_stages=3)


def _upcast(dtype: torch.dtype) -> bool:
    return _interpreted() and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's matmul precision setting ('highest' = exact fp32, else TF32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 3


def _merge_lse(m: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge (S, N) partial maxima and sums over splits into (max, log of the sum at that max) per row.

    logsumexp = max + log_sum, but kept apart: ``exp((x - max) - log_sum)`` is accurate for the largest entries
    where ``exp(x - (max + log_sum))`` loses the bits of a large max (logits of magnitude 100 lose ~1e-5)."""
    mx = m.max(0).values
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return mx, (d * torch.exp(m - mx)).sum(0).log()


def fused_forward_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids_ext: torch.Tensor,
    inv_t: float,
    need_s: bool,
    need_z: bool,
    n_targets: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row log-normalisers and gathered logits without materialising (N, V).

    hidden (N, H) and weight (V, H) with unit last stride, bias (V,) or None, ids_ext (N, K1) int with -1 where
    nothing is to be gathered. Returns lse_s = (max, log_sum) of z / T (when need_s, else None), lse_z the same of
    z (when need_z), the fp32 logits at ids_ext (N, K1) (0 where the id is -1), and, when ``n_targets`` (the first
    slots of ids_ext that are target ids) is given with need_s, the bucket's student tail 1 - Q per row: the
    softmax(z / T) mass outside those ids (duplicates subtract their extra copies), summed in the pass (else None).
    """
    n, h = hidden.shape
    vocab = weight.shape[0]
    k1 = ids_ext.shape[1]
    cfg = _blocks(hidden)
    n_m = triton.cdiv(n, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(vocab, cfg["BLOCK_N"])
    splits = max(1, min(n_tiles, triton.cdiv(_target_programs(hidden.device), n_m)))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    zg = torch.zeros((n, k1), dtype=torch.float32, device=hidden.device)
    tail_sum = need_s and n_targets is not None
    part = torch.empty((5, splits, n), dtype=torch.float32, device=hidden.device)
    _fused_forward_kernel[(n_m, splits)](
        hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
        ids_ext, ids_ext.stride(0), zg, part,
        n, vocab, h, k1, n_targets or 0, per_split, inv_t,
        HAS_BIAS=bias is not None, NEED_S=need_s, NEED_Z=need_z, TAIL_SUM=tail_sum,
        PRECISION=_precision(hidden.dtype), UPCAST=_upcast(hidden.dtype), **cfg,
    )  # fmt: skip
    lse_s = _merge_lse(part[0], part[1]) if need_s else None
    lse_z = _merge_lse(part[2], part[3]) if need_z else None
    q_tail = None
    if tail_sum:
        mx = lse_s[0]
        at_max = torch.exp(part[0] - mx)
        total = (part[1] * at_max).sum(0)
        # total NaN (a NaN or +inf logit) or 0 (a row that does not count): 0 here, the log-normaliser carries it
        q_tail = torch.where(total > 0, (part[4] * at_max).sum(0) / total.clamp_min(1e-30), torch.zeros_like(total))
    return lse_s, lse_z, zg, q_tail


def fused_backward_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids_ext: torch.Tensor,
    coef: torch.Tensor,
    row: torch.Tensor,
    inv_t: float,
    dense_s: bool,
    dense_z: bool,
    needs: tuple[bool, bool, bool],
    skip_eps: float,
    cin: torch.Tensor | None = None,
    fp32_dh: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dH, dW, db) in the dtypes of hidden, weight and bias (None where not needed).

    coef (N, K1) fp32: the gradient at ids_ext; row (7, N) fp32: max and log_sum of z / T, the dense coefficient
    of softmax(z / T), max and log_sum of z, the dense coefficient of softmax(z) (coefficients already multiplied by
    grad_output and the mean's 1/denominator; max = +inf on rows whose dense gradient is 0), and 1 where the row
    counts, 0 where its hidden state is to be read as 0. cin (N, K) fp32 or None (tail='bucket' with dense_s):
    the coefficient of softmax(z / T) at the first K ids_ext (the target ids), in place of the row's dense one.
    ``fp32_dh``: dH stays in float32 (a vocab-parallel caller sums it over ranks before rounding).
    """
    n, h = hidden.shape
    vocab = weight.shape[0]
    k1 = ids_ext.shape[1]
    cfg = _blocks(hidden)
    cfg.pop("num_stages", None)
    need_dh, need_dw, need_db = needs
    dev = hidden.device
    dh32 = torch.zeros((n, h), dtype=torch.float32, device=dev) if need_dh else None
    db32 = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_db else None
    # An fp32 weight accumulates straight into its gradient; a half one through an fp32 slice of whole tiles.
    block_n = cfg["BLOCK_N"]
    direct = weight.dtype == torch.float32
    slice_rows = vocab if direct else max(block_n, SLICE_ELEMENTS // max(h, 1) // block_n * block_n)
    dw = dw32 = None
    if need_dw:
        dw = torch.zeros_like(weight) if direct else torch.empty_like(weight)
        if not direct:
            dw32 = torch.empty((min(slice_rows, vocab), h), dtype=torch.float32, device=dev)
    dummy = hidden.new_zeros(1, dtype=torch.float32)
    support = dense_s and cin is not None
    k_t = cin.shape[1] if support else 0
    for v_begin in range(0, vocab, slice_rows):
        v_end = min(vocab, v_begin + slice_rows)
        acc = None
        if need_dw:
            acc = dw[v_begin:v_end] if dw32 is None else dw32[: v_end - v_begin].zero_()
        grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(v_end - v_begin, block_n),)
        _fused_backward_kernel[grid](
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else weight,
            ids_ext, ids_ext.stride(0), coef, row, cin if support else dummy,
            dh32 if need_dh else dummy, h, acc if acc is not None else dummy, h, db32 if need_db else dummy,
            n, vocab, h, k1, k_t, v_begin, v_end, inv_t, skip_eps,
            HAS_BIAS=bias is not None, DENSE_S=dense_s, DENSE_Z=dense_z, SUPPORT=support, SKIP=skip_eps > 0,
            COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, COMPUTE_DB=need_db, GROUP_M=8,
            PRECISION=_precision(hidden.dtype), UPCAST=_upcast(hidden.dtype), **cfg,
        )  # fmt: skip
        if dw32 is not None:
            dw[v_begin:v_end] = acc
    return (
        (dh32 if fp32_dh else dh32.to(hidden.dtype)) if need_dh else None,
        dw,
        db32.to(bias.dtype) if need_db else None,
    )
