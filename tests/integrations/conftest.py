"""Shared by the integration tests: a random topk cache, the demo teacher's cache, and helpers handed out as
fixtures (``student``, ``arguments``, ``with_ignored_labels``).

The helpers are plain functions too: ``test_integrations_ddp.py`` runs them on each rank of ``torch.distributed.run``,
outside pytest.
"""

import numpy as np
import pytest
import torch
import transformers

import softcache

V, K = 203, 6
LENGTHS = (17, 9, 23, 12, 5)


def student(vocab=V, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def arguments(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                   disable_tqdm=True, per_device_train_batch_size=2, per_device_eval_batch_size=8, max_steps=1,
                   lr_scheduler_type="constant", seed=0)  # fmt: skip
    return transformers.TrainingArguments(**{**options, **overrides})


def with_ignored_labels(dataset, every=3):
    """Items of ``dataset`` with every ``every``-th label set to -100 (a prompt mask, say)."""
    items = []
    for i in range(len(dataset)):
        item = dict(dataset[i])
        item["labels"] = item["labels"].copy()
        item["labels"][i % every :: every] = -100
        items.append(item)
    return items


@pytest.fixture(name="student", scope="session")
def fixture_student():
    return student


@pytest.fixture(name="arguments", scope="session")
def fixture_arguments():
    return arguments


@pytest.fixture(name="with_ignored_labels", scope="session")
def fixture_with_ignored_labels():
    return with_ignored_labels


@pytest.fixture(scope="session")
def random_cache(tmp_path_factory):
    """A topk cache (captured at T = 1 and 2) of random logits over an odd vocabulary, sequences of odd lengths."""
    path = str(tmp_path_factory.mktemp("integrations") / "cache")
    rng = np.random.default_rng(0)
    with softcache.CacheWriter(path, vocab_size=V, k=K, temperatures=(1.0, 2.0)) as writer:
        for length in LENGTHS:
            ids = rng.integers(0, V, size=length)
            writer.write_logits(ids, (rng.standard_normal((length, V)) * 3).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    """The demo teacher's cache (18 sequences of 64 tokens), built once per session."""
    from softcache.build import build_demo

    out = str(tmp_path_factory.getbasetemp() / "demo-cache")
    build_demo(out, quiet=True, limit=32, max_length=64)
    return out
