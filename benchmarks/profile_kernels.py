"""Where the GPU time goes: a per-kernel breakdown (torch.profiler) of the configurations that miss their targets.

For each case it runs a few warm iterations, then profiles 5 more and prints every CUDA kernel's time per iteration,
largest first, with its share of the total, and the host time per iteration (the wall time of enqueueing 20
iterations without a synchronisation: when it exceeds the kernels' time, the GPU waits for Python and the
benchmarks' figures measure the host). Cases (the benchmarks' shapes):

  la-fused-<L>   hedgehog_linear_attention (feature maps + chunk kernels) forward+backward, bf16, H=16 D=64 F=128
  la-phi-<L>     linear_attention on given phi, forward+backward (the unfused kernels)
  fla-<L>        fla's chunk_linear_attn on the same phi, forward+backward (when fla is importable)
  fft-<L>        hhfft fftconv forward+backward at B*H*L = 2^27 bf16 elements (benchmarks/fftconv.py's shapes)
  fftref-<L>     the torch rfft reference, forward+backward, same shapes
  demo-<backend>-<L>  the demo's training step (HyenaLM, batch 1, bf16 autocast, AdamW) compiled with that backend
  hvp-<width>    AdaHessian's iteration by hutchinson (jvp of grad, Inductor) + the fused step on adahessian.py's MLP

    PYTHONPATH=. python3 benchmarks/profile_kernels.py --cases la-fused-32768 fft-16384 --out $OUT
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import pstats
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fftconv as fft_bench  # noqa: E402
import linear_attention as la_bench  # noqa: E402

from hhfft.kernels.fftconv import monarch  # noqa: E402
from hhfft.lowering.linear_attention import hedgehog_linear_attention, linear_attention  # noqa: E402
from hhfft.nn import HedgehogFeatureMap  # noqa: E402

ITERS = 5


def la_case(kind: str, L: int):
    B, H, D, FH = max(1, la_bench.TOKENS // L), la_bench.H, la_bench.D, la_bench.FH
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    fq, fk = HedgehogFeatureMap(H, D, FH).cuda(), HedgehogFeatureMap(H, D, FH).cuda()
    if kind == "la-fused":
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        leaves = x + [fq.weight, fq.bias, fk.weight, fk.bias]
        fwd = lambda: hedgehog_linear_attention(  # noqa: E731
            x[0], x[1], x[2], fq.weight, fq.bias, fk.weight, fk.bias, kind="softmax_split", causal=True)
        dout = do
    else:
        with torch.no_grad():
            pq, pk = fq(q), fk(k)
        if kind == "la-phi":
            leaves = [t.clone().requires_grad_() for t in (pq, pk, v)]
            fwd = lambda: linear_attention(*leaves, causal=True)  # noqa: E731
            dout = do
        else:
            from fla.ops.linear_attn import chunk_linear_attn

            leaves = [t.transpose(1, 2).contiguous().requires_grad_() for t in (pq, pk, v)]
            fwd = lambda: chunk_linear_attn(*leaves, scale=1.0, normalize=True)[0]  # noqa: E731
            dout = do.transpose(1, 2).contiguous()

    def step():
        for t in leaves:
            t.grad = None
        fwd().backward(dout)

    return step, f"B={B} H={H} L={L} D={D} F={2 * FH} bf16 causal, forward+backward"


def fft_case(kind: str, L: int):
    B, H = fft_bench.shape_for(L)
    g = torch.Generator(device="cuda").manual_seed(L)
    u = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = (torch.randn(H, L, device="cuda", generator=g) / math.sqrt(L)).requires_grad_()
    dy = torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16, generator=g)
    fn = fft_bench.hhfft_fn if kind == "fft" else fft_bench.torch_ref

    def step():
        return torch.autograd.grad(fn(u, k), (u, k), dy)

    return step, f"B={B} H={H} L={L} N={monarch.plan(L, L, L)} bf16 u, fp32 k, forward+backward"


def demo_case(backend: str, L: int):
    from hhfft.demo import batch, text_bytes
    from hhfft.models import HyenaConfig, HyenaLM

    torch.manual_seed(0)
    model = HyenaLM(HyenaConfig(max_len=max(2048, L))).cuda()
    tokens = batch(text_bytes(), 1, L, torch.Generator().manual_seed(0)).cuda()
    fn = torch.compile(model.loss, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(tokens)
        loss.backward()
        opt.step()

    return step, f"demo HyenaLM, batch 1 x {L}, bf16 autocast, backend={backend}, forward+backward+AdamW"


def hvp_case(width: int):
    import adahessian as ah_bench

    from hhfft.optim import AdaHessian, hutchinson

    model = ah_bench.mlp(24, width, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(1024, width, device="cuda", generator=g) for _ in range(2))
    opt = AdaHessian(model.parameters(), lr=0.15, fused=True)
    named = dict(model.named_parameters())

    def loss_fn(ps):
        return ah_bench.sq_err(torch.func.functional_call(model, ps, (x,)), y)

    def step():  # TF32 matmuls as in adahessian.py, for this case only (the setting is read when mm runs)
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            opt.zero_grad(set_to_none=True)
            opt.step(hessian=hutchinson(loss_fn, named, generator=opt.generator, backend="inductor"))
        finally:
            torch.set_float32_matmul_precision(prev)

    return step, f"AdaHessian iteration, hutchinson (jvp of grad, Inductor) + fused step, 24 x Linear({width}), batch 1024"


def host_ms(step, n: int = 20) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e3


def profile(step) -> list[tuple[str, float, int]]:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(ITERS):
            step()
        torch.cuda.synchronize()
    total_us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total_us[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            calls[ev.name] += 1
    rows = [(name, us / ITERS / 1e3, calls[name] // ITERS) for name, us in total_us.items()]
    return sorted(rows, key=lambda r: -r[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["la-fused-2048", "la-fused-32768", "la-phi-32768", "fla-32768",
                                                  "fft-4096", "fft-16384", "fft-65536", "fftref-16384"])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cprofile", type=int, default=0, metavar="N",
                   help="also print the N Python functions with the most own host time (cProfile over 20 iterations)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for case in args.cases:
        kind, L = case.rsplit("-", 1)
        try:
            if kind.startswith("demo-"):
                step, what = demo_case(kind.split("-", 1)[1], int(L))
            elif kind == "hvp":
                step, what = hvp_case(int(L))
            else:
                step, what = (la_case if kind.startswith(("la", "fla")) else fft_case)(kind, int(L))
            rows = profile(step)
            host = host_ms(step)
        except Exception as e:  # one failing case must not lose the others
            print(f"## {case}: failed: {e!r}"[:600], flush=True)
            continue
        total = sum(r[1] for r in rows)
        print(f"## {case}: {what}; kernels {total:.3f} ms, host {host:.3f} ms per iteration", flush=True)
        for name, ms, n in rows[:25]:
            print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  x{n:<3d} {name[:110]}")
        results[case] = dict(what=what, total_ms=total, host_ms=host, kernels=rows)
        if args.cprofile:
            prof = cProfile.Profile()
            prof.runcall(host_ms, step)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.cprofile)
            print("\n".join(line[:150] for line in text.getvalue().splitlines()[4:]), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "profile_kernels.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
