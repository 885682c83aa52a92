"""DistillationTrainer under DDP: one SGD step on 2 gloo ranks x 2 sequences moves the weights exactly as one process
with a batch of 4 (the row count spans the ranks; DDP's gradient mean is undone). This file is also the script that
``torch.distributed.run`` starts on each rank."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

import softcache
from softcache.integrations.hf import DistillationTrainer


def one_step(cache: str, out: Path, per_device: int, student, arguments, with_ignored_labels) -> torch.Tensor:
    """The parameter update of one SGD step (lr 1) over the cache's first 4 sequences, some labels ignored; the last
    three arguments are conftest's helpers."""
    items = with_ignored_labels(softcache.SoftTargetDataset(cache, temperature=2.0))[:4]
    model = student()
    before = [p.detach().clone() for p in model.parameters()]
    args = arguments(out, per_device_train_batch_size=per_device, optim="sgd", learning_rate=1.0, max_grad_norm=0.0)
    DistillationTrainer(model=model, args=args, train_dataset=items, alpha=0.5).train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])


def test_ddp_step_equals_one_process(random_cache, student, arguments, with_ignored_labels, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__, random_cache,
               str(tmp_path)]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    distributed = torch.load(tmp_path / "update.pt")
    alone = one_step(random_cache, tmp_path, 4, student, arguments, with_ignored_labels)
    assert torch.allclose(distributed, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


if __name__ == "__main__":  # a rank of torch.distributed.run: no pytest here, so the helpers come from conftest
    import conftest

    transformers.logging.set_verbosity_error()
    update = one_step(sys.argv[1], Path(sys.argv[2]), 2, conftest.student, conftest.arguments,
                      conftest.with_ignored_labels)
    if int(os.environ["RANK"]) == 0:
        torch.save(update, Path(sys.argv[2]) / "update.pt")
