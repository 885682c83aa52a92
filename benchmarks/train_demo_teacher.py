"""Train the demo teacher shipped in ``softcache/demo/``: a small Llama-style LM on CPython's standard library.

Run once, on CPU (a few minutes on 2 cores)::

    nice python benchmarks/train_demo_teacher.py --minutes 8

It writes, inside the package:

* ``softcache/demo/corpus/{train,validation}.parquet``: the top-level ``*.py`` modules of this machine's
  Python standard library (PSF licence), one document per file, split by a hash of the file name;
* ``softcache/demo/teacher/``: a byte-level BPE tokenizer (``tokenizers``) and a ``LlamaForCausalLM``
  saved with ``save_pretrained``, so ``AutoTokenizer``/``AutoModelForCausalLM`` load them;

and prints the held-out loss beside a unigram baseline (nats per token) for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEMO = Path(__file__).resolve().parents[1] / "softcache" / "demo"
EOS = "<|endoftext|>"


def read_corpus(stdlib: Path, held_out: float) -> dict[str, list[dict]]:
    """One document per top-level module; ~``held_out`` of the files (by name hash) form the validation split."""
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        bucket = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 1000 / 1000
        splits["validation" if bucket < held_out else "train"].append({"path": path.name, "text": text})
    return splits


def write_corpus(splits: dict[str, list[dict]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in splits.items():
        table = pa.table({"path": [d["path"] for d in docs], "text": [d["text"] for d in docs]})
        pq.write_table(table, out / f"{name}.parquet", compression="zstd", compression_level=19)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None)


def token_stream(tokenizer, docs: list[dict]) -> np.ndarray:
    """All documents, each followed by the end-of-text token, as one int32 array."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids = tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(x + [eos], np.int32) for x in ids])


def unigram_loss(train: np.ndarray, valid: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``valid`` of add-one-smoothed unigram frequencies from ``train``."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[valid].mean())


@torch.inference_mode()
def heldout_loss(model, valid: np.ndarray, seq_len: int, max_windows: int, batch: int = 16) -> float:
    n = min(max_windows, (len(valid) - 1) // seq_len)
    x = torch.from_numpy(valid[: n * seq_len + 1].astype(np.int64))
    total, count = 0.0, 0
    for start in range(0, n, batch):
        rows = range(start, min(n, start + batch))
        inp = torch.stack([x[r * seq_len : (r + 1) * seq_len] for r in rows])
        tgt = torch.stack([x[r * seq_len + 1 : (r + 1) * seq_len + 1] for r in rows])
        logits = model(input_ids=inp).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum").item()
        count += tgt.numel()
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--out", type=Path, default=DEMO)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget (wall clock)")
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of --seq-len scored")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    splits = read_corpus(args.stdlib, held_out=0.1)
    write_corpus(splits, args.out / "corpus")
    tokenizer = train_tokenizer([d["text"] for d in splits["train"]], args.vocab_size)
    train, valid = token_stream(tokenizer, splits["train"]), token_stream(tokenizer, splits["validation"])
    print(f"corpus: {len(splits['train'])} train files ({len(train):,} tokens), "
          f"{len(splits['validation'])} validation files ({len(valid):,} tokens)")

    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 32,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=eos,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({args.layers} layers, hidden {args.hidden}, vocab {config.vocab_size})")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    budget, start, step, warmup = args.minutes * 60, time.perf_counter(), 0, 50
    x = torch.from_numpy(train.astype(np.int64))
    while step < args.max_steps:
        elapsed = time.perf_counter() - start
        if elapsed > budget:
            break
        frac = elapsed / budget  # cosine schedule over the time budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(train) - args.seq_len - 1, args.batch)
        batch = torch.stack([x[s : s + args.seq_len + 1] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}  loss {loss.item():.3f}  lr {lr:.2e}  {time.perf_counter() - start:.0f}s", flush=True)

    model.eval()
    held_out = heldout_loss(model, valid, args.seq_len, args.eval_windows)
    eval_tokens = min(args.eval_windows, (len(valid) - 1) // args.seq_len) * args.seq_len
    unigram = unigram_loss(train, valid[1 : eval_tokens + 1], config.vocab_size)
    tokens_seen = step * args.batch * args.seq_len
    out = args.out / "teacher"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {
        "parameters": n_params, "steps": step, "tokens_seen": tokens_seen, "train_tokens": int(len(train)),
        "validation_tokens_scored": eval_tokens, "heldout_loss": round(held_out, 4), "unigram_loss": round(unigram, 4),
        "minutes": round((time.perf_counter() - start) / 60, 2), "threads": args.threads,
    }
    (out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"held-out loss {held_out:.3f} nats/token vs unigram {unigram:.3f} ({step} steps, {tokens_seen:,} tokens)")


if __name__ == "__main__":
    main()
