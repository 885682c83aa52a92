"""The bucket tail where the top-k holds all but ~1e-7 of the mass, for teacher and student alike.

There 1 - Q computed from the gathered student probabilities keeps none of its bits in fp32 (1 - 1e-7 is one
ulp from 1), so the tail bin's gradient came out wrong by O(1). The kernels sum the tail during the dense pass
instead (and the teacher's 1 - P in float64): the loss and the gradient match the float64 reference, also on the
tail columns alone, whose gradient (1 - p_tail / q_tail) q_j the tail bin alone decides.
"""

import math

import pytest
import torch
from softcache.kernels import fused_linear_sparse_kl_loss, sparse_kl_loss

TAILS = (1e-7, 3e-7, 3e-8, 2e-7, 1e-7, 5e-7)  # student tail of row r; the teacher's is that of row r + 1


def _with_tail(x, inside, tail):
    """x shifted outside ``inside`` so that softmax(x) puts ``tail`` of its mass there."""
    x = x.clone()
    x[~inside] += torch.logsumexp(x[inside], 0) - torch.logsumexp(x[~inside], 0) + math.log(tail / (1 - tail))
    return x


def make_pair(n=6, vocab=1031, k=13, *, noise=0.5, seed=0):
    """fp32 student logits and teacher top-k targets over one support per row, each side with its tail in TAILS."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, vocab, dtype=torch.float64)
    ids = torch.zeros(n, k, dtype=torch.long)
    lps = torch.zeros(n, k, dtype=torch.float64)
    for r in range(n):
        idx = torch.randperm(vocab, generator=g)[:k]
        inside = torch.zeros(vocab, dtype=torch.bool)
        inside[idx] = True
        base = torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5
        student = base + noise * torch.randn(vocab, generator=g, dtype=torch.float64)
        z[r] = _with_tail(student, inside, TAILS[r % 6]) + 3.0
        ids[r] = idx
        lps[r] = torch.log_softmax(_with_tail(base, inside, TAILS[(r + 1) % 6]), 0)[idx]
    return z.float(), ids, lps.float()


def _tail_columns(ids, vocab):
    return ~torch.zeros(ids.shape[0], vocab, dtype=torch.bool).scatter_(1, ids.cpu(), True)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_exact_tail(backend, kind, temperature, reference, assert_matches):
    device, name = backend
    logits, ids, lps = make_pair()
    if temperature != 1.0:  # keep the tails at the loss temperature: the student's logits are given at T = 1
        logits = logits * temperature
    x = logits.to(device).requires_grad_(True)
    loss = sparse_kl_loss(x, ids.to(device), lps.to(device), kind=kind, temperature=temperature,
                          reduction="none", backend=name)  # fmt: skip
    (loss * 2.0).sum().backward()
    ref_loss, ref_grad = reference(logits, ids, lps, kind=kind, temperature=temperature, reduction="none")
    grad = x.grad.cpu().double()
    assert_matches(loss.detach().cpu().double(), ref_loss, torch.float32)
    assert_matches(grad, ref_grad, torch.float32)
    tail = _tail_columns(ids, logits.shape[1])
    assert_matches(grad[tail], ref_grad[tail], torch.float32)


def make_confident_student(n=6, vocab=1031, k=13, *, seed=3):
    """fp32 student logits whose tail outside the support is 1e-4 .. 1e-8, against a teacher whose top-k holds only
    0.9 (p_tail = 0.1): the tail bin's g_t ~ p_tail / q_tail is up to 1e7, which the support's gradient must not see."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, vocab, dtype=torch.float64)
    ids = torch.zeros(n, k, dtype=torch.long)
    lps = torch.zeros(n, k, dtype=torch.float64)
    tails = (1e-4, 1e-6, 1e-8, 3e-5, 3e-7, 3e-9)
    for r in range(n):
        idx = torch.randperm(vocab, generator=g)[:k]
        inside = torch.zeros(vocab, dtype=torch.bool)
        inside[idx] = True
        z[r] = _with_tail(torch.randn(vocab, generator=g, dtype=torch.float64) * 1.5, inside, tails[r])
        ids[r] = idx
        lps[r] = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0) + math.log(0.9)
    ids[4, 5] = ids[4, 2]  # a duplicate id: its separate bins count it twice in Q
    return z.float(), ids, lps.float()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.7)])
def test_support_gradient_under_a_large_tail_ratio(backend, kind, temperature, alpha, reference, assert_matches,
                                                   make_labels):  # fmt: skip
    """Before the fix the support's gradient lost g_t times fp32 rounding: 17 % (torch) to 140 % (Triton) off at
    q_tail = 1e-6, and 230x at 1e-8."""
    device, name = backend
    logits, ids, lps = make_confident_student()
    logits = logits * temperature  # the tails hold at the loss temperature
    labels = make_labels(logits.shape[0], logits.shape[1], ignore=()) if alpha < 1 else None
    x = logits.to(device).requires_grad_(True)
    opts = dict(kind=kind, temperature=temperature, alpha=alpha, reduction="none")
    loss = sparse_kl_loss(x, ids.to(device), lps.to(device), labels=None if labels is None else labels.to(device),
                          backend=name, **opts)  # fmt: skip
    (loss * 2.0).sum().backward()
    ref_loss, ref_grad = reference(logits, ids, lps, labels=labels, **opts)
    assert_matches(loss.detach().cpu().double(), ref_loss, torch.float32)
    grad = x.grad.cpu().double()
    for r in range(logits.shape[0]):  # row by row: each row's gradient has its own scale
        assert_matches(grad[r], ref_grad[r], torch.float32)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("make", [make_pair, make_confident_student], ids=["tiny-tails", "large-tail-ratio"])
def test_exact_tail_fused(backend, kind, make, reference, assert_matches):
    """The fused output layer: logits = h W^T with the same tails (W = I, h = the logits)."""
    device, name = backend
    logits, ids, lps = make(vocab=67, k=7)
    h = logits.to(device).requires_grad_(True)
    weight = torch.eye(logits.shape[1], device=device)
    loss = fused_linear_sparse_kl_loss(h, weight, ids.to(device), lps.to(device), kind=kind, reduction="none",
                                       backend=name)  # fmt: skip
    (loss * 2.0).sum().backward()
    ref_loss, ref_grad = reference(logits, ids, lps, kind=kind, reduction="none")
    assert_matches(loss.detach().cpu().double(), ref_loss, torch.float32)
    grad = h.grad.cpu().double()
    for r in range(logits.shape[0]):
        assert_matches(grad[r], ref_grad[r], torch.float32)
    tail = _tail_columns(ids, logits.shape[1])
    assert_matches(grad[tail], ref_grad[tail], torch.float32)
