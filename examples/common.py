"""What the examples share: command-line options, the demo cache, a tiny student."""

from __future__ import annotations

import argparse
import tempfile

import transformers

from softcache.demo import teacher_path


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cache", help="cache path or URL (default: build the demo cache into a temporary folder)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=1.0, help="a temperature the cache captured")
    parser.add_argument("--alpha", type=float, default=1.0, help="weight of the soft term (1 - alpha: hard CE)")
    parser.add_argument("--max-length", type=int, default=256, help="positions kept per sequence")
    parser.add_argument("--hidden", type=int, default=64, help="student hidden size")
    parser.add_argument("--layers", type=int, default=2, help="student layers")
    parser.add_argument("--demo-limit", type=int, default=64, help="sequences of the demo cache when building it")
    return parser.parse_args()


def demo_cache(args: argparse.Namespace) -> str:
    """``args.cache``, or the demo teacher's cache built into a temporary folder (a few seconds on a CPU)."""
    if args.cache:
        return args.cache
    from softcache.build import build_demo

    out = tempfile.mkdtemp(prefix="softcache-demo-") + "/cache"
    print(f"building the demo cache into {out} ...", flush=True)
    build_demo(out, quiet=True, limit=args.demo_limit, max_length=args.max_length)
    return out


def tiny_student(vocab_size: int, args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    """A freshly initialised Llama shaped like the demo teacher but smaller, with the cache's vocabulary."""
    config = transformers.LlamaConfig.from_pretrained(teacher_path())
    heads = max(1, args.hidden // 32)
    config.update(dict(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=args.hidden // heads))  # fmt: skip
    return transformers.LlamaForCausalLM(config)
