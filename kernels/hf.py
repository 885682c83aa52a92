"""The fused distillation loss for Hugging Face causal LMs, from the final hidden states and
``get_output_embeddings()``, so the student's (B, T, V) logits are never computed.

    from softcache.kernels.hf import causal_lm_sparse_kl_loss
    loss = causal_lm_sparse_kl_loss(model, batch["input_ids"], batch["target_ids"], batch["target_logprobs"],
                                    attention_mask=batch["attention_mask"], labels=batch["labels"],
                                    temperature=2.0, alpha=0.5, vocab_size=dataset.vocab_size)

transformers is imported by nobody here: the model object brings it. The model runs once with ``logits_to_keep=1``
(logits of the last position only, a (B, 1, V) tensor) while a hook on its decoder keeps the final hidden states.
Linear transforms of the logits that models apply after the output layer are folded into the hidden states
(``logit_scale`` of Cohere, ``logits_scaling`` of Granite, ``lm_head_multiplier`` of Falcon-H1); soft-capping
(Gemma 2/3's ``final_logit_softcapping``) is not linear and is refused. Any other transform is caught by comparing
the model's own last-position logits with the output layer applied to the kept hidden states (``check_head``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .fused_linear import fused_linear_sparse_kl_loss


def _text_config(model):
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def output_layer(model) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(weight (V, H), bias (V,) or None, factor): the model's logits are ``factor * (h @ weight.T + bias)``.

    Raises ValueError for models whose logits are a non-linear function of that (soft-capping).
    """
    config = _text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        raise ValueError(
            f"{type(model).__name__} soft-caps its logits (config.final_logit_softcapping={cap}: "
            "logits = cap * tanh(z / cap)), which cannot be fused with the output layer. Either train without the "
            "cap (set model.config.final_logit_softcapping = None; the teacher's targets are unaffected) or compute "
            "the logits and use softcache.kernels.sparse_kl_loss"
        )
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__}.get_output_embeddings() returned {head!r}, not a linear output layer")
    factor = 1.0
    for name, apply in (("logit_scale", lambda f, v: f * v), ("lm_head_multiplier", lambda f, v: f * v),
                        ("logits_scaling", lambda f, v: f / v)):  # fmt: skip
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 1:
            factor = apply(factor, float(value))
    bias = getattr(head, "bias", None)
    if bias is not None and factor != 1.0:
        raise ValueError(f"{type(model).__name__} scales biased logits by {factor}; this is not supported")
    return head.weight, bias, factor


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF labels (= input_ids) to the label each position predicts: labels[t + 1], ignore_index at the end."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def final_hidden_states(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    check_head: bool = True,
    forward=None,
    model_kwargs: dict | None = None,
):
    """Run a causal LM once and keep what the fused loss needs instead of its (B, T, V) logits.

    Args:
        model: a transformers ``*ForCausalLM`` (anything with ``get_decoder()``, ``get_output_embeddings()`` and a
            forward that takes ``logits_to_keep``).
        input_ids, attention_mask: the inputs (B, T).
        check_head: compare the model's own last-position logits with the output layer applied to the kept hidden
            states and raise ValueError if they differ (a transform after the output layer that softcache does not
            know). Costs (B, V) logits.
        forward: the callable that runs the model, e.g. its ``DistributedDataParallel`` wrapper (DDP synchronises
            gradients only through its own forward); default: ``model``.
        model_kwargs: extra keyword arguments for the model's forward.

    Returns:
        (hidden (B, T, H) with linear logit scales folded in, weight (V, H), bias (V,) or None, outputs): the
        model's logits are ``hidden @ weight.T + bias``.
    """
    weight, bias, factor = output_layer(model)
    decoder = model.get_decoder()
    kept = {}

    def keep(module, args, output):
        kept["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
        kept["autocast"] = torch.is_autocast_enabled(kept["hidden"].device.type)

    kwargs = dict(model_kwargs or {})
    kwargs.setdefault("use_cache", False)
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    handle = decoder.register_forward_hook(keep)
    try:
        if takes_keep:
            run = model if forward is None else forward
            outputs = run(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, **kwargs)
        else:  # no way to skip the full logits inside the model: run the decoder alone, unchecked
            outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    if "hidden" not in kept:
        raise ValueError(f"{type(model).__name__}.get_decoder() did not run in forward; its hidden states are unknown")
    hidden = kept["hidden"]
    if factor != 1.0:
        hidden = hidden * factor
    if check_head and takes_keep:
        _check_last_logits(model, outputs.logits, hidden, weight, bias, kept["autocast"])
    return hidden, weight, bias, outputs


def causal_lm_sparse_kl_loss(
    model,
    input_ids: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    check_head: bool = True,
    return_outputs: bool = False,
    forward=None,
    model_kwargs: dict | None = None,
    vocab_size: int | None = None,
    **loss_options,
):
    """``fused_linear_sparse_kl_loss`` on a causal LM's final hidden states and output layer.

    Args:
        model, input_ids, attention_mask, check_head, forward, model_kwargs: as in :func:`final_hidden_states`.
        target_ids, target_logprobs: (B, T, K) teacher targets aligned with input positions: position t holds the
            distribution of the token at t + 1, i.e. what the logits at t predict (softcache's cache layout).
        vocab_size: the cache's vocabulary size (``dataset.vocab_size``). A student whose output layer is padded
            larger (e.g. to a multiple of 64) is scored over the first ``vocab_size`` logits only, as if its
            vocabulary were the cache's; without it the padded logits would take probability mass. Pass it whenever
            ``dataset.check_student(model)`` returns more than 0; larger than the output layer: ValueError.
        labels: HF convention (labels = input_ids, -100 where ignored); shifted here to the token each position
            predicts, so the last position and ignored tokens do not count.
        return_outputs: also return the model's outputs (for auxiliary losses such as MoE router losses).
        **loss_options: keyword options of ``fused_linear_sparse_kl_loss`` (temperature, kind, tail, alpha, ...),
            among them ``check_ids`` and ``check_inputs`` (on by default: NaN, +inf or positive teacher log-probs
            raise ValueError naming the row; one host sync per call, none with both False).

    Returns:
        the loss, or (loss, outputs) with ``return_outputs``.
    """
    hidden, weight, bias, outputs = final_hidden_states(
        model, input_ids, attention_mask=attention_mask, check_head=check_head, forward=forward,
        model_kwargs=model_kwargs,
    )  # fmt: skip
    if vocab_size is not None:
        if not 0 < int(vocab_size) <= weight.shape[0]:
            raise ValueError(
                f"vocab_size={vocab_size} but {type(model).__name__} has {weight.shape[0]} output rows: pass the "
                "cache's vocabulary size (dataset.vocab_size), which the student's output layer must cover"
            )
        weight, bias = weight[: int(vocab_size)], None if bias is None else bias[: int(vocab_size)]
    ignore_index = loss_options.get("ignore_index", -100)
    shifted = shift_labels(labels, ignore_index) if labels is not None else None
    loss = fused_linear_sparse_kl_loss(hidden, weight, target_ids, target_logprobs, bias, labels=shifted,
                                       **loss_options)  # fmt: skip
    return (loss, outputs) if return_outputs else loss


def _check_last_logits(model, logits, hidden, weight, bias, autocast):
    with torch.no_grad():
        h = hidden[:, -1]
        mine = (h @ weight.to(h.dtype).T + (bias.to(h.dtype) if bias is not None else 0)).float()
        theirs = logits[:, -1].float()
        exact = not autocast and h.dtype in (torch.float32, torch.float64)  # autocast: the model's head ran in 16 bits
        tol = 1e-4 if exact else 2e-2
        err = float((mine - theirs).abs().max())
        scale = max(float(theirs.abs().max()), 1.0)
    if not err <= tol * scale:
        raise ValueError(
            f"{type(model).__name__}'s logits differ from its output layer applied to its final hidden states "
            f"(max difference {err:.3g} at logit scale {scale:.3g}): the model transforms its logits after "
            "get_output_embeddings() in a way softcache does not know, so the fused loss would train the wrong "
            "thing. Compute the logits and use softcache.kernels.sparse_kl_loss, or pass check_head=False if the "
            "difference is intended"
        )
