"""Sweep the Monarch kernels' variants (loop vs stacked rows, rows per program, warps, dot precision, fused vs
four-step split) at B*H*L = 2^27 bf16, K = L, on one CUDA GPU; prints one JSON line per variant and the compiled
kernels' registers/spills. Used to pick the defaults in hhfft/kernels/fftconv/monarch.py.

    PYTHONPATH=. python benchmarks/fftconv_tune.py --out /tmp/tune
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton

from hhfft.kernels.fftconv import monarch as m

TOTAL = 1 << 27


def torch_ref(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]].to(u.dtype)


def variants(L: int):
    N = m.plan(L, L, L)
    out = []
    if N <= 4096:
        out += [dict(precision="fp16", variant="loop", rows_per_program=1, num_warps=nw) for nw in (4, 8)]
        out += [dict(precision="fp16", variant="loop", rows_per_program=r) for r in (2, 4)]
        out += [dict(precision="tf32", variant="loop", rows_per_program=1)]
        out += [
            dict(precision="fp16", variant="stacked", rows_per_program=r, num_warps=nw)
            for r in (1, 2, 4, 8) if r * N <= 8192 for nw in (4, 8)
        ]
        out += [dict(precision="fp16", variant="t", rows_per_program=r) for r in (1, 2, 4, 8) if r * N <= 8192]
    if N == 8192:
        out += [dict(precision="fp16", max_fused_n=8192, num_warps=nw) for nw in (8, 16)]
    if N > 4096:
        qs = sorted({min(mf, N // 16) for mf in (512, 1024, 2048, 4096) if 16 <= N // min(mf, N // 16) <= 128})
        out += [dict(precision="fp16", max_fused_n=q) for q in qs]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 2048, 4096, 16384, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    rows = []
    for L in args.lengths:
        H = 768 if L <= 65536 else 64
        B = max(1, TOTAL // (H * L))
        u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(H, L, device="cuda") / math.sqrt(L)
        y_ref = torch_ref(u, k)
        t_ref = triton.testing.do_bench(lambda: torch_ref(u, k), rep=50, return_mode="median")
        for v in variants(L):
            row = dict(L=L, N=m.plan(L, L, L), **v)
            try:
                y = m.fftconv_fwd(u, k, 0, L, **v)
                row["rel_err"] = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                t = triton.testing.do_bench(lambda: m.fftconv_fwd(u, k, 0, L, **v), rep=50, return_mode="median")
                row.update(ms=round(t, 4), ref_ms=round(t_ref, 4), speedup=round(t_ref / t, 2))
            except Exception as e:  # a variant that does not compile is a result too
                row["error"] = repr(e)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if m.plan(L, L, L) <= 4096:
            g = torch.randn_like(u)
            t = triton.testing.do_bench(lambda: m.fftconv_corr_fwd(g, u, 0, L), rep=50, return_mode="median")
            rows.append(dict(L=L, corr_ms=round(t, 4)))
            print(json.dumps(rows[-1]), flush=True)
        del u, k, y_ref
        torch.cuda.empty_cache()
    for kern in (m.fftconv_fwd_kernel, m.fftconv_fwd_stacked_kernel, m.fftconv_fwd_t_kernel, m.fftconv_row_kernel,
                 m.fftconv_corr_kernel,
                 m.fftconv_col_fwd_kernel, m.fftconv_col_inv_kernel):
        info = []
        for cache in getattr(kern, "device_caches", {}).values():
            for ck in cache[0].values():
                info.append((ck.metadata.num_warps, getattr(ck, "n_regs", None), getattr(ck, "n_spills", None),
                             ck.metadata.shared))
        print(kern.__name__ if hasattr(kern, "__name__") else str(kern), info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fftconv_tune.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
