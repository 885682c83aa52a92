"""examples/: each script trains a tiny student for a few steps from the demo cache, in its own process (the DDP one
under ``torch.distributed.run`` with 2 gloo ranks). The processes start together, so they share the CPUs' time."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--steps", "3", "--max-length", "64", "--hidden", "32", "--layers", "1", "--batch-size", "2"]
COMMANDS = {
    "plain_pytorch": [sys.executable, "examples/plain_pytorch.py"],
    "hf_trainer": [sys.executable, "examples/hf_trainer.py"],
    "lightning_train": [sys.executable, "examples/lightning_train.py"],
    "ddp_torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "examples/ddp_torchrun.py"],
    "self_distillation": [sys.executable, "examples/self_distillation.py"],
    "feature_distillation": [sys.executable, "examples/feature_distillation.py"],
    "distilbert": [sys.executable, "examples/distilbert.py"],
}
EXPECT = {
    "plain_pytorch": r"step 3 loss \d+\.\d+",
    "hf_trainer": r"held-out distillation loss: \d+\.\d+ before, \d+\.\d+ after 3 steps",
    "lightning_train": r"held-out distillation loss: \d+\.\d+ before, \d+\.\d+ after 3 steps",
    "ddp_torchrun": r"step 3 loss \d+\.\d+ \(\d+ rows on 2 ranks\)[\s\S]*ranks hold identical weights after 3 steps",
    "self_distillation": r"generation 2, step 3: loss \d+\.\d+ offline, \d+\.\d+ online[\s\S]*offline and online",
    "feature_distillation": r"after 3 steps: loss \d+\.\d+ → \d+\.\d+, hidden \d+\.\d+ → \d+\.\d+, attention",
    "distilbert": r"after 3 steps: loss [\d.]+ → [\d.]+, soft KL \(T=2\) [\d.]+ → [\d.]+, MLM [\d.]+ → [\d.]+, cosine",
}


@pytest.fixture(scope="module")
def runs(demo_cache):
    cache = demo_cache
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = {
        name: subprocess.Popen(
            command + ["--cache", cache, *SMALL],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for name, command in COMMANDS.items()
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_example_runs(runs, name):
    try:
        out, _ = runs[name].communicate(timeout=240)
    except subprocess.TimeoutExpired:
        runs[name].kill()
        pytest.fail(f"examples/{name}.py did not finish in 240 s")
    assert runs[name].returncode == 0, out[-4000:]
    assert re.search(EXPECT[name], out), out[-4000:]
