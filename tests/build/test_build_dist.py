"""`torchrun --nproc_per_node 2` (gloo, CPU): each rank builds its part, rank 0 merges; equals the one-process build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import softcache
from softcache.build import build

OPTS = dict(k=8, temperatures=(1.0, 2.0), max_length=40, pack=True, batch_tokens=100, shard_tokens=300)
ARGS = ["--k", "8", "--temperatures", "1,2", "--max-length", "40", "--pack", "--batch-tokens", "100",
        "--shard-tokens", "300", "-q"]
DIE = """
import os, signal, sys
from softcache.format import ShardWriter
write_batch = ShardWriter.write_batch
def write_then_die(self, streams, n):  # rank 1: kill -9 with its shard 0 committed and shard 1 half written
    write_batch(self, streams, n)
    if os.environ["RANK"] == "1" and self.name.startswith("shard-00001") and len(self.batches) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
ShardWriter.write_batch = write_then_die
from softcache.cli.main import main
main()
"""


def torchrun(target: list[str], teacher, data, out, expect_ok: bool = True) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, "build",
           "--teacher", str(teacher), "--data", str(data), "--out", str(out), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert (proc.returncode == 0) == expect_ok, stderr[-3000:]
    return stdout


def test_torchrun_two_ranks_equals_one_process(teacher, data, assert_same_cache, tmp_path):
    out = tmp_path / "two"
    stdout = torchrun(["-m", "softcache.cli.main"], teacher, data, out)
    assert stdout.count("wrote") == 1  # one summary, from rank 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == ["softcache.json"]
    two = softcache.open_cache(out)
    assert two.manifest.build_state.complete and two.manifest.metadata["build"]["world_size"] == 2
    build(str(teacher), str(data), str(tmp_path / "one"), quiet=True, **OPTS)
    assert_same_cache(two, softcache.open_cache(tmp_path / "one"))


def test_torchrun_rank_killed_then_rerun_equals_one_process(teacher, data, assert_same_cache, tmp_path):
    out, script = tmp_path / "two", tmp_path / "die.py"
    script.write_text(DIE)
    torchrun([str(script)], teacher, data, out, expect_ok=False)
    rank1 = softcache.open_cache(out / "rank-00001-of-00002")
    assert len(rank1.manifest["shards"]) == 1 and not two_complete(out)
    torchrun(["-m", "softcache.cli.main"], teacher, data, out)
    assert two_complete(out) and not (out / "rank-00001-of-00002").exists()
    build(str(teacher), str(data), str(tmp_path / "one"), quiet=True, **OPTS)
    assert_same_cache(softcache.open_cache(out), softcache.open_cache(tmp_path / "one"))


def two_complete(out) -> bool:
    return softcache.open_cache(out).manifest.build_state.complete
