"""The teacher side of the build: load a Hugging Face causal LM, run its body, and turn hidden states
into sparse targets through the output layer in row chunks, so (batch × length × V) logits never exist.

``TeacherHead.batch_targets`` runs the body over a batch and hands the output layer's logits, a row chunk at a
time on the model's device, to a :class:`~softcache.sparsify.Sparsifier` (the same one ``CacheWriter.write_logits``
uses), so a build and the writer store the same targets for the same logits and seed.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

import numpy as np
import torch

from .._version import __version__
from ..errors import TeacherError
from ..extras import Attentions, HiddenStates
from ..identity import config_hash, vocab_fingerprint
from ..kinds import TopK
from ..sparsify import Sparsifier
from .distributed import Dist
from .gguf import find_gguf, load_gguf
from .gguf import teacher_info as gguf_teacher_info

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str | None, local_rank: int | None = None) -> str:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and local_rank is not None:
        device = f"cuda:{local_rank}"
    return device


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise TeacherError(f"--dtype {dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def load_teacher(path: str, revision: str | None, trust_remote_code: bool, dtype: torch.dtype, device: str,
                 progress: bool = False, objective: str = "causal"):
    """→ (model, tokenizer); ``device == "map"`` spreads the model over the GPUs with ``device_map="auto"``.
    ``objective="mlm"``: a masked LM (``AutoModelForMaskedLM``)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if device == "map":
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise TeacherError("--device map spreads the teacher with device_map='auto', which needs accelerate: "
                               "pip install accelerate")
    if objective == "mlm":
        AutoModelForCausalLM = AutoModelForMaskedLM  # noqa: N806 - the same loading, another head
    if objective == "causal" and (gguf_file := find_gguf(path)) is not None:  # llama.cpp GGUF, de-quantised to dtype
        model, tokenizer = load_gguf(gguf_file, dtype, device)
        model.eval()
        return model, tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if device == "map":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(device)
    except (OSError, ValueError) as e:
        raise TeacherError(
            f"--teacher {path}: cannot load a {'masked' if objective == 'mlm' else 'causal'} LM and its tokenizer "
            f"({type(e).__name__}: {e}). Give a local folder written by save_pretrained (config.json, weights, "
            "tokenizer files); custom code needs --trust-remote-code"
        ) from None
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class RunSetup:
    """Where a teacher pass runs: its rank in a torchrun job, the device and dtype, whether it shows progress."""

    dist: Dist
    device: str
    dtype: torch.dtype
    show: bool


def run_setup(device: str | None, dtype: str | None, quiet: bool, targets: str, samples: int | None) -> RunSetup:
    """The start of every teacher pass (build, generate): the rank (initialising torch.distributed under torchrun),
    the device (``map``: spread over the GPUs), the dtype, progress on rank 0 of a terminal; and the first check."""
    if targets == "sampled" and samples is None:
        raise ValueError("--targets sampled needs --samples N (draws per position, e.g. 50)")
    dist = Dist.from_env(device)
    dev = "map" if device == "map" else resolve_device(device, dist.local_rank)
    torch_dtype = resolve_dtype(dtype, "cuda" if dev == "map" else dev)
    return RunSetup(dist, dev, torch_dtype, not quiet and dist.rank == 0 and sys.stderr.isatty())


def teacher_identity(path: str, revision: str | None, model, tokenizer, dtype: torch.dtype, command: str | None):
    """What names a teacher in a manifest. → (build identity entries: config and vocabulary hashes, dtype, and the
    GGUF file's hash for a GGUF teacher, since another quantisation is another build; metadata entries: teacher,
    tokenizer, softcache version, command)."""
    gguf = gguf_teacher_info(path)  # file name, sha256, quantisation; None unless the teacher is a GGUF file
    identity = {
        "teacher_config_sha256": config_hash(model.config),
        "tokenizer_vocab_sha256": vocab_fingerprint(tokenizer),
        "dtype": str(dtype).removeprefix("torch."),
    }
    if gguf is not None:
        identity["teacher_gguf_sha256"] = gguf["sha256"]
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    metadata = {
        "teacher": {"path": os.path.abspath(path) if os.path.exists(path) else path, "revision": revision,
                    "class": type(model).__name__, "config_sha256": identity["teacher_config_sha256"],
                    "dtype": identity["dtype"], "vocab_size": vocab, **({"gguf": gguf} if gguf else {})},
        "tokenizer": {"vocab_sha256": identity["tokenizer_vocab_sha256"], "size": len(tokenizer)},
        "softcache_version": __version__,
        "command": command if command is not None else shlex.join(sys.argv),
    }  # fmt: skip
    return identity, metadata


@dataclass
class TeacherHead:
    """The body/output-layer split of a causal LM and the target computation over row chunks."""

    model: torch.nn.Module
    sparsifier: Sparsifier
    chunk_elements: int = 1 << 24
    hidden_states: HiddenStates | None = None
    attentions: Attentions | None = None

    def __post_init__(self) -> None:
        m = self.model
        self.body = m.get_decoder() if hasattr(m, "get_decoder") else m.base_model
        self.head = m.get_output_embeddings()
        if self.body is None or self.body is m or self.head is None:
            raise TeacherError(
                f"{type(m).__name__} does not expose its transformer body (get_decoder) and output layer "
                "(get_output_embeddings); softcache build needs both to avoid materialising full logits"
            )
        self.vocab_size = int(self.head.weight.shape[0])
        cfg = m.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        self.divide = getattr(cfg, "logits_scaling", None)  # Granite divides
        self.input_device = next(self.body.parameters()).device
        self.projection = None
        if self.hidden_states is not None and self.hidden_states.projection is not None:
            p = self.hidden_states.projection
            matrix = HiddenStates.projection_matrix(p["seed"], p["from"], self.hidden_states.width)
            self.projection = torch.from_numpy(matrix)
        self._features: dict = {}

    # -- forward -------------------------------------------------------------------------------

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: bool = False) -> torch.Tensor:
        """The body's last hidden states; with ``features``, the hidden states and attentions the cache stores are
        kept in ``self._features`` (layer → batch tensors) for :meth:`batch_targets`."""
        want_h, want_a = features and self.hidden_states is not None, features and self.attentions is not None
        out = self.body(input_ids=input_ids.to(self.input_device), attention_mask=attention_mask.to(self.input_device),
                        use_cache=False, output_hidden_states=want_h, output_attentions=want_a)
        self._features = {}
        if want_h:
            self._features["hidden_states"] = {layer: out.hidden_states[layer] for layer in self.hidden_states.layers}
        if want_a:
            self._features["attentions"] = {layer: out.attentions[layer] for layer in self.attentions.layers}
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _sequence_features(self, b: int, length: int) -> dict:
        """The stored features of sequence ``b`` of the last batch, as float32 numpy arrays."""
        out = {}
        for name, layers in self._features.items():
            if name == "hidden_states":
                out[name] = {}
                for layer, h in layers.items():
                    h = h[b, :length].float()
                    if self.projection is not None:
                        h = h @ self.projection.to(h.device)
                    out[name][layer] = h.cpu().numpy()
            else:
                out[name] = {layer: a[b, :, :length, :length].float().cpu().numpy() for layer, a in layers.items()}
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output layer on some rows of hidden states → fp32 logits (rows, V)."""
        z = self.head(h.to(self.head.weight.device)).float()
        if self.scale is not None:
            z = z * self.scale
        if self.divide is not None:
            z = z / self.divide
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def check_against_full_forward(self, input_ids: torch.Tensor) -> None:
        """The split must reproduce ``model(...).logits``: checked once on a short probe."""
        mask = torch.ones_like(input_ids)
        full = self.model(input_ids=input_ids.to(self.input_device), attention_mask=mask.to(self.input_device),
                          use_cache=False).logits.float()
        mine = self.logits(self.hidden(input_ids, mask))
        tol = 1e-3 if self.head.weight.dtype == torch.float32 else 5e-2
        full = full.to(mine.device)
        finite = torch.isfinite(full) & torch.isfinite(mine)  # NaN logits are reported per sequence later
        err = (full - mine)[finite].abs().max().item() if finite.any() else 0.0
        if not err <= tol * max(1.0, full[finite].abs().max().item() if finite.any() else 1.0):
            raise TeacherError(
                f"{type(self.model).__name__}: body + output layer differ from the model's own logits by {err:.3g}; "
                "this architecture post-processes its logits in a way softcache does not know. Please report it"
            )

    # -- targets -------------------------------------------------------------------------------

    @torch.inference_mode()
    def batch_targets(self, input_ids: torch.Tensor, lengths: list[int], seq_index: list[int]):
        """Targets of a right-padded batch. → (per-sequence results, bad sequence positions in the batch).

        Each result is (target_ids (L, k) int32, values (L, k): log-probs float32 or counts int32,
        lognorm (L, n_temps) float64 or None, the extras the cache stores: hidden states, attentions; or None).
        """
        lengths_t = torch.tensor(lengths)
        mask = (torch.arange(input_ids.shape[1])[None] < lengths_t[:, None]).long()
        h = self.hidden(input_ids, mask, features=True)
        rows = h[mask.to(h.device).bool()]  # (N, H) valid positions, sequence after sequence
        owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
        uniforms = self.sparsifier.uniforms(lengths, seq_index, rows.device)
        step = max(1, self.chunk_elements // self.vocab_size)
        ids, vals, norms, bad = [], [], [], torch.zeros(len(lengths), dtype=torch.bool)
        for a in range(0, rows.shape[0], step):
            u = None if uniforms is None else uniforms[a : a + step]
            i, v, n, broken = self.sparsifier.rows(self.logits(rows[a : a + step]), u)
            bad[owner[a : a + step][broken.cpu()]] = True
            ids.append(i)
            vals.append(v)
            if n is not None:
                norms.append(n)
        ids = torch.cat(ids).cpu().numpy()
        vals = torch.cat(vals).cpu().numpy()
        norms = torch.cat(norms).cpu().double().numpy() if norms else None
        ends = np.cumsum(lengths)
        out = []
        for b, end in enumerate(ends):
            s = slice(end - lengths[b], end)
            features = self._sequence_features(b, lengths[b]) or None
            out.append((ids[s], vals[s], None if norms is None else norms[s], features))
        return out, [b for b in range(len(lengths)) if bad[b]]


@dataclass
class MaskedLMHead(TeacherHead):
    """A masked LM's targets (``softcache build --objective mlm``): the full model runs over the corrupted ids (an MLM
    head transforms the hidden states before its output layer, so there is no body/output-layer split) and its
    logits at the masked positions, in row chunks, go through the same :class:`~softcache.sparsify.Sparsifier`.
    Targets are not shifted: position ``t`` holds the distribution of token ``t``; positions that were not masked
    store none. ``labels(i)``: the labels of sequence ``i`` (original id where masked, −1 elsewhere)."""

    labels: object = None

    def __post_init__(self) -> None:
        m = self.model
        self.head = m.get_output_embeddings()
        if self.head is None:
            raise TeacherError(f"{type(m).__name__} has no output layer (get_output_embeddings)")
        self.vocab_size = int(self.head.weight.shape[0])
        self.input_device = next(m.parameters()).device
        self.projection = None
        if self.hidden_states is not None and self.hidden_states.projection is not None:
            p = self.hidden_states.projection
            self.projection = torch.from_numpy(HiddenStates.projection_matrix(p["seed"], p["from"],
                                                                              self.hidden_states.width))
        self._features = {}

    def check_against_full_forward(self, input_ids: torch.Tensor) -> None:
        """Nothing to check: the targets come from the model's own logits."""

    def hidden(self, input_ids, attention_mask, features: bool = False) -> torch.Tensor:
        """The model's logits (B, L, V) (and its features, kept as :meth:`TeacherHead.hidden` keeps them)."""
        want_h, want_a = features and self.hidden_states is not None, features and self.attentions is not None
        out = self.model(input_ids=input_ids.to(self.input_device), attention_mask=attention_mask.to(self.input_device),
                         output_hidden_states=want_h, output_attentions=want_a)
        self._features = {}
        if want_h:
            self._features["hidden_states"] = {layer: out.hidden_states[layer] for layer in self.hidden_states.layers}
        if want_a:
            self._features["attentions"] = {layer: out.attentions[layer] for layer in self.attentions.layers}
        return out.logits

    @torch.inference_mode()
    def batch_targets(self, input_ids: torch.Tensor, lengths: list[int], seq_index: list[int]):
        """As :meth:`TeacherHead.batch_targets`, with targets only at the masked positions and the labels among
        the extras."""
        lengths_t = torch.tensor(lengths)
        mask = (torch.arange(input_ids.shape[1])[None] < lengths_t[:, None]).long()
        logits = self.hidden(input_ids, mask, features=True)
        labels = [np.asarray(self.labels(i), np.int64) for i in seq_index]
        chosen = torch.zeros(mask.shape, dtype=torch.bool)
        for b, lab in enumerate(labels):
            chosen[b, : lengths[b]] = torch.from_numpy(lab >= 0)
        rows = logits[chosen.to(logits.device)]  # (M, V) masked positions, sequence after sequence
        counts = chosen.sum(1)
        owner = torch.repeat_interleave(torch.arange(len(lengths)), counts)
        uniforms = self.sparsifier.uniforms(lengths, seq_index, rows.device)
        flat = chosen[mask.bool()]  # masked among the valid positions (the rows of ``uniforms``)
        if uniforms is not None:
            uniforms = uniforms[flat.to(uniforms.device)]
        step = max(1, self.chunk_elements // self.vocab_size)
        ids, vals, norms, bad = [], [], [], torch.zeros(len(lengths), dtype=torch.bool)
        for a in range(0, rows.shape[0], step):
            u = None if uniforms is None else uniforms[a : a + step]
            i, v, n, broken = self.sparsifier.rows(rows[a : a + step].float(), u)
            bad[owner[a : a + step][broken.cpu()]] = True
            ids.append(i.cpu())
            vals.append(v.cpu())
            if n is not None:
                norms.append(n.cpu())
        out = []
        flat = flat.numpy()
        ends = np.cumsum(lengths)
        width, topk = self.sparsifier.k, isinstance(self.sparsifier.kind, TopK)
        all_ids = torch.cat(ids).numpy() if ids else np.zeros((0, width), np.int32)
        all_vals = torch.cat(vals).numpy() if vals else np.zeros((0, width), np.float32 if topk else np.int32)
        all_norms = torch.cat(norms).double().numpy() if norms else np.zeros((0, len(self.sparsifier.temperatures)))
        at = np.cumsum(flat) - 1  # row of each masked position among the computed rows
        for b, end in enumerate(ends):
            s = slice(end - lengths[b], end)
            sel, rows_b = flat[s], at[s][flat[s]]
            t_ids = np.full((lengths[b], width), -1, np.int32)
            t_vals = np.zeros((lengths[b], width), all_vals.dtype)
            t_ids[sel, : all_ids.shape[1]] = all_ids[rows_b]
            t_vals[sel, : all_vals.shape[1]] = all_vals[rows_b]
            t_norm = None
            if topk:  # every position gets normalisers (0 where nothing is stored), as the writer's other sequences
                t_norm = np.zeros((lengths[b], all_norms.shape[1]), np.float64)
                t_norm[sel] = all_norms[rows_b]
            features = self._sequence_features(b, lengths[b])
            features["mlm_labels"] = labels[b]
            out.append((t_ids, t_vals, t_norm, features))
        return out, [b for b in range(len(lengths)) if bad[b]]
