"""``causal_lm_sparse_kl_loss(vocab_size=)``: a student whose output layer is padded beyond the cache's vocabulary
(e.g. to a multiple of 64) is scored over the cache's vocabulary only, as the trainers do; without it the padded
logits would take probability mass and the loss would be silently wrong."""

import pytest
import torch
import transformers
from softcache.kernels import sparse_kl_loss
from softcache.kernels.hf import causal_lm_sparse_kl_loss, shift_labels

V, PAD, K, B, T = 97, 31, 5, 2, 11


def _student(vocab):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # padded rows that would take mass if they were scored
        model.get_output_embeddings().weight[V:] *= 40
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    target_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).reshape(B, T, K)
    logprobs = torch.log_softmax(torch.randn(B, T, K, generator=g), -1) - 0.3
    return ids, target_ids.int(), logprobs


def test_padded_student_is_scored_over_the_cache_vocabulary():
    model = _student(V + PAD)
    ids, target_ids, logprobs = _batch()
    got = causal_lm_sparse_kl_loss(model, ids, target_ids, logprobs, labels=ids, temperature=2.0, alpha=0.5,
                                   vocab_size=V)  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[..., :V]
    expected = sparse_kl_loss(logits, target_ids, logprobs.double(), labels=shift_labels(ids), temperature=2.0,
                              alpha=0.5, backend="torch")  # fmt: skip
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    unsliced = causal_lm_sparse_kl_loss(model, ids, target_ids, logprobs, labels=ids, temperature=2.0, alpha=0.5,
                                        vocab_size=V + PAD)  # fmt: skip
    assert abs(unsliced.item() - got.item()) > 1e-2 * got.item()


def test_vocab_size_larger_than_the_student_is_an_error():
    model = _student(V + PAD)
    ids, target_ids, logprobs = _batch()
    with pytest.raises(ValueError, match=f"vocab_size={V + PAD + 1}.*{V + PAD} output rows"):
        causal_lm_sparse_kl_loss(model, ids, target_ids, logprobs, vocab_size=V + PAD + 1)
