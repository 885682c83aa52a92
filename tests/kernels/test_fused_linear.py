"""fused_linear_sparse_kl_loss against a float64 reference on hidden @ weight.T + bias: value and gradients for
hidden, weight and bias.

The reference is conftest's ``reference`` (row by row, from DESIGN.md) applied to the float64 logits; its gradient
with respect to the logits, G, is carried to the inputs by the chain rule in float64: dH = G W, dW = G^T H,
db = sum_rows G. Backends: torch on the CPU, Triton under TRITON_INTERPRET=1 (tiny tiles, so a few rows already
cover several row blocks, vocabulary tiles, splits, H steps and weight-gradient slices), and both on CUDA.
"""

import math

import pytest
import torch
from softcache.kernels import FusedLinearSparseKLLoss, fused_linear_sparse_kl_loss

try:
    from softcache.kernels import fused_linear_triton
except ImportError:  # no triton: the torch backend alone is tested
    fused_linear_triton = None


def make_fused_inputs(n=9, hidden=37, vocab=203, k=7, *, seed=0, dtype=torch.float32, device="cpu", bias=True,
                      pad=True, dup=True, extreme=False, lead=None):  # fmt: skip
    """Student hidden states and output layer, and teacher top-k targets correlated with the student's logits."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * (2.0 / math.sqrt(hidden))  # logits of std ~2
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    if extreme and n > 4:
        # Logits of std ~16: a nearly one-hot student row. (Larger scales make the fp32 rounding of that row's
        # logits gradient, multiplied by its large hidden state in dW = G^T H, exceed 1e-4 of max|dW| on any
        # fp32 implementation: a property of the chain rule, not of the kernels.)
        h[4] *= 8.0
    z = h @ w.T + (b if bias else 0.0)
    teacher = torch.log_softmax(z + torch.randn(n, vocab, generator=g) * 1.5, -1)
    ids = teacher.topk(k, -1).indices[:, torch.randperm(k, generator=g)]
    lps = teacher.gather(1, ids)
    if pad and n > 2 and k > 2:
        ids[1, -2:] = -1
        lps[1, -2:] = 0.0
        ids[2, :] = -1  # no targets: the row does not count
    if dup and n > 3 and k > 2:
        ids[3, 1] = ids[3, 0]
    h, w = h.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if lead is not None:
        h, ids, lps = h.reshape(*lead, hidden), ids.reshape(*lead, k), lps.reshape(*lead, k)
    to = lambda t: t.to(device) if t is not None else None  # noqa: E731
    return to(h), to(w), to(b), to(ids), to(lps.float())


@pytest.fixture(scope="session")
def fused_reference(reference):
    """(loss, dH, dW[, db]) in float64 from the reference on the logits of the (already rounded) inputs."""

    def fused_reference(hidden, weight, bias, ids, lps, *, grad_weight=None, **kw):
        h = hidden.detach().cpu().double()
        w = weight.detach().cpu().double()
        z = h @ w.T
        if bias is not None:
            z = z + bias.detach().cpu().double()
        loss, gz = reference(z, ids, lps, grad_weight=grad_weight, **kw)
        gz = gz.reshape(-1, w.shape[0])
        dh = (gz @ w).reshape(h.shape)
        dw = gz.T @ h.reshape(-1, w.shape[1])
        return (loss, dh, dw, gz.sum(0)) if bias is not None else (loss, dh, dw)

    return fused_reference


def run_fused(backend, hidden, weight, bias, ids, lps, *, grad_weight=None, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    loss = fused_linear_sparse_kl_loss(h, w, ids, lps, b, backend=backend[1], **kw)
    weight_out = torch.full_like(loss, 2.0) if grad_weight is None else grad_weight.to(loss.device)
    (loss * weight_out).sum().backward()
    assert h.grad.dtype == hidden.dtype and w.grad.dtype == weight.dtype
    grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    return loss.detach().cpu().double(), [g.cpu().double() for g in grads]


@pytest.fixture(scope="session")
def check_fused(fused_reference, assert_matches):
    """``run_fused`` against ``fused_reference``, within the DESIGN tolerances → (loss, grads)."""

    def check_fused(backend, hidden, weight, bias, ids, lps, *, grad_weight=None, **kw):
        loss, grads = run_fused(backend, hidden, weight, bias, ids, lps, grad_weight=grad_weight, **kw)
        ref_loss, *ref_grads = fused_reference(hidden, weight, bias, ids, lps, grad_weight=grad_weight, **kw)
        assert_matches(loss, ref_loss, hidden.dtype)
        for got, want in zip(grads, ref_grads, strict=True):
            assert_matches(got, want, hidden.dtype)
        return loss, grads

    return check_fused


# ----------------------------------------------------------------------------------------------------------
# semantics


def test_kinds_tails(backend, pair, check_fused):
    kind, tail, seed = pair
    inputs = make_fused_inputs(seed=seed, device=backend[0], extreme=True)
    check_fused(backend, *inputs, kind=kind, tail=tail, temperature=2.5, beta=0.3)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind,tail", [("forward_kl", "bucket"), ("tvd", "restrict"), ("forward_kl", "renormalize")])
def test_with_labels(backend, kind, tail, temperature, make_labels, check_fused):
    """The cross-entropy's log-normaliser is shared with the soft term at T = 1 and separate otherwise (and always
    separate for tail='restrict', which needs no full-vocabulary normaliser of its own)."""
    inputs = make_fused_inputs(n=11, seed=7, device=backend[0])
    labels = make_labels(11, 203, device=backend[0])
    check_fused(backend, *inputs, kind=kind, tail=tail, temperature=temperature, labels=labels, alpha=0.6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hidden_3d_and_reductions(backend, reduction, make_labels, check_fused):
    """hidden (B, T, H); ignored labels and a row without targets; per-row grad_output for reduction='none'."""
    hidden, weight, bias, ids, lps = make_fused_inputs(n=10, seed=13, device=backend[0], lead=(2, 5))
    labels = make_labels(10, 203, device=backend[0], ignore=(0, 6)).reshape(2, 5)
    weight_out = torch.linspace(-1.0, 3.0, 10).reshape(2, 5) if reduction == "none" else None
    loss, _ = check_fused(backend, hidden, weight, bias, ids, lps, labels=labels, alpha=0.7, temperature=2.5,
                          reduction=reduction, grad_weight=weight_out)  # fmt: skip
    assert loss.shape == ((2, 5) if reduction == "none" else ())


def test_num_items_in_batch(backend, make_labels, check_fused):
    inputs = make_fused_inputs(seed=17, device=backend[0], bias=False)
    labels = make_labels(9, 203, device=backend[0])
    check_fused(backend, *inputs, labels=labels, alpha=0.5, num_items_in_batch=23)


def test_odd_sizes(backend, make_labels, check_fused):
    """H, V and K odd and not multiples of the tiles; several row blocks; no bias."""
    inputs = make_fused_inputs(n=19, hidden=45, vocab=301, k=17, seed=19, device=backend[0], bias=False)
    labels = make_labels(19, 301, device=backend[0], ignore=(0, 7))
    check_fused(backend, *inputs, kind="jsd", temperature=2.5, labels=labels, alpha=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype, monkeypatch, make_labels, check_fused):
    """bf16/fp16 inputs within 1e-2 of the float64 reference on the same rounded inputs; the Triton weight gradient
    accumulates through fp32 slices of the vocabulary (made small here so that there are several)."""
    if fused_linear_triton is not None:
        monkeypatch.setattr(fused_linear_triton, "SLICE_ELEMENTS", 64 * 37)
    inputs = make_fused_inputs(seed=23, dtype=dtype, device=backend[0])
    labels = make_labels(9, 203, device=backend[0])
    check_fused(backend, *inputs, temperature=2.5, labels=labels, alpha=0.8)


def test_tied_embeddings(backend, reference, assert_matches):
    """One weight as input embedding and output layer: its gradient sums both uses, as with materialised logits."""
    device = backend[0]
    hidden, weight, _, ids, lps = make_fused_inputs(seed=29, device=device, bias=False)
    input_ids = torch.randint(0, 203, (9,), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(temperature=2.5, kind="reverse_kl")
    w = weight.clone().requires_grad_(True)
    h = torch.tanh(hidden + w[input_ids])  # a stand-in for the transformer body
    (2 * fused_linear_sparse_kl_loss(h, w, ids, lps, backend=backend[1], **kw)).backward()
    w64 = weight.cpu().double().requires_grad_(True)
    h64 = torch.tanh(hidden.cpu().double() + w64[input_ids.cpu()])
    z = h64 @ w64.T
    _, gz = reference(z, ids, lps, **kw)  # d(2 * loss)/dz in float64
    (z * gz).sum().backward()  # carried through both uses of the weight
    assert_matches(w.grad.cpu().double(), w64.grad.cpu(), torch.float32)


def test_partial_requires_grad(backend, assert_matches, fused_reference):
    """A frozen output layer (or frozen hidden states) gets no gradient, the others still match."""
    hidden, weight, bias, ids, lps = make_fused_inputs(seed=31, device=backend[0])
    _, ref_dh, ref_dw, ref_db = fused_reference(hidden, weight, bias, ids, lps, temperature=2.5)
    h = hidden.clone().requires_grad_(True)
    (2 * fused_linear_sparse_kl_loss(h, weight, ids, lps, bias, temperature=2.5, backend=backend[1])).backward()
    assert_matches(h.grad.cpu().double(), ref_dh, torch.float32)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    (2 * fused_linear_sparse_kl_loss(hidden, w, ids, lps, b, temperature=2.5, backend=backend[1])).backward()
    assert_matches(w.grad.cpu().double(), ref_dw, torch.float32)
    assert_matches(b.grad.cpu().double(), ref_db, torch.float32)


def test_nothing_counts(backend):
    hidden, weight, bias, ids, lps = make_fused_inputs(seed=37, device=backend[0], extreme=True)
    labels = torch.full((9,), -100, device=backend[0])
    loss, grads = run_fused(backend, hidden, weight, bias, ids, lps, labels=labels, alpha=0.5, temperature=2.5)
    assert float(loss) == 0.0 and all(torch.all(g == 0) for g in grads)


def test_forward_only_and_module(backend, make_labels, assert_matches, fused_reference):
    hidden, weight, bias, ids, lps = make_fused_inputs(seed=41, device=backend[0])
    labels = make_labels(9, 203, device=backend[0])
    module = FusedLinearSparseKLLoss(kind="jsd", temperature=2.5, alpha=0.5, backend=backend[1])
    assert "jsd" in repr(module)
    with torch.no_grad():
        loss = module(hidden, weight, ids, lps, bias, labels=labels)
    ref, *_ = fused_reference(hidden, weight, bias, ids, lps, labels=labels, kind="jsd", temperature=2.5, alpha=0.5)
    assert_matches(loss.cpu().double(), ref, torch.float32)


def test_grad_skip_eps(triton_backend, assert_matches, fused_reference):
    """Skipping tiles whose probabilities are all below eps and that hold no target: exact at 0, a small error when
    on. Tiny shapes need a coarse eps to skip anything (CCE's 2**-12 skips nothing at V = 203 with 32-wide tiles);
    benchmarks/fused_linear.py measures the error at real sizes."""
    backend = triton_backend
    hidden, weight, bias, ids, lps = make_fused_inputs(n=4, k=3, seed=43, device=backend[0], pad=False, dup=False)
    hidden = hidden * 3.0  # a peaked student: most tiles hold little probability
    kw = dict(tail="renormalize")
    _, ref_dh, ref_dw, ref_db = fused_reference(hidden, weight, bias, ids, lps, **kw)
    _, exact = run_fused(backend, hidden, weight, bias, ids, lps, **kw)
    _, skipped = run_fused(backend, hidden, weight, bias, ids, lps, grad_skip_eps=2.0**-8, **kw)
    assert int((skipped[1] == 0).all(1).sum()) > 0, "no tile was skipped"
    for got, skip, want in zip(exact, skipped, (ref_dh, ref_dw, ref_db), strict=True):
        assert_matches(got, want, torch.float32)
        err = float((skip - want).norm() / want.norm())
        assert 0 < err < 1e-2, err  # measured 2.5e-3 here


def test_torch_backend_chunks(monkeypatch, make_labels, check_fused):
    """Several row chunks give the same result as one, whether gradients are made in forward or recomputed."""
    from softcache.kernels import sparse_kl_torch

    monkeypatch.setattr(sparse_kl_torch, "CHUNK_ELEMENTS", 203 * 2)
    inputs = make_fused_inputs(seed=47)
    labels = make_labels(9, 203)
    check_fused(("cpu", "torch"), *inputs, labels=labels, alpha=0.5, temperature=2.5)
    check_fused(("cpu", "torch"), *inputs, labels=labels, alpha=0.5, temperature=2.5, reduction="none",
                grad_weight=torch.linspace(-2.0, 1.0, 9))  # fmt: skip


def test_float64_torch_backend(fused_reference):
    inputs = make_fused_inputs(seed=53, dtype=torch.float64)
    loss, grads = run_fused(("cpu", "torch"), *inputs, kind="reverse_kl", temperature=2.5)
    ref_loss, *ref_grads = fused_reference(*inputs, kind="reverse_kl", temperature=2.5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0.0)  # the loss is returned in float32
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_autocast_casts_inputs(assert_matches, fused_reference):
    """fp32 master weights with bf16 autocast (HF Trainer bf16=True): computed in bf16, gradients in fp32."""
    hidden, weight, bias, ids, lps = make_fused_inputs(seed=59)
    w = weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_sparse_kl_loss(hidden, w, ids, lps, bias, temperature=2.5, backend="torch")
    loss.backward()
    assert w.grad.dtype == torch.float32
    rounded = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    ref_loss, _, ref_dw, _ = fused_reference(*rounded, ids, lps, temperature=2.5)
    assert_matches(loss.detach().double(), ref_loss, torch.bfloat16)
    assert_matches(2 * w.grad.double(), ref_dw, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h, w, b: (h, w[:, :-1], b), r"weight must have shape \(V, H=37\)"),
        (lambda h, w, b: (h, w, b[:-1]), r"bias must have shape \(V=203,\)"),
        (lambda h, w, b: (h, w.double(), b), "weight is torch.float64 but hidden is torch.float32"),
        (lambda h, w, b: (h[:, :0], w[:, :0], b), "need H >= 1"),
    ],
)
def test_head_errors(change, match):
    hidden, weight, bias, ids, lps = make_fused_inputs(seed=61)
    hidden, weight, bias = change(hidden, weight, bias)
    with pytest.raises(ValueError, match=match):
        fused_linear_sparse_kl_loss(hidden, weight, ids, lps, bias)


def test_argument_errors(triton_runs):
    hidden, weight, bias, ids, lps = make_fused_inputs(seed=67)
    with pytest.raises(ValueError, match="grad_skip_eps"):
        fused_linear_sparse_kl_loss(hidden, weight, ids, lps, grad_skip_eps=-1.0)
    with pytest.raises(ValueError, match="leading dims of hidden"):
        fused_linear_sparse_kl_loss(hidden, weight, ids[:3], lps[:3])
    bad = ids.clone()
    bad[4, 2] = 203
    with pytest.raises(ValueError, match=r"target_ids\[4, 2\]"):
        fused_linear_sparse_kl_loss(hidden, weight, bad, lps)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_sparse_kl_loss(hidden, weight, ids, lps, alpha=0.5)
    if triton_runs:
        with pytest.raises(ValueError, match="float64"):
            fused_linear_sparse_kl_loss(hidden.double(), weight.double(), ids, lps, backend="triton")
