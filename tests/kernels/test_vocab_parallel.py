"""Vocab-parallel losses (process_group=...) on 2 and 4 gloo ranks on the CPU against the unsharded ones.

Each spawned rank builds the same inputs from a seed, computes the unsharded loss and gradient on the full logits,
and the sharded loss on its column slice; the loss and its gradient slice (so the concatenated gradient) must agree
within 1e-5 relative, with exactly two all-reduces per call (a third, of dH, in the fused form's backward). The fused
form (fused_linear_sparse_kl_loss with a row slice of the output layer) is compared the same way for dH, dW and db.
One spawn per world size runs every case.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from softcache.kernels import (
    FusedLinearSparseKLLoss,
    SparseKLLoss,
    fused_linear_sparse_kl_loss,
    sparse_kl_loss,
    triton_available,
)

# the Triton path on the CPU through the interpreter (the spawned ranks inherit TRITON_INTERPRET from tests/conftest.py)
TRITON = os.environ.get("TRITON_INTERPRET") == "1" and triton_available()

CASES = [  # (kind, tail, dtype, temperature, alpha, reduction, scale_by_t2)
    ("forward_kl", "bucket", torch.float64, 1.0, 1.0, "mean", True),
    ("forward_kl", "bucket", torch.float32, 2.0, 0.7, "mean", True),
    ("forward_kl", "bucket", torch.float64, 1.5, 0.6, "sum", False),
    ("forward_kl", "bucket", torch.float32, 1.0, 0.5, "none", True),
    ("forward_kl", "renormalize", torch.float64, 1.0, 1.0, "mean", True),
    ("forward_kl", "renormalize", torch.float32, 3.0, 0.8, "sum", True),
    ("forward_kl", "renormalize", torch.float64, 0.7, 0.4, "none", True),
    ("reverse_kl", "bucket", torch.float64, 2.0, 0.9, "mean", True),
    ("jsd", "bucket", torch.float64, 1.0, 1.0, "sum", True),
    ("tvd", "bucket", torch.float64, 1.3, 0.7, "mean", True),
    ("forward_kl", "restrict", torch.float64, 1.0, 1.0, "mean", True),
    ("reverse_kl", "restrict", torch.float32, 2.0, 0.6, "none", True),
    ("jsd", "restrict", torch.float64, 1.0, 0.8, "sum", True),
    ("forward_kl", "bucket", torch.float32, 1.0, 1.0, "mean", True),  # float32, tail ratio p_t / q_t ~ 1e6: row 9
]
FUSED = (0, 2, 3, 4, 9, 10, 13)  # the cases also run through the fused output layer


def _inputs(vocab, seed, dtype, n=13, k=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    ids[2, 3:] = -1  # padding
    ids[4] = -1  # a row without targets
    ids[6, 1] = ids[6, 0]  # a duplicate id
    lp = torch.log_softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, -1)
    lp = (lp + torch.log(torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.5 + 0.45)).to(dtype)
    lp[1] = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), -1).to(dtype)  # P = 1
    logits[8, ids[8]] += 25.0  # the student's tail 1 - Q ~ 1e-9: summed over the shards, not 1 - sum_S q
    logits[9, ids[9]] += 18.0  # a tail ~1e-6 against a teacher's ~0.5: g_t ~ 1e6 must not reach the support columns
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[5] = -100
    labels[7] = ids[7, 0]  # the label is a target id
    return logits.to(dtype).reshape(1, n, vocab), ids.reshape(1, n, k), lp.reshape(1, n, k), labels.reshape(1, n)


def _close(actual, expected, what):
    tol = 1e-5
    scale = float(expected.abs().max().clamp_min(1e-12))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=what)


def _counting_all_reduce(calls):
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(kwargs.get("op", dist.ReduceOp.SUM))
        return real(*args, **kwargs)

    return counting


def _check_fused(i, case, logits, ids, lp, labels, group, start, end, layout, what):
    """The fused output layer on a row slice of (weight, bias): loss, dH (all-reduced or not), dW and db."""
    kind, tail, dtype, t, alpha, reduction, t2 = case
    n, vocab, hid, dev = logits.shape[1], logits.shape[2], 7, logits.device
    g = torch.Generator().manual_seed(1000 + i)
    hidden = torch.randn(1, n, hid, generator=g, dtype=torch.float64).to(dev, dtype)
    weight = (torch.randn(vocab, hid, generator=g, dtype=torch.float64) * 0.8).to(dev, dtype)
    bias = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5).to(dev, dtype)
    opts = dict(kind=kind, tail=tail, temperature=t, alpha=alpha, reduction=reduction, scale_by_t2=t2,
                labels=labels if alpha < 1 else None, backend="torch")  # fmt: skip
    h_full, w_full, b_full = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    ref = fused_linear_sparse_kl_loss(h_full, w_full, ids, lp, b_full, **opts)
    out_w = (torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5).to(dev)
    (ref * out_w.to(ref.dtype)).sum().backward()
    runs = [("torch", True), ("torch", False)]
    if (TRITON or dev.type == "cuda") and dtype != torch.float64:
        runs += [("triton", True), ("triton", False)]
    for name, reduce in runs:
        h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight[start:end], bias[start:end]))
        calls = []
        real = dist.all_reduce
        dist.all_reduce = _counting_all_reduce(calls)
        try:
            out = fused_linear_sparse_kl_loss(h, w, ids, lp, b, process_group=group, reduce_hidden_grad=reduce,
                                              **layout, **{**opts, "backend": name})  # fmt: skip
            (out * out_w.to(out.dtype)).sum().backward()
        finally:
            dist.all_reduce = real
        assert calls == [dist.ReduceOp.MAX, dist.ReduceOp.SUM] + [dist.ReduceOp.SUM] * reduce, (what, calls)
        run = f"{what} fused {name} reduce={reduce}"
        _close(out.detach(), ref.detach(), run + " loss")
        dh = h.grad.clone()
        if not reduce:  # each rank holds its slice's part of dH
            dist.all_reduce(dh, group=group)
        _close(dh, h_full.grad, run + " dH")
        _close(w.grad, w_full.grad[start:end], run + " dW")
        _close(b.grad, b_full.grad[start:end], run + " db")


def _run_cases(rank, world, bounds):
    group = dist.group.WORLD
    calls = []
    real_all_reduce = dist.all_reduce
    for even in (True, False):
        vocab = 4 * 11 * world // 2 + (0 if even else 3)  # not a power of two
        if even:
            start, end = rank * vocab // world, (rank + 1) * vocab // world
        else:
            cuts = [0, *bounds(vocab), vocab]
            start, end = cuts[rank], cuts[rank + 1]
        layout = {} if even else dict(vocab_start=start, vocab_size=vocab)
        for i, case in enumerate(CASES):
            kind, tail, dtype, t, alpha, reduction, t2 = case
            logits, ids, lp, labels = _inputs(vocab, 100 + i, dtype)
            opts = dict(kind=kind, tail=tail, temperature=t, alpha=alpha, reduction=reduction, scale_by_t2=t2,
                        labels=labels if alpha < 1 else None, backend="torch")  # fmt: skip
            full = logits.clone().requires_grad_(True)
            ref = sparse_kl_loss(full, ids, lp, **opts)
            weight = torch.rand(ref.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) + 0.5
            (ref * weight.to(ref.dtype)).sum().backward()
            local = logits[..., start:end].clone().requires_grad_(True)
            dist.all_reduce = _counting_all_reduce(calls)
            calls.clear()
            try:
                out = sparse_kl_loss(local, ids, lp, process_group=group, **layout, **opts)
            finally:
                dist.all_reduce = real_all_reduce
            assert calls == [dist.ReduceOp.MAX, dist.ReduceOp.SUM], calls
            (out * weight.to(out.dtype)).sum().backward()
            what = f"case {i} {kind}/{tail} {dtype} T={t} alpha={alpha} {reduction} even={even} rank={rank}"
            assert out.shape == ref.shape, what
            _close(out.detach(), ref.detach(), what + " loss")
            _close(local.grad, full.grad[..., start:end], what + " grad")
            assert float(full.grad.abs().max()) > 0, what
            backends = ["torch", "triton"] if TRITON and dtype != torch.float64 else ["torch"]
            if i == 1:  # inplace_grad: the gradient is written over the (non-leaf) local logits
                for name in backends:
                    leaf = logits[..., start:end].clone().requires_grad_(True)
                    out2 = sparse_kl_loss(leaf * 1.0, ids, lp, process_group=group, inplace_grad=True, **layout,
                                          **{**opts, "backend": name})  # fmt: skip
                    (out2 * weight.to(out2.dtype)).sum().backward()
                    _close(out2.detach(), ref.detach(), what + f" inplace loss {name}")
                    _close(leaf.grad, full.grad[..., start:end], what + f" inplace grad {name}")
            if "triton" in backends:
                local_t = logits[..., start:end].clone().requires_grad_(True)
                out_t = sparse_kl_loss(local_t, ids, lp, process_group=group, **layout, **{**opts, "backend": "triton"})
                (out_t * weight.to(out_t.dtype)).sum().backward()
                _close(out_t.detach(), ref.detach(), what + " triton loss")
                _close(local_t.grad, full.grad[..., start:end], what + " triton grad")
            if i == 2:  # the module form
                module = SparseKLLoss(process_group=group, **layout, **{k: v for k, v in opts.items() if k != "labels"})
                _close(module(logits[..., start:end], ids, lp, labels=opts["labels"]), ref.detach(), what + " module")
            if i in FUSED:
                _check_fused(i, case, logits, ids, lp, labels, group, start, end, layout, what)

    # a NaN or +inf logit on one rank's slice makes that row's loss NaN on every rank, for every tail; others finite
    logits, ids, lp, _ = _inputs(4 * world, 0, torch.float32, k=2)
    local = logits[..., rank * 4 : (rank + 1) * 4].clone()
    if rank == world - 1:
        local[0, 3, 1] = float("nan")
        local[0, 6, 2] = float("inf")
    for tail in ("bucket", "renormalize", "restrict"):
        for name in ["torch", "triton"] if TRITON else ["torch"]:
            x = local.clone().requires_grad_(True)
            out = sparse_kl_loss(x, ids, lp, process_group=group, tail=tail, reduction="none", backend=name)
            out.sum().backward()
            bad = torch.zeros(out.shape, dtype=torch.bool)
            bad[0, 3] = bad[0, 6] = True
            assert bool(out[bad].isnan().all()) and bool(out[~bad].isfinite().all()), (tail, name, out)
            assert bool(x.grad[~bad].isfinite().all()), (tail, name)

    # the fused module form
    module = FusedLinearSparseKLLoss(process_group=group, backend="torch")
    hidden = torch.randn(1, logits.shape[1], 3, generator=torch.Generator().manual_seed(5))
    full_w = torch.randn(4 * world, 3, generator=torch.Generator().manual_seed(6))
    expected = fused_linear_sparse_kl_loss(hidden, full_w, ids, lp, backend="torch")
    _close(module(hidden, full_w[rank * 4 : (rank + 1) * 4], ids, lp), expected, "fused module")

    # refused configurations, with messages that say what is supported
    if TRITON:
        with pytest.raises(ValueError, match="float64"):
            sparse_kl_loss(local.double(), ids, lp, process_group=group, backend="triton")
        with pytest.raises(ValueError, match="float64"):
            fused_linear_sparse_kl_loss(hidden.double(), full_w[:4].double(), ids, lp, process_group=group,
                                        backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="vocab_size"):
        sparse_kl_loss(local, ids, lp, process_group=group, vocab_size=4 * world + 1)
    bad = ids.clone()
    bad[0, 0] = 4 * world
    with pytest.raises(ValueError, match="outside"):
        sparse_kl_loss(local, bad, lp, process_group=group)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_sparse_kl_loss(hidden, full_w[:4], bad, lp, process_group=group)


def _worker(rank, world, init_file, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:

        def bounds(vocab):  # uneven, rank-ordered cuts inside (0, vocab)
            step = vocab // world
            return [r * step + (r % 2) * 3 - 1 for r in range(1, world)]

        _run_cases(rank, world, bounds)
        ok, msg = True, ""
    except BaseException:  # report every rank's failure, not only the first
        ok, msg = False, traceback.format_exc()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
        f.write("ok" if ok else msg)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_unsharded(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        reports = [open(os.path.join(tmp, f"rank{r}.txt")).read() for r in range(world)]
    failures = [r for r in reports if r != "ok"]
    assert not failures, "\n".join(failures)


def test_vocab_start_needs_process_group():
    x = torch.randn(2, 5)
    ids = torch.tensor([[0, 1], [2, -1]])
    lp = torch.full((2, 2), -1.0)
    with pytest.raises(ValueError, match="process_group"):
        sparse_kl_loss(x, ids, lp, vocab_start=0, vocab_size=5)
    with pytest.raises(ValueError, match="process_group"):
        fused_linear_sparse_kl_loss(x, torch.randn(5, 5), ids, lp, vocab_size=5)
    with pytest.raises(ValueError, match="process_group"):
        SparseKLLoss(vocab_start=0, vocab_size=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vocab_parallel_on_cuda():
    """One rank on the GPU (NCCL): both backends, compiled Triton included, equal the unsharded loss and gradient."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        try:
            for i, (kind, tail, dtype, t, alpha, reduction, t2) in enumerate(CASES):
                dtype = torch.float32 if dtype == torch.float64 else dtype
                logits, ids, lp, labels = (x.cuda() for x in _inputs(50_257, 100 + i, dtype, n=67, k=33))
                opts = dict(kind=kind, tail=tail, temperature=t, alpha=alpha, reduction=reduction, scale_by_t2=t2,
                            labels=labels if alpha < 1 else None)  # fmt: skip
                full = logits.clone().requires_grad_(True)
                ref = sparse_kl_loss(full, ids, lp, backend="torch", **opts)
                ref.sum().backward()
                for name in ("torch", "triton"):
                    x = logits.clone().requires_grad_(True)
                    out = sparse_kl_loss(x, ids, lp, process_group=dist.group.WORLD, backend=name, **opts)
                    out.sum().backward()
                    _close(out.detach(), ref.detach(), f"case {i} {name} loss")
                    _close(x.grad, full.grad, f"case {i} {name} grad")
                if i in FUSED:  # the fused form on the GPU: Triton against the torch backend, both vocab-parallel
                    layout = dict(vocab_start=0, vocab_size=logits.shape[-1])
                    _check_fused(i, (kind, tail, dtype, t, alpha, reduction, t2), logits, ids, lp, labels,
                                 dist.group.WORLD, 0, logits.shape[-1], layout, f"cuda case {i}")
        finally:
            dist.destroy_process_group()
