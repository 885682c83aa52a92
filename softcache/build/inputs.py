"""Datasets for the teacher pass: load ``--data``, pick the text column, tokenise, pack or truncate.

With a loss mask (``--mask``), each token also gets whether it is trained: ``assistant`` (chat data: the assistant
turns, from the chat template's ``{% generation %}`` blocks where it has them, else from the boundaries of the rendered
turns) or ``completion`` (``prompt`` + ``completion`` columns: the completion and the EOS after it).

The result is a :class:`Sequences`: a fixed, ordered list of token sequences (dataset order) with random
access, which the build splits into windows, ranks and batches. It is a pure function of the data and the
options, so a resumed or multi-process build sees exactly the same sequences.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text", ".text": "text"}
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for suffix in (".gz", ".zst", ".bz2", ".xz"):
        name = name.removesuffix(suffix)
    return _BUILDERS.get(Path(name).suffix)


def load_rows(spec: str, split: str = "train", limit: int | None = None):
    """``spec`` → a ``datasets.Dataset``: a folder saved with ``save_to_disk``, data files (json, jsonl,
    parquet, csv, text; globs allowed), or a folder of data files. The first ``limit`` rows are kept."""
    import datasets

    path = Path(spec)
    if path.is_dir() and any((path / m).exists() for m in _SAVED_MARKERS):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - e.g. datasets cannot reload a saved dataset of 0 rows
            raise DataError(f"{spec}: datasets cannot load this saved dataset ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{spec} has splits {sorted(ds)}, not {split!r}; pass --split with one of them")
            ds = ds[split]
    elif path.is_dir():
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except ValueError as e:
            raise DataError(f"{spec}: cannot load split {split!r} from this folder ({e})") from None
    else:
        builder = _builder_for(spec)
        if builder is None:
            raise DataError(
                f"{spec}: not a folder and not a data file this build reads; give a folder saved with "
                "Dataset.save_to_disk, or .json/.jsonl/.parquet/.csv/.txt files (optionally compressed, globs allowed)"
            )
        if not glob.glob(spec):
            raise DataError(f"{spec}: no such file")
        if split != "train":
            raise DataError(f"{spec}: data files hold a single split ('train'); drop --split {split}")
        try:
            ds = datasets.load_dataset(builder, data_files=spec, split="train")
        except Exception as e:  # datasets wraps the reader's error; show the root cause
            cause = e.__cause__ or e
            raise DataError(
                f"{spec}: cannot be read as {builder} ({type(cause).__name__}: {cause}); is it empty or damaged?"
            ) from None
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be positive, got {limit}")
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"{spec} (split {split!r}) has no rows: nothing to build")
    return ds


def _pick_field(ds, spec: str, field: str | None, chat_template: bool) -> tuple[str, bool]:
    """→ (column, pretokenised)."""
    columns = list(ds.column_names)
    if field is None:
        field = "messages" if chat_template else "input_ids" if "input_ids" in columns else "text"
    if field not in columns:
        hint = ""
        if not chat_template and any(c in columns for c in ("messages", "conversations")):
            hint = "; for chat data (a column of messages), pass --chat-template (with --field if it is not 'messages')"
        elif {"prompt", "completion"} <= set(columns):
            hint = "; for prompt/completion data, pass --mask completion"
        raise DataError(
            f"{spec} has no column {field!r}; its columns are {columns}. Pass --field with the text column "
            f"(or a column of token ids){hint}"
        )
    feature = ds.features[field]
    pretokenised = not chat_template and getattr(feature, "feature", None) is not None and getattr(
        feature.feature, "dtype", ""
    ).startswith(("int", "uint"))
    return field, pretokenised


def _texts(batch: list, field: str, first_row: int, spec: str, tokenizer, chat_template: bool) -> list[str]:
    out = []
    for j, value in enumerate(batch):
        if chat_template:
            if not isinstance(value, list):
                raise DataError(f"{spec}, row {first_row + j}: --chat-template needs a list of messages in {field!r}")
            value = tokenizer.apply_chat_template(value, tokenize=False)
        elif value is None:
            value = ""
        elif not isinstance(value, str):
            chat = isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)
            raise DataError(
                f"{spec}, row {first_row + j}: column {field!r} holds {type(value).__name__}, not text; "
                + ("it holds chat messages: pass --chat-template to render them with the tokenizer's chat template"
                   if chat else "pass --field with a text column")
            )
        out.append(value)
    return out


@dataclass
class Tokenized:
    """Documents as one flat token array; document ``d`` is ``tokens[offsets[d]:offsets[d+1]]`` and came
    from dataset row ``rows[d]`` (empty documents are dropped). ``mask``: which tokens are trained, or None
    when all are; ``mask_source`` says how it was found."""

    tokens: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    empty_rows: int
    mask: np.ndarray | None = None
    mask_source: str | None = None


MASKS = ("all", "assistant", "completion")


def resolve_mask(mask: str | None, chat_template: bool) -> str:
    """``--mask``: given, or ``assistant`` with ``--chat-template`` and ``all`` without."""
    mask = mask or ("assistant" if chat_template else "all")
    if mask not in MASKS:
        raise DataError(f"--mask must be one of {', '.join(MASKS)}, got {mask!r}")
    if mask == "assistant" and not chat_template:
        raise DataError("--mask assistant needs --chat-template (a messages column rendered with the chat template)")
    if mask == "completion" and chat_template:
        raise DataError("--mask completion reads prompt and completion text columns; drop --chat-template")
    return mask


def _has_generation_blocks(tokenizer) -> bool:
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    return "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def _chat_masked(tokenizer, messages: list, where: str) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its assistant mask. Without ``{% generation %}`` in the template, the
    tokens each assistant message adds to the conversation rendered up to it (after the generation prompt)."""
    if _has_generation_blocks(tokenizer):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(out["input_ids"]), list(out["assistant_masks"])

    def render(conversation, prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                                  add_generation_prompt=prompt)["input_ids"])

    ids = render(messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start, end = len(render(messages[:i], True)), render(messages[: i + 1], False)
        if ids[: len(end)] != end:
            raise DataError(
                f"{where}: the chat template does not render conversations as prefixes of each other, so the "
                "assistant turns cannot be found from turn boundaries; use a template with {% generation %} blocks, "
                "or --mask all"
            )
        mask[start : len(end)] = [1] * (len(end) - start)
    return ids, mask


def _completion_masked(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``prompt + completion`` tokenised (as TRL's prompt-completion data), the completion and a final EOS trained."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:  # the boundary merged into one token: tokenise the two apart
        ids = prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def tokenize(
    ds, spec: str, tokenizer, field: str | None, chat_template: bool, vocab_size: int, progress: bool,
    mask: str = "all",
) -> Tokenized:
    from tqdm.auto import tqdm

    if mask == "completion":
        missing = [c for c in ("prompt", "completion") if c not in ds.column_names]
        if missing:
            raise DataError(f"--mask completion needs columns prompt and completion; {spec} lacks {missing}")
        field, pretokenised = "prompt", False
    else:
        field, pretokenised = _pick_field(ds, spec, field, chat_template)
    pieces, masks, rows, empty, step = [], [], [], 0, 1000
    bar = tqdm(total=len(ds), desc="tokenising", unit="row", disable=not progress, leave=False)
    for start in range(0, len(ds), step):
        batch = ds[start : start + step][field]
        row_masks = None
        if mask == "assistant":
            _texts(batch, field, start, spec, tokenizer, chat_template)  # the same checks of every row
            pairs = [_chat_masked(tokenizer, m, f"{spec}, row {start + j}") for j, m in enumerate(batch)]
            ids, row_masks = [p[0] for p in pairs], [p[1] for p in pairs]
        elif mask == "completion":
            completions = ds[start : start + step]["completion"]
            pairs = [_completion_masked(tokenizer, p or "", c or "") for p, c in zip(batch, completions, strict=True)]
            ids, row_masks = [p[0] for p in pairs], [p[1] for p in pairs]
        elif pretokenised:
            ids = batch
        else:
            texts = _texts(batch, field, start, spec, tokenizer, chat_template)
            ids = tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]
        for j, seq in enumerate(ids):
            seq = np.asarray(seq if seq is not None else [], dtype=np.int64)
            if seq.size and (seq.min() < 0 or seq.max() >= vocab_size):
                raise DataError(
                    f"{spec}, row {start + j}: token id {int(seq.max() if seq.max() >= vocab_size else seq.min())} "
                    f"is outside the teacher's vocabulary [0, {vocab_size}); the ids were made by another tokenizer"
                )
            if seq.size == 0:
                empty += 1
                continue
            pieces.append(seq.astype(np.int32))  # half the memory of int64; vocabularies are far below 2^31
            if row_masks is not None:
                masks.append(np.asarray(row_masks[j], bool))
            rows.append(start + j)
        bar.update(len(batch))
    bar.close()
    if not pieces:
        raise DataError(f"{spec}: all {len(ds)} rows are empty after tokenisation (column {field!r}); nothing to build")
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    source = {"all": None, "completion": "prompt/completion columns"}.get(mask) or (
        "{% generation %} blocks" if _has_generation_blocks(tokenizer) else "rendered turn boundaries"
    )
    return Tokenized(np.concatenate(pieces), offsets, np.asarray(rows, np.int64), empty,
                     np.concatenate(masks) if masks else None, source)


class Sequences:
    """The sequences the teacher sees, in dataset order.

    ``pack``: documents joined (each followed by ``separator``, e.g. EOS, so boundaries stay visible)
    and cut into ``max_length`` pieces, the last one shorter. Otherwise each document, truncated to
    ``max_length``.
    """

    def __init__(self, docs: Tokenized, max_length: int, pack: bool, separator: int | None) -> None:
        if max_length < 1:
            raise DataError(f"--max-length must be positive, got {max_length}")
        self.max_length, self.pack = max_length, pack
        self._mask = docs.mask
        if pack:
            if separator is not None:
                lengths = np.diff(docs.offsets) + 1
                stream = np.full(int(lengths.sum()), separator, np.int32)
                mask = np.zeros(len(stream), bool)  # a separator is never trained
                ends = np.cumsum(lengths)
                for d in range(len(lengths)):
                    stream[ends[d] - lengths[d] : ends[d] - 1] = docs.tokens[docs.offsets[d] : docs.offsets[d + 1]]
                    if docs.mask is not None:
                        mask[ends[d] - lengths[d] : ends[d] - 1] = docs.mask[docs.offsets[d] : docs.offsets[d + 1]]
                self._mask = mask if docs.mask is not None else None
            else:
                stream = docs.tokens
            self._stream = stream
            n = -(-len(stream) // max_length)
            self.starts = np.arange(n, dtype=np.int64) * max_length
            self.lengths = np.minimum(max_length, len(stream) - self.starts)
        else:
            self._stream = docs.tokens
            self.starts = docs.offsets[:-1].astype(np.int64)
            self.lengths = np.minimum(max_length, np.diff(docs.offsets)).astype(np.int64)
        self.rows = docs.rows

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def __getitem__(self, i: int) -> np.ndarray:
        return self._stream[self.starts[i] : self.starts[i] + self.lengths[i]]

    def mask(self, i: int) -> np.ndarray | None:
        """Which tokens of sequence ``i`` are trained, or None when the build has no loss mask."""
        return None if self._mask is None else self._mask[self.starts[i] : self.starts[i] + self.lengths[i]]

    def describe(self, i: int) -> str:
        """Where sequence ``i`` comes from, for error messages."""
        if self.pack:
            return f"sequence {i} (packed tokens {self.starts[i]}..{self.starts[i] + self.lengths[i]})"
        return f"sequence {i} (dataset row {self.rows[i]})"


class MaskedCopies:
    """``--objective mlm``: ``copies`` differently-masked copies of each sequence of ``seqs``, in order (sequence
    ``n`` is copy ``n % copies`` of ``seqs[n // copies]``), masked by ``extra`` (an
    :class:`~softcache.extras.MLMLabels`) seeded per (seed, sequence, copy). ``self[n]``: the corrupted ids (what the
    teacher sees and the cache stores); :meth:`labels`: the original ids where masked, −1 elsewhere."""

    def __init__(self, seqs: Sequences, extra, tokenizer, vocab_size: int, seed: int) -> None:
        if tokenizer.mask_token_id is None:
            raise DataError("--objective mlm needs a tokenizer with a mask token (e.g. [MASK]); this one has none")
        self.seqs, self.extra, self.copies, self.seed = seqs, extra, extra.copies, seed
        self.mask_id, self.vocab = int(tokenizer.mask_token_id), min(int(vocab_size), len(tokenizer))
        self.special = sorted(set(tokenizer.all_special_ids))
        self.lengths = np.repeat(seqs.lengths, self.copies)
        self._last: tuple[int, tuple] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def _masked(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != n:
            i, copy = divmod(int(n), self.copies)
            self._last = (n, self.extra.corrupt(self.seqs[i], mask_id=self.mask_id, vocab_size=self.vocab,
                                                special_ids=self.special, seed=self.seed, index=i, copy=copy))
        return self._last[1]

    def __getitem__(self, n: int) -> np.ndarray:
        return self._masked(n)[0]

    def labels(self, n: int) -> np.ndarray:
        return self._masked(n)[1]

    def mask(self, n: int) -> None:
        return None

    def describe(self, n: int) -> str:
        return f"copy {n % self.copies} of {self.seqs.describe(n // self.copies)}"
