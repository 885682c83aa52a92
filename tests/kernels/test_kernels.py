"""sparse_kl_loss against a float64 reference written from DESIGN.md "Loss semantics", forward and gradient.

The reference and the backends come from conftest.py. Shapes stay small: the interpreter runs each Triton program
in numpy.
"""


import pytest
import torch
from softcache.kernels import SparseKLLoss, sparse_kl_loss

# ----------------------------------------------------------------------------------------------------------
# realistic inputs


def make_inputs(n=9, vocab=401, k=7, *, seed=0, dtype=torch.float32, device="cpu", pad=True, dup=True,
                extreme=False, p_over_one=False, lead=None):  # fmt: skip
    """Student logits and teacher top-k targets; the teacher is a random softmax, so sum p <= 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * 2.0
    teacher = z + torch.randn(n, vocab, generator=g) * 1.5  # correlated with the student, as after training
    lps, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    ids = ids[:, torch.randperm(k, generator=g)]  # slot order carries no meaning
    lps = torch.log_softmax(teacher, -1).gather(1, ids)
    if p_over_one:
        lps = lps - lps.exp().sum(-1, keepdim=True).log() + 2e-3  # P = e^0.002 > 1 by rounding
    if pad and n > 2 and k > 2:
        ids[1, -2:] = -1
        lps[1, -2:] = 0.0  # collate pads log-probs with 0: must not count
        ids[2, :] = -1  # a row with no targets does not count
    if dup and n > 3 and k > 2:
        ids[3, 1] = ids[3, 0]  # same id twice: two separate bins
    if extreme and n > 6:
        z[4, ids[4, 0]] = 1e4
        z[5, ids[5, 0]] = -1e4
        z[5, (ids[5, 1] + 1) % vocab] = 1e4
        z[6, ids[6, 1]] = float("-inf")
        z[6, :5] = float("-inf")
        z[4, -3:] = float("-inf")
    logits = z.to(dtype)
    if lead is not None:
        logits, ids, lps = logits.reshape(*lead, vocab), ids.reshape(*lead, k), lps.reshape(*lead, k)
    return logits.to(device), ids.to(device), lps.float().to(device)


def run(backend, logits, ids, lps, *, grad_weight=None, **kw):
    device, name = backend
    x = logits.detach().clone().requires_grad_(True)
    loss = sparse_kl_loss(x, ids, lps, backend=name, **kw)
    weight = torch.full_like(loss, 2.0) if grad_weight is None else grad_weight.to(loss.device)
    (loss * weight).sum().backward()
    return loss.detach().cpu().double(), x.grad.cpu().double()


@pytest.fixture(scope="session")
def check(reference, assert_matches):
    """``run`` against the float64 reference, loss and gradient within the DESIGN tolerances → (loss, grad)."""

    def check(backend, logits, ids, lps, *, grad_weight=None, **kw):
        loss, grad = run(backend, logits, ids, lps, grad_weight=grad_weight, **kw)
        ref_loss, ref_grad = reference(logits, ids, lps, grad_weight=grad_weight, **kw)
        assert_matches(loss, ref_loss, logits.dtype)
        assert_matches(grad, ref_grad, logits.dtype)
        return loss, grad

    return check


# ----------------------------------------------------------------------------------------------------------
# semantics


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kinds_tails(backend, pair, temperature, check):
    kind, tail, seed = pair
    logits, ids, lps = make_inputs(seed=seed, device=backend[0], extreme=True)
    check(backend, logits, ids, lps, kind=kind, tail=tail, temperature=temperature, beta=0.3)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_with_labels(backend, pair, temperature, make_labels, check):
    kind, tail, _ = pair
    logits, ids, lps = make_inputs(seed=7, device=backend[0])
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0])
    check(backend, logits, ids, lps, kind=kind, tail=tail, temperature=temperature, labels=labels, alpha=0.6)


def test_labels_mask_without_ce(backend, make_labels, check):
    """alpha = 1 with labels: no CE term, but ignore_index rows still do not count."""
    logits, ids, lps = make_inputs(seed=3, device=backend[0])
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0], ignore=(0, 4, 6))
    check(backend, logits, ids, lps, labels=labels, temperature=2.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,tail", [("forward_kl", "bucket"), ("jsd", "bucket"), ("reverse_kl", "restrict"),
                                       ("forward_kl", "renormalize"), ("tvd", "bucket")])  # fmt: skip
def test_half_precision(backend, dtype, kind, tail, make_labels, check):
    logits, ids, lps = make_inputs(seed=11, dtype=dtype, device=backend[0], extreme=True)
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0])
    _, grad = check(backend, logits, ids, lps, kind=kind, tail=tail, temperature=2.5, labels=labels, alpha=0.8)
    x = logits.detach().clone().requires_grad_(True)
    sparse_kl_loss(x, ids, lps, kind=kind, tail=tail, backend=backend[1]).backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("vocab,k", [(1271, 33), (20000, 5)])
def test_odd_and_multi_block_sizes(backend, vocab, k, make_labels, check):
    """V not a power of two, K not a power of two; V = 20000 spans three 8192-wide Triton blocks."""
    logits, ids, lps = make_inputs(n=5, vocab=vocab, k=k, seed=vocab, device=backend[0])
    labels = make_labels(5, vocab, device=backend[0], ignore=(0,))
    check(backend, logits, ids, lps, kind="jsd", temperature=2.5, labels=labels, alpha=0.5)
    check(backend, logits, ids, lps, kind="forward_kl", tail="restrict")


@pytest.mark.parametrize("kind,tail", [("forward_kl", "bucket"), ("reverse_kl", "bucket"), ("jsd", "restrict")])
def test_teacher_mass_slightly_above_one(backend, kind, tail, check):
    logits, ids, lps = make_inputs(seed=5, device=backend[0], p_over_one=True, pad=False, dup=False)
    assert bool((lps.exp().sum(-1) > 1).all())
    check(backend, logits, ids, lps, kind=kind, tail=tail, temperature=2.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(backend, reduction, make_labels, check):
    logits, ids, lps = make_inputs(seed=13, device=backend[0], lead=(3, 3))
    labels = make_labels(9, logits.shape[-1], device=backend[0]).reshape(3, 3)
    weight = torch.linspace(-1.0, 3.0, 9).reshape(3, 3) if reduction == "none" else None
    loss, _ = check(backend, logits, ids, lps, labels=labels, alpha=0.7, temperature=2.5, reduction=reduction,
                    grad_weight=weight)  # fmt: skip
    assert loss.shape == ((3, 3) if reduction == "none" else ())
    if reduction == "none":
        assert float(loss[0, 0]) == 0.0 and float(loss[0, 2]) == 0.0  # ignored label, row without targets


@pytest.mark.parametrize("num_items", [4, 17.0, "tensor"])
def test_num_items_in_batch(backend, num_items, reference, make_labels, assert_matches):
    logits, ids, lps = make_inputs(seed=17, device=backend[0])
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0])
    ref_items = 23 if num_items == "tensor" else num_items
    items = torch.tensor(23, device=backend[0]) if num_items == "tensor" else num_items
    loss, grad = run(backend, logits, ids, lps, labels=labels, alpha=0.5, num_items_in_batch=items)
    ref_loss, ref_grad = reference(logits, ids, lps, labels=labels, alpha=0.5, num_items_in_batch=ref_items)
    assert_matches(loss, ref_loss, torch.float32)
    assert_matches(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nothing_counts(backend, reduction):
    """All rows ignored: loss 0 and gradient exactly 0, no NaN, whatever the logits hold."""
    logits, ids, lps = make_inputs(seed=19, device=backend[0], extreme=True)
    labels = torch.full((logits.shape[0],), -100, device=backend[0])
    for kw in (dict(labels=labels, alpha=0.5), dict(labels=None)):
        ids_used = ids if kw["labels"] is not None else torch.full_like(ids, -1)
        loss, grad = run(backend, logits, ids_used, lps, reduction=reduction, temperature=2.5, **kw)
        assert torch.all(loss == 0) and torch.all(grad == 0)
    loss, grad = run(backend, logits, ids, lps, labels=labels, num_items_in_batch=0)
    assert float(loss) == 0.0 and torch.all(grad == 0)


def test_forward_only_and_module(backend, reference, make_labels, assert_matches):
    logits, ids, lps = make_inputs(seed=23, device=backend[0])
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0])
    kw = dict(kind="jsd", temperature=2.5, alpha=0.5, backend=backend[1])
    with torch.no_grad():
        plain = sparse_kl_loss(logits, ids, lps, labels=labels, **kw)
    module = SparseKLLoss(**kw)
    assert "jsd" in repr(module)
    x = logits.clone().requires_grad_(True)
    via_module = module(x, ids, lps, labels)
    torch.testing.assert_close(plain, via_module.detach(), rtol=1e-6, atol=1e-6)
    ref, _ = reference(logits, ids, lps, labels=labels, kind="jsd", temperature=2.5, alpha=0.5)
    assert_matches(plain.cpu().double(), ref, torch.float32)


def test_inplace_grad(backend, make_labels):
    logits, ids, lps = make_inputs(seed=29, device=backend[0])
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0])
    kw = dict(labels=labels, alpha=0.5, temperature=2.5, backend=backend[1])
    _, expected = run(backend, logits, ids, lps, **{k: v for k, v in kw.items() if k != "backend"})
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0  # non-leaf, like lm_head output
    loss = sparse_kl_loss(x, ids, lps, inplace_grad=True, **kw)
    (loss * 2).backward()
    torch.testing.assert_close(leaf.grad.cpu().double(), expected, rtol=1e-5, atol=1e-6)


def test_gradient_only_to_logits(backend):
    logits, ids, lps = make_inputs(seed=31, device=backend[0])
    lps = lps.clone().requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    sparse_kl_loss(x, ids, lps, backend=backend[1]).backward()
    assert x.grad is not None and lps.grad is None


def test_shifted_non_contiguous_logits(backend, check):
    """logits[:, :-1] (the usual shift) is not viewable as (N, V): copied, and the gradient lands in place."""
    logits, ids, lps = make_inputs(n=10, seed=71, device=backend[0], lead=(2, 5))
    shifted = logits[:, :-1]
    ids, lps = ids[:, 1:], lps[:, 1:]
    check(backend, shifted, ids, lps, kind="reverse_kl", temperature=2.5)
    x = logits.clone().requires_grad_(True)
    sparse_kl_loss(x[:, :-1], ids, lps, backend=backend[1]).backward()
    assert torch.all(x.grad[:, -1] == 0)


def test_torch_backend_chunks(monkeypatch, make_labels, check):
    """Rows processed in several chunks give the same result as one chunk."""
    from softcache.kernels import sparse_kl_torch

    logits, ids, lps = make_inputs(n=9, vocab=401, seed=37)
    labels = make_labels(9, 401)
    kw = dict(labels=labels, alpha=0.5, temperature=2.5)
    monkeypatch.setattr(sparse_kl_torch, "CHUNK_ELEMENTS", 401 * 2)
    check(("cpu", "torch"), logits, ids, lps, **kw)


# ----------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad_id", [401, 10**6, -2])
def test_ids_out_of_range(backend, bad_id):
    logits, ids, lps = make_inputs(seed=41, device=backend[0])
    ids = ids.clone()
    ids[4, 2] = bad_id
    with pytest.raises(ValueError, match=r"target_ids\[4, 2\]"):
        sparse_kl_loss(logits, ids, lps, backend=backend[1])


def test_ids_unchecked_are_padding(backend):
    logits, ids, lps = make_inputs(seed=43, device=backend[0], pad=False, dup=False)
    bad, padded = ids.clone(), ids.clone()
    bad[2, 3] = 5000
    padded[2, 3] = -1
    a = sparse_kl_loss(logits, bad, lps, backend=backend[1], check_ids=False)
    b = sparse_kl_loss(logits, padded, lps, backend=backend[1])
    torch.testing.assert_close(a, b)


def test_labels_out_of_range(make_labels):
    logits, ids, lps = make_inputs(seed=47)
    labels = make_labels(9, 401)
    labels[3] = 401
    with pytest.raises(ValueError, match=r"labels\[3\]"):
        sparse_kl_loss(logits, ids, lps, labels=labels, alpha=0.5)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(alpha=0.5), "needs labels"),
        (dict(kind="jsd", tail="renormalize"), "defined for kind='forward_kl' only"),
        (dict(kind="kl"), "kind must be"),
        (dict(tail="zero"), "tail must be"),
        (dict(kind="jsd", beta=1.0), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(reduction="batchmean"), "reduction"),
        (dict(reduction="sum", num_items_in_batch=3), "num_items_in_batch"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_argument_errors(kw, match):
    logits, ids, lps = make_inputs(n=4, seed=53)
    with pytest.raises(ValueError, match=match):
        sparse_kl_loss(logits, ids, lps, **kw)


def test_shape_errors():
    logits, ids, lps = make_inputs(n=4, seed=59)
    with pytest.raises(ValueError, match="target_ids must have shape"):
        sparse_kl_loss(logits, ids[:3], lps[:3])
    with pytest.raises(ValueError, match="target_logprobs"):
        sparse_kl_loss(logits, ids, lps[:, :3])
    with pytest.raises(ValueError, match="integer"):
        sparse_kl_loss(logits, ids.float(), lps)
    with pytest.raises(ValueError, match="labels must have"):
        sparse_kl_loss(logits, ids, lps, labels=torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("inplace_grad", [False, True])
def test_torch_compile_without_graph_break(backend, inplace_grad, reference, make_labels, assert_matches):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward without a C compiler."""
    logits, ids, lps = make_inputs(seed=61, device=backend[0])
    labels = make_labels(logits.shape[0], logits.shape[1], device=backend[0])
    kw = dict(alpha=0.5, temperature=2.5, backend=backend[1], inplace_grad=inplace_grad)

    def step(x, ids, lps, labels):
        return sparse_kl_loss(x * 1.0, ids, lps, labels=labels, **kw) * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_(True)
    compiled(x, ids, lps, labels).backward()
    _, ref_grad = reference(logits, ids, lps, labels=labels, alpha=0.5, temperature=2.5)
    assert_matches(x.grad.cpu().double(), ref_grad, torch.float32)
