"""What of the teacher besides its next-token distribution a build stores: hidden states and attention maps.

``--hidden-states 0,4,-1`` names layers of the model's ``hidden_states`` output (0 = the embeddings, negative from the
end), stored per token as bf16/fp16/int8, optionally projected to ``--hidden-project D`` dimensions by a seeded random
orthogonal matrix; ``--attentions 0,-1`` names attention layers, stored per sequence as (heads, L, L) bf16, for
sequences of at most 512 tokens. The options are checked before the teacher loads; the layers are resolved against it.
"""

from __future__ import annotations

from ..errors import TeacherError
from ..extras import Attentions, HiddenStates


def check_features(hidden_states, hidden_dtype: str, hidden_project, attentions, max_length: int) -> None:
    """The checks that need no teacher (before it loads)."""
    if hidden_dtype not in HiddenStates.DTYPES:
        raise ValueError(f"--hidden-dtype must be one of {', '.join(HiddenStates.DTYPES)}, got {hidden_dtype!r}")
    if hidden_project is not None and (hidden_states is None or hidden_project < 1):
        raise ValueError("--hidden-project D needs --hidden-states and a positive D")
    for option, layers in (("--hidden-states", hidden_states), ("--attentions", attentions)):
        if layers is not None and (not layers or len(set(layers)) != len(layers)):
            raise ValueError(f"{option} needs distinct layer indices, e.g. 0,4,-1; got {layers!r}")
    if attentions is not None and max_length > Attentions.MAX_LENGTH:
        raise ValueError(
            f"--attentions stores (heads, L, L) per sequence: it needs --max-length ≤ {Attentions.MAX_LENGTH} "
            f"(got {max_length}); attention maps of longer sequences cost {max_length * 2:,}+ bytes per token per head"
        )


def _resolve(layers: list[int], count: int, option: str, what: str) -> list[int]:
    out = [layer + count if layer < 0 else layer for layer in layers]
    if any(not 0 <= layer < count for layer in out):
        raise TeacherError(f"{option} {layers}: the teacher has {count} {what} (indices 0..{count - 1}, or negative)")
    if len(set(out)) != len(out):
        raise TeacherError(f"{option} {layers} names a layer twice")
    return out


def features(model, hidden_states, hidden_dtype, hidden_project, attentions, seed: int):
    """The configured extras (HiddenStates, Attentions, either None) for this teacher; switches the model to eager
    attention when attention maps are stored (the fused kernels do not return them)."""
    config = model.config
    n_layers, width = int(config.num_hidden_layers), int(config.hidden_size)
    hidden = attn = None
    if hidden_states is not None:
        layers = _resolve(hidden_states, n_layers + 1, "--hidden-states", "hidden states (embeddings + each layer)")
        if hidden_project is not None:
            if hidden_project > width:
                raise TeacherError(f"--hidden-project {hidden_project} is wider than the teacher's hidden size {width}")
            hidden = HiddenStates.projected(layers, width, hidden_project, seed, hidden_dtype)
        else:
            hidden = HiddenStates(layers, width, hidden_dtype)
    if attentions is not None:
        attn = Attentions(_resolve(attentions, n_layers, "--attentions", "attention layers"),
                          int(config.num_attention_heads))
        model.set_attn_implementation("eager")
    return hidden, attn


def feature_size_note(hidden: HiddenStates | None, attn: Attentions | None, max_length: int) -> str:
    """The storage the features will take, before compression, printed before the build starts."""
    parts = []
    if hidden is not None:
        parts.append(
            f"hidden states: {len(hidden.layers)} layers × {hidden.width} × {hidden.dtype} = "
            f"{hidden.bytes_per_token():,} B/token"
        )
    if attn is not None:
        parts.append(
            f"attentions: {len(attn.layers)} layers × {attn.heads} heads × L × bf16 = "
            f"{attn.bytes_per_token(max_length):,} B/token at L = {max_length}"
        )
    return "storing " + "; ".join(parts) + " (before zstd; the targets come on top)"
