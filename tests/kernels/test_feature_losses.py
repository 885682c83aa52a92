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


def test_uniform_layer_map_is_tinybert_g():
    assert uniform_layer_map(4, 12) == {0: 0, 1: 3, 2: 6, 3: 9, 4: 12}
    assert uniform_layer_map(3, 3) == {0: 0, 1: 1, 2: 2, 3: 3}
    with pytest.raises(ValueError):
        uniform_layer_map(5, 3)
