"""A cache whose build was interrupted (its manifest's build_state says complete: false) is shown as such by
``softcache info`` and ``verify``, and ``verify`` fails on it unless ``--allow-incomplete``. Caches written with
CacheWriter directly are not builds (no build_state) and are complete as far as softcache can tell."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from softcache.cli.main import main

import softcache
from softcache.format.manifest import BuildState
from softcache.ops import summary

INCOMPLETE = "complete: no (interrupted build; rerun the same command to finish)"


def _cache(path, state):
    rng = np.random.default_rng(0)
    with softcache.CacheWriter(str(path), vocab_size=50, k=4, temperatures=(1.0,)) as w:
        for n in (7, 5, 9):
            w.write_logits(rng.integers(0, 50, n), rng.standard_normal((n, 50)).astype(np.float32))
        w.manifest.build_state = state
        w.save_manifest()
    return str(path)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("incomplete")
    return {
        "interrupted": _cache(root / "interrupted", BuildState(complete=False)),
        "built": _cache(root / "built", BuildState(complete=True)),
        "written": _cache(root / "written", None),
    }


def test_info_says_an_interrupted_build_is_incomplete(caches):
    assert summary(softcache.open_cache(caches["interrupted"]))["complete"] == INCOMPLETE.removeprefix("complete: ")
    assert summary(softcache.open_cache(caches["built"]))["complete"] == "yes"
    assert summary(softcache.open_cache(caches["written"]))["complete"] == "yes (written by CacheWriter, not a build)"
    out = CliRunner().invoke(main, ["info", caches["interrupted"]])
    assert out.exit_code == 0 and "interrupted build; rerun the same command to finish" in out.output
    shown = json.loads(CliRunner().invoke(main, ["info", "--json", caches["built"]]).output)
    assert shown["complete"] == "yes"


def test_verify_fails_on_an_incomplete_cache_unless_allowed(caches):
    out = CliRunner().invoke(main, ["verify", "-q", caches["interrupted"]])
    assert out.exit_code == 1, out.output
    assert INCOMPLETE in out.output and "--allow-incomplete" in out.output
    out = CliRunner().invoke(main, ["verify", "-q", "--allow-incomplete", caches["interrupted"]])
    assert out.exit_code == 0, out.output
    assert INCOMPLETE in out.output and "ok: 1 shards" in out.output
    for name in ("built", "written"):
        out = CliRunner().invoke(main, ["verify", "-q", caches[name]])
        assert out.exit_code == 0 and "complete: no" not in out.output, out.output


def test_convert_keeps_the_build_state(caches, tmp_path):
    """A converted interrupted build is still one (not a complete cache "written by CacheWriter"), and back."""
    from softcache.ops import convert

    zarr = convert(caches["interrupted"], str(tmp_path / "z"), "zarr").manifest.build_state
    assert zarr == BuildState(complete=False)
    assert convert(str(tmp_path / "z"), str(tmp_path / "a"), "arrow").manifest.build_state == zarr
    assert convert(caches["built"], str(tmp_path / "b"), "zarr").manifest.build_state == BuildState(complete=True)
    assert convert(caches["written"], str(tmp_path / "w"), "zarr").manifest.build_state is None
    out = CliRunner().invoke(main, ["verify", "-q", str(tmp_path / "a")])
    assert out.exit_code == 1 and INCOMPLETE in out.output
