"""Distil a tiny student from a softcache cache with DistributedDataParallel, one process per device.

    torchrun --nproc_per_node=2 examples/ddp_torchrun.py --steps 100       # NCCL on GPUs, gloo on CPUs
    torchrun --nproc_per_node=8 examples/ddp_torchrun.py --cache my-cache/ --temperature 2.0

Each rank reads its own part of the cache (``DistributedSampler``). The loss is the mean over the rows counted on
*all* ranks, not a mean of per-rank means: each rank divides its row sum by the global count (one all-reduce of a
scalar) and multiplies by the world size, which DDP's gradient averaging undoes. The model runs through the DDP
wrapper (``forward=``), which is what makes DDP synchronise the gradients.
"""

import itertools
import os

import torch
import torch.distributed as dist
from common import demo_cache, parse_args, tiny_student
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import softcache
from softcache.integrations import DistillationLoss


def main():
    args = parse_args(__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    objects = [demo_cache(args) if rank == 0 else None]  # the demo cache is built once, by rank 0
    dist.broadcast_object_list(objects)
    dataset = softcache.SoftTargetDataset(objects[0], temperature=args.temperature, max_length=args.max_length)

    torch.manual_seed(0)  # the same initial student on every rank (DDP also broadcasts rank 0's weights)
    student = tiny_student(dataset.vocab_size, args).to(device)
    extra = dataset.check_student(student)
    model = DistributedDataParallel(student, device_ids=[device.index] if cuda else None)
    loss_fn = DistillationLoss(temperature=dataset.temperature, alpha=args.alpha,
                               vocab_size=dataset.vocab_size if extra else None)  # fmt: skip
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=softcache.collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def batches():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader

    for step, batch in zip(range(1, args.steps + 1), batches(), strict=False):
        batch = {key: value.to(device) for key, value in batch.items()}
        rows = loss_fn.count(batch).float()
        dist.all_reduce(rows)
        loss, _, _ = loss_fn(student, batch, num_items_in_batch=rows, forward=model)
        optimizer.zero_grad(set_to_none=True)
        (loss * world).backward()
        optimizer.step()
        loss = loss.detach()
        dist.all_reduce(loss)  # the row sums over the global count add up to the global mean
        if rank == 0 and (step == 1 or step % 10 == 0 or step == args.steps):
            print(f"step {step} loss {loss.item():.4f} ({int(rows.item())} rows on {world} ranks)", flush=True)

    checksum = torch.stack([p.detach().double().sum() for p in student.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"ranks hold {'identical' if same else 'DIFFERENT'} weights after {args.steps} steps", flush=True)
    dist.barrier()  # every rank done with its collectives before any tears the group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
