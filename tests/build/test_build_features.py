"""softcache build --hidden-states / --attentions: the stored features are the teacher's own (rounded to bf16), a
projection is the seeded matrix, the size is announced, and an interrupted build resumes to the same cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import softcache
from softcache.build import build
from softcache.build.teacher import TeacherHead
from softcache.extras import HiddenStates

OPTS = dict(k=4, max_length=32, pack=True, batch_tokens=100, shard_tokens=200, quiet=True)


def bf16(x: torch.Tensor) -> np.ndarray:
    return x.float().to(torch.bfloat16).float().numpy()


def test_stored_features_are_the_teachers(teacher, data, tmp_path):
    build(str(teacher), str(data), str(tmp_path / "c"), hidden_states=[0, -1], attentions=[-1], **OPTS)
    cache = softcache.open_cache(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.set_attn_implementation("eager")
    n_layers = model.config.num_hidden_layers
    assert cache.manifest.extras["hidden_states"]["layers"] == [0, n_layers]
    assert cache.manifest.extras["attentions"] == {"layers": [n_layers - 1], "heads": model.config.num_attention_heads}
    for i in (0, len(cache) - 1):
        rec = cache[i]
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(rec["input_ids"])[None], output_hidden_states=True,
                        output_attentions=True)  # fmt: skip
        for layer in (0, n_layers):
            np.testing.assert_allclose(rec["teacher_hidden"][layer], bf16(out.hidden_states[layer][0]),
                                       rtol=2**-7, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(rec["teacher_attentions"][n_layers - 1], bf16(out.attentions[-1][0]),
                                   rtol=2**-7, atol=1e-6)  # fmt: skip


def test_projected_hidden_states(teacher, data, tmp_path):
    build(str(teacher), str(data), str(tmp_path / "c"), hidden_states=[-1], hidden_project=8, hidden_dtype="fp16",
          seed=3, **OPTS)  # fmt: skip
    cache = softcache.open_cache(tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(teacher)
    settings = cache.manifest.extras["hidden_states"]
    assert settings["width"] == 8 and settings["projection"]["seed"] == 3
    matrix = HiddenStates.projection_matrix(3, model.config.hidden_size, 8)
    rec = cache[0]
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(rec["input_ids"])[None], output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(rec["teacher_hidden"][model.config.num_hidden_layers], h.numpy() @ matrix,
                               rtol=2e-3, atol=2e-3)  # fmt: skip


def test_feature_options_fail_before_the_teacher_loads(teacher, data, tmp_path, capsys):
    with pytest.raises(ValueError, match="--attentions .* needs --max-length ≤ 512"):
        build(str(teacher), str(data), str(tmp_path / "c"), attentions=[0], max_length=1024, quiet=True)
    with pytest.raises(ValueError, match="--hidden-states 0,4,-1 needs distinct|distinct layer indices"):
        build(str(teacher), str(data), str(tmp_path / "c"), hidden_states=[1, 1], quiet=True)
    with pytest.raises(ValueError, match=r"--hidden-states \[7\]: the teacher has 3 hidden states"):
        build(str(teacher), str(data), str(tmp_path / "c"), hidden_states=[7], quiet=True)
    build(str(teacher), str(data), str(tmp_path / "d"), hidden_states=[1], **{**OPTS, "quiet": False})
    assert "storing hidden states: 1 layers × 32 × bf16 = 64 B/token" in capsys.readouterr().err


def test_interrupted_feature_build_resumes_to_the_same_cache(teacher, data, assert_same_cache, tmp_path, monkeypatch):
    opts = dict(hidden_states=[0, 2], attentions=[1], hidden_dtype="int8", **{**OPTS, "batch_tokens": 40})
    original, calls = TeacherHead.batch_targets, []

    def counted(self, *args):
        calls.append(1)
        if fail_at and len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return original(self, *args)

    monkeypatch.setattr(TeacherHead, "batch_targets", counted)
    fail_at = None
    build(str(teacher), str(data), str(tmp_path / "whole"), **opts)
    fail_at, total = len(calls) - 1, len(calls)  # in the last window: the earlier ones are written
    calls.clear()
    assert total > 10

    with pytest.raises(RuntimeError, match="injected"):
        build(str(teacher), str(data), str(tmp_path / "cut"), **opts)
    monkeypatch.setattr(TeacherHead, "batch_targets", original)
    whole = softcache.open_cache(tmp_path / "whole")
    assert 0 < len(softcache.open_cache(tmp_path / "cut")) < len(whole)
    build(str(teacher), str(data), str(tmp_path / "cut"), **opts)
    assert_same_cache(softcache.open_cache(tmp_path / "cut"), whole)
