"""Sweep the Monarch kernels' variants (loop vs stacked rows, rows per program, warps, dot precision, 3-dot (Gauss)
complex products, fp16 DFT tables, fused vs four-step split, the four-step path's persistent kernel) at
B*H*L = 2^27 bf16, K = L, on one CUDA GPU; prints one JSON line per variant and the compiled kernels'
registers/spills. Used to pick the defaults in
hhfft/kernels/fftconv/monarch.py (_fused_config).

    PYTHONPATH=. python benchmarks/fftconv_tune.py --out /tmp/tune                     # the full sweep
    PYTHONPATH=. python benchmarks/fftconv_tune.py --dots --lengths 256 1024 --out /tmp/tune
        # the fused kernel's dot options (4 dots / Gauss x fp32 / fp16 tables) on the static variant of each size
    PYTHONPATH=. python benchmarks/fftconv_tune.py --four-step --lengths 4096 16384 65536 --out /tmp/tune
        # four-step sizes: the persistent kernel (programs per SM, warps) against the three kernels
    PYTHONPATH=. python benchmarks/fftconv_tune.py --dv-dk --lengths 256 1024 4096 16384 65536 --out /tmp/tune
        # the backward's du and dk at one four-step size: fftconv_dv_dk against the two separate calls
    python benchmarks/fftconv_tune.py --sm90-offline --lengths 256 1024
        # no GPU: compile the fused kernels for sm_90 and print cuobjdump's registers/stack per configuration
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton

from hhfft.kernels.fftconv import monarch as m

TOTAL = 1 << 27
DOTS = [dict(gauss=g, half_tables=h) for g in (False, True) for h in (False, True)]


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
        # the dot options the rows above do not cover (they run with the static configuration's options)
        out += [d for d in dot_variants(L) if (d["variant"], d["rows_per_program"], d["gauss"], d["half_tables"])
                != tuple(m._fused_config(N))]
    if N == 8192:
        out += [dict(precision="fp16", max_fused_n=8192, num_warps=nw) for nw in (8, 16)]
    if N > 4096:
        qs = sorted({min(mf, N // 16) for mf in (512, 1024, 2048, 4096) if 16 <= N // min(mf, N // 16) <= 128})
        out += [dict(precision="fp16", max_fused_n=q) for q in qs]
    return out


def four_step_variants(L: int):
    """The four-step path above the fused sizes, at the op's split N = P Q (rows of Q <= 2048 where P <= 128 allows):
    the three kernels through a whole-batch scratch (programs=0) against the persistent kernel at 1, 2 and 4 programs
    per SM and 4 or 8 warps; above the four-step limit, the nested path at 1 or 2 programs per SM and 4 or 8 warps."""
    N = m.plan(L, L, L)
    if N <= 4096:
        return []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if N > m.MAX_FOURSTEP_N:  # the nested path (fftconv_fwd only; the op still takes torch.fft there)
        return [dict(precision="fp16", programs=c * sms, num_warps=nw) for c in (1, 2) for nw in (4, 8)]
    return [dict(precision="fp16", programs=0)] + [
        dict(precision="fp16", programs=c * sms, num_warps=nw) for c in (1, 2, 4) for nw in (4, 8)
    ]


def dot_bases(N: int) -> list:
    """The fused configurations the dot options are tried on: the static one and the one the op's timing picked on
    the H200 for this N (benchmarks/fftconv_results.json, e.g. "tx2"), if that differs."""
    cfg = m._fused_config(N)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fftconv_results.json")
    with open(path) as f:
        picked = [r.get("variant", "") for r in json.load(f)["rows"] if r.get("N") == N]
    out = [cfg]
    for p in picked:
        match = re.fullmatch(r"([a-z]+)x(\d+)", p.split(",")[0])
        if match and (match[1], int(match[2])) != cfg[:2]:
            out.append(m.FusedConfig(match[1], int(match[2])))
    return out


def dot_variants(L: int):
    """Each dot option (DOTS) on each of dot_bases, the static configuration first."""
    return [
        dict(precision="fp16", variant=c.variant, rows_per_program=c.rows, **d)
        for c in dot_bases(m.plan(L, L, L)) for d in DOTS
    ]


def _compiled(kern):
    """(key, num_warps, registers, spills, shared bytes) of each compiled version of a Triton kernel."""
    out = []
    for cache in getattr(kern, "device_caches", {}).values():
        for key, ck in cache[0].items():
            out.append((str(key), ck.metadata.num_warps, getattr(ck, "n_regs", None), getattr(ck, "n_spills", None),
                        ck.metadata.shared))
    return out


def sm90_offline(lengths) -> None:
    """Compile the fused kernel of each size (dot_bases x DOTS, bf16, no gates) for sm_90 without a GPU and print
    cuobjdump's resource usage (ptxas and cuobjdump come with triton; the CPU's triton may differ from the GPU's)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for L in lengths:
        N = m.plan(L, L, L)
        n1, n2 = m._split(N)
        for cfg, d in [(c, d) for c in dot_bases(N) for d in DOTS]:
            kern = m._FUSED_KERNELS[cfg.variant]
            tab = "*fp16" if d["half_tables"] else "*fp32"
            sig = {a: "constexpr" for a in kern.arg_names}
            sig.update({a: "*bf16" for a in ("p_u", "p_pre", "p_post", "p_bias", "p_skip", "p_y")})
            sig.update(p_kf="*fp32", p_ks="*fp32", p_tw="*fp32", p_f1=tab, p_f2=tab)
            sig.update({a: "i32" for a in ("B", "H", "L", "T", "LO", "HI")})
            const = dict(N1=n1, N2=n2, R=cfg.rows, HAS_PRE=False, HAS_POST=False, HAS_BIAS=False, HAS_SKIP=False,
                         PREC="fp16", GAUSS=d["gauss"], CONJ_K=False)
            attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kern.arg_names) if a.startswith("p_")}
            t0 = time.perf_counter()
            ck = triton.compile(ASTSource(kern, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=m._num_warps(n1, n2)))
            t_compile = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(ck.asm["cubin"])
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True)
            res = [line.split("Resource usage:")[-1].strip() for line in usage.stdout.splitlines() if "REG:" in line]
            row = dict(L=L, N=N, variant=cfg.variant, rows=cfg.rows, **d, sm90=res, compile_s=round(t_compile, 1))
            print(json.dumps(row), flush=True)


def dv_dk(lengths, out: str) -> int:
    """fftconv_dv_dk (g's column pass and row transforms shared by du and dk) against fftconv_fwd + fftconv_corr_fwd
    on the same g, v and flipped kernel (K = L; fused and four-step sizes), with the relative difference of their
    results."""
    rows = []
    for L in lengths:
        N = m.plan(L, L, L)
        if N > m.MAX_FOURSTEP_N:
            continue
        H = 768 if L <= 65536 else 64
        B = max(1, TOTAL // (H * L))
        g, v = (torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        kf = torch.randn(H, L, device="cuda") / math.sqrt(L)

        def apart():
            return m.fftconv_fwd(g, kf, L - 1, L), m.fftconv_corr_fwd(g, v, 0, L)

        (dv0, dk0), (dv1, dk1) = m.fftconv_dv_dk(g, v, kf, 0), apart()
        row = dict(L=L, N=N, B=B, H=H,
                   dv_rel_diff=((dv0.float() - dv1.float()).norm() / dv1.float().norm()).item(),
                   dk_rel_diff=((dk0 - dk1).norm() / dk1.norm()).item())
        for name, fn in (("dv_dk_ms", lambda: m.fftconv_dv_dk(g, v, kf, 0)), ("apart_ms", apart)):
            row[name] = round(triton.testing.do_bench(fn, rep=50, return_mode="median"), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del g, v, kf
        torch.cuda.empty_cache()
    for kern in (m.fftconv_corr_kernel, m.fftconv_corr_row_kernel):
        print(kern.fn.__name__, [c[1:] for c in _compiled(kern)], flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "fftconv_tune_dv_dk.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 2048, 4096, 16384, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--dots", action="store_true", help="only the dot options of the fused kernel (L <= 2K)")
    ap.add_argument("--sm90-offline", action="store_true", help="no GPU: registers/stack of the fused kernels")
    ap.add_argument("--four-step", action="store_true", help="only the four-step path: persistent kernel vs three")
    ap.add_argument("--dv-dk", action="store_true",
                    help="only the backward's four-step products: fftconv_dv_dk against the two separate calls")
    args = ap.parse_args(argv)
    if args.sm90_offline:
        sm90_offline(args.lengths)
        return 0
    if args.dv_dk:
        return dv_dk(args.lengths, args.out)
    rows = []
    for L in args.lengths:
        H = 768 if L <= 65536 else 64
        B = max(1, TOTAL // (H * L))
        u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(H, L, device="cuda") / math.sqrt(L)
        y_ref = torch_ref(u, k)
        t_ref = triton.testing.do_bench(lambda: torch_ref(u, k), rep=50, return_mode="median")
        for v in dot_variants(L) if args.dots else four_step_variants(L) if args.four_step else variants(L):
            row = dict(L=L, N=m.plan(L, L, L), **v)
            try:
                fused = list(m._FUSED_KERNELS.values()) + [m.fftconv_four_step_kernel, m.fftconv_row_kernel]
                before = {c[0] for kern in fused for c in _compiled(kern)}
                y = m.fftconv_fwd(u, k, 0, L, **v)
                # registers/spills of the kernel this variant compiled (none if an earlier row compiled it)
                row["regs"] = [c[1:] for kern in fused for c in _compiled(kern) if c[0] not in before]
                row["rel_err"] = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                t = triton.testing.do_bench(lambda: m.fftconv_fwd(u, k, 0, L, **v), rep=50, return_mode="median")
                row.update(ms=round(t, 4), ref_ms=round(t_ref, 4), speedup=round(t_ref / t, 2))
            except Exception as e:  # a variant that does not compile is a result too
                row["error"] = repr(e)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        if m.plan(L, L, L) <= 4096 and not (args.dots or args.four_step):
            g = torch.randn_like(u)
            t = triton.testing.do_bench(lambda: m.fftconv_corr_fwd(g, u, 0, L), rep=50, return_mode="median")
            rows.append(dict(L=L, corr_ms=round(t, 4)))
            print(json.dumps(rows[-1]), flush=True)
        del u, k, y_ref
        torch.cuda.empty_cache()
    for kern in (m.fftconv_fwd_kernel, m.fftconv_fwd_stacked_kernel, m.fftconv_fwd_t_kernel, m.fftconv_row_kernel,
                 m.fftconv_corr_kernel, m.fftconv_col_fwd_kernel, m.fftconv_col_inv_kernel,
                 m.fftconv_four_step_kernel):
        info = [c[1:] for c in _compiled(kern)]
        print(kern.__name__ if hasattr(kern, "__name__") else str(kern), info, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fftconv_tune.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
