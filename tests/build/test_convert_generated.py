"""``softcache convert`` of a ``softcache generate`` cache carries its ``generations.jsonl`` (the file the manifest
records by name, line count and SHA-256) byte for byte, both ways, with the build state, and the converted caches
verify as complete; a source whose text file is missing or altered is refused by name before anything is written."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.build.generate import TEXTS_NAME
from softcache.errors import CacheFormatError
from softcache.ops import convert, verify


@pytest.fixture(scope="module")
def generated(generation):
    return generation[0]


def test_convert_carries_the_generated_text_both_ways(generated, tmp_path, assert_same_cache):
    text = (generated / TEXTS_NAME).read_bytes()
    source = softcache.open_cache(generated).manifest
    recorded = source.metadata["generated_text"]
    zarr = convert(str(generated), str(tmp_path / "zarr"), "zarr")
    run = CliRunner().invoke(main, ["convert", "-q", "--backend", "arrow", str(tmp_path / "zarr"), str(tmp_path / "a")])
    assert run.exit_code == 0, run.output
    for out in (tmp_path / "zarr", tmp_path / "a"):
        assert (out / TEXTS_NAME).read_bytes() == text
        manifest = softcache.open_cache(out).manifest
        assert manifest.metadata["generated_text"] == recorded and manifest.build_state == source.build_state
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        report = verify(str(out))
        assert report.ok and report.complete == "yes", report.problems
    assert zarr.manifest.backend == "zarr"
    assert_same_cache(softcache.open_cache(tmp_path / "a"), softcache.open_cache(generated))


def test_a_missing_or_altered_generated_text_is_refused(generated, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(generated, src)
    lines = (src / TEXTS_NAME).read_text().splitlines(keepends=True)
    (src / TEXTS_NAME).write_text("".join(lines[:-1]) + json.dumps({"edited": True}) + "\n")
    with pytest.raises(CacheFormatError, match=f"{TEXTS_NAME} does not match the SHA-256 the manifest records"):
        convert(str(src), str(tmp_path / "z1"), "zarr")
    assert not (tmp_path / "z1").exists()
    (src / TEXTS_NAME).unlink()
    with pytest.raises(CacheFormatError, match=f"{TEXTS_NAME} is missing"):
        convert(str(src), str(tmp_path / "z2"), "zarr")
    assert not (tmp_path / "z2").exists()
