"""The backend registry in ``softcache.format``."""

import pytest

from softcache.format import BACKENDS, get_backend


def test_registry():
    assert [get_backend(b).name for b in BACKENDS] == list(BACKENDS)
    assert {get_backend(b).suffix for b in BACKENDS} == {".arrow", ".zarr"}
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("parquet")
