"""softcache.kernels.hf: the fused loss on tiny randomly initialised HF causal LMs equals sparse_kl_loss on the
model's own logits, in value and in the gradient of every parameter; soft-capped or unknown logit transforms are
refused. Models are built from configs (nothing is downloaded)."""

import pytest
import torch
from softcache.kernels import sparse_kl_loss
from softcache.kernels.hf import causal_lm_sparse_kl_loss, shift_labels

transformers = pytest.importorskip("transformers")

V, B, T, K = 101, 2, 7, 5
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)  # fmt: skip


def tiny(name, **overrides):
    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(**{**SMALL, **overrides})
    return getattr(transformers, f"{name}ForCausalLM")(config).float().eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, V, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    target_ids = torch.randint(0, V, (B, T, K), generator=g)
    target_ids[1, 0] = -1
    target_logprobs = torch.log_softmax(torch.randn(B, T, K, generator=g), -1) - 0.2
    return input_ids, attention_mask, labels, target_ids, target_logprobs


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(model, backend="torch", **options):
    input_ids, attention_mask, labels, target_ids, target_logprobs = batch()
    fused = causal_lm_sparse_kl_loss(model, input_ids, target_ids, target_logprobs, attention_mask=attention_mask,
                                     labels=labels, backend=backend, **options)  # fmt: skip
    fused_grads = grads_of(model, 2 * fused)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    plain = sparse_kl_loss(logits, target_ids, target_logprobs, labels=shift_labels(labels), **options)
    plain_grads = grads_of(model, 2 * plain)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()), msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_llama(tied):
    model = tiny("Llama", tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    compare(model, temperature=2.0, alpha=0.5)


def test_llama_triton(triton_backend):
    if triton_backend[0] != "cpu":
        pytest.skip("compare() runs on the CPU: Triton is tested here through the interpreter only")
    compare(tiny("Llama"), backend="triton", kind="jsd", temperature=2.0, alpha=0.7)


def test_cohere_logit_scale_folded():
    model = tiny("Cohere", logit_scale=0.25)
    compare(model, temperature=1.5, alpha=0.5)


def test_gemma2_softcapping_refused_or_disabled():
    model = tiny("Gemma2", head_dim=16, final_logit_softcapping=30.0)
    input_ids, attention_mask, labels, target_ids, target_logprobs = batch()
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_sparse_kl_loss(model, input_ids, target_ids, target_logprobs)
    model.config.final_logit_softcapping = None
    compare(model, temperature=2.0)


def test_unknown_logit_transform_detected():
    model = tiny("Llama")
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2.0)
    input_ids, _, _, target_ids, target_logprobs = batch()
    with pytest.raises(ValueError, match="transforms its logits"):
        causal_lm_sparse_kl_loss(model, input_ids, target_ids, target_logprobs)
    loss = causal_lm_sparse_kl_loss(model, input_ids, target_ids, target_logprobs, check_head=False)
    assert torch.isfinite(loss)


def test_return_outputs_keeps_only_last_logits():
    model = tiny("Llama")
    input_ids, attention_mask, labels, target_ids, target_logprobs = batch()
    _, outputs = causal_lm_sparse_kl_loss(model, input_ids, target_ids, target_logprobs, attention_mask=attention_mask,
                                          return_outputs=True)  # fmt: skip
    assert outputs.logits.shape == (B, 1, V)
