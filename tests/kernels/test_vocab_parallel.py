"""Vocab-parallel sparse_kl_loss (process_group=...) on 2 and 4 gloo ranks on the CPU against the unsharded loss.

Each spawned rank builds the same inputs from a seed, computes the unsharded loss and gradient on the full logits,
and the sharded loss on its column slice; the loss and its gradient slice (so the concatenated gradient) must agree
within 1e-5 relative, with exactly two all-reduces per call. One spawn per world size runs every case.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from softcache.kernels import sparse_kl_loss

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
]


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
    if dtype == torch.float64:  # in float32 this row's gradient is ill-conditioned (p_tail / q_tail): both paths
        # differ from the float64 reference by ~5e-4 there, the sharded one by less
        logits[8, ids[8]] += 25.0  # the student's tail 1 - Q ~ 1e-9: summed over the shards, not 1 - sum_S q
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[5] = -100
    labels[7] = ids[7, 0]  # the label is a target id
    return logits.to(dtype).reshape(1, n, vocab), ids.reshape(1, n, k), lp.reshape(1, n, k), labels.reshape(1, n)


def _close(actual, expected, what):
    tol = 1e-5
    scale = float(expected.abs().max().clamp_min(1e-12))
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol * scale, msg=what)


def _run_cases(rank, world, bounds):
    group = dist.group.WORLD
    calls = []
    real_all_reduce = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(kwargs.get("op", dist.ReduceOp.SUM))
        return real_all_reduce(*args, **kwargs)

    for even in (True, False):
        vocab = 4 * 11 * world // 2 + (0 if even else 3)  # not a power of two
        if even:
            start, end = rank * vocab // world, (rank + 1) * vocab // world
        else:
            cuts = [0, *bounds(vocab), vocab]
            start, end = cuts[rank], cuts[rank + 1]
        for i, (kind, tail, dtype, t, alpha, reduction, t2) in enumerate(CASES):
            logits, ids, lp, labels = _inputs(vocab, 100 + i, dtype)
            opts = dict(kind=kind, tail=tail, temperature=t, alpha=alpha, reduction=reduction, scale_by_t2=t2,
                        labels=labels if alpha < 1 else None, backend="torch")  # fmt: skip
            full = logits.clone().requires_grad_(True)
            ref = sparse_kl_loss(full, ids, lp, **opts)
            weight = torch.rand(ref.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) + 0.5
            (ref * weight.to(ref.dtype)).sum().backward()
            local = logits[..., start:end].clone().requires_grad_(True)
            layout = {} if even else dict(vocab_start=start, vocab_size=vocab)
            dist.all_reduce = counting
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
            assert float(full.grad[..., start:end].abs().max()) > 0, what
            if i == 1:  # inplace_grad: the gradient is written over the (non-leaf) local logits
                leaf = logits[..., start:end].clone().requires_grad_(True)
                out2 = sparse_kl_loss(leaf * 1.0, ids, lp, process_group=group, inplace_grad=True, **layout, **opts)
                (out2 * weight.to(out2.dtype)).sum().backward()
                _close(out2.detach(), ref.detach(), what + " inplace loss")
                _close(leaf.grad, full.grad[..., start:end], what + " inplace grad")

    # refused configurations, with messages that say what is supported
    logits, ids, lp, _ = _inputs(4 * world, 0, torch.float32, k=2)
    local = logits[..., rank * 4 : (rank + 1) * 4]
    with pytest.raises(NotImplementedError, match="GPU session"):
        sparse_kl_loss(local, ids, lp, process_group=group, backend="triton")
    with pytest.raises(NotImplementedError, match="renormalize"):
        sparse_kl_loss(local, ids, lp, process_group=group, tail="restrict")
    with pytest.raises(NotImplementedError, match="tail='restrict'"):
        sparse_kl_loss(local, ids, lp, process_group=group, kind="tvd", tail="restrict")
    with pytest.raises(ValueError, match="vocab_size"):
        sparse_kl_loss(local, ids, lp, process_group=group, vocab_size=4 * world + 1)
    bad = ids.clone()
    bad[0, 0] = 4 * world
    with pytest.raises(ValueError, match="outside"):
        sparse_kl_loss(local, bad, lp, process_group=group)


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
    with pytest.raises(ValueError, match="process_group"):
        sparse_kl_loss(x, ids, torch.full((2, 2), -1.0), vocab_start=0, vocab_size=5)
