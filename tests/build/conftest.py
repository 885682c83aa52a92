"""Shared by the teacher-pass tests: a tiny Llama teacher made from a config, a JSONL corpus of code snippets, and
helpers handed out as fixtures (``make_teacher``, ``write_jsonl``, ``assert_same_cache``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "while True:\n    break\n",
] * 4


def make_teacher(path: Path, vocab_extra: int = 0, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a byte-level BPE tokenizer of ~300 tokens, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer) + vocab_extra, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peakier distribution than the default init, so that top-k is informative
        model.lm_head.weight.mul_(20)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def assert_same_cache(a, b) -> None:
    """Equal decoded content: same sequences, ids, log-probs (or counts) and normalisers."""
    assert len(a) == len(b) and a.num_tokens == b.num_tokens
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], dict):  # features: layer → array
                assert ra[key].keys() == rb[key].keys()
                for layer in ra[key]:
                    np.testing.assert_array_equal(ra[key][layer], rb[key][layer], err_msg=f"sequence {i}, {key}")
            else:
                np.testing.assert_array_equal(ra[key], rb[key], err_msg=f"sequence {i}, {key}")


@pytest.fixture(scope="session")
def text() -> list[str]:
    """The snippets the teachers' tokenizers are trained on and the corpora are made of."""
    return TEXT


@pytest.fixture(name="make_teacher", scope="session")
def fixture_make_teacher():
    return make_teacher


@pytest.fixture(name="write_jsonl", scope="session")
def fixture_write_jsonl():
    return write_jsonl


@pytest.fixture(name="assert_same_cache", scope="session")
def fixture_assert_same_cache():
    return assert_same_cache


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(TEXT, size=int(rng.integers(1, 4)))) for _ in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "docs.jsonl", docs)


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    """A tiny ``softcache generate`` cache (two prompts, two samples each, a few tokens) in several Arrow shards →
    (its folder, a function that reruns the same generate command into a given folder)."""
    import pandas as pd

    import softcache
    from softcache.build.generate import generate
    from softcache.demo import corpus_path, teacher_path

    texts = pd.read_parquet(corpus_path("validation"))["text"].tolist()
    root = tmp_path_factory.mktemp("generated")
    prompts = write_jsonl(root / "prompts.jsonl", [texts[0][:40], texts[1][:25]], field="prompt")

    def run(out):
        return generate(str(teacher_path()), str(prompts), str(out), max_new_tokens=6, num_return_sequences=2, k=4,
                        batch_size=2, shard_tokens=32, quiet=True)  # fmt: skip

    run(root / "cache")
    assert len(softcache.open_cache(root / "cache").manifest.shards) > 1
    return root / "cache", run

