"""The teacher pass behind ``softcache build``: a Hugging Face causal LM over a dataset → a cache.

``build(teacher, data, out, ...)`` loads the teacher and the data (:mod:`.inputs`), cuts the
sequences into windows and length-grouped batches (:mod:`.plan`), runs the model body and the output
layer in row chunks (:mod:`.teacher`) under ``torch.inference_mode``, and hands the targets to a
:class:`~softcache.CacheWriter` on a background thread.

Resumable: the manifest records the build's settings; rerunning the same build continues after the last
committed shard, with the same batches, so the cache ends with the same content as an uninterrupted run.
A different build on an existing cache is refused unless ``overwrite``. Under ``torchrun`` each rank
builds a contiguous part of the windows into ``OUT/rank-RRRRR-of-WWWWW/``; rank 0 then copies those shards,
in rank order, into the cache (see :mod:`.distributed`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from ..errors import TeacherError
from ..extras import MLMLabels
from ..format import BuildState, Manifest
from ..format.manifest import MAX_VOCAB
from ..kinds import get_kind
from ..sparsify import Sparsifier
from ..writer import CacheWriter, new_manifest
from .distributed import check_out, merge_rank_caches, prepare_out, rank_path
from .features import check_features, feature_size_note, features
from .inputs import MaskedCopies, Sequences, load_rows, resolve_mask, tokenize
from .plan import BackgroundWriter, batches, rank_windows, windows
from .teacher import MaskedLMHead, TeacherHead, load_teacher, run_setup, teacher_identity


@dataclass
class BuildResult:
    out: str
    sequences: int = 0
    tokens: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    built_tokens: int = 0
    resumed_sequences: int = 0
    skipped_bad: int = 0
    skipped_empty: int = 0
    already_complete: bool = False
    is_main: bool = True  # False on ranks other than 0 of a torchrun build: they print nothing
    next_steps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.out} is complete ({self.sequences:,} sequences, {self.tokens:,} tokens): nothing to do"
        rate = self.built_tokens / self.seconds if self.seconds else 0.0
        extra = f", resumed after {self.resumed_sequences:,} sequences" if self.resumed_sequences else ""
        extra += f", skipped {self.skipped_bad} bad" if self.skipped_bad else ""
        extra += f", {self.skipped_empty} empty rows dropped" if self.skipped_empty else ""
        per_token = self.bytes / self.tokens if self.tokens else 0.0
        return (
            f"wrote {self.out}: {self.sequences:,} sequences, {self.tokens:,} tokens, {self.shards} shards, "
            f"{self.bytes / 1e6:,.1f} MB ({per_token:.1f} B/token) in {self.seconds:.1f}s ({rate:,.0f} tokens/s){extra}"
        )


def build(
    teacher: str,
    data: str,
    out: str,
    *,
    k: int = 64,
    targets: str = "topk",
    samples: int | None = None,
    temperatures=(1.0,),
    max_length: int = 2048,
    pack: bool = False,
    field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    chat_template: bool = False,
    mask: str | None = None,
    hidden_states: list[int] | None = None,
    hidden_dtype: str = "bf16",
    hidden_project: int | None = None,
    attentions: list[int] | None = None,
    objective: str = "causal",
    mlm_probability: float = 0.15,
    mask_copies: int = 1,
    batch_tokens: int = 16384,
    dtype: str | None = None,
    device: str | None = None,
    backend: str = "arrow",
    shard_tokens: int = 1 << 20,
    seed: int = 0,
    revision: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
    quiet: bool = False,
    command: str | None = None,
) -> BuildResult:
    """Run ``teacher`` (a local Hugging Face model folder) over ``data`` and write the cache ``out``.

    Options mirror ``softcache build --help``. Returns a :class:`BuildResult` (``.summary()`` is the
    one-line report). Errors are ``ValueError`` subclasses whose message names the file, row or option.
    """
    t0 = time.perf_counter()
    setup = run_setup(device, dtype, quiet, targets, samples)
    dist, dev, torch_dtype, show = setup.dist, setup.device, setup.dtype, setup.show
    temps = [float(t) for t in temperatures]
    # Everything that can be checked without the teacher is checked before it loads (that can take minutes).
    new_manifest(MAX_VOCAB, k, targets, temps, samples, backend)
    mask = resolve_mask(mask, chat_template)
    check_features(hidden_states, hidden_dtype, hidden_project, attentions, max_length)
    mlm = _check_objective(objective, mlm_probability, mask_copies, mask, chat_template)
    check_out(out)
    if not show:
        import datasets

        datasets.disable_progress_bars()
    rows = load_rows(data, split, limit)

    model, tokenizer = load_teacher(teacher, revision, trust_remote_code, torch_dtype, dev, show, objective)
    hidden, attn = features(model, hidden_states, hidden_dtype, hidden_project, attentions, seed)
    head = (MaskedLMHead if mlm else TeacherHead)(model, Sparsifier(get_kind(targets), k, tuple(temps), samples, seed),
                                                   hidden_states=hidden, attentions=attn)
    vocab = head.vocab_size
    if len(tokenizer) > vocab:
        raise TeacherError(
            f"--teacher {teacher}: the tokenizer has {len(tokenizer)} tokens but the model's output layer only "
            f"{vocab}; they do not belong together (check the folder, or resize the model's embeddings)"
        )
    if k > vocab:
        raise ValueError(f"--k {k} is larger than the teacher's vocabulary ({vocab}); use --k ≤ {vocab}")

    docs = tokenize(rows, data, tokenizer, field, chat_template, vocab, show, mask)
    seqs = Sequences(docs, max_length, pack, tokenizer.eos_token_id if not mlm else tokenizer.sep_token_id)
    if mlm:
        seqs = MaskedCopies(seqs, mlm, tokenizer, vocab, seed)
        head.labels = seqs.labels
    head.check_against_full_forward(torch.from_numpy(seqs[0][:16].astype("int64"))[None])

    settings = dict(vocab_size=vocab, k=k, targets=targets, temperatures=temps, samples=samples, backend=backend,
                    shard_tokens=shard_tokens, batch_tokens=min(4096, max(1, shard_tokens // 4)), seed=seed,
                    loss_mask=mask != "all", extras=[e for e in (hidden, attn, mlm) if e is not None])
    identity, described = teacher_identity(teacher, revision, model, tokenizer, torch_dtype, command)
    build_id = {
        **identity,
        "data": os.path.abspath(data) if os.path.exists(data) else data,
        "split": split, "field": field, "limit": limit, "chat_template": chat_template, "max_length": max_length,
        "pack": pack, "k": k, "targets": targets, "samples": samples, "temperatures": temps,
        "batch_tokens": batch_tokens, "backend": backend, "shard_tokens": shard_tokens, "seed": seed,
        "world_size": dist.world,
    }
    if mask != "all":  # (a key only when masked: builds without a mask keep the identity they always had)
        build_id["mask"] = mask
    for extra in (hidden, attn, mlm):  # (likewise)
        if extra is not None:
            build_id[extra.name] = extra.settings()
    if (hidden or attn) and not quiet and dist.rank == 0:
        print(feature_size_note(hidden, attn, max_length), file=sys.stderr)
    metadata = {
        **described,
        "build": build_id,
        "data": {"rows": len(rows), "empty_rows": docs.empty_rows, "sequences": len(seqs), "tokens": seqs.num_tokens},
    }
    if mask != "all":
        trained = int(docs.mask.sum())
        metadata["loss_mask"] = {"mode": mask, "source": docs.mask_source, "trained_tokens": trained}
    result = BuildResult(out=out, skipped_empty=docs.empty_rows, is_main=dist.rank == 0)
    done = prepare_out(out, metadata, settings, overwrite, dist)
    if done is not None:
        return _finish(result, done, t0, already=True)

    path = out if dist.world == 1 else rank_path(out, dist.rank, dist.world)
    wins = rank_windows(windows(seqs.lengths, 8 * batch_tokens), seqs.lengths, dist.rank, dist.world)
    with CacheWriter(path, **settings, metadata=metadata) as writer:
        state = writer.manifest.build_state = writer.manifest.build_state or BuildState()
        if not state.complete:
            first = wins[0][0] if wins else 0
            resume_at = first + writer.num_sequences + len(state.skipped_bad)
            result.resumed_sequences = resume_at - first
            result.built_tokens = _run(head, seqs, wins, resume_at, writer, batch_tokens, skip_bad, show)
            writer.flush()
            state.complete = True
            writer.save_manifest()
    final = merge_rank_caches(out, settings, dist) if dist.world > 1 else writer.manifest
    return _finish(result, final, t0)


def _check_objective(objective: str, probability: float, copies: int, mask: str, chat_template: bool):
    """``--objective``: None for causal LMs, the configured :class:`~softcache.extras.MLMLabels` for ``mlm``."""
    if objective not in ("causal", "mlm"):
        raise ValueError(f"--objective must be causal or mlm, got {objective!r}")
    if objective == "causal":
        if probability != 0.15 or copies != 1:
            raise ValueError("--mlm-probability and --mask-copies need --objective mlm")
        return None
    if mask != "all" or chat_template:
        raise ValueError("--objective mlm trains the masked tokens: it takes no --mask or --chat-template")
    try:
        return MLMLabels(probability, copies)
    except ValueError as e:
        raise ValueError(f"--mlm-probability / --mask-copies: {e}") from None


def _run(head, seqs, wins, resume_at, writer, batch_tokens, skip_bad, show) -> int:
    """Compute and write every sequence ≥ ``resume_at`` of ``wins``; returns the tokens written."""
    from tqdm.auto import tqdm

    todo = [(max(a, resume_at), b) for a, b in wins if b > resume_at]
    total = int(sum(seqs.lengths[a:b].sum() for a, b in todo))
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="teacher", disable=not show, dynamic_ncols=True)
    bg = BackgroundWriter(writer)
    pad = 0
    written = 0
    try:
        for a, b in wins:
            if b <= resume_at:
                continue
            results: dict[int, tuple | None] = {}
            for group in batches(seqs.lengths, a, b, batch_tokens):
                if max(group) < resume_at:
                    continue  # all already committed; skipping a whole batch changes no other batch
                lengths = [int(seqs.lengths[i]) for i in group]
                ids = torch.full((len(group), max(lengths)), pad, dtype=torch.long)
                for row, i in enumerate(group):
                    ids[row, : lengths[row]] = torch.from_numpy(seqs[i])
                out, bad = head.batch_targets(ids, lengths, group)
                for row in bad:
                    out[row] = None
                results.update(zip(group, out, strict=True))
                new = sum(n for i, n in zip(group, lengths, strict=True) if i >= resume_at)
                written += new
                bar.update(new)
                bar.set_postfix(shards=len(writer.manifest.shards), refresh=False)
            todo_here = range(max(a, resume_at), b)
            first_bad = next((i for i in todo_here if results[i] is None), None)
            if first_bad is not None and not skip_bad:
                bg.put([(i, seqs[i], results[i], seqs.mask(i)) for i in range(todo_here.start, first_bad)])
                raise ValueError(
                    f"teacher logits are NaN, +inf or all -inf in {seqs.describe(first_bad)}; check the teacher's "
                    "--dtype (fp16 overflows) and that sequence, or pass --skip-bad to skip such sequences (they are "
                    "counted in the manifest)"
                )
            bg.put([(i, seqs[i], results[i], seqs.mask(i)) for i in todo_here])
    finally:
        bar.close()
        bg.close()  # sequences already handed over are valid: write them, so that a rerun continues after them
    return written


def _finish(result: BuildResult, manifest: Manifest, t0: float, already: bool = False) -> BuildResult:
    result.sequences = manifest.num_sequences
    result.tokens = manifest.num_tokens
    result.shards = len(manifest.shards)
    result.bytes = manifest.num_bytes
    result.skipped_bad = len(manifest.build_state.skipped_bad) if manifest.build_state else 0
    result.seconds = time.perf_counter() - t0
    result.already_complete = already
    return result


def build_demo(out: str = "softcache-demo", *, quiet: bool = False, limit: int | None = None, **options) -> BuildResult:
    """The embedded default: the shipped demo teacher over the shipped held-out corpus (see softcache/demo)."""
    from ..demo import DEMO_BUILD, corpus_path, teacher_path

    kwargs = {**DEMO_BUILD, **options}
    if limit is not None:
        kwargs["limit"] = limit
    result = build(str(teacher_path()), str(corpus_path("validation")), out, quiet=quiet, **kwargs)
    result.next_steps = [
        f"softcache info {out}            # what the cache holds, bytes per token",
        f"softcache stats {out}           # teacher mass in the stored ids, tail mass, entropy",
        f"python -c \"import softcache; c = softcache.open_cache('{out}'); print(c, c[0]['target_ids'].shape)\"",
    ]
    return result
