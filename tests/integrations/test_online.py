"""Online distillation: ``softcache.sparse_targets`` gives a cache's targets from live logits, and a trainer given
``teacher=`` computes the loss and gradients of one trained from a cache of that teacher, step for step, within the
cache's quantisation (log-probs within 1/64 nat at T = 1, 1/(64 T) at T)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import softcache
from softcache import sparse_targets
from softcache.integrations.hf import DistillationTrainer
from softcache.integrations.lightning import DistillationModule
from softcache.integrations.online import collate_inputs

V, K, T = 203, 16, 2.0
LENGTHS = (17, 9, 23, 12, 5, 14)
STEP = 1.0 / 64


@pytest.fixture(scope="module")
def teacher(student):
    model = student(V, seed=7)
    with torch.no_grad():  # a peaked teacher, so that its top-k holds most of its mass
        model.lm_head.weight.mul_(30)
    return model.eval()


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(1)
    return [rng.integers(0, V, size=n) for n in LENGTHS]


@pytest.fixture(scope="module")
def teacher_cache(teacher, sequences, tmp_path_factory):
    """The teacher's cache over the sequences (top-16 at T = 1 and 2)."""
    path = str(tmp_path_factory.mktemp("online") / "cache")
    with softcache.CacheWriter(path, vocab_size=V, k=K, temperatures=(1.0, T)) as writer, torch.no_grad():
        for ids in sequences:
            writer.write_logits(ids, teacher(torch.from_numpy(ids)[None]).logits[0])
    return path


def test_sparse_targets_are_the_cache_targets(sequences, tmp_path):
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((3, 11, V)).astype(np.float32) * 4)
    ids = rng.integers(0, V, size=(3, 11))
    with softcache.CacheWriter(tmp_path / "topk", vocab_size=V, k=K, temperatures=(1.0, T)) as writer:
        writer.write_logits(ids, logits)
    cached = softcache.SoftTargetDataset(str(tmp_path / "topk"), temperature=T)
    live_ids, live_logp = sparse_targets(logits, k=K, temperature=T)
    assert live_ids.dtype == torch.int32 and live_logp.dtype == torch.float32 and live_ids.shape == (3, 11, K)
    exact = torch.log_softmax(logits.double() / T, -1)
    for b in range(3):
        np.testing.assert_array_equal(live_ids[b].numpy(), cached[b]["target_ids"])
        assert np.abs(live_logp[b].numpy() - cached[b]["target_logprobs"]).max() <= STEP / T + 1e-5
        np.testing.assert_allclose(live_logp[b].double(), exact[b].gather(-1, live_ids[b].long()), atol=1e-5)

    # sampled: the very draws a cache written with the same seed stores (sequence b draws from stream (seed, b))
    with softcache.CacheWriter(tmp_path / "sampled", vocab_size=V, k=24, targets="sampled", samples=20,
                               temperatures=(T,), seed=5) as writer:  # fmt: skip
        writer.write_logits(ids, logits)
    cached = softcache.SoftTargetDataset(str(tmp_path / "sampled"), temperature=T)
    live_ids, live_logp = sparse_targets(logits, k=24, temperature=T, kind="sampled", samples=20, seed=5)
    for b in range(3):
        np.testing.assert_array_equal(live_ids[b].numpy(), cached[b]["target_ids"])
        np.testing.assert_allclose(live_logp[b].numpy(), cached[b]["target_logprobs"], atol=1e-6)

    bad = logits.clone()
    bad[1, 4, 7] = float("nan")
    with pytest.raises(ValueError, match=r"position \(1, 4\)"):
        sparse_targets(bad, k=K)
    with pytest.raises(ValueError, match="k=24 < samples=50"):
        sparse_targets(logits, k=24, kind="sampled", samples=50)


class Recorder(transformers.TrainerCallback):
    """The gradients just before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _train(student, arguments, tmp_path, **options):
    recorder = Recorder()
    # SGD: the weights of the two runs then differ only as much as their gradients (Adam's first steps are ±lr on
    # every weight, whatever the size of its gradient, which would turn a quantisation-sized difference into lr)
    args = arguments(tmp_path, max_steps=3, gradient_accumulation_steps=2, logging_steps=1, learning_rate=0.5,
                     optim="sgd", max_grad_norm=0.0)  # fmt: skip
    trainer = DistillationTrainer(model=student(V, seed=0), args=args, callbacks=[recorder], **options)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, recorder.grads


def test_online_trainer_matches_offline_step_for_step(teacher, teacher_cache, sequences, student, arguments,
                                                      tmp_path):  # fmt: skip
    offline = _train(student, arguments, tmp_path / "offline", alpha=0.5,
                     train_dataset=softcache.SoftTargetDataset(teacher_cache, temperature=T))  # fmt: skip
    online = _train(student, arguments, tmp_path / "online", alpha=0.5, teacher=teacher, teacher_k=K, temperature=T,
                    train_dataset=[{"input_ids": ids} for ids in sequences])  # fmt: skip
    assert len(offline[0]) == len(online[0]) == 3 and len(offline[1]) == len(online[1]) == 3
    # per counted row, the soft term moves by at most T² · Σ p |Δ log p| ≤ T · STEP (the codec bound at T)
    np.testing.assert_allclose(online[0], offline[0], rtol=0, atol=T * STEP)
    for step, (a, b) in enumerate(zip(online[1], offline[1], strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            error = (a[name] - b[name]).norm() / b[name].norm().clamp(min=1e-12)
            assert error < 0.01, (step, name, float(error))


def test_lightning_module_with_a_teacher_matches_offline(teacher, teacher_cache, sequences, student):
    model = student(V, seed=0)
    offline = DistillationModule(model, dataset=softcache.SoftTargetDataset(teacher_cache, temperature=T), alpha=0.5)
    online = DistillationModule(model, teacher=teacher, teacher_k=K, temperature=T, alpha=0.5)
    online.train()
    assert model.training and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    dataset = softcache.SoftTargetDataset(teacher_cache, temperature=T)
    batch = softcache.collate([dataset[i] for i in (0, 1, 4)])  # padded to the longest: padding holds no targets
    tokens = collate_inputs([{"input_ids": sequences[i]} for i in (0, 1, 4)])
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(tokens[key], batch[key])
    grads = []
    for module, inputs in ((offline, batch), (online, tokens)):
        model.zero_grad()
        loss, _ = module.distillation_loss(inputs)
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (want, offline_grad), (got, online_grad) = grads
    assert abs(float(got) - float(want)) <= T * STEP
    assert (online_grad - offline_grad).norm() < 0.01 * offline_grad.norm()
    assert {id(p) for p in online.configure_optimizers().param_groups[0]["params"]} == {
        id(p) for p in model.parameters()
    }
