"""The ``softcache`` command: a thin layer over the library (no logic lives here)."""

from __future__ import annotations

import json
import sys

import click

from softcache import __version__
from softcache.kinds import KINDS

_EXPECTED = (ValueError, TypeError, OSError, RuntimeError)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _run(fn, *args, **kwargs):
    """Call the library; expected failures become one clear line and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except _EXPECTED as e:
        _fail(str(e) or type(e).__name__)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    if value is None:
        return "-"
    return str(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="softcache")
def main() -> None:
    """softcache: run a teacher once, keep a compact exact record of its next-token distributions,
    and distil students from it.

    \b
    softcache build            build a cache (no arguments: the demo cache)
    softcache info PATH        what a cache holds, bytes per token
    softcache verify PATH      check every shard's checksum and structure
    softcache convert SRC DST  copy a cache to the other backend, losslessly
    softcache stats PATH       teacher mass, tail mass and entropy histograms
    """


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(path: str, as_json: bool) -> None:
    """Summarise the cache at PATH (a directory or fsspec URL)."""
    from softcache import open_cache
    from softcache.ops import summary

    cache = _run(open_cache, path)
    s = summary(cache)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    width = max(map(len, s))
    for key, value in s.items():
        click.echo(f"{key:<{width}}  {_fmt(value)}")


@main.command()
@click.argument("path")
@click.option("--no-decode", is_flag=True, help="Only checksums and batch CRCs; skip decoding every batch.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def verify(path: str, no_decode: bool, quiet: bool) -> None:
    """Check every shard of PATH: presence, size and SHA-256 against the manifest, each batch's CRC,
    and that every batch decodes. Exit 1, naming each damaged shard, on any problem."""
    from softcache.ops import verify as verify_cache

    progress = None if quiet else (lambda i, name: click.echo(f"checking {name}", err=True))
    report = _run(verify_cache, path, decode=not no_decode, progress=progress)
    for name, problem in report.problems:
        click.echo(f"{name}: {problem}", err=True)
    if not report.ok:
        _fail(f"{len(report.problems)} of {report.shards_checked} shards damaged in {path}")
    click.echo(f"ok: {report.shards_checked} shards, {report.batches_checked} batches verified")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--backend", type=click.Choice(["arrow", "zarr"]), required=True, help="Backend of the new cache.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def convert(src: str, dst: str, backend: str, quiet: bool) -> None:
    """Copy the cache SRC to a new cache DST stored with --backend, without re-encoding (lossless)."""
    from softcache.ops import convert as convert_cache

    progress = None if quiet else (lambda i, name: click.echo(f"copying {name}", err=True))
    out = _run(convert_cache, src, dst, backend, progress=progress)
    click.echo(f"wrote {dst}: {len(out):,} sequences, {out.num_tokens:,} tokens, {out.num_bytes:,} bytes ({backend})")


@main.command()
@click.argument("path")
@click.option("--temperature", type=float, default=None, help="A captured temperature (default: the first).")
@click.option("--max-tokens", type=int, default=1_000_000, show_default=True, help="Positions to read at most.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Also write histograms to this PNG.")
def stats(path: str, temperature: float | None, max_tokens: int, plot_path: str | None) -> None:
    """Histograms of the teacher's mass in the stored ids, the tail mass and the entropy per position."""
    from softcache import open_cache
    from softcache.ops import describe, plot_stats, position_stats, text_histogram

    cache = _run(open_cache, path)
    st = _run(position_stats, cache, temperature, max_tokens)
    t = cache.temperatures[0] if temperature is None else temperature
    click.echo(f"{path}: {len(st['mass']):,} positions at T={t}")
    for key, label, lo, hi in (
        ("mass", "teacher mass in stored ids", 0.0, 1.0),
        ("tail_mass", "tail mass", 0.0, 1.0),
        ("entropy", "entropy (nats, tail as one bin)", None, None),
        ("entries", "entries per position", None, None),
    ):
        d = describe(st[key].astype(float))
        click.echo(f"\n{label}: " + "  ".join(f"{k}={v:.4g}" for k, v in d.items()))
        for line in text_histogram(st[key].astype(float), lo=lo, hi=hi):
            click.echo("  " + line)
    if plot_path:
        _run(plot_stats, st, plot_path, f"{path} (T={t})")
        click.echo(f"\nplot written to {plot_path}")


@main.command()
@click.option("--teacher", help="Local Hugging Face causal LM folder (model + tokenizer), or a GGUF file "
              "(pip install 'softcache[gguf]'); omit both for the demo.")
@click.option("--data", help="save_to_disk folder, json/jsonl/parquet/csv/txt files (globs ok) or a folder of them.")
@click.option("--out", default=None, help="Cache directory or fsspec URL [default: ./softcache-demo for the demo].")
@click.option("--k", "k", type=int, default=64, show_default=True, help="Top-k ids kept per position.")
@click.option("--targets", type=click.Choice(list(KINDS)), default="topk", show_default=True)
@click.option("--samples", type=int, default=None, help="Draws per position for --targets sampled (e.g. 50).")
@click.option("--temperatures", default="1", show_default=True, help="Capture temperatures, comma-separated.")
@click.option("--max-length", type=int, default=2048, show_default=True, help="Tokens per sequence at most.")
@click.option("--pack", is_flag=True, help="Concatenate documents (EOS between) and cut to --max-length; "
              "default: truncate each document.")
@click.option("--field", default=None, help="Text column (default: input_ids if present, else text).")
@click.option("--split", default="train", show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N rows.")
@click.option("--chat-template", is_flag=True, help="--field holds chat messages; render them with the "
              "tokenizer's chat template.")
@click.option("--mask", type=click.Choice(["assistant", "all", "completion"]), default=None,
              help="Which tokens are trained (others store no targets and get labels -100): assistant turns "
              "[default with --chat-template], all [default otherwise], or completion (prompt + completion columns).")
@click.option("--batch-tokens", type=int, default=16384, show_default=True, help="Padded tokens per teacher batch.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher dtype [default: bf16 on CUDA, fp32 on CPU].")
@click.option("--device", default=None, help="cpu, cuda, cuda:N, or map (spread the model with device_map=auto).")
@click.option("--backend", type=click.Choice(["arrow", "zarr"]), default="arrow", show_default=True)
@click.option("--shard-tokens", type=int, default=1 << 20, show_default=True, help="Tokens per shard file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampled draws.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit) to load.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the teacher folder's own Python code to run.")
@click.option("--overwrite", is_flag=True, help="Replace a cache at --out that a different build wrote.")
@click.option("--skip-bad", is_flag=True, help="Skip sequences with NaN/inf teacher logits (counted in the manifest).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def build(teacher, data, out, temperatures, **options) -> None:
    """Run a teacher over a dataset and write a cache (the teacher pass). Rerun the same command to
    resume after a crash; run it under torchrun to use several processes. With no --teacher/--data,
    build the demo cache from the teacher and corpus shipped with softcache."""
    from softcache.build import build as build_cache
    from softcache.build import build_demo

    temps = _run(lambda: [float(t) for t in temperatures.split(",") if t.strip()])
    if teacher is None and data is None:
        # The demo's own settings, overridden by whatever was given on the command line.
        given = click.get_current_context().get_parameter_source
        demo = {key: value for key, value in options.items() if given(key) == click.core.ParameterSource.COMMANDLINE}
        if given("temperatures") == click.core.ParameterSource.COMMANDLINE:
            demo["temperatures"] = temps
        result = _run(build_demo, out or "softcache-demo", **demo)
    elif teacher is None or data is None:
        _fail("give both --teacher and --data (or neither, for the demo cache)")
    elif out is None:
        _fail("--out is required with --teacher/--data: the cache directory or URL to write")
    else:
        result = _run(build_cache, teacher, data, out, temperatures=temps, **options)
    if result.is_main:
        click.echo(result.summary())
    if result.is_main and result.next_steps:
        click.echo("next:\n  " + "\n  ".join(result.next_steps))


if __name__ == "__main__":
    main()
