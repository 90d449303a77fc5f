"""fp32 linear-attention kernels: how their sums are rounded, without a GPU (README "Precision", issue #7).

Two checks, both on the CPU:

  --emulate N     fp32 emulation of the kernels' dq at L = 1, non-causal, F = D = 128, masked (the GPU test case
                  B2-Hq2-Hkv2-L1-F128-D128-mask-float32-full, random inputs of its distribution, N draws). Variants:
                  one FMA chain per output over K (Triton's fp32 dot, the kernels before the fix), chains in the
                  backward's sums over D only, and the kernels now (eight chains over k mod 8 in o's sum over F
                  and dq's over D, partials summed in fp64, s = dden - do.o / den in fp64 and s z added in fp64
                  before the one rounding). Prints each variant's
                  error relative to the old kernels' on the same draw, and against the test's rule (<= 2x PyTorch's
                  own error + 4 ulp) with PyTorch's error taken from the CPU (MKL) and from a model of an exact-sum
                  GEMM (each matmul summed exactly, then rounded).
  --sm90-offline  compiles the fp32 dq kernel (non-causal, F = D = 128, 4 warps) for sm_90 with triton.compile and
                  counts in its PTX the FMA chains per output: each fma whose addend is another fma's result continues
                  that one's chain.

    PYTHONPATH=. python3 benchmarks/la_fp32_precision.py --emulate 300 --sm90-offline
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

import numpy as np
import torch

from hhfft.kernels.linear_attention.naive import (
    DEN_FLOOR,
    linear_attention_naive,
    linear_attention_weights_naive,
)
from hhfft.lowering.linear_attention import _bwd_composite, _fwd_torch, _product_torch

B, H, F, D = 2, 2, 128, 128
f32, f64 = np.float32, np.float64
EPS = float(np.finfo(f32).eps)


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, f64), np.asarray(ref, f64)
    n = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / n) if n > 0 else float(np.linalg.norm(x))


def _chain_sum(a, b, classes, interleave=False):
    """sum_k a[..., k] b[..., k] as fp32 FMA chains (fl(a b + acc), one rounding each): one chain per class of k
    (contiguous parts, or k mod classes), each class's partial returned; classes = 0: the exact sum."""
    if classes == 0:
        return [(a.astype(f64) * b.astype(f64)).sum(-1)]
    K = a.shape[-1]
    out = []
    for j in range(classes):
        ks = range(j, K, classes) if interleave else range(j * K // classes, (j + 1) * K // classes)
        acc = np.zeros(np.broadcast_shapes(a.shape, b.shape)[:-1], f32)
        for k in ks:
            acc = (a[..., k].astype(f64) * b[..., k].astype(f64) + acc).astype(f32)
        out.append(acc)
    return out


def kernel_dq(q, k, v, keep, do, dden, variant):
    """The kernels' fp32 dq at L = 1 (q, k [B, H, F], v, do [B, H, D], keep [B], dden [B, H]); variant "old" (one
    chain everywhere), "bwd4" (4 chains over D in dq, their fp32 sum, nothing else changed), "now" (chunk.py:
    _dot_c's 8 chains over k mod 8 in o's sum over F and dq's over D, partials summed in fp64; s in fp64; s z
    added in fp64 before the one rounding)."""
    km, vm = k * keep[:, None, None], v * keep[:, None, None]
    h = (km[..., :, None] * vm[..., None, :]).astype(f32)  # the state at L = 1: one rounded product per element
    den = (q * km).sum(-1, dtype=f32)  # tl.sum (a tree; numpy's pairwise sum)
    ds = np.maximum(den, f32(DEN_FLOOR))
    if variant == "now":
        num = sum(p.astype(f64) for p in _chain_sum(np.swapaxes(h, -1, -2), q[..., None, :], 8, interleave=True))
        o = (num / ds[..., None]).astype(f32)
        s = dden - np.where(den >= DEN_FLOOR, (do.astype(f64) * o).sum(-1) / ds, 0)
        x = sum(p.astype(f64) for p in _chain_sum(do[..., None, :], h, 8, interleave=True))
        return (x / ds[..., None] + s[..., None] * km).astype(f32)
    num = _chain_sum(np.swapaxes(h, -1, -2), q[..., None, :], 1)[0]
    o = (num / ds[..., None]).astype(f32)
    s = (dden - np.where(den >= DEN_FLOOR, (do * o).sum(-1, dtype=f32) / ds, f32(0))).astype(f32)
    x = _chain_sum(do[..., None, :], h, 4 if variant == "bwd4" else 1)
    x = x[0] if len(x) == 1 else ((x[0] + x[1]) + x[2]) + x[3]  # fp32 adds of the chains
    return (x / ds[..., None] + s[..., None] * km).astype(f32)


def exact_sum_state_form(q, k, v, keep, do, dden):
    """dq of _fwd_torch + _bwd_composite in fp32 with every matmul summed exactly, then rounded (a model of a GEMM
    that splits K finely, as cuBLAS may for these M = 1 products)."""
    km, vm = k * keep[:, None, None], v * keep[:, None, None]
    v1 = np.concatenate([vm, np.ones_like(vm[..., :1])], -1)
    st = (km[..., :, None] * v1[..., None, :]).astype(f32)
    nd = (np.swapaxes(st, -1, -2).astype(f64) * q[..., None, :]).sum(-1).astype(f32)
    num, den = nd[..., :-1], nd[..., -1]
    ds = np.maximum(den, f32(DEN_FLOOR))
    o = (num / ds[..., None]).astype(f32)
    g = (do / ds[..., None]).astype(f32)
    s = (dden - np.where(den >= DEN_FLOOR, (do * o).astype(f32).astype(f64).sum(-1).astype(f32) / ds, 0)).astype(f32)
    g1 = np.concatenate([g, s[..., None]], -1)
    st2 = (v1[..., :, None] * km[..., None, :]).astype(f32)
    return (g1[..., :, None].astype(f64) * st2).sum(-2).astype(f32)


def _draw(seed):
    """The GPU test's inputs (its distributions, CPU generator): Hedgehog-like features, mask, dden on every 3rd row."""
    g = torch.Generator().manual_seed(seed)

    def feat():
        return torch.cat([torch.softmax(x, -1) for x in torch.randn(2, B, H, 1, F // 2, generator=g).unbind(0)], -1)

    q, k = feat(), feat()
    v = torch.randn(B, H, 1, D, generator=g)
    mask = torch.rand(B, 1, generator=g) > 0.25
    do = torch.randn(B, H, 1, D, generator=g)
    dden = torch.randn(B, H, 1, generator=g)  # L = 1: row 0 is one of every third
    return q, k, v, mask, do, dden


def emulate(n: int) -> None:
    variants = ("old", "bwd4", "now")
    rows = []
    for seed in range(n):
        q, k, v, mask, do, dden = _draw(seed)
        if not mask.any():
            continue  # every key masked: dq = 0 exactly
        x = [t.double().requires_grad_() for t in (q, k, v)]
        o = linear_attention_naive(*x, causal=False, key_mask=mask)
        den = linear_attention_weights_naive(x[0], x[1], causal=False, key_mask=mask).sum(-1)
        ref = torch.autograd.grad((o, den), x[0], (do.double(), dden.double()))[0][:, :, 0].numpy()
        o_c, den_c = _fwd_torch(q, k, v, False, mask)
        cpu_state = _bwd_composite(q, k, v, o_c, den_c, do, dden, False, mask, _product_torch)[0]
        xq = [t.clone().requires_grad_() for t in (q, k, v)]
        oq = linear_attention_naive(*xq, causal=False, key_mask=mask)
        dq_ = linear_attention_weights_naive(xq[0], xq[1], causal=False, key_mask=mask).sum(-1)
        quad = torch.autograd.grad((oq, dq_), xq[0], (do, dden))[0]
        a = [t[:, :, 0].numpy().astype(f32) for t in (q, k, v)] + [mask[:, 0].numpy().astype(f32)]
        a += [do[:, :, 0].numpy(), dden[:, :, 0].numpy()]
        e_quad = _rel(quad[:, :, 0].numpy(), ref)
        row = dict(cpu=max(_rel(cpu_state[:, :, 0].numpy(), ref), e_quad),
                   exact=max(_rel(exact_sum_state_form(*a), ref), e_quad))
        row.update({vname: _rel(kernel_dq(*a, vname), ref) for vname in variants})
        rows.append(row)
    print(f"dq at L = 1, F = D = 128, masked, non-causal: {len(rows)} draws")
    old = np.array([r["old"] for r in rows])
    for vname in variants:
        err = np.array([r[vname] for r in rows])
        rel = err / old
        line = (f"  {vname:5s} error median {np.median(err):.2e}; / old on the same draw: median {np.median(rel):.2f}, "
                f"p90 {np.quantile(rel, .9):.2f}, share < 0.653 {np.mean(rel < 0.653):4.0%}")
        for base in ("cpu", "exact"):
            b = np.array([r[base] for r in rows])
            line += f"; over 2x PyTorch ({base}) {np.mean(err > 2 * b + 4 * EPS):5.1%}"
        print(line)
    print("  (0.653 = 8.264e-5 / 1.265e-4: the bound and the old kernels' error in the H200 run that failed)")


def sm90_offline() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hhfft.kernels.linear_attention import chunk

    fn = chunk.linear_attention_bwd_dq_kernel.fn
    const = dict(BT=64, BK=128, BV=128, BDX=16, BFH=16, CAUSAL=False, HAS_MASK=True, FUSED=False, KIND=0,
                 PREC="ieee", PREC_STATE="ieee", SEG=False)
    const = {a: x for a, x in const.items() if a in fn.arg_names}
    ints = {"L", "NT", "NC", "F", "D", "Hq", "G", "DX", "FH"}
    sig = {a: "constexpr" if a in const else "i32" if a in ints else "*u8" if a == "mask" else "*fp32"
           for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    ck = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 64),
                        options=dict(num_warps=4, num_stages=1))
    ptx = ck.asm["ptx"]
    ins = re.findall(r"^\s*([a-z][\w.]*)\s+([^;]+);", ptx, re.MULTILINE)
    defs = {}
    depth = {}
    addend_of = collections.Counter()
    for op, args in ins:
        a = [x.strip() for x in args.split(",")]
        defs[a[0]] = (op, a[1:])
        if op == "fma.rn.f32":
            c = a[3]
            depth[a[0]] = depth[c] + 1 if c in depth else 1
            addend_of[c] += 1
    ends = collections.Counter(n for r, n in depth.items() if r not in addend_of)
    used_by = collections.Counter(op for op, args in ins for x in args.split(",")[1:]
                                  if x.strip() in depth and x.strip() not in addend_of)
    print(f"sm_90 PTX of the fp32 dq kernel (triton {triton.__version__}, BT = 64, F = D = 128, 4 warps, "
          f"128 threads: 64 outputs of dq per thread): {len(depth)} fp32 FMAs; "
          f"chains by length: {dict(sorted(ends.items()))}; chain ends used by: {dict(used_by)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--emulate", type=int, default=0, metavar="N", help="draws of the fp32 emulation")
    ap.add_argument("--sm90-offline", action="store_true", help="compile the fp32 dq kernel for sm_90, count chains")
    args = ap.parse_args(argv)
    if args.emulate:
        emulate(args.emulate)
    if args.sm90_offline:
        sm90_offline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
