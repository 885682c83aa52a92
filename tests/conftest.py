"""Test configuration: Triton kernels run on the CPU through the interpreter (CI has no GPU).

The folders mirror the package (``build/``, ``data/``, ``format/``, ``integrations/``, ``kernels/``; top-level modules'
tests here); each folder's ``conftest.py`` holds what its tests share. Test modules never import each other, and the
folders are not packages, so every test file needs a basename of its own.
"""

import os
from pathlib import Path

import pytest

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``build`` is in pytest's default ``norecursedirs``; ``tests/build`` (the teacher pass) is collected anyway."""
    if collection_path == Path(__file__).parent / "build":
        return False
    return None
