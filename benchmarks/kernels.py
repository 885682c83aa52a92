"""Forward+backward time and peak extra memory of softcache's sparse_kl_loss beside its peers, in one run.

Peers, all fed the same bf16 student logits (N, V) and the same teacher targets:
  eager     the same loss (forward_kl, bucket tail, T^2) written in plain PyTorch over the dense log-softmax
  compile   that function under torch.compile
  liger-kl  Liger-Kernel's LigerKLDIVLoss on log_softmax(z / T) and the dense teacher distribution (N, V)
  liger-jsd Liger-Kernel's LigerJSD on log_softmax(z / T) and the dense teacher log-probs (a different loss,
            shown because it is what users run today)
The dense teacher puts the top-K mass at the target ids and spreads the tail evenly; building it is not timed.

Also measures the card's copy bandwidth (tensor.copy_) and reports softcache's effective bandwidth for one read
of the logits and one write of the gradient, as a fraction of it. Ratios are peer time / softcache time.

    python benchmarks/kernels.py                 # the issue's grid on a GPU
    python benchmarks/kernels.py --tiny          # CPU smoke run at tiny sizes: proves the script runs, no more
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time

import torch
from bench_common import Timer, cpu_name, eager_loss
from softcache.kernels import sparse_kl_loss


def make_inputs(n, vocab, k, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n, vocab, device=device, generator=g).to(torch.bfloat16)
    ids = torch.randint(0, vocab, (n, k), device=device, generator=g, dtype=torch.int32)
    lps = torch.log_softmax(2 * torch.randn(n, k, device=device, generator=g), -1) + math.log(0.9)  # P = 0.9
    return logits, ids, lps


def dense_teacher(ids, lps, vocab):
    n, k = ids.shape
    probs = torch.full((n, vocab), 0.1 / max(vocab - k, 1), device=ids.device)
    probs.scatter_(1, ids.long(), lps.exp())
    return probs


def copy_bandwidth(device, timer, nbytes):
    """Bytes moved per second by a device-to-device copy (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms, _ = timer.measure(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * nbytes / (ms / 1e3)


def build_peers(args, device):
    peers = {}
    peers["softcache"] = lambda x, ids, lps, dense: sparse_kl_loss(x, ids, lps, temperature=args.temperature)
    peers["eager"] = lambda x, ids, lps, dense: eager_loss(x, ids, lps, args.temperature)
    if not args.no_compile:
        compiled = torch.compile(eager_loss)
        peers["compile"] = lambda x, ids, lps, dense: compiled(x, ids, lps, args.temperature)
    notes = []
    try:
        from liger_kernel.transformers.jsd import LigerJSD
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss

        if device.type != "cuda":
            raise ImportError("Liger-Kernel needs a GPU")
        kl, jsd = LigerKLDIVLoss(reduction="batchmean"), LigerJSD(beta=0.5)
        t = args.temperature

        peers["liger-kl"] = lambda x, ids, lps, dense: kl(torch.log_softmax(x.float() / t, -1), dense[0]) * t * t
        peers["liger-jsd"] = lambda x, ids, lps, dense: jsd(torch.log_softmax(x.float() / t, -1), dense[1]) * t * t
    except ImportError as exc:
        notes.append(f"Liger-Kernel peers skipped: {exc}")
    return peers, notes


def run_config(n, vocab, k, peers, timer, device, args):
    logits, ids, lps = make_inputs(n, vocab, k, device)
    dense = None
    if any(name.startswith("liger") for name in peers):
        probs = dense_teacher(ids, lps, vocab)
        dense = (probs, probs.log())
    rows = []
    for name, loss_fn in peers.items():
        x = logits.clone().requires_grad_(True)

        def step(x=x, loss_fn=loss_fn, inputs=(ids, lps, dense)):
            x.grad = None
            loss_fn(x, *inputs).backward()

        try:
            ms, peak = timer.measure(step, warmup=args.warmup, reps=args.reps)
        except torch.cuda.OutOfMemoryError:
            ms, peak = float("nan"), float("nan")
            torch.cuda.empty_cache()
        except Exception as exc:  # a peer failing must not hide the others
            print(f"  {name} failed at N={n} V={vocab} K={k}: {type(exc).__name__}: {exc}", file=sys.stderr)
            ms, peak = float("nan"), float("nan")
        del x
        rows.append((name, ms, peak))
    del logits, ids, lps, dense
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, runs on the CPU (smoke test, not a result)")
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--v", type=int, nargs="+", default=[32768, 131072, 262144])
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no new size after this many seconds")
    args = ap.parse_args(argv)
    if args.tiny:
        args.n, args.v, args.k, args.warmup, args.reps = [64], [1000, 4001], [16], 1, 3
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    timer = Timer(device)
    began = time.time()

    if device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# softcache kernel benchmark  {datetime.date.today()}  {name}")
    print(f"# torch {torch.__version__}  command: python {' '.join(sys.argv)}")
    if args.tiny:
        print("# CPU SMOKE RUN at tiny sizes: proves the script runs; these are not performance results")
    copy_bw = copy_bandwidth(device, timer, 1 << (30 if device.type == "cuda" else 26))
    print(f"# copy bandwidth (tensor.copy_, read + write): {copy_bw / 1e9:.0f} GB/s")
    peers, notes = build_peers(args, device)
    for note in notes:
        print(f"# note: {note}")
    print(f"# loss: forward_kl, tail=bucket, T={args.temperature:g}, mean, bf16 logits; time = forward + backward")

    header = f"{'N':>6} {'V':>7} {'K':>4}  {'impl':<10} {'ms':>9} {'x slower':>8} {'extra MiB':>10}"
    header += f" {'GB/s':>7} {'%copy':>6}"
    lines, skipped = [header, "-" * len(header)], 0
    for n in args.n:
        for vocab in args.v:
            for k in args.k:
                if time.time() - began > args.budget_s:
                    skipped += 1
                    continue
                rows = run_config(n, vocab, k, peers, timer, device, args)
                base_ms = rows[0][1]
                logits_bytes = n * vocab * 2
                for impl, ms, peak in rows:
                    bw = 2 * logits_bytes / (ms / 1e3) if ms == ms else float("nan")  # one read + one write
                    ratio = ms / base_ms if base_ms == base_ms else float("nan")
                    pct = 100 * bw / copy_bw
                    lines.append(
                        f"{n:>6} {vocab:>7} {k:>4}  {impl:<10} {ms:>9.3f} {ratio:>8.2f} {peak:>10.1f} "
                        f"{bw / 1e9:>7.0f} {pct:>6.1f}"
                    )
                print(lines[-len(rows)], "...", flush=True)
    print()
    print("\n".join(lines))
    if skipped:
        print(f"# {skipped} size(s) skipped: --budget-s {args.budget_s:g} reached")
    print("# extra MiB: peak allocated during forward+backward beyond the inputs and one gradient buffer.")
    print("# GB/s and %copy count one read of the logits and one write of their gradient (2*N*V*2 bytes),")
    print("# whatever the implementation actually moves; 'x slower' is time / softcache time.")


if __name__ == "__main__":
    main()
