"""Non-finite inputs on both backends: NaN/+inf student logits poison their row's loss (never a finite number),
-inf logits are probability 0, rows that do not count stay inert, and bad teacher log-probs are refused.

Self-contained: a small float64 reference of forward_kl (bucket and restrict, with the optional cross-entropy)
written from DESIGN.md "Loss semantics". Odd sizes; Triton runs under TRITON_INTERPRET=1 (tests/conftest.py).
"""

import math
import os

import pytest
import torch
from softcache.kernels import (
    FusedLinearSparseKLLoss,
    SparseKLLoss,
    fused_linear_sparse_kl_loss,
    sparse_kl_loss,
    triton_available,
)

LOG_EPS = math.log(1e-12)
N, V, K, H = 7, 53, 5, 11
BAD_AT_TARGET, BAD_ELSEWHERE, IGNORED, NO_TARGETS = 1, 2, 4, 5  # row roles in the inputs below
BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" and triton_available() else [])
OPTIONS = {  # tail x hard term: restrict without CE is the one mode that never reads a whole row
    "bucket": dict(tail="bucket"),
    "bucket-ce": dict(tail="bucket", alpha=0.6),
    "restrict": dict(tail="restrict"),
    "restrict-ce": dict(tail="restrict", alpha=0.6, temperature=2.0),
}


def inputs(seed=0):
    """(logits (N, V), target_ids, target_logprobs, labels): IGNORED has label -100, NO_TARGETS only padding."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 2.0
    teacher = torch.log_softmax(z + torch.randn(N, V, generator=g), -1)
    lps, ids = teacher.topk(K, -1)
    ids[0, -2:], lps[0, -2:] = -1, 0.0
    ids[NO_TARGETS], lps[NO_TARGETS] = -1, 0.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[IGNORED] = -100
    return z, ids, lps, labels


def outside_support(ids, row):
    return int(next(j for j in range(V) if j not in ids[row].tolist()))


def reference(z, ids, lps, labels, tail="bucket", alpha=1.0, temperature=1.0):
    """Per-row float64 losses (0 where a row does not count) of forward_kl, differentiable in z."""
    rows = []
    for n in range(z.shape[0]):
        sel = ids[n] >= 0
        if not bool(sel.any()) or int(labels[n]) == -100:
            rows.append(z.new_zeros(()))
            continue
        idx, lp = ids[n][sel], lps[n][sel].double()
        p = lp.exp()
        if tail == "bucket":
            lq = torch.log_softmax(z[n] / temperature, -1)[idx]
            p_t = (1 - p.sum()).clamp_min(0)
            q_t = (-torch.expm1(torch.logsumexp(lq, 0))).clamp_min(0)
            d = (p * (lp.clamp_min(LOG_EPS) - lq.clamp_min(LOG_EPS))).sum()
            d = d + p_t * (p_t.clamp_min(1e-12).log() - q_t.clamp_min(1e-12).log())
        else:
            lq = torch.log_softmax(z[n][idx] / temperature, -1)
            pb = p / p.sum()
            d = (pb * ((lp - p.sum().log()).clamp_min(LOG_EPS) - lq.clamp_min(LOG_EPS))).sum()
        row = alpha * temperature**2 * d
        if alpha < 1:
            row = row - (1 - alpha) * torch.log_softmax(z[n], -1)[int(labels[n])]
        rows.append(row)
    return torch.stack(rows)


def run(backend, z, ids, lps, labels, **kw):
    x = z.clone().requires_grad_(True)
    loss = sparse_kl_loss(x, ids, lps, labels=labels, backend=backend, reduction="none", **kw)
    (loss * torch.arange(1.0, N + 1)).sum().backward()  # grad_output != 1, different per row
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "+inf"])
def test_nan_or_inf_logit_poisons_its_row(backend, option, value):
    kw = OPTIONS[option]
    z, ids, lps, labels = inputs()
    clean = z.clone()
    z[BAD_AT_TARGET, ids[BAD_AT_TARGET, 1]] = value
    z[BAD_ELSEWHERE, outside_support(ids, BAD_ELSEWHERE)] = value
    z[IGNORED, 3] = z[NO_TARGETS, 4] = float("nan")  # rows that do not count: no effect at all
    loss, grad = run(backend, z, ids, lps, labels, **kw)
    bad = [BAD_AT_TARGET, BAD_ELSEWHERE]
    assert torch.isnan(loss[bad]).all(), loss  # same on both backends: inf - inf and NaN arithmetic give nan
    assert not torch.isfinite(grad[bad]).all(dim=1).any()
    assert (loss[[IGNORED, NO_TARGETS]] == 0).all() and (grad[[IGNORED, NO_TARGETS]] == 0).all()
    good = [r for r in range(N) if r not in bad]
    x = clean.double().requires_grad_(True)
    ref = reference(x, ids, lps, labels, **kw)
    (ref * torch.arange(1.0, N + 1, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(loss[good].double(), ref[good].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[good].double(), x.grad[good], rtol=1e-4, atol=1e-5)
    mean = sparse_kl_loss(z, ids, lps, labels=labels, backend=backend, **kw)
    assert torch.isnan(mean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
def test_neg_inf_logit_is_probability_zero(backend, option):
    kw = OPTIONS[option]
    z, ids, lps, labels = inputs(seed=1)
    z[BAD_AT_TARGET, ids[BAD_AT_TARGET, 1]] = float("-inf")
    z[BAD_ELSEWHERE, outside_support(ids, BAD_ELSEWHERE)] = float("-inf")
    z[3, :7] = float("-inf")
    loss, grad = run(backend, z, ids, lps, labels, **kw)
    x = z.double().requires_grad_(True)
    ref = reference(x, ids, lps, labels, **kw)
    (ref * torch.arange(1.0, N + 1, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", ["bucket", "bucket-ce"])
def test_all_neg_inf_row_is_nan(backend, option):
    """Every logit -inf is no distribution: log_softmax gives NaN, and so does the loss, on both backends."""
    z, ids, lps, labels = inputs()
    z[3] = float("-inf")
    loss, _ = run(backend, z, ids, lps, labels, **OPTIONS[option])
    assert torch.isnan(loss[3]) and torch.isfinite(loss[[0, 1, 2, 6]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.01], ids=["nan", "+inf", "positive"])
def test_bad_teacher_logprobs_are_refused(backend, value):
    z, ids, lps, labels = inputs()
    lps[3, 2] = value
    with pytest.raises(ValueError, match=r"target_logprobs\[3, 2\].*check_inputs=False"):
        sparse_kl_loss(z, ids, lps, labels=labels, backend=backend)
    with pytest.raises(ValueError, match=r"target_logprobs\[3, 2\]"):  # row index after flattening (B, T)
        SparseKLLoss(backend=backend)(z.reshape(1, N, V), ids.reshape(1, N, K), lps.reshape(1, N, K))
    loss = sparse_kl_loss(z, ids, lps, labels=labels, backend=backend, check_inputs=False)
    assert loss.shape == ()
    SparseKLLoss(backend=backend, check_inputs=False)(z, ids, lps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_and_padding_garbage_pass(backend):
    """log(1) may round slightly above 0; padding slots (id -1) may hold anything; -inf is probability 0."""
    z, ids, lps, labels = inputs()
    expected = sparse_kl_loss(z, ids, lps, labels=labels, backend=backend, reduction="none")
    lps[0, -2:] = torch.tensor([float("nan"), float("inf")])
    lps[NO_TARGETS] = 7.0
    loss = sparse_kl_loss(z, ids, lps, labels=labels, backend=backend, reduction="none", check_inputs=True)
    torch.testing.assert_close(loss, expected)
    lps[3, 0], lps[4, 1] = 5e-5, float("-inf")
    sparse_kl_loss(z, ids, lps, labels=labels, backend=backend, check_inputs=True)


# ----------------------------------------------------------------------------------------------------------
# the fused output layer: a NaN/+inf hidden state makes its row's logits non-finite


def fused_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.6
    b = torch.randn(V, generator=g) * 0.5
    _, ids, lps, labels = inputs(seed)
    return h, w, b, ids, lps, labels


def run_fused(backend, h, w, b, ids, lps, labels, **kw):
    leaves = [t.clone().requires_grad_(True) for t in (h, w, b)]
    loss = fused_linear_sparse_kl_loss(*leaves[:2], ids, lps, leaves[2], labels=labels, backend=backend,
                                       reduction="none", **kw)  # fmt: skip
    (loss * torch.arange(1.0, N + 1)).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "+inf"])
def test_fused_nan_or_inf_hidden(backend, option, value):
    kw = OPTIONS[option]
    h, w, b, ids, lps, labels = fused_inputs()
    h[BAD_AT_TARGET, 0] = value
    loss, (dh, dw, db) = run_fused(backend, h, w, b, ids, lps, labels, **kw)
    assert torch.isnan(loss[BAD_AT_TARGET]) and not torch.isfinite(dh[BAD_AT_TARGET]).all()
    good = [r for r in range(N) if r != BAD_AT_TARGET]
    assert torch.isfinite(loss[good]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
def test_fused_rows_that_do_not_count_stay_inert(backend, option):
    """A NaN hidden state where nothing is trained (e.g. a fully masked padding position) touches no gradient."""
    kw = OPTIONS[option]
    h, w, b, ids, lps, labels = fused_inputs(seed=2)
    h[IGNORED] = h[NO_TARGETS] = float("nan")
    loss, (dh, dw, db) = run_fused(backend, h, w, b, ids, lps, labels, **kw)
    clean = h.clone()
    clean[[IGNORED, NO_TARGETS]] = 0.0
    leaves = [t.double().requires_grad_(True) for t in (clean, w, b)]
    ref = reference(leaves[0] @ leaves[1].T + leaves[2], ids, lps, labels, **kw)
    (ref * torch.arange(1.0, N + 1, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    for got, leaf in zip((dh, dw, db), leaves, strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-4, atol=1e-4 * float(leaf.grad.abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.01], ids=["nan", "+inf", "positive"])
def test_fused_bad_teacher_logprobs_are_refused(backend, value):
    h, w, b, ids, lps, labels = fused_inputs()
    lps[6, 4] = value
    with pytest.raises(ValueError, match=r"target_logprobs\[6, 4\].*check_inputs=False"):
        fused_linear_sparse_kl_loss(h, w, ids, lps, b, labels=labels, backend=backend)
    with pytest.raises(ValueError, match=r"target_logprobs\[6, 4\]"):
        FusedLinearSparseKLLoss(backend=backend)(h, w, ids, lps, b)
    fused_linear_sparse_kl_loss(h, w, ids, lps, b, labels=labels, backend=backend, check_inputs=False)
    FusedLinearSparseKLLoss(backend=backend, check_inputs=False)(h, w, ids, lps, b)
    lps[6, 4], ids[6, 4] = float("nan"), -1  # padding may hold anything
    fused_linear_sparse_kl_loss(h, w, ids, lps, b, labels=labels, backend=backend, check_inputs=True)


def test_check_runs_inside_compiled_graph():
    """The check lives inside the custom op, so fullgraph=True compiles and the error still reaches the caller."""
    z, ids, lps, labels = inputs()
    lps[3, 2] = float("nan")
    step = torch.compile(lambda z, i, lp: sparse_kl_loss(z, i, lp, backend="torch"), backend="aot_eager",
                         fullgraph=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"target_logprobs\[3, 2\]"):
        step(z, ids, lps)


def test_fused_compiles_with_checks_on():
    """The fused loss checks outside any op: skipped while tracing, so fullgraph=True compiles with the defaults."""
    h, w, b, ids, lps, labels = fused_inputs()
    h.requires_grad_(True)
    step = torch.compile(lambda h: fused_linear_sparse_kl_loss(h, w, ids, lps, b, labels=labels, backend="torch"),
                         backend="aot_eager", fullgraph=True)  # fmt: skip
    step(h).backward()
    assert torch.isfinite(h.grad).all()


def test_hf_causal_lm_threads_check_inputs():
    transformers = pytest.importorskip("transformers")
    from softcache.kernels.hf import causal_lm_sparse_kl_loss

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).float().eval()
    _, ids, lps, _ = inputs()
    input_ids = torch.randint(0, V, (1, N))
    lps[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"target_logprobs\[2, 1\]"):
        causal_lm_sparse_kl_loss(model, input_ids, ids[None], lps[None])
    causal_lm_sparse_kl_loss(model, input_ids, ids[None], lps[None], check_inputs=False)
