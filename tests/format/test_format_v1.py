"""Caches written before the package was reshaped (format_version 1, commit 87c5912) open and decode unchanged.

``format_v1_caches/`` beside this file holds one tiny cache of each backend and kind, written by ``make.py`` with the
code of that commit, and ``expected.npz``: every record and ``Cache.targets`` at every captured temperature as it
decoded then.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest

import softcache
from softcache.ops import verify

DATA = Path(__file__).parent / "format_v1_caches"
NAMES = ["topk_arrow", "sampled_arrow", "topk_zarr", "sampled_zarr"]


@pytest.fixture(scope="module")
def expected():
    with np.load(DATA / "expected.npz", allow_pickle=False) as npz:
        return dict(npz)


@pytest.mark.parametrize("name", NAMES)
def test_old_cache_decodes_as_before(name, expected, tmp_path):
    path = tmp_path / name
    shutil.copytree(DATA / name, path)  # a copy: the checked-in cache is never written by a test
    assert verify(str(path)).ok
    cache = softcache.open_cache(str(path))
    assert cache.manifest.format_version == 1
    keys = [k for k in expected if k.startswith(f"{name}/")]
    assert len(cache) == 4 and keys
    for key in keys:
        _, i, field = key.split("/", 2)
        if field.startswith("targets@"):
            temperature, part = field.removeprefix("targets@").split("/")
            ids, logprobs = cache.targets(int(i), temperature=float(temperature))
            got = ids if part == "ids" else logprobs
        else:
            got = cache[int(i)][field]
        np.testing.assert_array_equal(np.asarray(got), expected[key], err_msg=key)
