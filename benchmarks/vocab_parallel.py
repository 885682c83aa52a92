"""One rank's cost in a vocab-parallel student: sparse_kl_loss(process_group=...) on a slice of the vocabulary.

A 128k vocabulary over 8 ranks gives each a (N, 16032) slice. Measured on one process (a group of one: the two
all-reduces are then local, so this is the compute of one rank, not the network), beside the unsharded Triton loss
on a tensor of the same size (what a rank would cost if its slice were the whole vocabulary), fwd + bwd, bf16:

  vp-torch     the vocab-parallel loss, torch backend (chunked PyTorch passes)
  vp-triton    the vocab-parallel loss, Triton backend (vocab_parallel_triton.py: one stats pass, one gradient pass)
  unsharded    sparse_kl_loss on the same (N, V_local) logits, no process group (Triton on CUDA)
and the fused output layer (``fused_linear_sparse_kl_loss`` with the rank's (V_local, H) rows of the weight), the same
three ways (vpf-torch, vpf-triton, unsharded-f), whose backward all-reduces dH (a no-op in a group of one).

    python benchmarks/vocab_parallel.py            # N = 16384, V_local = 16032, K = 64 on a GPU
    python benchmarks/vocab_parallel.py --tiny     # CPU smoke run (TRITON_INTERPRET=1 for the Triton rows)
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from bench_common import Timer, cpu_name
from softcache.kernels import fused_linear_sparse_kl_loss, sparse_kl_loss, triton_available


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v-local", type=int, default=128256 // 8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096, help="H of the fused rows")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes: proves the script runs")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    n, v, k = (64, 1001, 8) if args.tiny else (args.n, args.v_local, args.k)
    args.hidden = 32 if args.tiny else args.hidden
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{os.path.join(tmp, 'i')}",
                                rank=0, world_size=1)  # fmt: skip
        try:
            run(n, v, k, device, args)
        finally:
            dist.destroy_process_group()


def run(n, v, k, device, args) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, v, (n, k), device=device, generator=g)
    lps = torch.log_softmax(2 * torch.randn(n, k, device=device, generator=g), -1) + math.log(0.9)
    group = dist.group.WORLD
    triton_ok = triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    impls = {"vp-torch": (sparse_kl_loss, dict(process_group=group, backend="torch"))}
    if triton_ok:
        impls["vp-triton"] = (sparse_kl_loss, dict(process_group=group, backend="triton"))
        impls["unsharded"] = (sparse_kl_loss, dict(backend="triton"))
    impls["vpf-torch"] = (fused_linear_sparse_kl_loss, dict(process_group=group, backend="torch"))
    if triton_ok:
        impls["vpf-triton"] = (fused_linear_sparse_kl_loss, dict(process_group=group, backend="triton"))
        impls["unsharded-f"] = (fused_linear_sparse_kl_loss, dict(backend="triton"))
    timer = Timer(device)
    x = logits.clone().requires_grad_(True)
    hid = (torch.randn(n, args.hidden, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, args.hidden, device=device, generator=g) * 0.05).to(torch.bfloat16).requires_grad_(True)
    reps = 3 if args.tiny else 20
    print(f"# softcache vocab-parallel benchmark  {datetime.date.today()}  "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else cpu_name()}")  # fmt: skip
    print(f"# torch {torch.__version__}  command: python benchmarks/vocab_parallel.py {' '.join(sys.argv[1:])}")
    print("# one rank of a group of one: forward_kl, bucket, T=2, mean, bf16; time = forward + backward; "
          f"fused rows: H={args.hidden}")  # fmt: skip
    print(f"{'N':>6} {'V_local':>8} {'K':>4}  {'impl':<11} {'ms':>9} {'x slower':>9} {'extra MiB':>10}")
    base = {}
    for name, (loss_fn, opts) in impls.items():
        fused = loss_fn is fused_linear_sparse_kl_loss

        def step(loss_fn=loss_fn, opts=opts, fused=fused):
            x.grad = hid.grad = w.grad = None
            inputs = (hid, w) if fused else (x,)
            loss_fn(*inputs, ids, lps, temperature=2.0, **opts).backward()

        ms, mib = timer.measure(step, warmup=1 if args.tiny else 3, reps=reps)
        base.setdefault(fused, ms)
        print(f"{n:>6} {v:>8} {k:>4}  {name:<11} {ms:>9.3f} {ms / base[fused]:>9.2f} {mib:>10.0f}", flush=True)
    print("# extra MiB: peak allocated during forward+backward beyond the inputs (CUDA only); includes the gradient")


if __name__ == "__main__":
    main()
