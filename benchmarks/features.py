"""Storage of teacher features: bytes per token of hidden states and attention maps, beside the targets alone.

Builds the demo cache (the shipped teacher: hidden 128, 3 layers, 4 heads) over the first ``--limit`` held-out
modules with each feature option and prints what each costs on disk per token after zstd, and before it (the raw
size the build announces). Run: ``python benchmarks/features.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import tempfile

from bench_common import cpu_name, markdown_table

import softcache
from softcache.build import build_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=8, help="held-out modules to build over")
    p.add_argument("--max-length", type=int, default=512)
    args = p.parse_args()
    options = [
        ("targets only (top-32, 3 temperatures)", {}),
        ("+ hidden states, 2 layers, bf16", dict(hidden_states=[0, -1])),
        ("+ hidden states, 2 layers, fp16", dict(hidden_states=[0, -1], hidden_dtype="fp16")),
        ("+ hidden states, 2 layers, int8", dict(hidden_states=[0, -1], hidden_dtype="int8")),
        ("+ hidden states, 2 layers, bf16, projected to 32", dict(hidden_states=[0, -1], hidden_project=32)),
        ("+ hidden states, all 4, bf16", dict(hidden_states=[0, 1, 2, 3])),
        ("+ attentions, 1 layer (4 heads)", dict(attentions=[-1])),
    ]
    rows, base = [], None
    for name, extra in options:
        with tempfile.TemporaryDirectory() as tmp:
            build_demo(f"{tmp}/c", quiet=True, limit=args.limit, max_length=args.max_length, **extra)
            cache = softcache.open_cache(f"{tmp}/c")
            per_token = cache.num_bytes / cache.num_tokens
            base = per_token if base is None else base
            rows.append([name, f"{per_token:,.1f}", f"{per_token - base:,.1f}", f"{cache.num_tokens:,}"])
    print(f"# {cpu_name()}; demo teacher, {args.limit} modules, --max-length {args.max_length}")
    print(markdown_table(["cache", "B/token on disk", "features B/token", "tokens"], rows))


if __name__ == "__main__":
    main()
