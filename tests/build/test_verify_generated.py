"""``softcache verify`` of a ``softcache generate`` cache checks the ``generations.jsonl`` its manifest records (name,
line count, SHA-256) as well as the shards: a missing, edited or symlinked one fails verify (exit 1) by name, with the
fix, in ``report.file_problems`` and not as a damaged shard; the fix it names (rerun the generate command) works."""

from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.build.generate import TEXTS_NAME
from softcache.errors import CacheFormatError
from softcache.ops import convert, verify

FIX = "rerun the softcache generate command that wrote"


@pytest.fixture
def copy(generation, tmp_path):
    """A fresh copy of the generated cache, to damage."""
    return shutil.copytree(generation[0], tmp_path / "cache")


def damage(cache, how: str, outside) -> None:
    text = cache / TEXTS_NAME
    if how == "edited":  # one byte of a completion changed, same length
        data = bytearray(text.read_bytes())
        at = data.rindex(b'"completion": "') + len(b'"completion": "')
        data[at] = ord("X") if data[at] != ord("X") else ord("Y")
        text.write_bytes(bytes(data))
    elif how == "deleted":
        text.unlink()
    elif how == "symlink":  # to a byte-identical copy outside the cache: still not the cache's own file
        shutil.copyfile(text, outside / TEXTS_NAME)
        text.unlink()
        os.symlink(outside / TEXTS_NAME, text)
    elif how == "dangling symlink":
        text.unlink()
        os.symlink(outside / "nowhere.jsonl", text)
    else:
        raise AssertionError(how)


def test_a_generated_cache_verifies_with_its_text(generation):
    cache, _ = generation
    report = verify(str(cache))
    assert report.ok and report.complete == "yes", (report.problems, report.file_problems)
    assert report.files_checked == 1 and report.file_problems == [] and report.shards_checked > 1
    checked = []
    verify(str(cache), decode=False, progress=lambda i, name: checked.append(name))
    assert checked[-1] == TEXTS_NAME and len(checked) == report.shards_checked + 1
    run = CliRunner().invoke(main, ["verify", "-q", str(cache)])
    assert run.exit_code == 0, run.output
    assert f"ok: {report.shards_checked} shards, {report.batches_checked} batches, 1 recorded files" in run.output
    run = CliRunner().invoke(main, ["verify", str(cache)])
    assert run.exit_code == 0 and f"checking {TEXTS_NAME}" in run.output, run.output


@pytest.mark.parametrize("how", ["edited", "deleted", "symlink", "dangling symlink"])
def test_a_damaged_generated_text_fails_verify_by_name(copy, tmp_path, how):
    damage(copy, how, tmp_path)
    report = verify(str(copy))
    assert not report.ok and report.problems == [], report.problems  # the shards are sound
    assert report.files_checked == 1 and len(report.file_problems) == 1
    name, why = report.file_problems[0]
    assert name == TEXTS_NAME and str(copy / TEXTS_NAME) in why and FIX in why, why
    expected = {"edited": "does not match the SHA-256", "deleted": "is missing", "symlink": "is a symlink",
                "dangling symlink": "is a symlink"}[how]  # fmt: skip
    assert expected in why, why
    if how != "deleted":
        assert "delete it and rerun" in why, why
    assert verify(str(copy), decode=False).file_problems == report.file_problems
    for flags in (["-q"], ["-q", "--no-decode"], ["-q", "--allow-incomplete"]):
        run = CliRunner().invoke(main, ["verify", *flags, str(copy)])
        assert run.exit_code == 1, (flags, run.output)
        assert f"{TEXTS_NAME}: {why}" in run.output
        assert f"error: 1 of 1 files the manifest records beside the shards missing or altered ({TEXTS_NAME})" in (
            run.output
        )
        assert "shards damaged" not in run.output and "ok:" not in run.output


def test_a_damaged_shard_and_text_are_told_apart(copy):
    shard = copy / softcache.open_cache(copy).manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / TEXTS_NAME).unlink()
    report = verify(str(copy))
    assert [name for name, _ in report.problems] == [shard.name]
    assert [name for name, _ in report.file_problems] == [TEXTS_NAME]
    run = CliRunner().invoke(main, ["verify", "-q", str(copy)])
    assert run.exit_code == 1 and f"{shard.name}: " in run.output and f"{TEXTS_NAME}: " in run.output, run.output
    assert f"1 of {report.shards_checked} shards damaged and 1 of 1 files the manifest records beside" in run.output


@pytest.mark.parametrize("how", ["edited", "deleted", "symlink"])
def test_the_fix_verify_names_works(generation, copy, tmp_path, how):
    original = (generation[0] / TEXTS_NAME).read_bytes()
    damage(copy, how, tmp_path)
    (name, why), *more = verify(str(copy)).file_problems
    assert name == TEXTS_NAME and not more and FIX in why
    if "delete it and rerun" in why:
        (copy / TEXTS_NAME).unlink()
    generation[1](copy)
    assert (copy / TEXTS_NAME).read_bytes() == original and not (copy / TEXTS_NAME).is_symlink()
    assert verify(str(copy)).ok


def test_convert_refuses_a_symlinked_text_with_the_fix(copy, tmp_path):
    damage(copy, "symlink", tmp_path)
    with pytest.raises(CacheFormatError, match=f"{TEXTS_NAME} is a symlink.*delete it and {FIX}.*then convert"):
        convert(str(copy), str(tmp_path / "z"), "zarr")
    assert not (tmp_path / "z").exists()
