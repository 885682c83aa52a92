"""Feature distillation through the trainers: a cache with teacher hidden states and attention maps adds
``alpha_hidden · hidden_state_loss + alpha_attention · attention_loss`` to the KD loss, with a layer map and a
learned projection that the optimizer trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from softcache.kernels import attention_loss, hidden_state_loss

import softcache
from softcache.extras import Attentions, HiddenStates
from softcache.integrations.hf import DistillationTrainer
from softcache.integrations.loss import DistillationLoss

V, K, TEACHER_WIDTH, HEADS = 61, 4, 48, 2
LAYER_MAP = {0: 0, 1: 2}  # student hidden-state index → teacher's


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("features") / "cache")
    rng = np.random.default_rng(5)
    extras = [HiddenStates([0, 2], TEACHER_WIDTH, "fp16"), Attentions([1], HEADS)]
    with softcache.CacheWriter(path, vocab_size=V, k=K, temperatures=(2.0,), extras=extras) as writer:
        for length in (9, 13, 6, 11):
            scores = rng.normal(size=(HEADS, length, length)) + np.triu(np.full((length, length), -np.inf), 1)
            attn = np.exp(scores - scores.max(-1, keepdims=True))
            writer.write_logits(
                rng.integers(0, V, length), (rng.standard_normal((length, V)) * 2).astype(np.float32),
                extras={"hidden_states": {0: rng.normal(size=(length, TEACHER_WIDTH)),
                                          2: rng.normal(size=(length, TEACHER_WIDTH))},
                        "attentions": {1: attn / attn.sum(-1, keepdims=True)}},
            )  # fmt: skip
    return path


def student():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                      max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("eager")  # attention maps are only returned by the eager implementation
    return model


def test_loss_adds_the_feature_terms(feature_cache, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(feature_cache, temperature=2.0)
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    assert set(batch["teacher_hidden"]) == {0, 2} and batch["teacher_attentions"][1].shape == (4, HEADS, 13, 13)
    model, projection = student(), torch.nn.Linear(32, TEACHER_WIDTH, bias=False)
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), train_dataset=ds, alpha=0.7, fused=False,
                                  alpha_hidden=0.5, alpha_attention=3.0, layer_map=LAYER_MAP, projection=projection)
    got = trainer.compute_loss(model, batch)

    kd, _, _ = DistillationLoss(temperature=2.0, alpha=0.7, fused=False)(model, batch)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                output_attentions=True)  # fmt: skip
    mask = batch["attention_mask"]
    hidden = [hidden_state_loss(out.hidden_states[s], batch["teacher_hidden"][t], projection=projection, mask=mask)
              for s, t in LAYER_MAP.items()]  # fmt: skip
    attn = attention_loss(out.attentions[0], batch["teacher_attentions"][1], mask=mask)  # student layer 1 ↔ 2
    expected = kd + 0.5 * torch.stack(hidden).mean() + 3.0 * attn
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert hidden[0].item() > 0.1 and attn.item() > 1e-3  # the terms are not negligible


def test_training_trains_the_projection_and_logs_the_terms(feature_cache, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(feature_cache, temperature=2.0)
    model, projection = student(), torch.nn.Linear(32, TEACHER_WIDTH, bias=False)
    before = projection.weight.detach().clone()
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path, max_steps=3, logging_steps=1), train_dataset=ds,
                                  alpha_hidden=1.0, alpha_attention=1.0, layer_map=LAYER_MAP, projection=projection)
    trainer.train()
    assert not torch.equal(projection.weight.detach().cpu(), before)
    logged = [entry for entry in trainer.state.log_history if "hidden_loss" in entry]
    assert logged and all("attention_loss" in entry for entry in logged)


ATTENTION_MAP = {0: 0, 1: 1, 2: 3}  # hidden-state indices: student attention layers 0 ↔ 0 and 1 ↔ 2


@pytest.fixture(scope="module")
def attention_cache(tmp_path_factory):
    """Teacher attention maps of three layers (stored in bf16) for sequences of ragged lengths."""
    path = str(tmp_path_factory.mktemp("attentions") / "cache")
    rng = np.random.default_rng(6)
    extras = [Attentions([0, 1, 2], HEADS)]
    with softcache.CacheWriter(path, vocab_size=V, k=K, temperatures=(2.0,), extras=extras) as w:
        for length in (7, 12, 5, 10):
            maps = {}
            for layer in (0, 1, 2):
                scores = rng.normal(size=(HEADS, length, length)) * 2 + np.triu(np.full((length, length), -np.inf), 1)
                attn = np.exp(scores - scores.max(-1, keepdims=True))
                maps[layer] = attn / attn.sum(-1, keepdims=True)
            logits = (rng.standard_normal((length, V)) * 2).astype(np.float32)
            w.write_logits(rng.integers(0, V, length), logits, extras={"attentions": maps})
    return path


def expected_attention_term(model, batch, kind):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    stored, mask = batch["teacher_attentions"], batch["attention_mask"]
    losses = [attention_loss(out.attentions[0], stored[0], kind=kind, mask=mask),
              attention_loss(out.attentions[1], stored[2], kind=kind, mask=mask)]  # fmt: skip
    return torch.stack(losses).mean()


def test_attention_kind_reaches_the_trainer_loss(attention_cache, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(attention_cache, temperature=2.0)
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    model = student()
    kd, _, _ = DistillationLoss(temperature=2.0, fused=False)(model, batch)
    got = {}
    for kind in ("mse", "kl"):
        trainer = DistillationTrainer(model=model, args=arguments(tmp_path), train_dataset=ds, fused=False,
                                      alpha_attention=2.0, attention_kind=kind, layer_map=ATTENTION_MAP)  # fmt: skip
        got[kind] = trainer.compute_loss(model, batch).item()
        expected = kd + 2.0 * expected_attention_term(model, batch, kind)
        assert got[kind] == pytest.approx(expected.item(), rel=1e-5)
    assert abs(got["kl"] - got["mse"]) > 0.1  # the KL term is far larger than the probabilities' MSE


def test_attention_kind_is_logged(attention_cache, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(attention_cache, temperature=2.0)
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    logged = {}
    for kind in ("mse", "kl"):
        model = student()
        with torch.no_grad():
            expected = expected_attention_term(model, batch, kind).item()
        args = arguments(tmp_path / kind, per_device_train_batch_size=len(ds), logging_steps=1)  # one batch: all
        trainer = DistillationTrainer(model=model, args=args, train_dataset=ds, alpha_attention=1.0,
                                      attention_kind=kind, layer_map=ATTENTION_MAP)  # fmt: skip
        trainer.train()
        logged[kind] = next(entry for entry in trainer.state.log_history if "attention_loss" in entry)["attention_loss"]
        assert logged[kind] == pytest.approx(expected, rel=1e-4)
    assert logged["kl"] > 10 * logged["mse"]


def test_attention_kind_reaches_the_lightning_module(attention_cache):
    from softcache.integrations.lightning import DistillationModule

    ds = softcache.SoftTargetDataset(attention_cache, temperature=2.0)
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    model = student()
    for kind in ("mse", "kl"):
        module = DistillationModule(model, dataset=ds, fused=False, alpha_attention=1.0, attention_kind=kind,
                                    layer_map=ATTENTION_MAP)  # fmt: skip
        _, terms = module.distillation_loss(batch)
        expected = expected_attention_term(model, batch, kind)
        assert terms["attention_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_invalid_attention_kind(attention_cache, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(attention_cache, temperature=2.0)
    with pytest.raises(ValueError, match=r"attention_kind must be one of \('mse', 'kl'\), got 'cosine'"):
        DistillationTrainer(model=student(), args=arguments(tmp_path), train_dataset=ds, alpha_attention=1.0,
                            attention_kind="cosine")  # fmt: skip
    with pytest.raises(ValueError, match=r"\('mse', 'kl'\)"):
        DistillationLoss(attention_kind="KL")
