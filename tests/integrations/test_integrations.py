"""softcache.integrations: the HF DistillationTrainer (loss, accumulation, columns, logs, vocabularies), the Lightning
module, and a student that learns from the demo teacher's cache. Tiny Llama students on the CPU.

References are ``sparse_kl_loss`` on the model's own logits in float64 (the kernels are tested against a float64
formula in tests/kernels/test_kernels.py), with the labels shifted by hand.
"""

import copy
import math

import pytest
import torch
import transformers
from softcache.kernels import sparse_kl_loss
from softcache.kernels.hf import shift_labels

import softcache
from softcache.integrations.hf import DistillationTrainer
from softcache.integrations.loss import DistillationLoss, supports_fused

V, K = 203, 6  # random_cache's vocabulary and k (conftest.py)


def reference_loss(model, batch, *, temperature, alpha, vocab=None):
    """sparse_kl_loss in float64 on the model's full logits (sliced to ``vocab``), labels shifted by hand."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    return sparse_kl_loss(logits[..., :vocab] if vocab else logits, batch["target_ids"], batch["target_logprobs"],
                          labels=labels, temperature=temperature, alpha=alpha, backend="torch")  # fmt: skip


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.4)])
def test_loss_equals_sparse_kl_on_logits(random_cache, student, arguments, with_ignored_labels, tmp_path, fused,
                                         temperature, alpha):
    ds = softcache.SoftTargetDataset(random_cache, temperature=temperature)
    model = student()
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), train_dataset=ds, eval_dataset=ds,
                                  alpha=alpha, fused=fused)  # fmt: skip
    assert trainer.distillation.temperature == temperature  # taken from the dataset
    batch = softcache.collate(with_ignored_labels(ds))
    expected = reference_loss(model, batch, temperature=temperature, alpha=alpha)
    got = trainer.compute_loss(model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    evaluated = trainer.evaluate(eval_dataset=ds)["eval_loss"]  # one batch of all 5 sequences
    whole = softcache.collate([ds[i] for i in range(len(ds))])
    assert evaluated == pytest.approx(
        reference_loss(model, whole, temperature=temperature, alpha=alpha).item(), rel=1e-5
    )


@pytest.mark.parametrize("fused", [True, False])
def test_padded_student_vocab_is_sliced(random_cache, student, arguments, tmp_path, fused):
    ds = softcache.SoftTargetDataset(random_cache, temperature=2.0)
    model = student(vocab=V + 13)
    with torch.no_grad():  # make the padded logits matter: they would take mass if they were not sliced off
        model.get_output_embeddings().weight[V:] *= 40
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), train_dataset=ds, alpha=0.5, fused=fused)
    assert trainer.distillation.vocab_size == V
    batch = softcache.collate([ds[i] for i in range(len(ds))])
    got = trainer.compute_loss(model, batch).item()
    assert got == pytest.approx(reference_loss(model, batch, temperature=2.0, alpha=0.5, vocab=V).item(), rel=1e-5)
    unsliced = reference_loss(model, batch, temperature=2.0, alpha=0.5).item()
    assert abs(got - unsliced) > 1e-2 * got


def test_too_small_student_vocab_errors(random_cache, student, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(random_cache)
    with pytest.raises(ValueError, match=f"vocab_size={V}.*{V - 1} logits"):
        DistillationTrainer(model=student(vocab=V - 1), args=arguments(tmp_path), train_dataset=ds)


def test_temperature_must_match_the_dataset(random_cache, student, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(random_cache, temperature=2.0)
    with pytest.raises(ValueError, match="temperature=1.0 but the dataset's targets are at temperature 2.0"):
        DistillationTrainer(model=student(), args=arguments(tmp_path), train_dataset=ds, temperature=1.0)
    trainer = DistillationTrainer(model=student(), args=arguments(tmp_path), train_dataset=ds, temperature=2.0)
    assert trainer.distillation.temperature == 2.0


def updates(trainer):
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(trainer.model.parameters(), before, strict=True)])


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_accumulation_equals_one_batch(random_cache, student, arguments, with_ignored_labels, tmp_path, fused):
    ds = softcache.SoftTargetDataset(random_cache, temperature=2.0)
    items = with_ignored_labels(ds)[:4]  # lengths 17, 9, 23, 12: padding and ignored labels differ per micro-batch
    model = student()
    sgd = dict(optim="sgd", learning_rate=1.0, max_grad_norm=0.0, max_steps=1, seed=3)
    options = dict(train_dataset=items, alpha=0.5, fused=fused, temperature=2.0)
    one = DistillationTrainer(model=copy.deepcopy(model), args=arguments(tmp_path, per_device_train_batch_size=4,
                                                                         **sgd), **options)  # fmt: skip
    two = DistillationTrainer(model=copy.deepcopy(model), args=arguments(tmp_path, per_device_train_batch_size=2,
                                                                         gradient_accumulation_steps=2, **sgd),
                              **options)  # fmt: skip
    step_one, step_two = updates(one), updates(two)
    assert torch.allclose(step_two, step_one, rtol=1e-5, atol=1e-5 * step_one.abs().max().item())

    # The naive mean of per-micro-batch means is a different gradient, so the test above can tell them apart.
    loss = DistillationLoss(temperature=2.0, alpha=0.5)
    naive = copy.deepcopy(model)
    for part in (items[:2], items[2:]):
        (loss(naive, softcache.collate(part))[0] / 2).backward()
    naive_step = -torch.cat([p.grad.flatten() for p in naive.parameters()])
    assert (naive_step - step_one).abs().max() > 1e-2 * step_one.abs().max()


def test_remove_unused_columns_keeps_the_targets(random_cache, student, arguments, tmp_path):
    import datasets

    ds = softcache.SoftTargetDataset(random_cache, temperature=2.0)
    table = datasets.Dataset.from_list([{**ds[i], "source": f"row {i}"} for i in range(len(ds))])
    decoded = softcache.to_hf_dataset(ds.cache, temperature=2.0).shuffle(seed=0)
    args = arguments(tmp_path, remove_unused_columns=True, max_steps=2)
    for train, options in ((table, dict(temperature=2.0, vocab_size=V)), (decoded, {}), (ds, {})):
        trainer = DistillationTrainer(model=student(), args=args, train_dataset=train, **options)
        assert trainer.distillation.temperature == 2.0
        batch = next(iter(trainer.get_train_dataloader()))
        assert {"target_ids", "target_logprobs", "labels"} <= set(batch)
        assert batch["target_logprobs"].dtype == torch.float32 and batch["target_ids"].shape[-1] == K
        trainer.train()
        assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert "source" not in trainer._remove_unused_columns(table).column_names
    with pytest.raises(ValueError, match="vocab_size=203 but the student has 202 logits"):
        DistillationTrainer(model=student(vocab=V - 1), args=args, train_dataset=decoded)


def test_logs_soft_and_hard_terms(random_cache, student, arguments, tmp_path):
    ds = softcache.SoftTargetDataset(random_cache, temperature=2.0)
    args = arguments(tmp_path, max_steps=4, logging_steps=2, learning_rate=1e-2)
    trainer = DistillationTrainer(model=student(), args=args, train_dataset=ds, alpha=0.3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert entry["soft_loss"] > 0 and entry["hard_loss"] > math.log(V) / 2
        assert entry["loss"] == pytest.approx(0.3 * entry["soft_loss"] + 0.7 * entry["hard_loss"], rel=1e-4)


def test_lightning_module_uses_the_same_loss(random_cache, student, with_ignored_labels):
    from softcache.integrations.lightning import DistillationModule

    ds = softcache.SoftTargetDataset(random_cache, temperature=2.0)
    model = student(vocab=V + 3)
    module = DistillationModule(model, dataset=ds, alpha=0.6)
    assert module.distillation.temperature == 2.0 and module.distillation.vocab_size == V
    batch = softcache.collate(with_ignored_labels(ds))
    loss, terms = module.distillation_loss(batch)
    expected = reference_loss(model, batch, temperature=2.0, alpha=0.6, vocab=V)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    soft = reference_loss(model, batch, temperature=2.0, alpha=1.0, vocab=V)  # the T^2-scaled divergence alone
    hard = reference_loss(model, batch, temperature=2.0, alpha=0.0, vocab=V)  # the cross-entropy alone
    assert terms["soft_loss"].item() == pytest.approx(soft.item(), rel=1e-4)
    assert terms["hard_loss"].item() == pytest.approx(hard.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature=1.0 but the dataset's targets are at temperature 2.0"):
        DistillationModule(model, dataset=ds, temperature=1.0)


def teacher_student_kl(teacher, model, batch):
    """Mean KL(teacher || student) at T = 1 over the positions that predict a real next token, from full logits."""
    with torch.no_grad():
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        p = torch.log_softmax(teacher(**inputs).logits.double(), -1)
        q = torch.log_softmax(model(**inputs).logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    keep = shift_labels(batch["labels"]) != -100
    return kl[keep].mean().item()


def test_student_learns_the_teacher_from_its_cache(demo_cache, student, arguments, tmp_path):
    from softcache.demo import teacher_path

    ds = softcache.SoftTargetDataset(demo_cache)
    held_out = softcache.collate([ds[i] for i in range(len(ds) - 4, len(ds))])
    train = torch.utils.data.Subset(ds, range(len(ds) - 4))
    teacher = transformers.LlamaForCausalLM.from_pretrained(teacher_path()).eval()
    model = student(vocab=ds.vocab_size)
    assert supports_fused(model)
    before = teacher_student_kl(teacher, model.eval(), held_out)
    args = arguments(tmp_path, max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3, optim="adamw_torch")
    DistillationTrainer(model=model, args=args, train_dataset=train).train()
    after = teacher_student_kl(teacher, model.eval(), held_out)
    print(f"held-out KL(teacher || student): {before:.3f} -> {after:.3f} nats after 30 steps")
    assert after < 0.75 * before
