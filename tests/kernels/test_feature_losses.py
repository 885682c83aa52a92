"""Feature-distillation losses against float64 computations written out element by element."""

from __future__ import annotations

import math

import pytest
import torch
from softcache.kernels import attention_loss, hidden_state_loss, uniform_layer_map


def reference_hidden(s, t, mask, kind):
    total = weight = 0.0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            x, y = s[b, i].tolist(), t[b, i].tolist()
            if kind == "mse":
                value = sum((p - q) ** 2 for p, q in zip(x, y, strict=True)) / len(x)
            else:
                dot = sum(p * q for p, q in zip(x, y, strict=True))
                value = 1 - dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))
            total += value
            weight += 1
    return total / weight


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_matches_the_formula(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    t = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    got = hidden_state_loss(s.float().requires_grad_(), t.float(), kind=kind, mask=mask)
    assert got.item() == pytest.approx(reference_hidden(s, t, mask, kind), rel=1e-5)
    s[1, 5] += 100  # padding never counts
    assert hidden_state_loss(s.float(), t.float(), kind=kind, mask=mask).item() == pytest.approx(got.item(), rel=1e-5)


def test_projection_is_applied_and_trained():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 9, generator=g)
    proj = torch.nn.Linear(4, 9, bias=False)
    loss = hidden_state_loss(s, t, projection=proj)
    expected = reference_hidden(proj(s).detach().double(), t.double(), torch.ones(2, 6), "mse")
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="give a projection"):
        hidden_state_loss(s, t)


def test_attention_loss_matches_the_formula():
    g = torch.Generator().manual_seed(2)
    s = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1)
    t = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    total = weight = 0.0
    for b in range(2):
        keys = [j for j in range(5) if mask[b, j]]
        for h in range(3):
            for i in keys:
                total += sum((s[b, h, i, j] - t[b, h, i, j]).item() ** 2 for j in keys) / len(keys)
                weight += 1
    assert attention_loss(s.float(), t.float(), mask=mask).item() == pytest.approx(total / weight, rel=1e-5)


def reference_attention_kl(s, t, mask, eps=1e-12):
    """MiniLM's attention transfer from the formula, row by row with float64 scalar ops (so autograd gives the
    reference gradient): for each real query i of each head, the teacher's row over the real keys renormalised to sum
    to 1, then Σ_j t_j (log max(t_j, eps) − log max(s_j, eps)); the mean over heads and real queries."""
    rows = []
    for b in range(s.shape[0]):
        keys = [j for j in range(s.shape[-1]) if mask[b, j]]
        for h in range(s.shape[1]):
            for i in keys:
                total = sum(t[b, h, i, j] for j in keys)
                kl = 0.0
                for j in keys:
                    p = t[b, h, i, j] / total
                    kl = kl + p * (p.clamp_min(eps).log() - s[b, h, i, j].clamp_min(eps).log())
                rows.append(kl)
    return sum(rows) / len(rows)


def attention_inputs(seed, lengths=(7, 4, 1), heads=3, causal=True):
    """Student and teacher attention maps (float64) of sequences of ``lengths`` padded to the longest, causal ones with
    exact zeros above the diagonal; the teacher's rows rounded to bf16, so they do not sum exactly to 1."""
    g = torch.Generator().manual_seed(seed)
    batch, length = len(lengths), max(lengths)
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()
    future = torch.ones(length, length, dtype=torch.bool).triu(1) if causal else torch.zeros(length, length).bool()
    hidden = future | ~mask.bool()[:, None, None, :]  # the student's eager attention never sees padded keys

    def maps():
        scores = torch.randn(batch, heads, length, length, generator=g, dtype=torch.float64)
        return torch.softmax(scores.masked_fill(hidden, -torch.inf), -1)

    s, t = maps(), maps().bfloat16().double()
    return s, t, mask


@pytest.mark.parametrize("causal", [True, False])
def test_attention_kl_matches_the_formula(causal):
    s, t, mask = attention_inputs(3, causal=causal)
    assert not torch.allclose(t[0].sum(-1), torch.ones((), dtype=t.dtype), atol=1e-6)  # the bf16 rows do not sum to 1
    expected = reference_attention_kl(s, t, mask)
    got = attention_loss(s, t, kind="kl", mask=mask)
    assert got.dtype == torch.float64 and got.item() == pytest.approx(expected.item(), rel=1e-12)
    assert attention_loss(s.float(), t.float(), kind="kl", mask=mask).item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > 0.1
    s_moved, t_moved = s.clone(), t.clone()
    s_moved[1, :, 5], t_moved[1, :, 5] = 0.5, 0.25  # padded query rows never count
    t_moved[1, :, :3, 5] = 0.5  # nor do padded keys
    assert attention_loss(s_moved, t_moved, kind="kl", mask=mask).item() == pytest.approx(got.item(), rel=1e-12)
    unmasked = reference_attention_kl(s[:1], t[:1], torch.ones(1, 7))  # no mask: every position is real
    assert attention_loss(s[:1], t[:1], kind="kl").item() == pytest.approx(unmasked.item(), rel=1e-12)


def test_attention_kl_gradients():
    s, t, mask = attention_inputs(4, lengths=(5, 3), heads=2, causal=False)
    s = s.float().requires_grad_()
    attention_loss(s, t.float(), kind="kl", mask=mask).backward()
    s64 = s.detach().double().requires_grad_()
    reference_attention_kl(s64, t, mask).backward()
    torch.testing.assert_close(s.grad, s64.grad.float(), rtol=1e-4, atol=1e-6)
    # float64 finite differences, for the student and the (renormalised) teacher alike
    g = torch.Generator().manual_seed(5)
    s = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1).requires_grad_()
    t = torch.softmax(torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64), -1).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda a, b: attention_loss(a, b, kind="kl", mask=mask), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: attention_loss(a, b, kind="mse", mask=mask), (s, t))


def test_attention_kl_is_finite_on_zero_probabilities():
    s, t, mask = attention_inputs(6)  # causal and padded: exact zeros in both maps
    s[0, 0, 3, :2] = 0.0  # and keys the teacher attends to but the student does not
    s = s.float().requires_grad_()
    loss = attention_loss(s, t.float(), kind="kl", mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(reference_attention_kl(s.detach().double(), t, mask).item(), rel=1e-5)
    empty = torch.zeros(2, 1, 3, 3, requires_grad=True)  # every position padding
    zero = attention_loss(empty, empty.detach(), kind="kl", mask=torch.zeros(2, 3))
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(empty.grad).all()


def test_attention_kl_renormalises_the_teacher_rows():
    s, t, mask = attention_inputs(7)
    loss = attention_loss(s, t, kind="kl", mask=mask)
    assert attention_loss(s, t * 1.01, kind="kl", mask=mask).item() == pytest.approx(loss.item(), rel=1e-12)
    assert attention_loss(t / t.sum(-1, keepdim=True), t, kind="kl", mask=mask).item() == pytest.approx(0, abs=1e-12)


def test_attention_loss_kinds():
    s, t, mask = attention_inputs(8)
    assert attention_loss(s, t, mask=mask).item() == attention_loss(s, t, kind="mse", mask=mask).item()
    assert attention_loss(s, t, kind="kl", mask=mask).item() != attention_loss(s, t, mask=mask).item()
    with pytest.raises(ValueError, match=r"\('mse', 'kl'\).*'cosine'"):
        attention_loss(s, t, kind="cosine")


def test_uniform_layer_map_is_tinybert_g():
    assert uniform_layer_map(4, 12) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}
    assert uniform_layer_map(3, 3) == {0: 0, 1: 1, 2: 2, 3: 3}
    with pytest.raises(ValueError):
        uniform_layer_map(5, 3)
