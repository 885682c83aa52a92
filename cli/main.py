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


def _layers(param, value: str | None) -> list[int] | None:
    """A comma-separated list of layer indices (negative from the end)."""
    if value is None:
        return None
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected layer indices such as 0,4,-1, got {value!r}", param=param) from None


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
    softcache generate         teacher answers to prompts, with its targets at every generated token
    softcache info PATH        what a cache holds, bytes per token
    softcache verify PATH      check every shard (and generations.jsonl) against the manifest
    softcache convert SRC DST  copy a cache to the other backend, losslessly
    softcache stats PATH       teacher mass, tail mass and entropy histograms
    """


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(path: str, as_json: bool) -> None:
    """Summarise the cache at PATH (a directory or fsspec URL)."""
    from softcache import open_cache
    from softcache.ops import describe_extras, summary

    cache = _run(open_cache, path)
    s = summary(cache)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    width = max(map(len, s))
    for key, value in s.items():
        lines = describe_extras(value) if key == "extras" else [_fmt(value)]
        click.echo(f"{key:<{width}}  " + ("\n" + " " * (width + 2)).join(lines))


@main.command()
@click.argument("path")
@click.option("--no-decode", is_flag=True,
              help="Only checksums (the recorded files' too) and batch CRCs; skip decoding every batch.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.option("--allow-incomplete", is_flag=True, help="Exit 0 on an interrupted build whose shards are sound.")
def verify(path: str, no_decode: bool, quiet: bool, allow_incomplete: bool) -> None:
    """Check every shard of PATH: presence, size and SHA-256 against the manifest, each batch's CRC,
    and that every batch decodes; and the files the manifest records beside the shards (softcache generate's
    generations.jsonl): present, regular files, of the recorded SHA-256. Exit 1, naming each damaged shard or
    file and the fix, on any problem, and on a cache whose build was interrupted (unless --allow-incomplete)."""
    from softcache.ops import verify as verify_cache

    progress = None if quiet else (lambda i, name: click.echo(f"checking {name}", err=True))
    report = _run(verify_cache, path, decode=not no_decode, progress=progress)
    for name, problem in report.problems + report.file_problems:
        click.echo(f"{name}: {problem}", err=True)
    click.echo(f"complete: {report.complete}")
    if not report.ok:
        damaged = [f"{len(report.problems)} of {report.shards_checked} shards damaged"] if report.problems else []
        if report.file_problems:
            names = ", ".join(name for name, _ in report.file_problems)
            damaged.append(f"{len(report.file_problems)} of {report.files_checked} files the manifest records beside "
                           f"the shards missing or altered ({names})")  # fmt: skip
        _fail(" and ".join(damaged) + f" in {path}")
    incomplete = report.complete.startswith("no")
    if incomplete and not allow_incomplete:
        _fail(f"{path} is an interrupted build: rerun the softcache build command that wrote it to finish it, or "
              "pass --allow-incomplete to accept the sequences written so far")
    files = f", {report.files_checked} recorded files" if report.files_checked else ""
    click.echo(f"ok: {report.shards_checked} shards, {report.batches_checked} batches{files} verified"
               + (" (incomplete)" if incomplete else ""))


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
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also write histograms to this PNG (pip install 'softcache[plot]').")
def stats(path: str, temperature: float | None, max_tokens: int, plot_path: str | None) -> None:
    """Histograms per position: top-k caches the teacher's mass in the stored ids, the tail mass and bounds of the
    entropy; sampled caches the distinct ids drawn and the largest count share."""
    from softcache import open_cache
    from softcache.ops import describe, panels, plot_stats, position_stats, text_histogram

    cache = _run(open_cache, path)
    st = _run(position_stats, cache, temperature, max_tokens)
    t = cache.temperatures[0] if temperature is None else temperature
    shown = panels(st)
    click.echo(f"{path}: {len(st[shown[0][0]]):,} positions at T={t}")
    for key, label, lo, hi in shown:
        d = describe(st[key].astype(float))
        click.echo(f"\n{label}: " + "  ".join(f"{k}={v:.4g}" for k, v in d.items()))
        for line in text_histogram(st[key].astype(float), lo=lo, hi=hi):
            click.echo("  " + line)
    if plot_path:
        _run(plot_stats, st, plot_path, f"{path} (T={t})")
        click.echo(f"\nplot written to {plot_path}")


def _temperatures(ctx, param, values) -> list[float]:
    """``--temperatures 1,2 --temperatures 4`` → [1.0, 2.0, 4.0] (each use adds its comma-separated list)."""
    out = []
    for value in values:
        for part in str(value).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise click.BadParameter(f"{part.strip()!r} is not a number (give e.g. 1,2 or 1 2 4)") from None
    return out


def _config(ctx, param, path) -> None:
    """``--config FILE.yaml``: its keys (option names, with - or _) become the defaults that the command line
    overrides."""
    if path is None:
        return
    import difflib

    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"{path}: cannot be read as YAML: {e}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values (e.g. 'k: 64'), "
                                 f"got a {type(values).__name__}")
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option) and p.name != param.name}
    params.pop("help", None)
    defaults = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in params:
            options = [n.replace("_", "-") for n in params]
            close = difflib.get_close_matches(str(key).replace("_", "-"), options, n=1)
            raise click.BadParameter(f"{path}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else
                                     f"; the keys are the options of softcache build: {', '.join(sorted(options))}"))
        option = params[name]
        if option.multiple and not isinstance(value, list):
            value = [value]
        try:
            option.type_cast_value(ctx, value)
        except (click.BadParameter, TypeError, ValueError) as e:
            raise click.BadParameter(f"{path}: {key}: {value!r} is not a valid {option.type.name} "
                                     f"({getattr(e, 'message', e)})") from None
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


@main.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False,
              callback=_config, help="A YAML file of options (keys: the option names, e.g. 'max-length: 1024'); "
              "options given on the command line override it.")
@click.option("--teacher", help="Local Hugging Face causal LM folder (model + tokenizer), or a GGUF file "
              "(pip install 'softcache[gguf]'); omit both for the demo.")
@click.option("--data", help="save_to_disk folder, json/jsonl/parquet/csv/txt files (globs ok) or a folder of them.")
@click.option("--out", default=None, help="Cache directory or fsspec URL [default: ./softcache-demo for the demo].")
@click.option("--k", "k", type=int, default=64, show_default=True, help="Top-k ids kept per position.")
@click.option("--targets", type=click.Choice(list(KINDS)), default="topk", show_default=True)
@click.option("--samples", type=int, default=None, help="Draws per position for --targets sampled (e.g. 50).")
@click.option("--temperatures", multiple=True, default=("1",), show_default=True, callback=_temperatures,
              help="Capture temperatures, comma-separated; repeat the option to add more.")
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
@click.option("--hidden-states", callback=lambda ctx, param, value: _layers(param, value), default=None,
              help="Also store the teacher's hidden states at these layers, e.g. 0,4,-1 (0 = embeddings, negative from "
              "the end), for feature distillation; the size per token is printed before the build starts.")
@click.option("--hidden-dtype", type=click.Choice(["bf16", "fp16", "int8"]), default="bf16", show_default=True,
              help="How hidden states are stored: bf16/fp16 exactly, int8 with a per-row scale (error ≤ absmax/254).")
@click.option("--hidden-project", type=int, default=None,
              help="Store hidden states projected to D dimensions by a seeded random orthogonal matrix.")
@click.option("--attentions", callback=lambda ctx, param, value: _layers(param, value), default=None,
              help="Also store attention probabilities (heads, L, L, bf16) at these layers; needs --max-length ≤ 512.")
@click.option("--objective", type=click.Choice(["causal", "mlm"]), default="causal", show_default=True,
              help="mlm: a masked-LM teacher (AutoModelForMaskedLM); each sequence is masked with BERT's seeded rule "
              "and targets are stored at the masked positions only (unshifted).")
@click.option("--mlm-probability", type=float, default=0.15, show_default=True,
              help="--objective mlm: share of tokens chosen (of those 80% -> [MASK], 10% random, 10% kept).")
@click.option("--mask-copies", type=int, default=1, show_default=True,
              help="--objective mlm: differently-masked copies written of each sequence.")
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

    temps = temperatures
    if teacher is None and data is None:
        # The demo's own settings, overridden by whatever was given on the command line or in --config.
        source = click.get_current_context().get_parameter_source
        chosen = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.DEFAULT_MAP)
        demo = {key: value for key, value in options.items() if source(key) in chosen}
        if source("temperatures") in chosen:
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


@main.command()
@click.option("--teacher", required=True, help="Local Hugging Face causal LM folder (model + tokenizer), or a GGUF "
              "file (pip install 'softcache[gguf]').")
@click.option("--prompts", required=True, help="Prompts: save_to_disk folder, json/jsonl/parquet/csv files (globs ok) "
              "or a folder of them, with a 'prompt' text column or a 'messages' chat column (rendered with the chat "
              "template and its generation prompt; trailing assistant turns are dropped).")
@click.option("--out", required=True, help="Cache directory or fsspec URL to write.")
@click.option("--field", default=None, help="The prompt column [default: messages if present, else prompt].")
@click.option("--split", default="train", show_default=True, help="Split of a saved dataset or folder.")
@click.option("--limit", type=int, default=None, help="Use only the first N prompts.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True,
              help="Tokens generated per completion at most (a completion ends earlier at EOS, which it keeps).")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Sampling temperature of the generation (0: greedy). The stored targets come from the raw logits "
              "whatever it is; their capture temperatures are --temperatures.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling: keep the smallest set "
              "of tokens holding this probability (1: off).")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the K likeliest tokens (0: off).")
@click.option("--num-return-sequences", type=int, default=1, show_default=True, help="Completions per prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generation (each batch of prompts "
              "is seeded from it and its first prompt, so a rerun regenerates the same samples) and of sampled "
              "targets.")
@click.option("--filter", "filter_", default=None, metavar="MODULE:FUNCTION", help="Keep only the samples for which "
              "FUNCTION(prompt_text, completion_text) is true; the rejected ones are counted in the manifest.")
@click.option("--k", "k", type=int, default=64, show_default=True, help="Top-k ids kept per generated token.")
@click.option("--targets", type=click.Choice(list(KINDS)), default="topk", show_default=True,
              help="topk (ids, log-probs and exact normalisers) or sampled (draws with counts).")
@click.option("--samples", type=int, default=None, help="Draws per position for --targets sampled (e.g. 50).")
@click.option("--temperatures", multiple=True, default=("1",), show_default=True, callback=_temperatures,
              help="Capture temperatures of the targets, comma-separated; repeat the option to add more.")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="Prompts per teacher batch (each answered --num-return-sequences times).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Teacher dtype [default: bf16 on CUDA, fp32 on CPU].")
@click.option("--device", default=None, help="cpu, cuda, cuda:N, or map (spread the model with device_map=auto).")
@click.option("--backend", type=click.Choice(["arrow", "zarr"]), default="arrow", show_default=True,
              help="Storage of the cache: Arrow IPC files or Zarr v3 (convertible both ways).")
@click.option("--shard-tokens", type=int, default=1 << 20, show_default=True, help="Tokens per shard file.")
@click.option("--revision", default=None, help="Model revision (branch, tag or commit) to load.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the teacher folder's own Python code to run.")
@click.option("--overwrite", is_flag=True, help="Replace a cache at --out that a different run wrote.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def generate(teacher, prompts, out, filter_, **options) -> None:
    """Let a teacher answer prompts and keep its soft targets at every generated token: a cache of prompt +
    completion sequences (students train on the completions only), the generated text in OUT/generations.jsonl.
    The targets come from the raw logits of each step, before --temperature/--top-k/--top-p. Rerun the same
    command to resume after a crash; run it under torchrun to use several processes."""
    from softcache.build.generate import generate as generate_cache

    result = _run(generate_cache, teacher, prompts, out, filter=filter_, **options)
    if result.is_main:
        click.echo(result.summary())


if __name__ == "__main__":
    main()
