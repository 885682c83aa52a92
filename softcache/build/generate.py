"""``softcache generate``: the teacher answers prompts, and its soft targets at every token it generates are kept.

Sequence-level distillation (R1-style traces) throws away what the teacher computes at every generated token: its
full next-token distribution. ``generate(teacher, prompts, out, ...)`` keeps it. Each prompt (a ``prompt`` text
column, or chat ``messages`` rendered with the chat template and its generation prompt) is answered
``num_return_sequences`` times; each answer is a *sample*, numbered ``prompt index × num_return_sequences + r``. A
sample is written as one sequence, prompt + completion, with a loss mask over the completion (the EOS that ended it
included), so the targets are stored at the last prompt position (it predicts the first completion token) and at
every completion position but the last, and nowhere else (:meth:`softcache.extras.LossMask.targets_stored`).

The targets are computed from the **raw** logits of each step (before temperature, top-k and top-p: the tensor
``transformers`` returns with ``output_logits=True``) by the same :class:`~softcache.sparsify.Sparsifier` as
``softcache build``, one step at a time on the teacher's device, so no (steps × batch × V) logits are ever kept. They
equal what a forward pass of the teacher over prompt + completion gives, up to floating-point reassociation.

Prompts are cut into batches of ``batch_size`` consecutive prompts; the sampler of each batch is seeded from (seed,
its first prompt), so a batch always generates the same samples. Resumable as ``build``: the manifest counts the
committed sequences and the samples ``filter`` rejected, in order; a rerun regenerates the batch it stopped in and
writes only what was not committed. Under ``torchrun`` each rank takes a contiguous run of batches (the samples do not
depend on the number of ranks) and rank 0 merges the ranks' shards (:mod:`.distributed`).

The generated text of every kept sample is written, once the cache is complete, to ``OUT/generations.jsonl``
(``sequence``, ``sample``, ``prompt_index``, ``prompt``, ``completion``; decoded from the cache's tokens), whose name,
line count and SHA-256 the manifest records under ``metadata["generated_text"]``; the settings under
``metadata["generation"]``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError, TeacherError
from ..format import BuildState, join, open_fs
from ..format.fs import tmp_name
from ..format.manifest import MAX_VOCAB
from ..kinds import get_kind
from ..reader import open_cache
from ..sparsify import Sparsifier
from ..writer import CacheWriter, new_manifest
from .distributed import check_out, merge_rank_caches, prepare_out, rank_path
from .inputs import load_rows
from .plan import REJECTED, BackgroundWriter
from .run import BuildResult
from .teacher import load_teacher, run_setup, teacher_identity

TEXTS_NAME = "generations.jsonl"
"""The file, inside the cache, holding the generated text of every kept sample."""


@dataclass
class GenerateResult(BuildResult):
    prompts: int = 0
    rejected: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    texts: str | None = None

    def summary(self) -> str:
        if self.already_complete:
            return (f"{self.out} is complete ({self.sequences:,} samples kept, {self.rejected:,} rejected): "
                    "nothing to do")  # fmt: skip
        rate = self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0
        extra = f", resumed after {self.resumed_sequences:,} samples" if self.resumed_sequences else ""
        return (
            f"wrote {self.out}: {self.sequences:,} samples of {self.prompts:,} prompts kept, {self.rejected:,} "
            f"rejected, {self.tokens:,} tokens, {self.shards} shards, {self.bytes / 1e6:,.1f} MB in "
            f"{self.seconds:.1f}s; generated {self.generated_tokens:,} tokens at {rate:,.0f} tokens/s{extra}; text in "
            f"{self.texts}"
        )


def generate(
    teacher: str,
    prompts: str,
    out: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    seed: int = 0,
    field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    k: int = 64,
    targets: str = "topk",
    samples: int | None = None,
    temperatures=(1.0,),
    batch_size: int = 8,
    dtype: str | None = None,
    device: str | None = None,
    backend: str = "arrow",
    shard_tokens: int = 1 << 20,
    revision: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    filter: Callable[[str, str], bool] | str | None = None,  # noqa: A002 - the name the issue and the CLI use
    quiet: bool = False,
    command: str | None = None,
) -> GenerateResult:
    """Let ``teacher`` answer the prompts of ``prompts`` and write prompt + completion with the teacher's targets at
    every generated token to the cache ``out``.

    Options mirror ``softcache generate --help``: sampling (``max_new_tokens``, ``temperature`` (0: greedy),
    ``top_p``, ``top_k`` (0: off), ``num_return_sequences``, ``seed``), the prompts (``field``, ``split``, ``limit``),
    the targets (``k``, ``targets``, ``samples``, ``temperatures``: as ``build``) and the run (``batch_size`` prompts
    per teacher batch, ...). ``filter(prompt_text, completion_text) -> bool`` (or ``"module:function"``) decides
    which samples are kept; the rejected ones are counted in the manifest's build state. Returns a
    :class:`GenerateResult` (``.summary()`` is the one-line report).
    """
    t0 = time.perf_counter()
    setup = run_setup(device, dtype, quiet, targets, samples)
    dist, dev, torch_dtype, show = setup.dist, setup.device, setup.dtype, setup.show
    temps = [float(t) for t in temperatures]
    sampling = _check_sampling(max_new_tokens, temperature, top_p, top_k, num_return_sequences, batch_size)
    new_manifest(MAX_VOCAB, k, targets, temps, samples, backend)
    keep, filter_name = _resolve_filter(filter)
    check_out(out)
    if not show:
        import datasets

        datasets.disable_progress_bars()
    rows = load_rows(prompts, split, limit)

    model, tokenizer = load_teacher(teacher, revision, trust_remote_code, torch_dtype, dev, show)
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    if k > vocab:
        raise ValueError(f"--k {k} is larger than the teacher's vocabulary ({vocab}); use --k ≤ {vocab}")
    column, texts, ids = _prompts(rows, prompts, tokenizer, field, vocab)
    eos, pad = _special_tokens(model, tokenizer)

    settings = dict(vocab_size=vocab, k=k, targets=targets, temperatures=temps, samples=samples, backend=backend,
                    shard_tokens=shard_tokens, batch_tokens=min(4096, max(1, shard_tokens // 4)), seed=seed,
                    loss_mask=True)  # fmt: skip
    generation = {**sampling, "seed": seed, "eos_token_ids": eos, "pad_token_id": pad, "filter": filter_name}
    identity, described = teacher_identity(teacher, revision, model, tokenizer, torch_dtype, command)
    build_id = {
        "command": "generate",
        **identity,
        "prompts": os.path.abspath(prompts) if os.path.exists(prompts) else prompts,
        "split": split, "field": column, "limit": limit, "k": k, "targets": targets, "samples": samples,
        "temperatures": temps, "backend": backend, "shard_tokens": shard_tokens, "world_size": dist.world,
        **generation,
    }  # fmt: skip
    metadata = {
        **described,
        "build": build_id,
        "generation": {**generation, "prompt_column": column, "chat_template": column == "messages",
                       "targets_from": "raw logits of each generation step (before temperature, top-k, top-p)"},
        "data": {"rows": len(rows), "prompts": len(ids)},
        "loss_mask": {"mode": "completion", "source": "generated tokens"},
    }  # fmt: skip
    n = num_return_sequences
    result = GenerateResult(out=out, is_main=dist.rank == 0, prompts=len(ids))
    done = prepare_out(out, metadata, settings, overwrite, dist)
    if done is None:
        path = out if dist.world == 1 else rank_path(out, dist.rank, dist.world)
        every = [(a, min(a + batch_size, len(ids))) for a in range(0, len(ids), batch_size)]
        mine = every[dist.rank * len(every) // dist.world : (dist.rank + 1) * len(every) // dist.world]
        sparsifier = Sparsifier(get_kind(targets), k, tuple(temps), samples, seed)
        run = _Generation(model, sparsifier, sampling, seed, eos, pad, texts, ids, keep)
        with CacheWriter(path, **settings, metadata=metadata) as writer:
            state = writer.manifest.build_state = writer.manifest.build_state or BuildState()
            if not state.complete:
                first = mine[0][0] * n if mine else 0
                resume_at = first + writer.num_sequences + len(state.skipped_bad) + len(state.rejected)
                result.resumed_sequences = resume_at - first
                started = time.perf_counter()
                result.generated_tokens = run.run(mine, resume_at, writer, tokenizer, show)
                result.generate_seconds = time.perf_counter() - started
                writer.flush()
                state.complete = True
                writer.save_manifest()
        final = merge_rank_caches(out, settings, dist) if dist.world > 1 else writer.manifest
    else:
        final = done
        result.already_complete = True
    if dist.rank == 0:
        final = _write_texts(out, settings, tokenizer, texts, n)
    dist.barrier()
    result.sequences = final.num_sequences
    result.tokens = final.num_tokens
    result.shards = len(final.shards)
    result.bytes = final.num_bytes
    result.rejected = len(final.build_state.rejected) if final.build_state else 0
    result.texts = join(str(out).rstrip("/"), TEXTS_NAME)
    result.seconds = time.perf_counter() - t0
    return result


# -- options and prompts -----------------------------------------------------------------------------


def _check_sampling(max_new_tokens, temperature, top_p, top_k, num_return_sequences, batch_size) -> dict:
    for name, value in (("--max-new-tokens", max_new_tokens), ("--num-return-sequences", num_return_sequences),
                        ("--batch-size", batch_size)):  # fmt: skip
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or a positive integer, got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be ≥ 0 (0: greedy decoding), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {top_p!r}")
    return {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": float(top_p),
            "top_k": int(top_k), "num_return_sequences": int(num_return_sequences), "batch_size": int(batch_size),
            "do_sample": temperature > 0}  # fmt: skip


def _resolve_filter(spec) -> tuple[Callable[[str, str], bool] | None, str | None]:
    """(the callable, the name recorded in the manifest) of ``filter=``: a callable, ``"module:function"`` or None."""
    if spec is None:
        return None, None
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name) if name else None
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--filter {spec}: cannot import it ({e}); give MODULE:FUNCTION") from None
        if not callable(fn):
            raise ValueError(f"--filter {spec}: give MODULE:FUNCTION naming a callable (prompt, completion) -> bool")
        return fn, spec
    if not callable(spec):
        raise ValueError(f"filter must be a callable (prompt_text, completion_text) -> bool, got {spec!r}")
    return spec, f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}"


def _prompts(rows, spec: str, tokenizer, field: str | None, vocab: int) -> tuple[str, list[str], list[np.ndarray]]:
    """→ (column, prompt texts as the teacher sees them, their token ids): ``messages`` rendered with the chat
    template and its generation prompt (trailing assistant turns dropped, so that the teacher answers), or text."""
    columns = list(rows.column_names)
    column = field or ("messages" if "messages" in columns else "prompt")
    if column not in columns:
        raise DataError(
            f"{spec} has no column {column!r}; its columns are {columns}. Give prompts in a 'prompt' text column or a "
            "'messages' chat column, or pass --field with the column"
        )
    texts, ids = [], []
    for i, value in enumerate(rows[column]):
        where = f"{spec}, row {i}"
        if isinstance(value, list):
            if not tokenizer.chat_template:
                raise DataError(f"{where}: {column!r} holds chat messages, but the teacher's tokenizer has no chat "
                                "template to render them with; give text prompts")  # fmt: skip
            while value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
                value = value[:-1]
            if not value:
                raise DataError(f"{where}: the conversation has no turn before the assistant's; nothing to answer")
            text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
            seq = tokenizer.apply_chat_template(value, tokenize=True, return_dict=True,
                                                add_generation_prompt=True)["input_ids"]  # fmt: skip
        elif isinstance(value, str):
            text, seq = value, tokenizer(value)["input_ids"]
        else:
            raise DataError(f"{where}: {column!r} holds {type(value).__name__}, not a prompt text or chat messages")
        seq = np.asarray(seq, np.int64)
        if seq.size == 0:
            raise DataError(f"{where}: the prompt is empty after tokenisation; every prompt needs at least one token")
        if seq.min() < 0 or seq.max() >= vocab:
            raise DataError(f"{where}: token ids outside the teacher's vocabulary [0, {vocab})")
        texts.append(text)
        ids.append(seq)
    return column, texts, ids


def _special_tokens(model, tokenizer) -> tuple[list[int], int]:
    """(the ids that end a completion, the padding id) from the model's generation config, else the tokenizer."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = getattr(config, "pad_token_id", None)
    pad = tokenizer.pad_token_id if pad is None else pad
    pad = pad if pad is not None else (eos[0] if eos else 0)
    if not eos:
        raise TeacherError("the teacher defines no end-of-sequence token (generation_config.eos_token_id or the "
                           "tokenizer's eos_token): completions could not end before --max-new-tokens")  # fmt: skip
    return eos, int(pad)


def _batch_seed(seed: int, first_prompt: int) -> int:
    return int(np.random.SeedSequence([seed, first_prompt]).generate_state(1, np.uint64)[0] >> 1)


# -- generation ----------------------------------------------------------------------------------------


class _Capture:
    """A logits processor that runs first, on the raw logits of each step: their sparse targets, kept on the device.
    (transformers calls every processor once per generated token; this one hands the logits on unchanged.)"""

    def __init__(self, sparsifier: Sparsifier, width: int, max_new_tokens: int, uniforms: torch.Tensor | None):
        self.sparsifier, self.width, self.max_new_tokens, self.uniforms = sparsifier, width, max_new_tokens, uniforms
        self.steps: list[tuple] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        if step == len(self.steps) and step < self.max_new_tokens:  # (a step transformers runs past the end: not kept)
            u = None if self.uniforms is None else self.uniforms[:, step].to(scores.device)
            self.steps.append(self.sparsifier.rows(scores.float(), u))
        return scores


@dataclass
class _Generation:
    model: torch.nn.Module
    sparsifier: Sparsifier
    sampling: dict
    seed: int
    eos: list[int]
    pad: int
    texts: list[str]
    ids: list[np.ndarray]
    keep: Callable[[str, str], bool] | None

    def run(self, batches: list[tuple[int, int]], resume_at: int, writer, tokenizer, show: bool) -> int:
        """Generate and write every sample ≥ ``resume_at`` of the prompt ``batches``; returns the tokens generated."""
        from tqdm.auto import tqdm

        n = self.sampling["num_return_sequences"]
        bar = tqdm(unit="tok", unit_scale=True, desc="generating", disable=not show, dynamic_ncols=True)
        bg = BackgroundWriter(writer)
        generated = kept = rejected = 0
        try:
            for a, b in batches:
                if b * n <= resume_at:
                    continue  # committed; the batches after it do not depend on it
                items = []
                for s, prompt, completion, result in self.batch(a, b):
                    if s < resume_at:
                        continue
                    text = tokenizer.decode(completion, skip_special_tokens=True)
                    accepted = self.keep is None or bool(self.keep(self.texts[s // n], text))
                    mask = np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)]
                    items.append((s, np.r_[prompt, completion], result if accepted else REJECTED, mask))
                    generated += len(completion)
                    kept, rejected = kept + accepted, rejected + (not accepted)
                    bar.update(len(completion))
                bg.put(items)
                bar.set_postfix(kept=kept, rejected=rejected, refresh=False)
        finally:
            bar.close()
            bg.close()  # samples already handed over are valid: write them, so that a rerun continues after them
        return generated

    @torch.inference_mode()
    def batch(self, a: int, b: int):
        """The samples of prompts [a, b): (sample index, prompt ids, completion ids, (target_ids, values, lognorm))."""
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        opts, n = self.sampling, self.sampling["num_return_sequences"]
        prompts = [self.ids[p] for p in range(a, b) for _ in range(n)]
        index = list(range(a * n, b * n))
        width = max(map(len, prompts))
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token is at the same column
            input_ids[row, width - len(prompt) :] = torch.from_numpy(prompt)
            attention[row, width - len(prompt) :] = 1
        uniforms = self.sparsifier.uniforms([len(p) + opts["max_new_tokens"] for p in prompts], index, "cpu")
        if uniforms is not None:  # row r, step j: the draws of position len(prompt) - 1 + j of sample r's sequence
            ends = np.cumsum([len(p) + opts["max_new_tokens"] for p in prompts])
            starts = [end - opts["max_new_tokens"] - 1 for end in ends]
            uniforms = torch.stack([uniforms[s : s + opts["max_new_tokens"]] for s in starts])
        capture = _Capture(self.sparsifier, width, opts["max_new_tokens"], uniforms)
        processors = [capture]
        if opts["do_sample"] and opts["temperature"] != 1.0:
            processors.append(TemperatureLogitsWarper(opts["temperature"]))
        if opts["do_sample"] and opts["top_k"]:
            processors.append(TopKLogitsWarper(opts["top_k"]))
        if opts["do_sample"] and opts["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(opts["top_p"]))
        # A config of our own, with no processors in it: ours are the only ones, and the capture runs first.
        config = GenerationConfig(do_sample=opts["do_sample"], max_new_tokens=opts["max_new_tokens"], temperature=1.0,
                                  top_p=1.0, top_k=0, eos_token_id=self.eos, pad_token_id=self.pad)  # fmt: skip
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(_batch_seed(self.seed, a))
            sequences = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                            generation_config=config, logits_processor=LogitsProcessorList(processors))
        tokens = sequences[:, width:].cpu().numpy()
        steps = capture.steps
        ids = torch.stack([s[0] for s in steps], 1).cpu().numpy()  # (rows, steps, k)
        values = torch.stack([s[1] for s in steps], 1).cpu().numpy()
        norms = None if steps[0][2] is None else torch.stack([s[2] for s in steps], 1).cpu().double().numpy()
        broken = torch.stack([s[3] for s in steps], 1).cpu().numpy()
        for row, (s, prompt) in enumerate(zip(index, prompts, strict=True)):
            ends = np.flatnonzero(np.isin(tokens[row], self.eos))
            c = int(ends[0]) + 1 if ends.size else tokens.shape[1]
            if broken[row, :c].any():
                raise ValueError(f"prompt {s // n} (sample {s}): the teacher's logits are NaN, +inf or all -inf at "
                                 f"step {int(np.flatnonzero(broken[row, :c])[0])}; check its --dtype")  # fmt: skip
            length, at = len(prompt) + c, len(prompt) - 1
            t_ids = np.full((length, ids.shape[-1]), -1, np.int32)
            t_values = np.zeros((length, ids.shape[-1]), values.dtype)
            t_ids[at : at + c], t_values[at : at + c] = ids[row, :c], values[row, :c]
            lognorm = None
            if norms is not None:
                lognorm = np.zeros((length, norms.shape[-1]))
                lognorm[at : at + c] = norms[row, :c]
            yield s, prompt, tokens[row, :c].astype(np.int64), (t_ids, t_values, lognorm)


# -- the generated text --------------------------------------------------------------------------------


def _write_texts(out: str, settings: dict, tokenizer, prompts: list[str], n: int):
    """Write ``OUT/generations.jsonl`` from the complete cache (unless it is there already) and record it in the
    manifest; → the manifest."""
    fs, root = open_fs(out)
    cache = open_cache(out)
    manifest = cache.manifest
    recorded = manifest.metadata.get("generated_text")
    if recorded and fs.exists(join(root, TEXTS_NAME)):
        cache.close()
        return manifest
    state = manifest.build_state
    dropped = set(state.skipped_bad) | set(state.rejected)
    kept = [s for s in range(len(prompts) * n) if s not in dropped]
    if len(kept) != len(cache):
        cache.close()
        raise RuntimeError(f"{out}: {len(cache)} sequences, but {len(prompts) * n} samples less {len(dropped)} "
                           f"rejected or skipped leave {len(kept)}; the cache is not this generation's, rerun with "
                           "--overwrite")  # fmt: skip
    digest, lines = hashlib.sha256(), 0
    with fs.open(join(root, tmp_name(TEXTS_NAME)), "wb") as f:
        for j, s in enumerate(kept):
            record = cache[j]
            completion = record["input_ids"][record["loss_mask"]]
            line = json.dumps({"sequence": j, "sample": s, "prompt_index": s // n, "prompt": prompts[s // n],
                               "completion": tokenizer.decode(completion, skip_special_tokens=True)},
                              ensure_ascii=False).encode() + b"\n"  # fmt: skip
            f.write(line)
            digest.update(line)
            lines += 1
    cache.close()
    fs.mv(join(root, tmp_name(TEXTS_NAME)), join(root, TEXTS_NAME))
    with CacheWriter(out, **settings) as writer:
        writer.manifest.metadata["generated_text"] = {"file": TEXTS_NAME, "lines": lines,
                                                      "sha256": digest.hexdigest()}  # fmt: skip
        writer.save_manifest()
        return writer.manifest
