"""Shared by the kernel tests: the backends this machine runs, every kind x tail that DESIGN.md defines, and the
float64 reference for the sparse distillation loss written from DESIGN.md "Loss semantics", handed out as fixtures
(``reference``, ``make_labels``, ``assert_matches``).

Backends: the chunked PyTorch path on the CPU, Triton under TRITON_INTERPRET=1 on the CPU (tests/conftest.py sets it),
and both on CUDA when a GPU is present (run with TRITON_INTERPRET=0, see benchmarks/gpu_check.sh).
"""

import math
import os

import pytest
import torch
from softcache.kernels import triton_available

EPS = 1e-12
LOG_EPS = math.log(EPS)
PAIRS = [  # every kind x tail that DESIGN.md defines
    ("forward_kl", "bucket"), ("reverse_kl", "bucket"), ("jsd", "bucket"), ("tvd", "bucket"),
    ("forward_kl", "renormalize"),
    ("forward_kl", "restrict"), ("reverse_kl", "restrict"), ("jsd", "restrict"), ("tvd", "restrict"),
]  # fmt: skip


def _backends():
    out = [pytest.param(("cpu", "torch"), id="torch-cpu")]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret and triton_available():
        out.append(pytest.param(("cpu", "triton"), id="triton-interp"))
    if torch.cuda.is_available():
        out.append(pytest.param(("cuda", "torch"), id="torch-cuda"))
        if not interpret and triton_available():
            out.append(pytest.param(("cuda", "triton"), id="triton-cuda"))
    return out


BACKENDS = _backends()


# ----------------------------------------------------------------------------------------------------------
# float64 reference, row by row, straight from the formulas


def _clog(x):
    return x.clamp_min(EPS).log()


def _divergence(kind, p, lp, q, lq, beta):
    if kind == "forward_kl":
        return (p * (lp - lq)).sum()
    if kind == "reverse_kl":
        return (q * (lq - lp)).sum()
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        lm = _clog(m)
        return beta * (p * (lp - lm)).sum() + (1 - beta) * (q * (lq - lm)).sum()
    return 0.5 * (p - q).abs().sum()


def reference(logits, target_ids, target_logprobs, *, temperature=1.0, kind="forward_kl", tail="bucket", beta=0.5,
              labels=None, alpha=1.0, ignore_index=-100, reduction="mean", num_items_in_batch=None,
              scale_by_t2=True, grad_weight=None):  # fmt: skip
    """Returns (loss, d(loss * grad_weight)/d logits) in float64 on the CPU."""
    vocab, k = logits.shape[-1], target_ids.shape[-1]
    lead = logits.shape[:-1]
    z = logits.detach().cpu().double().reshape(-1, vocab).requires_grad_(True)
    ids = target_ids.cpu().reshape(-1, k)
    lps = target_logprobs.detach().cpu().double().reshape(-1, k)
    labs = labels.cpu().reshape(-1) if labels is not None else None
    t = temperature
    rows, n_counted = [], 0
    for n in range(z.shape[0]):
        sel = ids[n] >= 0
        if not bool(sel.any()) or (labs is not None and int(labs[n]) == ignore_index):
            rows.append(z.new_zeros(()))
            continue
        n_counted += 1
        idx, lp = ids[n][sel], lps[n][sel]
        p = lp.exp()
        big_p = p.sum()
        logq = torch.log_softmax(z[n] / t, -1)[idx]
        if tail == "bucket":
            p_t = (1 - big_p).clamp_min(0)
            q_t = (-torch.expm1(torch.logsumexp(logq, 0))).clamp_min(0)
            pb, qb = torch.cat([p, p_t[None]]), torch.cat([logq.exp(), q_t[None]])
            lpb = torch.cat([lp.clamp_min(LOG_EPS), _clog(p_t)[None]])
            lqb = torch.cat([logq.clamp_min(LOG_EPS), _clog(q_t)[None]])
        else:
            pb, lpb = p / big_p, (lp - big_p.log()).clamp_min(LOG_EPS)
            if tail == "restrict":
                logq = torch.log_softmax(z[n][idx] / t, -1)
            qb, lqb = logq.exp(), logq.clamp_min(LOG_EPS)
        row = alpha * (t * t if scale_by_t2 else 1.0) * _divergence(kind, pb, lpb, qb, lqb, beta)
        if labs is not None and alpha < 1:
            row = row - (1 - alpha) * torch.log_softmax(z[n], -1)[int(labs[n])]
        rows.append(row)
    rows = torch.stack(rows)
    if reduction == "none":
        loss = rows.reshape(lead)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        denom = float(num_items_in_batch) if num_items_in_batch is not None else n_counted
        loss = rows.sum() / denom if denom > 0 else rows.sum() * 0
    weight = torch.ones_like(loss) * 2.0 if grad_weight is None else grad_weight.double().cpu()
    (loss * weight).sum().backward()
    return loss.detach(), z.grad.reshape(logits.shape)


def make_labels(n, vocab, *, seed=1, ignore=(0, 5), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    for i in ignore:
        if i < n:
            labels[i] = -100
    return labels.to(device)


def assert_matches(actual, expected, dtype):
    """DESIGN tolerances: 1e-4 relative for float32 inputs, 1e-2 for half precision (normwise for gradients)."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    assert torch.isfinite(actual).all()
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * float(scale))


@pytest.fixture(params=BACKENDS)
def backend(request) -> tuple[str, str]:
    """(device, backend name): each backend this machine runs."""
    return request.param


@pytest.fixture(params=[b for b in BACKENDS if b.values[0][1] == "triton"])
def triton_backend(request) -> tuple[str, str]:
    """(device, "triton") where Triton runs here (on the CPU through the interpreter, or on CUDA)."""
    return request.param


@pytest.fixture(scope="session")
def triton_runs() -> bool:
    """Whether a Triton backend runs on this machine."""
    return any(b.values[0][1] == "triton" for b in BACKENDS)


@pytest.fixture(params=PAIRS, ids=[f"{kind}-{tail}" for kind, tail in PAIRS])
def pair(request) -> tuple[str, str, int]:
    """(kind, tail, seed): each kind x tail that DESIGN.md defines, with a seed of its own (its index)."""
    return (*request.param, PAIRS.index(request.param))


@pytest.fixture(name="reference", scope="session")
def fixture_reference():
    return reference


@pytest.fixture(name="make_labels", scope="session")
def fixture_make_labels():
    return make_labels


@pytest.fixture(name="assert_matches", scope="session")
def fixture_assert_matches():
    return assert_matches
