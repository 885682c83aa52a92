"""DistillationTrainer + StreamingSoftTargetDataset under torchrun (2 gloo ranks on the CPU): accelerate would read
the iterable dataset on rank 0 and dispatch its batches (which fails on batches of different lengths) and shard it
again; the trainer integration lets each rank read the stream and deals its batches to the ranks, so every sequence
is trained on by exactly one rank. This file is also the script that ``torch.distributed.run`` starts on each rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import transformers

import softcache
from softcache.integrations.hf import DistillationTrainer


def train(cache: str, out: Path, student, arguments) -> list[list[list[int]]]:
    """Two steps of 2 sequences per rank; returns the input ids of each batch this rank trained on."""
    seen = []

    def recording(items):
        seen.append([[int(t) for t in item["input_ids"]] for item in items])
        return softcache.collate(items)

    train = softcache.StreamingSoftTargetDataset(cache, temperature=2.0, seed=0)
    args = arguments(out, max_steps=2, per_device_train_batch_size=2, dataloader_num_workers=0)
    DistillationTrainer(model=student(), args=args, train_dataset=train, data_collator=recording).train()
    return seen


def test_streaming_dataset_trains_under_torchrun(random_cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__, random_cache,
               str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"seen-{r}.json").read_text()) for r in range(2)]
    assert all(len(batches) == 2 and all(len(b) == 2 for b in batches) for batches in ranks)
    cache = softcache.open_cache(random_cache)
    every = sorted(cache[i]["input_ids"].tolist() for i in range(len(cache)))
    first_step = ranks[0][0] + ranks[1][0]
    assert len({tuple(s) for s in first_step}) == 4  # the ranks train on different sequences
    assert sorted({tuple(s) for batches in ranks for b in batches for s in b}) == [tuple(s) for s in every]


if __name__ == "__main__":  # a rank of torch.distributed.run: no pytest here, so the helpers come from conftest
    import conftest

    transformers.logging.set_verbosity_error()
    seen = train(sys.argv[1], Path(sys.argv[2]), conftest.student, conftest.arguments)
    (Path(sys.argv[2]) / f"seen-{os.environ['RANK']}.json").write_text(json.dumps(seen))
