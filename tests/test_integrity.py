"""What decodes is never trusted blindly, one writer holds a cache, and hostile files are refused, never followed.

One test (or a few) per finding of the reliability audit: an edited manifest, two writers, a kill during the first
manifest write, links and special files, hostile numbers, bad writer inputs, and the smaller ones. Each failed on the
code before the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from softcache import CacheFormatError, CacheWriter, CorruptShardError, open_cache
from softcache.demo import teacher_path
from softcache.errors import CacheLockedError
from softcache.format import get_backend
from softcache.format.manifest import canonical_digest
from softcache.ops import summary, verify

V, K, TEMPS = 61, 6, (1.0, 2.0)


def write_cache(root, backend="arrow", n=5, seed=0, **options):
    rng = np.random.default_rng(seed)
    opts = dict(vocab_size=V, k=K, temperatures=TEMPS, backend=backend, batch_tokens=16, shard_tokens=32) | options
    with CacheWriter(root, **opts) as w:
        for i in range(n):
            length = 5 + i
            w.write_logits(rng.integers(0, V, length), torch.from_numpy(rng.normal(size=(length, V)) * 3).float())
    return root


def load(root) -> dict:
    return json.loads((root / "softcache.json").read_text())


def save(root, manifest: dict, sign: bool) -> None:
    if sign:  # a forged manifest whose checksum matches: the field checks and shard headers must still refuse it
        manifest["manifest_sha256"] = canonical_digest(manifest)
    (root / "softcache.json").write_text(json.dumps(manifest))


# -- 1. the manifest carries a checksum; shards repeat what decodes them -----------------------------------------------


@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_an_edited_manifest_is_refused_by_name(backend, tmp_path):
    root = write_cache(tmp_path / "c", backend)
    m = load(root)
    m["codec"]["logprob_step"] = 0.03125  # would double every decoded log-prob
    save(root, m, sign=False)
    with pytest.raises(CacheFormatError, match=r"softcache\.json.*checksum.*edited or damaged"):
        open_cache(root)
    with pytest.raises(CacheFormatError, match="checksum"):
        verify(str(root))


@pytest.mark.parametrize(
    "field, value",
    [("codec", {"logprob_step": 0.03125, "lognorm_step": 2.0**-20}), ("temperatures", [1.0, 2.5]), ("k", K + 1)],
)
def test_a_forged_manifest_disagrees_with_the_shard_headers(field, value, tmp_path):
    root = write_cache(tmp_path / "c")
    m = load(root)
    m[field] = value
    save(root, m, sign=True)
    cache = open_cache(root)
    with pytest.raises(CorruptShardError, match=r"shard-00000\.arrow was encoded with .*manifest says"):
        cache[0]
    report = verify(str(root))
    assert not report.ok and all("encoded with" in why for _, why in report.problems)


def test_a_shard_listed_twice_is_refused(tmp_path):
    root = write_cache(tmp_path / "c")
    m = load(root)
    m["shards"].append(dict(m["shards"][0]))
    save(root, m, sign=True)
    with pytest.raises(CacheFormatError, match="shard-00000.arrow is listed twice"):
        open_cache(root)


def test_old_manifests_without_a_checksum_still_open_and_say_so(tmp_path):
    root = write_cache(tmp_path / "c")
    m = load(root)
    del m["manifest_sha256"]
    save(root, m, sign=False)
    cache = open_cache(root)
    assert not cache.manifest.checksummed and "none" in summary(cache)["manifest_checksum"]
    assert verify(str(root)).ok
    with CacheWriter(root, vocab_size=V, k=K, temperatures=TEMPS, batch_tokens=16, shard_tokens=32) as w:
        w.write_targets(np.arange(3), np.zeros((3, 1), np.int64), np.zeros((3, 1)), np.zeros((3, 2)))
    assert open_cache(root).manifest.checksummed  # appending re-signs it


# -- 2. one writer per cache -------------------------------------------------------------------------------------------

HOLD = """
import sys, time
import softcache
w = softcache.CacheWriter(sys.argv[1], vocab_size=61, k=6)
print("holding", flush=True)
time.sleep(120)
"""


def hold_lock(root):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    root = tmp_path / "c"
    proc = hold_lock(root)
    try:
        with pytest.raises(CacheLockedError, match=rf"being written by pid {proc.pid} on .*one writer per cache"):
            CacheWriter(root, vocab_size=V, k=K)
    finally:
        proc.kill()
        proc.wait()
    with pytest.warns(UserWarning, match=rf"taking over the lock of pid {proc.pid}.*no longer running"):
        w = CacheWriter(root, vocab_size=V, k=K)  # its holder was killed: the lock is stale
    with pytest.raises(CacheLockedError):  # and now this writer holds it, in this process too
        CacheWriter(root, vocab_size=V, k=K)
    w.close()
    assert not (root / ".softcache.lock").exists()
    CacheWriter(root, vocab_size=V, k=K).close()


def test_two_writers_in_one_process_on_memory(tmp_path):
    url = f"memory://lock-{tmp_path.name}"
    w = CacheWriter(url, vocab_size=V, k=K)
    with pytest.raises(CacheLockedError, match="lock file"):
        CacheWriter(url, vocab_size=V, k=K)
    w.close()
    CacheWriter(url, vocab_size=V, k=K).close()


# -- 3. resumable from a kill during the very first manifest write -----------------------------------------------------


def test_a_folder_holding_only_temporaries_is_empty(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / ".softcache.json.tmp").write_bytes(b"")  # killed while writing the first manifest
    (root / ".softcache.lock").write_text("{}")
    write_cache(root)
    assert len(open_cache(root)) == 5 and sorted(p.name for p in root.iterdir())[0] == "shard-00000.arrow"


def test_non_json_metadata_is_refused_before_the_folder_is_touched(tmp_path):
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        CacheWriter(tmp_path / "c", vocab_size=V, k=K, metadata={"x": object()})
    assert not (tmp_path / "c").exists()
    write_cache(tmp_path / "c")  # nothing was left behind


# -- 4. links and special files are refused, never followed ------------------------------------------------------------


def run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run in a subprocess: a read that hangs fails the test instead of hanging the suite."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("replacement", ["/dev/zero", "fifo", "outside"])
@pytest.mark.parametrize("backend", ["arrow", "zarr"])
def test_a_shard_file_replaced_by_a_link_or_fifo(replacement, backend, tmp_path):
    root = write_cache(tmp_path / "c", backend)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 100)
    name = f"shard-00000.{backend}"
    victim = root / name
    if backend == "zarr":  # the largest file of the shard: a data chunk
        victim = max((p for p in victim.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.unlink()
    if replacement == "fifo":
        os.mkfifo(victim)
    else:
        victim.symlink_to("/dev/zero" if replacement == "/dev/zero" else outside)
    out = run_isolated(f"""
        import softcache
        from softcache.ops import verify
        report = verify({str(root)!r})
        print("VERIFY", report.ok, report.problems[0][1] if report.problems else "")
        try:
            softcache.open_cache({str(root)!r})[0]
        except softcache.CorruptShardError as e:
            print("READ", e)
    """)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "VERIFY False" in out.stdout and "READ" in out.stdout
    kind = "special" if replacement == "fifo" else "symlink"
    assert out.stdout.count(kind) == 2 and name in out.stdout


def test_a_manifest_that_is_a_link_is_refused(tmp_path):
    root = write_cache(tmp_path / "c")
    real = tmp_path / "elsewhere.json"
    shutil.move(root / "softcache.json", real)
    (root / "softcache.json").symlink_to(real)
    with pytest.raises(CacheFormatError, match="softcache.json is a symlink"):
        open_cache(root)


# -- 6. numbers from the manifest are bounded, fields are checked ------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("k", 10**6, "k must be an integer in"),
        ("vocab_size", 10**10, "vocab_size must be an integer in"),
        ("format_version", True, "invalid format_version"),
        ("temperatures", 5, "temperatures must be distinct finite positive"),
        ("temperatures", [0.0, 2.0], "temperatures must be distinct finite positive"),
        ("samples", "many", "samples must be an integer"),
        ("backend", "parquet", "unknown backend"),
        ("codec", [1], "codec must be an object"),
    ],
)
def test_hostile_manifest_fields_name_the_file_and_field(field, value, message, tmp_path):
    root = write_cache(tmp_path / "c")
    m = load(root)
    m[field] = value
    save(root, m, sign=True)
    with pytest.raises(CacheFormatError, match=rf"softcache\.json: .*{message}"):
        open_cache(root)


@pytest.mark.parametrize("key, value", [("sequences", 10**30), ("tokens", -1), ("batches", [1, "x"]), ("bytes", 1.5)])
def test_hostile_shard_entries(key, value, tmp_path):
    root = write_cache(tmp_path / "c")
    m = load(root)
    m["shards"][0][key] = value
    save(root, m, sign=True)
    with pytest.raises(CacheFormatError, match=r"softcache\.json: shard shard-00000\.arrow"):
        summary(open_cache(root))


def test_a_shard_without_a_stream_its_kind_needs(tmp_path):
    """Checksums all consistent, but the batches lack ``lognorm``: an error naming the shard, not a KeyError."""
    root = write_cache(tmp_path / "c")
    cache = open_cache(root)
    entry, header, batches = next(cache.encoded_shards())
    kept = [(n, {k: v for k, v in streams.items() if k != "lognorm"}) for n, streams in batches]
    cache.close()
    backend = get_backend("arrow")
    (root / entry.file).unlink()
    writer = backend.create(cache.fs, cache.root, entry.file, header, [s for s in kept[0][1]])
    for n, streams in kept:
        writer.write_batch(streams, n)
    size, digest = writer.commit()
    m = load(root)
    m["shards"][0].update(bytes=size, sha256=digest)
    save(root, m, sign=True)
    with pytest.raises(CorruptShardError, match="shard-00000.arrow: batch 0 lacks the stream 'lognorm'"):
        open_cache(root)[0]


# -- 7. writer inputs --------------------------------------------------------------------------------------------------


def test_input_ids_at_or_beyond_the_vocabulary_are_refused(tmp_path):
    with CacheWriter(tmp_path / "c", vocab_size=V, k=K) as w:
        with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, vocab_size={V}\), found {V}"):
            w.write_logits(np.array([1, V, 2]), torch.zeros(3, V))
        with pytest.raises(ValueError, match="input_ids must be token ids"):
            w.write_targets(np.array([V + 5]), np.zeros((1, 1), np.int64), np.zeros((1, 1)), np.zeros((1, 2)))


@pytest.mark.parametrize("targets", ["topk", "sampled"])
def test_huge_finite_logits_give_a_distribution(targets, tmp_path):
    z = torch.full((4, V), -3e38)
    z[:, :3] = 3e38  # three equally likely ids, the rest impossible
    opts = dict(k=K, temperatures=TEMPS) if targets == "topk" else dict(k=8, targets="sampled", samples=8)
    with CacheWriter(tmp_path / "c", vocab_size=V, **opts) as w:
        w.write_logits(np.arange(4), z)
    cache = open_cache(tmp_path / "c")
    for t in cache.temperatures:
        ids, lp = cache.targets(0, temperature=t)
        p = np.where(ids >= 0, np.exp(lp.astype(np.float64)), 0)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=0.02)
        assert set(ids[ids >= 0].tolist()) <= {0, 1, 2}


# -- 8. the smaller ones -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 1e3, 1e5])
def test_the_tempered_tail_mass_is_exact_at_any_shift(shift, tmp_path):
    rng = np.random.default_rng(3)
    z = (torch.from_numpy(rng.normal(size=(6, V)) * 2) + shift).float()
    with CacheWriter(tmp_path / "c", vocab_size=V, k=K, temperatures=TEMPS) as w:
        w.write_logits(np.arange(6), z)
    ids, lp = open_cache(tmp_path / "c").targets(0, temperature=2.0)
    exact = torch.softmax(z.double() / 2.0, -1).numpy()  # of the fp32 logits the writer was given
    tail = 1 - np.take_along_axis(exact, ids, -1).sum(-1)
    np.testing.assert_allclose(1 - np.exp(lp.astype(np.float64)).sum(-1), tail, atol=2e-6)


def test_build_checks_data_and_out_before_loading_the_teacher(tmp_path, monkeypatch):
    from softcache.build import run

    def never(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the inputs were checked")

    monkeypatch.setattr(run, "load_teacher", never)
    teacher = str(teacher_path())
    with pytest.raises(ValueError, match="missing.jsonl"):
        run.build(teacher, str(tmp_path / "missing.jsonl"), str(tmp_path / "out"), quiet=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match="is not empty and is not a softcache cache"):
        run.build(teacher, str(data), str(busy), quiet=True)
    with pytest.raises(ValueError, match="temperatures"):
        run.build(teacher, str(data), str(tmp_path / "out"), temperatures=(0.0,), quiet=True)


def test_killed_writer_process_resumes_to_the_same_cache(tmp_path):
    """SIGKILL a writing process between shard commits; the rerun appends after the committed shards."""
    code = f"""
        import os, signal, sys
        import numpy as np, torch
        import softcache
        rng = np.random.default_rng(0)
        w = softcache.CacheWriter(sys.argv[1], vocab_size={V}, k={K}, temperatures={TEMPS}, batch_tokens=16,
                                  shard_tokens=32)
        for i in range(12):
            length = 5 + i
            ids, z = rng.integers(0, {V}, length), torch.from_numpy(rng.normal(size=(length, {V})) * 3).float()
            if i >= int(sys.argv[2]) and i >= 6:
                os.kill(os.getpid(), signal.SIGKILL)
            if i >= int(sys.argv[2]):
                continue
            w.write_logits(ids, z)
        w.close()
    """
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_isolated(code.replace("sys.argv[1]", repr(str(whole))).replace("sys.argv[2]", "99")).returncode == 0
    proc = run_isolated(code.replace("sys.argv[1]", repr(str(killed))).replace("sys.argv[2]", "7"))
    assert proc.returncode == -signal.SIGKILL
    done = len(open_cache(killed))
    assert 0 < done < 7
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="taking over the lock"):
        w = CacheWriter(killed, vocab_size=V, k=K, temperatures=TEMPS, batch_tokens=16, shard_tokens=32)
    with w:
        for i in range(12):
            length = 5 + i
            ids, z = rng.integers(0, V, length), torch.from_numpy(rng.normal(size=(length, V)) * 3).float()
            if i >= done:
                w.write_logits(ids, z)
    a, b = open_cache(whole), open_cache(killed)
    assert len(a) == len(b) == 12 and verify(str(killed)).ok
    for i in range(12):
        for key, value in a[i].items():
            np.testing.assert_array_equal(value, b[i][key])
