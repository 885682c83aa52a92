"""`torchrun --nproc_per_node 2` (gloo, CPU): each rank builds its part, rank 0 merges; equals the one-process build."""

# ruff: noqa: F811 - the shared fixtures `teacher` and `data` are imported from test_build, then requested by name
from __future__ import annotations

import os
import signal
import subprocess
import sys

from test_build import assert_same_cache, data, teacher  # noqa: F401 - shared fixtures

import softcache
from softcache.teacher import build

OPTS = dict(k=8, temperatures=(1.0, 2.0), max_length=40, pack=True, batch_tokens=100, shard_tokens=300)


def test_torchrun_two_ranks_equals_one_process(teacher, data, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "softcache.cli.main", "build", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
           "--k", "8", "--temperatures", "1,2", "--max-length", "40", "--pack", "--batch-tokens", "100",
           "--shard-tokens", "300", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote") == 1  # one summary, from rank 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("shard-")) == ["softcache.json"]
    two = softcache.open_cache(out)
    assert two.manifest["metadata"]["complete"] and two.manifest["metadata"]["build"]["world_size"] == 2
    build(str(teacher), str(data), str(tmp_path / "one"), quiet=True, **OPTS)
    assert_same_cache(two, softcache.open_cache(tmp_path / "one"))
