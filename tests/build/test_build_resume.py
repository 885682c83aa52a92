"""A build killed part-way (SIGKILL, or an exception) and rerun ends with the same cache as an uninterrupted one;
a different build on an existing cache is refused unless overwrite."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import softcache
from softcache.build import build
from softcache.build.teacher import TeacherHead
from softcache.errors import BuildConflictError

OPTS = dict(k=8, temperatures=(1.0, 2.0), max_length=40, pack=True, batch_tokens=100, shard_tokens=300, quiet=True)


@pytest.fixture(scope="module")
def reference(teacher, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "cache"
    build(str(teacher), str(data), str(out), **OPTS)
    return softcache.open_cache(out)


def test_sigkill_mid_shard_then_rerun_equals_uninterrupted(teacher, data, reference, assert_same_cache, tmp_path):
    out = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal
        from softcache.format import ShardWriter
        from softcache.build import build
        write_batch = ShardWriter.write_batch
        def write_then_die(self, streams, n):  # kill -9 with shard 0 committed and shard 1 half written
            write_batch(self, streams, n)
            if self.name.startswith("shard-00001") and len(self.batches) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        ShardWriter.write_batch = write_then_die
        build({str(teacher)!r}, {str(data)!r}, {str(out)!r}, **{OPTS!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    killed = softcache.open_cache(out)
    assert 0 < len(killed) < len(reference) and len(killed.manifest["shards"]) == 1
    assert any(p.name.endswith(".tmp") for p in out.iterdir())  # the half-written shard
    result = build(str(teacher), str(data), str(out), **OPTS)
    assert result.resumed_sequences == len(killed)
    assert_same_cache(softcache.open_cache(out), reference)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_exception_then_rerun_equals_uninterrupted(teacher, data, reference, assert_same_cache, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    original, calls = TeacherHead.batch_targets, []

    def fail_in_second_window(self, *args):
        calls.append(1)
        if len(calls) == 13:  # window 0 (800 tokens) is 10 batches
            raise RuntimeError("injected failure")
        return original(self, *args)

    monkeypatch.setattr(TeacherHead, "batch_targets", fail_in_second_window)
    with pytest.raises(RuntimeError, match="injected"):
        build(str(teacher), str(data), str(out), **OPTS)
    monkeypatch.setattr(TeacherHead, "batch_targets", original)
    partial = len(softcache.open_cache(out))
    assert 0 < partial < len(reference)
    assert build(str(teacher), str(data), str(out), **OPTS).resumed_sequences == partial
    assert_same_cache(softcache.open_cache(out), reference)
    again = build(str(teacher), str(data), str(out), **OPTS)
    assert again.already_complete and "nothing to do" in again.summary()


def test_a_different_build_is_refused_unless_overwrite(teacher, data, tmp_path):
    out = tmp_path / "cache"
    build(str(teacher), str(data), str(out), **OPTS)
    with pytest.raises(BuildConflictError, match=r"k: 8 → 6.*--overwrite"):
        build(str(teacher), str(data), str(out), **{**OPTS, "k": 6})
    build(str(teacher), str(data), str(out), **{**OPTS, "k": 6, "overwrite": True})
    assert softcache.open_cache(out).k == 6
