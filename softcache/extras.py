"""Extra streams a cache may hold beside the targets (whatever their kind): one class each, configured per cache.

* :class:`LossMask`: which tokens are trained (chat assistant turns, completions); one bit per token.
* :class:`HiddenStates`: the teacher's hidden states at chosen layers, ``(L, H)`` per layer, as bf16/fp16 (exact) or
  int8 with a per-row absmax scale (error ≤ absmax/254 per element), optionally projected to ``D`` dimensions by a
  seeded random orthogonal matrix; for feature distillation (DistilBERT's cosine, TinyBERT's MSE).
* :class:`Attentions`: the teacher's attention probabilities at chosen layers, ``(heads, L, L)`` per sequence, bf16.
* :class:`MLMLabels`: a masked-LM cache (``objective: mlm``): per token the original id where the input was masked
  (the input ids hold what the teacher saw), −1 elsewhere; targets are stored only at the masked positions, unshifted.

A configured extra is recorded in the manifest (``extras``: name → settings), repeated in every shard header, and
knows its streams, what a writer may hand it (:meth:`Extra.check`), its codec, and how a record is cut from a
decoded batch (:meth:`Extra.item`). Adding a kind of stream is one class here plus where it is produced.
"""

from __future__ import annotations

import hashlib

import numpy as np

from . import codec
from .kinds import as_array


class Extra:
    """One configured extra stream. Subclasses set ``name`` and implement the methods."""

    name: str

    @classmethod
    def from_settings(cls, settings: dict) -> Extra:
        """From the manifest's settings (a ValueError says what is wrong)."""
        if settings:
            raise ValueError(f"{cls.name} takes no settings, got {settings!r}")
        return cls()

    def settings(self) -> dict:
        return {}

    def streams(self) -> list[str]:
        return [self.name]

    def check(self, value, length: int):
        """Validate what a writer is given for one sequence of ``length`` tokens → what is stored."""
        raise NotImplementedError

    def encode(self, values: list, lengths: np.ndarray) -> dict[str, np.ndarray]:
        """The checked values of a batch's sequences → named uint8 streams."""
        raise NotImplementedError

    def decode(self, streams: dict, lengths: np.ndarray) -> dict:
        """The streams of a batch → entries of the decoded batch (arrays over its tokens, or per sequence)."""
        raise NotImplementedError

    def item(self, decoded: dict, j: int, a: int, b: int) -> dict:
        """The entries of record ``j`` (tokens ``a:b`` of the batch; ``b`` may cut the sequence short)."""
        return {key: decoded[key][a:b] for key in self.decoded_keys()}

    def decoded_keys(self) -> list[str]:
        return [self.name]


class LossMask(Extra):
    """Which tokens are trained (e.g. the assistant turns of chat data, the completion of prompt/completion data), in
    the Hugging Face sense of ``labels != -100``: token ``t`` is trained when the student's logits at ``t − 1`` should
    predict it. The targets at position ``t`` (which predict token ``t + 1``) are stored only where token ``t + 1`` is
    trained; elsewhere the position stores no targets and costs one bit."""

    name = "loss_mask"

    def check(self, value, length):
        mask = as_array(value, "loss_mask")
        if mask.shape != (length,):
            raise ValueError(f"loss_mask must have one value per token, shape ({length},), got {tuple(mask.shape)}")
        if mask.dtype != np.bool_ and not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
            raise ValueError(f"loss_mask must hold booleans (or 0/1), got dtype {mask.dtype}")
        return mask.astype(bool)

    def encode(self, values, lengths):
        return {"loss_mask": np.packbits(np.concatenate(values))}

    def decode(self, streams, lengths):
        n_tokens = int(lengths.sum())
        stream = streams["loss_mask"]
        if len(stream) != -(-n_tokens // 8):
            raise ValueError(f"loss_mask holds {len(stream)} bytes, not the {-(-n_tokens // 8)} of {n_tokens} tokens")
        return {"loss_mask": np.unpackbits(stream, count=n_tokens).astype(bool)}

    @staticmethod
    def targets_stored(mask: np.ndarray) -> np.ndarray:
        """Positions whose targets are stored: those whose next token is trained (never the last one)."""
        return np.append(mask[1:], False)


def _check_layers(layers, what: str) -> None:
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise ValueError(f"{what} layers must be non-negative layer indices, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{what} layers must be distinct, got {layers!r}")


def _per_layer(value, name: str, layers: list[int], shape: tuple[int, ...]) -> dict[int, np.ndarray]:
    """A writer's ``{layer: array}`` for one sequence, checked: exactly ``layers``, each ``shape``, finite; float32."""
    if not isinstance(value, dict) or sorted(value) != sorted(layers):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{name} must be a dict of layers {layers} → arrays of shape {shape}, got {got}")
    out = {}
    for layer in layers:
        array = as_array(value[layer], f"{name}[{layer}]", np.floating).astype(np.float32)
        if array.shape != shape:
            raise ValueError(f"{name}[{layer}] must have shape {shape}, got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name}[{layer}] holds NaN or inf")
        out[layer] = array
    return out


def _float_bytes(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values → bf16/fp16 bytes, byte-shuffled (all low bytes, then all high bytes: zstd compresses the
    sign/exponent plane far better than interleaved bytes). bf16 rounds to nearest even."""
    if dtype == "fp16":
        raw = x.astype(np.float16).view(np.uint16)
    else:
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
        raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(raw.view(np.uint8).reshape(-1, 2).T).reshape(-1)


def _float_values(stream: np.ndarray, dtype: str, count: int) -> np.ndarray:
    if len(stream) != 2 * count:
        raise ValueError(f"a {dtype} stream of {count} values must hold {2 * count} bytes, not {len(stream)}")
    raw = np.ascontiguousarray(stream.reshape(2, count).T).reshape(-1).view(np.uint16)
    if dtype == "fp16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.astype(np.uint32) << 16).view(np.float32)


class HiddenStates(Extra):
    """The teacher's hidden states at ``layers`` (indices of ``output_hidden_states``: 0 = embeddings), width
    ``width`` (``D`` when projected), stored as ``dtype``: ``bf16``/``fp16`` (decoded exactly to the value stored)
    or ``int8`` (per-row absmax scale kept in float32; error ≤ absmax/254 per element). With ``projection`` =
    ``{"seed": s, "from": H}``, the states were multiplied by :meth:`projection_matrix` (H × D, orthonormal columns)
    before storing: distances and angles are kept, not the coordinates. Values are taken as float32 (what a model
    gives) and rounded to nearest even from there."""

    name = "hidden_states"
    DTYPES = ("bf16", "fp16", "int8")

    def __init__(self, layers, width: int, dtype: str = "bf16", projection: dict | None = None) -> None:
        _check_layers(layers, "hidden state")
        if not isinstance(width, int) or not 1 <= width <= 1 << 16:
            raise ValueError(f"hidden state width must be an integer in [1, 65536], got {width!r}")
        if dtype not in self.DTYPES:
            raise ValueError(f"hidden state dtype must be one of {', '.join(self.DTYPES)}, got {dtype!r}")
        if projection is not None and (
            set(projection) != {"seed", "from", "sha256"} or not isinstance(projection["from"], int)
        ):
            raise ValueError(f"projection must hold seed, from and sha256, got {projection!r}")
        self.layers, self.width, self.dtype, self.projection = list(layers), width, dtype, projection

    @classmethod
    def from_settings(cls, settings):
        try:
            return cls(settings["layers"], settings["width"], settings["dtype"], settings.get("projection"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"hidden_states settings {settings!r} are incomplete ({e})") from None

    def settings(self):
        out = {"layers": self.layers, "width": self.width, "dtype": self.dtype}
        if self.projection is not None:
            out["projection"] = self.projection
        return out

    def bytes_per_token(self) -> int:
        return len(self.layers) * (self.width * (1 if self.dtype == "int8" else 2) + (4 if self.dtype == "int8" else 0))

    @staticmethod
    def projection_matrix(seed: int, width_in: int, width_out: int) -> np.ndarray:
        """A seeded random matrix with orthonormal columns, (width_in, width_out), float32; the same on every
        machine (float64 QR of a PCG64 Gaussian, signs fixed by the diagonal of R)."""
        if not 1 <= width_out <= width_in:
            raise ValueError(f"can only project {width_in} dimensions down to 1..{width_in}, not {width_out}")
        gauss = np.random.default_rng(seed).standard_normal((width_in, width_out))
        q, r = np.linalg.qr(gauss)
        return (q * np.sign(np.diag(r))).astype(np.float32)

    @classmethod
    def projected(cls, layers, width_in: int, width_out: int, seed: int, dtype: str = "bf16") -> HiddenStates:
        matrix = cls.projection_matrix(seed, width_in, width_out)
        digest = hashlib.sha256(matrix.tobytes()).hexdigest()
        return cls(layers, width_out, dtype, {"seed": seed, "from": width_in, "sha256": digest})

    def streams(self):
        names = [f"hidden_{layer}" for layer in self.layers]
        if self.dtype == "int8":
            names += [f"hidden_{layer}_scale" for layer in self.layers]
        return names

    def check(self, value, length):
        return _per_layer(value, "hidden_states", self.layers, (length, self.width))

    def encode(self, values, lengths):
        streams = {}
        for layer in self.layers:
            h = np.concatenate([v[layer] for v in values])
            if self.dtype == "int8":
                scale = np.abs(h).max(-1) / 127
                safe = np.where(scale > 0, scale, 1)
                streams[f"hidden_{layer}"] = np.rint(h / safe[:, None]).astype(np.int8).view(np.uint8)
                streams[f"hidden_{layer}_scale"] = scale.astype(np.float32).view(np.uint8)
            else:
                streams[f"hidden_{layer}"] = _float_bytes(h, self.dtype)
        return streams

    def decode(self, streams, lengths):
        n = int(lengths.sum())
        out = {}
        for layer in self.layers:
            stream = streams[f"hidden_{layer}"]
            if self.dtype == "int8":
                scale = streams[f"hidden_{layer}_scale"]
                if len(stream) != n * self.width or len(scale) != 4 * n:
                    raise ValueError(f"hidden_{layer}: {len(stream)} bytes and {len(scale)} scale bytes for {n} rows")
                h = stream.view(np.int8).reshape(n, self.width).astype(np.float32) * scale.view(np.float32)[:, None]
            else:
                h = _float_values(stream, self.dtype, n * self.width).reshape(n, self.width)
            out[layer] = h
        return {"teacher_hidden": out}

    def decoded_keys(self):
        return ["teacher_hidden"]

    def item(self, decoded, j, a, b):
        return {"teacher_hidden": {layer: h[a:b] for layer, h in decoded["teacher_hidden"].items()}}


class Attentions(Extra):
    """The teacher's attention probabilities at ``layers``: per sequence ``(heads, L, L)`` per layer, bf16 (each
    decoded value is the stored bf16 exactly). Quadratic in the length: ``heads × L × 2`` bytes per token and layer,
    so builds refuse sequences longer than :data:`MAX_LENGTH`."""

    name = "attentions"
    MAX_LENGTH = 512

    def __init__(self, layers, heads: int) -> None:
        _check_layers(layers, "attention")
        if not isinstance(heads, int) or not 1 <= heads <= 1024:
            raise ValueError(f"attention heads must be an integer in [1, 1024], got {heads!r}")
        self.layers, self.heads = list(layers), heads

    @classmethod
    def from_settings(cls, settings):
        try:
            return cls(settings["layers"], settings["heads"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"attentions settings {settings!r} are incomplete ({e})") from None

    def settings(self):
        return {"layers": self.layers, "heads": self.heads}

    def bytes_per_token(self, length: int) -> int:
        return len(self.layers) * self.heads * length * 2

    def streams(self):
        return [f"attention_{layer}" for layer in self.layers]

    def check(self, value, length):
        if length > self.MAX_LENGTH:
            raise ValueError(f"attentions are stored for sequences of at most {self.MAX_LENGTH} tokens, not {length}")
        return _per_layer(value, "attentions", self.layers, (self.heads, length, length))

    def encode(self, values, lengths):
        return {
            f"attention_{layer}": _float_bytes(np.concatenate([v[layer].reshape(-1) for v in values]), "bf16")
            for layer in self.layers
        }

    def decode(self, streams, lengths):
        sizes = self.heads * lengths.astype(np.int64) ** 2
        starts = np.concatenate([[0], np.cumsum(sizes)])
        per_layer = {
            layer: _float_values(streams[f"attention_{layer}"], "bf16", int(starts[-1])) for layer in self.layers
        }
        sequences = [
            {layer: flat[starts[s] : starts[s + 1]].reshape(self.heads, n, n) for layer, flat in per_layer.items()}
            for s, n in enumerate(lengths.tolist())
        ]
        return {"teacher_attentions": sequences}

    def decoded_keys(self):
        return ["teacher_attentions"]

    def item(self, decoded, j, a, b):
        n = b - a  # a truncated record keeps the top-left block: attention among the kept tokens
        return {"teacher_attentions": {layer: m[:, :n, :n] for layer, m in decoded["teacher_attentions"][j].items()}}


class MLMLabels(Extra):
    """A masked-LM cache: the stored ``input_ids`` are the corrupted ids the teacher saw, and this stream holds per
    token the original id at the masked (chosen) positions, −1 elsewhere. Targets are not shifted: position ``t``
    holds the teacher's distribution of token ``t``, stored only at the masked positions. Settings: ``objective``
    (``"mlm"``), the masking ``probability`` and ``copies`` (differently-masked copies written of each sequence)."""

    name = "mlm_labels"

    def __init__(self, probability: float = 0.15, copies: int = 1) -> None:
        if not isinstance(probability, (int, float)) or isinstance(probability, bool) or not 0 < probability < 1:
            raise ValueError(f"the masking probability must lie in (0, 1), got {probability!r}")
        if not isinstance(copies, int) or isinstance(copies, bool) or not 1 <= copies <= 1024:
            raise ValueError(f"mask copies must be an integer in [1, 1024], got {copies!r}")
        self.probability, self.copies = float(probability), copies

    @classmethod
    def from_settings(cls, settings):
        if settings.get("objective") != "mlm" or set(settings) != {"objective", "probability", "copies"}:
            raise ValueError(f"mlm_labels settings must hold objective 'mlm', probability and copies, got {settings!r}")
        return cls(settings["probability"], settings["copies"])

    def settings(self):
        return {"objective": "mlm", "probability": self.probability, "copies": self.copies}

    def check(self, value, length):
        labels = as_array(value, "mlm_labels", np.integer).astype(np.int64)
        if labels.shape != (length,):
            raise ValueError(f"mlm_labels must have one value per token, shape ({length},), got {tuple(labels.shape)}")
        if labels.size and labels.min() < -1:
            raise ValueError("mlm_labels must be token ids at masked positions and -1 elsewhere")
        return labels

    def encode(self, values, lengths):
        return {"mlm_labels": codec.encode_tokens(np.concatenate(values) + 1)}  # 0: not masked

    def decode(self, streams, lengths):
        return {"mlm_labels": codec.decode_tokens(streams["mlm_labels"], int(lengths.sum())) - 1}

    def corrupt(self, input_ids: np.ndarray, *, mask_id: int, vocab_size: int, special_ids, seed: int, index: int,
                copy: int) -> tuple[np.ndarray, np.ndarray]:
        """BERT's masking of one sequence → (corrupted ids, labels: the original id where chosen, −1 elsewhere).

        Each token that is not a special token is chosen with ``probability``; a chosen token becomes ``mask_id``
        (80 %), a uniformly random id below ``vocab_size`` (10 %) or stays (10 %). Seeded by (``seed``, ``index``,
        ``copy``) with numpy's PCG64, so the same on every machine and in a resumed build."""
        ids = np.asarray(input_ids, np.int64)
        rng = np.random.default_rng([int(seed), int(index), int(copy)])
        u = rng.random((2, len(ids)))
        random_ids = rng.integers(0, vocab_size, len(ids))
        chosen = (u[0] < self.probability) & ~np.isin(ids, np.asarray(list(special_ids), np.int64))
        corrupted = ids.copy()
        corrupted[chosen & (u[1] < 0.8)] = mask_id
        swap = chosen & (u[1] >= 0.8) & (u[1] < 0.9)
        corrupted[swap] = random_ids[swap]
        return corrupted, np.where(chosen, ids, -1)


EXTRAS: dict[str, type[Extra]] = {cls.name: cls for cls in (LossMask, HiddenStates, Attentions, MLMLabels)}


def configure(extras: dict) -> list[Extra]:
    """The manifest's ``extras`` (name → settings) → configured extras, in the manifest's order."""
    return [EXTRAS[name].from_settings(settings) for name, settings in extras.items()]
