"""Benchmark hhfft::fftconv (Monarch Triton kernels) against the torch.fft reference, on one CUDA GPU.

What it shows, per sequence length L (B*H*L = 2^27 elements, bf16, a full-length fp32 kernel K = L, causal):
forward and forward+backward times of
  - torch:    the reference every long-convolution model writes: rfft(u, n=2L) * rfft(k, n=2L) -> irfft -> [..., :L]
  - inductor: the same function under torch.compile
  - hhfft:    hhfft.lowering.fftconv.fftconv (the op's CUDA implementation)
plus the memory floor (bytes of u and y over the measured copy bandwidth), the tensor-core floor (the DFT products'
FLOPs over the measured fp16 matmul rate: bf16 inputs run fp16 dots) and the peak memory of each forward+backward.
Every length is checked against the reference before it is timed.

    PYTHONPATH=. python benchmarks/fftconv.py --out /tmp/fftconv        # the full table (one GPU run, ~3 min)
    PYTHONPATH=. python benchmarks/fftconv.py --lengths 1024 16384      # a subset
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton

import hhfft  # noqa: F401  (registers the ops)
from hhfft.kernels.fftconv import monarch
from hhfft.lowering.fftconv import fftconv

TOTAL = 1 << 27
LENGTHS = [256, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22]


def shape_for(L: int) -> tuple[int, int]:
    H = 768 if L <= (1 << 16) else 64
    while TOTAL // (H * L) < 1:
        H //= 2
    return TOTAL // (H * L), H


def torch_ref(u, k):
    L = u.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return y.to(u.dtype)


def hhfft_fn(u, k):
    return fftconv(u, k)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings() -> dict:
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / (ms * 1e-3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda")
    b = torch.randn(8192, 8192, device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        ms = bench(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    a16, b16 = a.half(), b.half()
    ms16 = bench(lambda: a16 @ b16)
    return {
        "copy_GBps": bw / 1e9,
        "tf32_TFLOPs": 2 * 8192**3 / (ms * 1e-3) / 1e12,
        "fp16_TFLOPs": 2 * 8192**3 / (ms16 * 1e-3) / 1e12,
    }


def dft_flops(B: int, H: int, L: int, N: int) -> float:
    """Real FLOPs of the forward's DFT matrix products (complex product = 4 real ones), tf32 passes counted once."""
    pairs = (B + 1) // 2 * H
    if N <= monarch.MAX_FUSED_N:
        n1, n2 = monarch._split(N)
        return pairs * 16.0 * N * (n1 + n2)
    if N <= monarch.MAX_FOURSTEP_N:
        Q = min(monarch.MAX_FUSED_N, N // 16)
        q1, q2 = monarch._split(Q)
        return pairs * 16.0 * N * (N // Q + q1 + q2)
    return float("nan")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_length(L: int, ceil: dict, inductor) -> dict:
    B, H = shape_for(L)
    N = monarch.plan(L, L, L)
    g = torch.Generator(device="cuda").manual_seed(L)
    u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(H, L, device="cuda", generator=g) / math.sqrt(L)
    dy = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16, generator=g)
    row = {"L": L, "B": B, "H": H, "N": N, "path": "fused" if N <= monarch.MAX_FUSED_N else
           "four-step" if N <= monarch.MAX_FOURSTEP_N else "nested four-step" if N <= monarch._NESTED_MAX_N
           else "torch.fft fallback"}
    # correctness first: forward and both gradients against the reference
    y_ref, y = torch_ref(u, k), hhfft_fn(u, k)
    row["fwd_rel_err"] = rel_err(y, y_ref)
    uu, kk = u.clone().requires_grad_(), k.clone().requires_grad_()
    g_ref = torch.autograd.grad(torch_ref(uu, kk), (uu, kk), dy)
    g_hh = torch.autograd.grad(hhfft_fn(uu, kk), (uu, kk), dy)
    row["du_rel_err"], row["dk_rel_err"] = rel_err(g_hh[0], g_ref[0]), rel_err(g_hh[1], g_ref[1])
    row["variant"] = ",".join(f"{v[0]}x{v[1]}" for key, v in monarch._CHOICE.items() if key[0] == N)
    del y_ref, y, g_ref, g_hh

    fns = {"torch": torch_ref, "hhfft": hhfft_fn}
    if inductor is not None:
        fns["inductor"] = inductor
    for name, fn in fns.items():
        row[f"fwd_ms_{name}"] = bench(lambda: fn(u, k))

        def step(fn=fn):
            return torch.autograd.grad(fn(uu, kk), (uu, kk), dy)

        step()
        row[f"fb_ms_{name}"] = bench(step)
        row[f"fwd_peak_MB_{name}"] = peak_mb(lambda: fn(u, k))
        row[f"fb_peak_MB_{name}"] = peak_mb(step)
    row["floor_mem_ms"] = 2 * u.numel() * u.element_size() / (ceil["copy_GBps"] * 1e9) * 1e3
    row["floor_tc_ms"] = dft_flops(B, H, L, N) / (ceil["fp16_TFLOPs"] * 1e12) * 1e3  # bf16 inputs: fp16 dots
    row["fwd_speedup"] = row["fwd_ms_torch"] / row["fwd_ms_hhfft"]
    row["fb_speedup"] = row["fb_ms_torch"] / row["fb_ms_hhfft"]
    del u, k, dy, uu, kk
    torch.cuda.empty_cache()
    return row


def table(rows: list, meta: dict) -> str:
    lines = [
        f"{meta['date']} · {meta['gpu']} · torch {meta['torch']} · triton {meta['triton']} · "
        f"copy {meta['copy_GBps']:.0f} GB/s · fp16 matmul {meta['fp16_TFLOPs']:.0f} TFLOP/s · "
        f"tf32 matmul {meta['tf32_TFLOPs']:.0f} TFLOP/s",
        "",
        "| L | B x H | N | path | fwd torch | fwd inductor | fwd hhfft | fwd speedup | fwd+bwd torch "
        "| fwd+bwd inductor | fwd+bwd hhfft | fwd+bwd speedup | mem floor | DFT tc floor "
        "| peak MB torch / hhfft (fwd+bwd) | rel err y / du / dk "
        "| fused variant |",
        "|" + "---|" * 17,
    ]
    for r in rows:
        lines.append(
            f"| {r['L']} | {r['B']} x {r['H']} | {r['N']} | {r['path']} | {r['fwd_ms_torch']:.3f} | "
            f"{r.get('fwd_ms_inductor', float('nan')):.3f} | {r['fwd_ms_hhfft']:.3f} | {r['fwd_speedup']:.2f}x | "
            f"{r['fb_ms_torch']:.3f} | {r.get('fb_ms_inductor', float('nan')):.3f} | {r['fb_ms_hhfft']:.3f} | "
            f"{r['fb_speedup']:.2f}x | {r['floor_mem_ms']:.3f} | {r['floor_tc_ms']:.3f} | "
            f"{r['fb_peak_MB_torch']:.0f} / {r['fb_peak_MB_hhfft']:.0f} | "
            f"{r['fwd_rel_err']:.1e} / {r['du_rel_err']:.1e} / {r['dk_rel_err']:.1e} | {r['variant']} |"
        )
    return "\n".join(lines)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ls = [r["L"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(Ls, [r["fwd_speedup"] for r in rows], "o-", label="forward vs torch")
    ax.plot(Ls, [r["fb_speedup"] for r in rows], "s-", label="forward+backward vs torch")
    if "fwd_ms_inductor" in rows[0]:
        ax.plot(Ls, [r["fwd_ms_inductor"] / r["fwd_ms_hhfft"] for r in rows], "^--", label="forward vs inductor")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (B*H*L = 2^27, bf16)")
    ax.set_ylabel("speedup (x)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    ap.add_argument("--no-inductor", action="store_true", help="skip the torch.compile reference")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for fftconv.json/.md/.png")
    ap.add_argument("--scratch-mb", type=int, default=None,
                    help="the four-step paths' scratch budget per column pass (monarch._SCRATCH_BYTES; 0: the whole "
                         "batch at once, as before the batch slices); default: the module's")
    args = ap.parse_args(argv)
    if args.scratch_mb is not None:
        monarch._SCRATCH_BYTES = args.scratch_mb << 20 if args.scratch_mb > 0 else 1 << 62
    if not torch.cuda.is_available():
        print("benchmarks/fftconv.py needs a CUDA GPU", file=sys.stderr)
        return 2
    ceil = ceilings()
    meta = dict(
        date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, scratch_MB=monarch._SCRATCH_BYTES >> 20, **ceil,
    )
    rows = []
    inductor = None if args.no_inductor else torch.compile(torch_ref, dynamic=True)  # one compile for all lengths
    for L in args.lengths:
        rows.append(run_length(L, ceil, inductor))
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    md = table(rows, meta)
    with open(os.path.join(args.out, "fftconv.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "fftconv.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(args.out, "fftconv_speedup.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
