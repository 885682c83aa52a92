"""Throughput and peak memory of ``softcache build`` beside the teacher's plain forward, in the same run.

Three modes over the same sequences and the same length-grouped batches, each in a fresh subprocess (so
each peak is its own):

* ``forward``: ``model(input_ids, attention_mask).logits``, the teacher's ordinary forward (full
  (batch × length × V) logits), nothing kept: the speed limit of any teacher pass.
* ``full-logits``: that forward, then ``CacheWriter.write_logits`` on the full logits (the naive pipeline).
* ``build``: softcache's pass (body, output layer over row chunks, targets on the device, background
  encoding and writing): what ``softcache build`` runs after loading.

Prints tokens/s, the ratio to ``forward``, and peak memory (CUDA: max allocated; CPU: peak RSS growth over the
loaded model and data). Usage::

    python benchmarks/build.py                      # synthetic Llama teacher, V=32000, demo corpus
    python benchmarks/build.py --device cuda --vocab 128256 --hidden 2048 --layers 8 --tokens 200000
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from softcache.build.inputs import Sequences, load_rows, tokenize
from softcache.build.plan import BackgroundWriter, batches, windows
from softcache.build.teacher import TeacherHead
from softcache.demo import corpus_path, teacher_path
from softcache.kinds import get_kind
from softcache.sparsify import Sparsifier

MODES = ("forward", "full-logits", "build")


def make_teacher(path: Path, vocab: int, hidden: int, layers: int) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_path()).save_pretrained(path)  # the demo tokenizer (4096 < V: padded)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softcache import CacheWriter

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.teacher)
    docs = tokenize(load_rows(str(corpus_path("train"))), "demo", tok, None, False, model.config.vocab_size, False)
    seqs = Sequences(docs, args.max_length, True, tok.eos_token_id)
    n = int((seqs.lengths.cumsum() < args.tokens).sum()) + 1
    groups = [g for a, b in windows(seqs.lengths[:n], 8 * args.batch_tokens) for g in batches(seqs.lengths, a, b,
                                                                                              args.batch_tokens)]
    head = TeacherHead(model, Sparsifier(get_kind("topk"), args.k, (1.0, 2.0)))
    out = tempfile.mkdtemp()
    writer = CacheWriter(out, vocab_size=head.vocab_size, k=args.k, temperatures=(1.0, 2.0))
    bg = BackgroundWriter(writer) if args.mode == "build" else None

    def padded(group):
        lengths = [int(seqs.lengths[i]) for i in group]
        ids = torch.zeros((len(group), max(lengths)), dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : lengths[r]] = torch.from_numpy(seqs[i])
        mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
        return ids.to(args.device), mask.to(args.device), lengths

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if cuda else rss_mb()
    t0 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for group in groups:
            ids, mask, lengths = padded(group)
            if args.mode == "build":
                results, _ = head.batch_targets(ids, lengths, group)
                bg.put([(i, seqs[i], r, None) for i, r in zip(group, results, strict=True)])
            else:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                if args.mode == "full-logits":
                    writer.write_logits(ids, logits, attention_mask=mask)
                del logits
            tokens += sum(lengths)
        if bg is not None:
            bg.close()
        writer.close()
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**20 if cuda else rss_mb() - base_mem
    return {"mode": args.mode, "tokens": tokens, "seconds": seconds, "peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=MODES, help="run one mode (internal: the parent runs all three)")
    p.add_argument("--teacher", help="a teacher folder (default: a synthetic Llama made with the options below)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16384, help="tokens to run through each mode")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = args.teacher is None
        if synthetic:
            args.teacher = tmp
            make_teacher(Path(tmp), args.vocab, args.hidden, args.layers)
        passthrough = ["--teacher", args.teacher, "--tokens", str(args.tokens), "--max-length", str(args.max_length),
                       "--batch-tokens", str(args.batch_tokens), "--k", str(args.k), "--device", args.device,
                       "--dtype", args.dtype]
        rows = []
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, *passthrough]
            rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
                                   .splitlines()[-1]))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# softcache build benchmark  {time.strftime('%Y-%m-%d')}  {device}  torch {torch.__version__}")
    print(f"# command: python benchmarks/build.py {' '.join(sys.argv[1:])}")
    print(f"# teacher: {'synthetic Llama' if synthetic else args.teacher}  V={args.vocab} hidden={args.hidden} "
          f"layers={args.layers}  k={args.k} temperatures=1,2  batch_tokens={args.batch_tokens} "
          f"max_length={args.max_length} dtype={args.dtype}")
    fwd = rows[0]["tokens"] / rows[0]["seconds"]
    print(f"{'mode':<12} {'tokens':>8} {'tokens/s':>10} {'vs forward':>10} {'peak MB':>9}")
    for r in rows:
        rate = r["tokens"] / r["seconds"]
        print(f"{r['mode']:<12} {r['tokens']:>8} {rate:>10,.0f} {rate / fwd:>10.2f} {r['peak_mb']:>9,.0f}")


if __name__ == "__main__":
    main()
