"""Datasets for the teacher pass: load ``--data``, pick the text column, tokenise, pack or truncate.

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
        raise DataError(
            f"{spec} has no column {field!r}; its columns are {columns}. Pass --field with the text column "
            "(or a column of token ids)"
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
            raise DataError(
                f"{spec}, row {first_row + j}: column {field!r} holds {type(value).__name__}, not text; "
                "pass --field with a text column"
            )
        out.append(value)
    return out


@dataclass
class Tokenized:
    """Documents as one flat token array; document ``d`` is ``tokens[offsets[d]:offsets[d+1]]`` and came
    from dataset row ``rows[d]`` (empty documents are dropped)."""

    tokens: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray
    empty_rows: int


def tokenize(
    ds, spec: str, tokenizer, field: str | None, chat_template: bool, vocab_size: int, progress: bool
) -> Tokenized:
    from tqdm.auto import tqdm

    field, pretokenised = _pick_field(ds, spec, field, chat_template)
    pieces, rows, empty, step = [], [], 0, 1000
    bar = tqdm(total=len(ds), desc="tokenising", unit="row", disable=not progress, leave=False)
    for start in range(0, len(ds), step):
        batch = ds[start : start + step][field]
        if pretokenised:
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
            rows.append(start + j)
        bar.update(len(batch))
    bar.close()
    if not pieces:
        raise DataError(f"{spec}: all {len(ds)} rows are empty after tokenisation (column {field!r}); nothing to build")
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    return Tokenized(np.concatenate(pieces), offsets, np.asarray(rows, np.int64), empty)


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
        if pack:
            if separator is not None:
                lengths = np.diff(docs.offsets) + 1
                stream = np.full(int(lengths.sum()), separator, np.int32)
                ends = np.cumsum(lengths)
                for d in range(len(lengths)):
                    stream[ends[d] - lengths[d] : ends[d] - 1] = docs.tokens[docs.offsets[d] : docs.offsets[d + 1]]
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

    def describe(self, i: int) -> str:
        """Where sequence ``i`` comes from, for error messages."""
        if self.pack:
            return f"sequence {i} (packed tokens {self.starts[i]}..{self.starts[i] + self.lengths[i]})"
        return f"sequence {i} (dataset row {self.rows[i]})"
