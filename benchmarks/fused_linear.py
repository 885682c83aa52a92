"""Forward+backward time and peak extra memory of fused_linear_sparse_kl_loss beside its peers, in one run.

Every peer starts from the same bf16 hidden states (N, H) and output layer (V, H) and ends with gradients for both:
  fused           softcache.kernels.fused_linear_sparse_kl_loss (no (N, V) logits)
  fused-skip      the same with grad_skip_eps = 2**-12 (Cut Cross-Entropy's bf16 filter); its gradient error
                  relative to 'fused' (normwise, dH and dW) is printed below the table
  materialised    logits = h @ W.T, then softcache.kernels.sparse_kl_loss
  eager           logits = h @ W.T, then the same loss in plain PyTorch (benchmarks/bench_common.py: eager_loss)
  liger-fl-jsd    Liger-Kernel's LigerFusedLinearJSD fed a dense teacher (teacher hidden states and a teacher output
                  layer of the same size; a different loss, and it also does the teacher's matmul)
Loss: forward_kl, bucket tail, T^2, mean over rows (and the cross-entropy when --alpha < 1).

It also times the floor the issue sets: the three matmuls of a linear layer's forward and backward (z = h W^T,
dH = dZ W, dW = dZ^T h) plus one recompute of z, each a plain torch.matmul into a preallocated output.
Goals (issue 5, N=8192, H=4096, V=128k, bf16, H100/H200): extra memory <= 1/10 of 'materialised', time <= 1.2x floor.

    python benchmarks/fused_linear.py            # the issue's size on a GPU
    python benchmarks/fused_linear.py --tiny     # CPU smoke run at tiny sizes: proves the script runs, no more
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import torch
from bench_common import Timer, cpu_name, eager_loss
from softcache.kernels import fused_linear_sparse_kl_loss, sparse_kl_loss


def make_inputs(n, hidden, vocab, k, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hidden, device=device, generator=g).to(torch.bfloat16)
    w = (torch.randn(vocab, hidden, device=device, generator=g) * (2.0 / math.sqrt(hidden))).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (n, k), device=device, generator=g, dtype=torch.int32)
    lps = torch.log_softmax(2 * torch.randn(n, k, device=device, generator=g), -1) + math.log(0.9)  # P = 0.9
    labels = torch.randint(0, vocab, (n,), device=device, generator=g)
    return h, w, ids, lps, labels


def build_peers(args, device):
    t, alpha = args.temperature, args.alpha
    opts = dict(temperature=t, alpha=alpha)

    def fused(eps):
        def run(h, w, ids, lps, labels, teacher):
            lab = labels if alpha < 1 else None
            return fused_linear_sparse_kl_loss(h, w, ids, lps, labels=lab, grad_skip_eps=eps, **opts)

        return run

    def materialised(h, w, ids, lps, labels, teacher):
        return sparse_kl_loss(h @ w.T, ids, lps, labels=labels if alpha < 1 else None, **opts)

    def eager(h, w, ids, lps, labels, teacher):
        loss = eager_loss(h @ w.T, ids, lps, t)
        if alpha < 1:
            loss = alpha * loss + (1 - alpha) * torch.nn.functional.cross_entropy((h @ w.T).float(), labels)
        return loss

    peers = {"fused": fused(0.0)}
    if device.type == "cuda":  # grad_skip_eps is a Triton-backend option
        peers["fused-skip"] = fused(2.0**-12)
    peers["materialised"] = materialised
    peers["eager"] = eager
    notes = []
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        if device.type != "cuda":
            raise ImportError("Liger-Kernel needs a GPU")
        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=t)
        peers["liger-fl-jsd"] = lambda h, w, ids, lps, labels, teacher: jsd(h, w, teacher[0], teacher[1])
    except ImportError as exc:
        notes.append(f"Liger-Kernel peer skipped: {exc}")
    return peers, notes


def matmul_floor(h, w, timer, args):
    """Milliseconds of z = h W^T (twice: forward and recompute), dH = dZ W and dW = dZ^T h."""
    n, vocab = h.shape[0], w.shape[0]
    z = torch.empty(n, vocab, dtype=h.dtype, device=h.device)
    dz = torch.randn_like(z)
    dh, dw = torch.empty_like(h), torch.empty_like(w)
    t_z, _ = timer.measure(lambda: torch.matmul(h, w.T, out=z), args.warmup, args.reps)
    t_dh, _ = timer.measure(lambda: torch.matmul(dz, w, out=dh), args.warmup, args.reps)
    t_dw, _ = timer.measure(lambda: torch.matmul(dz.T, h, out=dw), args.warmup, args.reps)
    return 2 * t_z + t_dh + t_dw, (t_z, t_dh, t_dw)


def gradients(loss_fn, h, w, inputs):
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss_fn(hh, ww, *inputs).backward()
    return hh.grad.float(), ww.grad.float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, runs on the CPU (smoke test, not a result)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=1.0, help="< 1 mixes in the cross-entropy on random labels")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.h, args.v, args.k, args.warmup, args.reps = 64, 64, 1000, 16, 1, 3
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    timer = Timer(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# softcache fused-linear benchmark  {datetime.date.today()}  {name}")
    print(f"# torch {torch.__version__}  command: python {' '.join(sys.argv)}")
    if args.tiny:
        print("# CPU SMOKE RUN at tiny sizes: proves the script runs; these are not performance results")
    print(f"# N={args.n} H={args.h} V={args.v} K={args.k} bf16; loss forward_kl/bucket T={args.temperature:g} "
          f"alpha={args.alpha:g}; time = forward + backward (grads of h and W)")  # fmt: skip

    h, w, ids, lps, labels = make_inputs(args.n, args.h, args.v, args.k, device)
    teacher = (torch.randn_like(h), torch.randn_like(w) * (2.0 / math.sqrt(args.h)))
    floor_ms, parts = matmul_floor(h, w, timer, args)
    print(f"# matmul floor: 2 x z {parts[0]:.3f} + dH {parts[1]:.3f} + dW {parts[2]:.3f} = {floor_ms:.3f} ms")
    peers, notes = build_peers(args, device)
    for note in notes:
        print(f"# note: {note}")

    rows = []
    for impl, loss_fn in peers.items():
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def step(hh=hh, ww=ww, loss_fn=loss_fn):
            hh.grad = ww.grad = None
            loss_fn(hh, ww, ids, lps, labels, teacher).backward()

        began = time.time()
        try:
            ms, peak = timer.measure(step, warmup=args.warmup, reps=args.reps)
        except torch.cuda.OutOfMemoryError:
            ms, peak = float("nan"), float("nan")
        except Exception as exc:  # a peer failing must not hide the others
            print(f"  {impl} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            ms, peak = float("nan"), float("nan")
        del hh, ww
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append((impl, ms, peak))
        print(f"  {impl}: {ms:.3f} ms ({time.time() - began:.0f} s)", flush=True)

    skip_note = ""
    if "fused-skip" in peers:
        inputs = (ids, lps, labels, teacher)
        exact = gradients(peers["fused"], h, w, inputs)
        approx = gradients(peers["fused-skip"], h, w, inputs)
        errs = [float((a - e).norm() / e.norm()) for a, e in zip(approx, exact, strict=True)]
        skip_note = f"# fused-skip gradient error vs fused (normwise): dH {errs[0]:.2e}, dW {errs[1]:.2e}"

    fused_ms = rows[0][1]
    mat_peak = next((p for i, _, p in rows if i == "materialised"), float("nan"))
    header = f"{'impl':<13} {'ms':>9} {'x fused':>8} {'x floor':>8} {'extra MiB':>10} {'mem / mat':>10}"
    print()
    print(header)
    print("-" * len(header))
    for impl, ms, peak in rows:
        ratios = f"{ms / fused_ms:>8.2f} {ms / floor_ms:>8.2f}"
        print(f"{impl:<13} {ms:>9.3f} {ratios} {peak:>10.1f} {peak / mat_peak:>10.3f}")
    print(f"{'matmul floor':<13} {floor_ms:>9.3f} {floor_ms / fused_ms:>8.2f} {1.0:>8.2f}")
    if skip_note:
        print(skip_note)
    print("# extra MiB: peak allocated during forward+backward beyond the inputs and one set of their gradients;")
    print("# goals: fused 'x floor' <= 1.2 and 'mem / mat' <= 0.1.")


if __name__ == "__main__":
    main()
