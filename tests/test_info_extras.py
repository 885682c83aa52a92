"""``softcache info`` lists the extra streams a cache holds (loss mask, hidden states, attentions, MLM labels) with
their settings and, where the manifest gives it, their size per token; a cache without extras says none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.extras import Attentions, HiddenStates, MLMLabels
from softcache.ops import summary

V, K = 41, 3
LENGTHS = (6, 9)


def _write(path, **options):
    """Two sequences with every extra the writer is configured with (random values of the right shapes)."""
    rng = np.random.default_rng(0)
    extras = {e.name: e for e in options.get("extras", ())}
    with softcache.CacheWriter(path, vocab_size=V, k=K, **options) as w:
        for n in LENGTHS:
            given = {}
            if "hidden_states" in extras:
                hs = extras["hidden_states"]
                given["hidden_states"] = {layer: rng.normal(size=(n, hs.width)) for layer in hs.layers}
            if "attentions" in extras:
                a = extras["attentions"]
                given["attentions"] = {layer: rng.random((a.heads, n, n)) for layer in a.layers}
            if "mlm_labels" in extras:
                given["mlm_labels"] = np.where(np.arange(n) % 3 == 0, rng.integers(0, V, n), -1)
            w.write_logits(rng.integers(0, V, n), rng.normal(size=(n, V)).astype(np.float32),
                           loss_mask=np.arange(n) % 2 == 0 if options.get("loss_mask") else None,
                           extras=given or None)  # fmt: skip
    return str(path)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    return {
        "plain": _write(root / "plain"),
        "mask": _write(root / "mask", loss_mask=True),
        "hidden": _write(root / "hidden", extras=[HiddenStates.projected([0, 2], 16, 8, seed=5, dtype="int8")]),
        "features": _write(
            root / "features", extras=[HiddenStates([1], 6, "fp16"), Attentions([0, 3], 2)], backend="zarr"
        ),
        "mlm": _write(root / "mlm", extras=[MLMLabels(0.2, copies=3)]),
    }


def info(path: str, *options: str):
    out = CliRunner().invoke(main, ["info", *options, path])
    assert out.exit_code == 0, out.output
    return out.output


def test_a_cache_without_extras_says_none(caches):
    assert summary(softcache.open_cache(caches["plain"]))["extras"] == {}
    assert json.loads(info(caches["plain"], "--json"))["extras"] == {}
    line = next(line for line in info(caches["plain"]).splitlines() if line.startswith("extras"))
    assert line.split() == ["extras", "none"]


def test_info_lists_the_loss_mask(caches):
    assert summary(softcache.open_cache(caches["mask"]))["extras"] == {"loss_mask": {"bytes_per_token": 0.125}}
    assert "loss_mask: 0.125 B/token" in info(caches["mask"])


def test_info_lists_hidden_states_with_layers_dtype_and_projection(caches):
    shown = json.loads(info(caches["hidden"], "--json"))["extras"]
    hidden = shown["hidden_states"]
    assert list(shown) == ["hidden_states"] and hidden["layers"] == [0, 2] and hidden["width"] == 8
    assert hidden["dtype"] == "int8" and hidden["projection"]["from"] == 16 and hidden["projection"]["seed"] == 5
    assert hidden["bytes_per_token"] == 2 * (8 + 4)  # two layers of 8 int8 values and a float32 scale
    text = info(caches["hidden"])
    assert "hidden_states: layers [0, 2], width 8, dtype int8, projected from 16 (seed 5); 24 B/token" in text


def test_info_lists_attentions_with_layers_heads_and_max_length(caches):
    shown = summary(softcache.open_cache(caches["features"]))["extras"]
    assert sorted(shown) == ["attentions", "hidden_states"]
    assert shown["hidden_states"] == {"layers": [1], "width": 6, "dtype": "fp16", "bytes_per_token": 12}
    attn = shown["attentions"]
    assert attn["layers"] == [0, 3] and attn["heads"] == 2 and attn["max_length"] == Attentions.MAX_LENGTH
    assert attn["bytes_per_token"] == "8 × L"  # 2 layers × 2 heads × bf16 per token of L
    text = info(caches["features"])
    assert "hidden_states: layers [1], width 6, dtype fp16; 12 B/token" in text
    assert f"attentions: layers [0, 3], heads 2, max_length {Attentions.MAX_LENGTH}; 8 × L B/token" in text


def test_info_lists_mlm_labels(caches):
    shown = json.loads(info(caches["mlm"], "--json"))["extras"]
    assert shown == {"mlm_labels": {"objective": "mlm", "probability": 0.2, "copies": 3}}
    assert "mlm_labels: objective mlm, probability 0.2, copies 3" in info(caches["mlm"])
