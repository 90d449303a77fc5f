"""Benchmark hhfft::linear_attention (chunked Triton kernels) against fla's chunk_linear_attn and causal SDPA.

What it shows, per sequence length L (H=16 heads, head dim D=64, Hedgehog features F=128 = 2 x 64, B*L = 32K tokens,
B = 1 at 64K; bf16; causal), forward and forward+backward times of (by default fla, hhfft-fused-compiled,
hhfft-fused, hhfft and sdpa; the others with --methods)
  - hhfft:       hhfft.lowering.linear_attention.linear_attention on phi_q, phi_k [B, H, L, F], v [B, H, L, D]
  - hhfft-fused: hhfft.lowering.linear_attention.hedgehog_linear_attention on q, k [B, H, L, 64] and the maps' W, b
                 (softmax_split; backward also gives dW, db), by its default route (HHFFT_LA_FUSED=map: one
                 feature-map kernel writes phi, then the unfused kernels); hhfft-fused-map names that route explicitly
  - hhfft-fused-compiled: hhfft-fused under torch.compile (Inductor launches the op's kernels from its generated
                 code: the backend's path, without the eager op's Python per launch)
  - hhfft-fused-inkernel: the same op with HHFFT_LA_FUSED=inkernel (the map computed inside the chunk kernels, phi
                 never in memory)
  - fla:         fla.ops.linear_attn.chunk_linear_attn (fla-core 0.6) on the same phi (its layout [B, L, H, F]),
                 scale=1, normalize=True: the same function
  - sdpa:        F.scaled_dot_product_attention(q, k, v, is_causal=True) on q, k, v [B, H, L, 64] (FlashAttention)
  - hhfft-par, hhfft-seq, hhfft-fused-seq: the state passes with one chunk per segment (HHFFT_LA_STATES=parallel)
                 or one segment per head (=sequential) instead of the default (segments enough to fill the GPU)
  - hhfft-tf32x3, hhfft-fused-tf32x3: with HHFFT_LA_PREC=tf32x3 (fp32 operands as tf32x3, not the default bf16
                 hi + lo split)
  - hhfft-apart, hhfft-fused-apart: with HHFFT_LA_DKDV=apart (dk, dv by two launches)
  - hhfft-fused-recompute: HHFFT_LA_KEEP=none (the backward recomputes phi and the chunk states instead of keeping
    the forward's); hhfft-fused-compiled-phi: HHFFT_LA_KEEP=phi (phi kept, the states recomputed), compiled
plus FLOPs and bytes of the chunked computation with the floors they give (the bf16 dense matmul rate and the copy
bandwidth measured in the same run), and the peak memory of each forward+backward. Every method is checked against
the fp32 plain-torch implementation on the same inputs before it is timed.

    PYTHONPATH=. python benchmarks/linear_attention.py --out /tmp/la          # the full table (one GPU run)
    PYTHONPATH=. python benchmarks/linear_attention.py --lengths 8192 --quick
    PYTHONPATH=. python benchmarks/linear_attention.py --graphs ...           # plus each method replayed from a CUDA graph

--graphs adds, after the normal (eager, host-included) timing, the time of the same forward and forward+backward
replayed from a CUDA graph (triton.testing.do_bench_cudagraph): the GPU's time alone, which separates a method that
is host-bound (its Python and launches take longer than its kernels) from one whose kernels are slow.

With --out, each row is also appended to OUT/rows.jsonl as soon as it is measured, so a run stopped by a time limit
keeps what it measured; --method-timeout S gives up on one method at one length after S seconds (fla autotunes
dozens of configs on its first call: it took the whole of an earlier run's time limit at L = 2K) and goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys

import torch
import torch.nn.functional as F
import triton

import hhfft  # noqa: F401  (registers the ops)
from hhfft.lowering.linear_attention import _fwd_torch, hedgehog_linear_attention, linear_attention
from hhfft.nn import HedgehogFeatureMap

TOKENS = 1 << 15
H, D, FH = 16, 64, 64
FEAT = 2 * FH
C = 64
LENGTHS = [2048, 8192, 32768, 65536]
# the table (the fused op as the backend runs it and as an eager call, the unfused kernels, the two peers);
# the variants are opt-in with --methods
DEFAULT_METHODS = ["fla", "hhfft-fused-compiled", "hhfft-fused", "hhfft", "sdpa"]
METHODS = ["hhfft-fused", "hhfft", "fla", "sdpa", "hhfft-fused-compiled", "hhfft-fused-inkernel", "hhfft-tf32x3",
           "hhfft-fused-tf32x3", "hhfft-apart", "hhfft-fused-apart", "hhfft-par", "hhfft-seq", "hhfft-fused-seq"]
VARIANTS = {  # the environment of each variant of the two hhfft paths
    "hhfft-fused-map": ("hhfft-fused", {"HHFFT_LA_FUSED": "map"}),
    "hhfft-fused-inkernel": ("hhfft-fused", {"HHFFT_LA_FUSED": "inkernel"}),
    "hhfft-par": ("hhfft", {"HHFFT_LA_STATES": "parallel"}),
    "hhfft-seq": ("hhfft", {"HHFFT_LA_STATES": "sequential"}),
    "hhfft-fused-seq": ("hhfft-fused", {"HHFFT_LA_STATES": "sequential"}),
    "hhfft-tf32x3": ("hhfft", {"HHFFT_LA_PREC": "tf32x3"}),
    "hhfft-fused-tf32x3": ("hhfft-fused", {"HHFFT_LA_PREC": "tf32x3"}),
    "hhfft-apart": ("hhfft", {"HHFFT_LA_DKDV": "apart"}),
    "hhfft-fused-apart": ("hhfft-fused", {"HHFFT_LA_DKDV": "apart"}),
    "hhfft-fused-recompute": ("hhfft-fused", {"HHFFT_LA_KEEP": "none"}),
    "hhfft-fused-compiled-phi": ("hhfft-fused-compiled", {"HHFFT_LA_KEEP": "phi"}),
}
_VARIANT_VARS = sorted({var for _, env in VARIANTS.values() for var in env})


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of fn replayed from a CUDA graph: the GPU's time without the host's (Python, launches)."""
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def peak_mb(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def floors(L: int, B: int, bw: float, flops: float) -> dict:
    """FLOPs and bytes of the chunked causal computation (tril products counted in full, as the kernels do them)."""
    n = B * H * L  # token-heads
    fwd_flop = n * (2 * C * (FEAT + D) + 4 * FEAT * D)  # intra QK^T, AV; inter Q h; state update K^T V
    bwd_flop = n * (4 * C * (FEAT + D) + 2 * C * (FEAT + D) + 8 * FEAT * D)  # dq, dk, dv intra + inter, 2 state passes
    e = 2  # bf16
    fwd_bytes = n * (e * (2 * FEAT + 2 * D) + 4)  # read phi_q, phi_k, v; write o, den
    bwd_bytes = n * (e * (2 * FEAT + 3 * D) + 8 + e * (2 * FEAT + D))  # read q,k,v,o,do,den,dden; write dq,dk,dv
    return dict(
        fwd_gflop=fwd_flop / 1e9, fwd_mb=fwd_bytes / 2**20,
        fwd_floor_ms=max(fwd_flop / flops, fwd_bytes / bw) * 1e3,
        fwdbwd_floor_ms=max((fwd_flop + bwd_flop) / flops, (fwd_bytes + bwd_bytes) / bw) * 1e3,
    )


def measure_rates() -> tuple[float, float]:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x)) * 1e-3
    bw = 2 * x.numel() / t
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ a) * 1e-3
    del x, y
    return bw, 2 * 8192**3 / t


class MethodTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise MethodTimeout()


def run_length(L: int, methods: list[str], quick: bool, sink=None, timeout: int = 0, graphs: bool = False) -> list[dict]:
    B = max(1, TOKENS // L)
    g = torch.Generator(device="cuda").manual_seed(L)
    dt = torch.bfloat16
    q = torch.randn(B, H, L, D, device="cuda", dtype=dt, generator=g)
    k = torch.randn(B, H, L, D, device="cuda", dtype=dt, generator=g)
    v = torch.randn(B, H, L, D, device="cuda", dtype=dt, generator=g)
    do = torch.randn(B, H, L, D, device="cuda", dtype=dt, generator=g)
    fq = HedgehogFeatureMap(H, D, FH).cuda()
    fk = HedgehogFeatureMap(H, D, FH).cuda()
    with torch.no_grad():
        for fm in (fq, fk):
            fm.weight.add_(0.1 * torch.randn(fm.weight.shape, device="cuda", generator=g))
            fm.bias.normal_(0, 0.1, generator=g)
        pq, pk = fq(q), fk(k)  # [B, H, L, 128] bf16
        o_ref = _fwd_torch(pq.float(), pk.float(), v.float(), True, None)[0]

    rows = []
    for name in methods:
        for var in _VARIANT_VARS:  # each method starts from the defaults
            os.environ.pop(var, None)
        base, env = VARIANTS.get(name, (name, {}))
        os.environ.update(env)
        if base == "hhfft":
            x = [t.clone().requires_grad_() for t in (pq, pk, v)]
            fwd = lambda: linear_attention(*x, causal=True)  # noqa: E731
            out = lambda o: o  # noqa: E731
            leaves = x
        elif base == "hhfft-fused":
            x = [t.clone().requires_grad_() for t in (q, k, v)]
            params = [fq.weight, fq.bias, fk.weight, fk.bias]
            fwd = lambda: hedgehog_linear_attention(  # noqa: E731
                x[0], x[1], x[2], fq.weight, fq.bias, fk.weight, fk.bias, kind="softmax_split", causal=True)
            out = lambda o: o  # noqa: E731
            leaves = x + params
        elif base == "hhfft-fused-compiled":  # the backend's path: Inductor launches the kernels from its own code
            x = [t.clone().requires_grad_() for t in (q, k, v)]
            params = [fq.weight, fq.bias, fk.weight, fk.bias]
            torch._dynamo.reset()  # the environment (HHFFT_LA_KEEP) is read when tracing: no graph of another variant
            cfn = torch.compile(lambda *a: hedgehog_linear_attention(*a, kind="softmax_split", causal=True))
            fwd = lambda: cfn(*x, *params)  # noqa: E731
            out = lambda o: o  # noqa: E731
            leaves = x + params
        elif name == "fla":
            from fla.ops.linear_attn import chunk_linear_attn

            x = [t.transpose(1, 2).contiguous().requires_grad_() for t in (pq, pk, v)]  # [B, L, H, *]
            fwd = lambda: chunk_linear_attn(*x, scale=1.0, normalize=True)[0]  # noqa: E731
            out = lambda o: o.transpose(1, 2)  # noqa: E731
            leaves = x
        elif name == "sdpa":
            x = [t.clone().requires_grad_() for t in (q, k, v)]
            fwd = lambda: F.scaled_dot_product_attention(*x, is_causal=True)  # noqa: E731
            out = lambda o: o  # noqa: E731
            leaves = x
        else:
            raise ValueError(f"unknown method {name!r}")
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(timeout)  # 0: no limit
        try:
            with torch.no_grad():
                o = out(fwd())
            err = None if name == "sdpa" else rel_err(o, o_ref)
            dout = do.transpose(1, 2).contiguous() if name == "fla" else do

            def fwdbwd():
                for t in leaves:
                    t.grad = None
                fwd().backward(dout)

            row = dict(L=L, B=B, method=name, err_vs_fp32=err)
            with torch.no_grad():
                row["fwd_ms"] = bench(fwd)
            row["fwdbwd_ms"] = bench(fwdbwd)
            row["peak_mb_fwdbwd"] = peak_mb(fwdbwd)
            if graphs:  # after the eager timing: kernels are autotuned and compiled, nothing left to do on the host
                try:
                    with torch.no_grad():
                        row["fwd_graph_ms"] = bench_graph(fwd)
                    row["fwdbwd_graph_ms"] = bench_graph(fwdbwd)
                except Exception as e:  # noqa: BLE001 - the eager figures stand without it
                    row["graph_error"] = repr(e)[:400]
        except MethodTimeout:
            row = dict(L=L, B=B, method=name, error=f"gave up after {timeout} s (--method-timeout)")
        except Exception as e:  # one failing method must not lose the others' figures
            row = dict(L=L, B=B, method=name, error=repr(e)[:800])
        finally:
            signal.alarm(0)
        print(json.dumps(row), flush=True)
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
        rows.append(row)
        if quick:
            continue
    return rows


def table(rows: list[dict], fl: dict) -> str:
    lines = [
        "| L | B | method | fwd ms | fwd+bwd ms | peak MB (fwd+bwd) | rel err vs fp32 | fwd+bwd speed-up of hhfft-fused "
        "| fwd+bwd speed-up over fla | fwd ms, graph | fwd+bwd ms, graph | fwd+bwd over fla, both graphs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by = {(r["L"], r["method"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['L']} | {r['B']} | {r['method']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        fused = by.get((r["L"], "hhfft-fused"), {})
        sp = f"{r['fwdbwd_ms'] / fused['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in fused and r["method"] != "hhfft-fused" else ""
        fla = by.get((r["L"], "fla"), {})
        sp_fla = f"{fla['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x" if "fwdbwd_ms" in fla and r["method"] != "fla" else ""
        err = "" if r["err_vs_fp32"] is None else f"{r['err_vs_fp32']:.1e}"
        g_fwd, g_all = (f"{r[k]:.3f}" if k in r else r.get("graph_error", "")[:40] for k in ("fwd_graph_ms", "fwdbwd_graph_ms"))
        g_fla = (f"{fla['fwdbwd_graph_ms'] / r['fwdbwd_graph_ms']:.2f}x"
                 if "fwdbwd_graph_ms" in fla and "fwdbwd_graph_ms" in r and r["method"] != "fla" else "")
        lines.append(f"| {r['L']} | {r['B']} | {r['method']} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
                     f"{r['peak_mb_fwdbwd']:.0f} | {err} | {sp} | {sp_fla} | {g_fwd} | {g_all} | {g_fla} |")
    lines.append("")
    lines.append("| L | fwd GFLOP | fwd MB moved | fwd floor ms | fwd+bwd floor ms |")
    lines.append("| --- | --- | --- | --- | --- |")
    for L, f in fl.items():
        lines.append(f"| {L} | {f['fwd_gflop']:.1f} | {f['fwd_mb']:.0f} | {f['fwd_floor_ms']:.3f} | {f['fwdbwd_floor_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=LENGTHS)
    p.add_argument("--methods", nargs="*", default=DEFAULT_METHODS,
                   choices=METHODS + sorted(set(VARIANTS) - set(METHODS)))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--method-timeout", type=int, default=0, help="seconds per method and length (0: no limit)")
    p.add_argument("--out", default=None, help="folder for results.json and table.md")
    p.add_argument("--graphs", action="store_true",
                   help="also time each method replayed from a CUDA graph (GPU time without host overhead)")
    a = p.parse_args(argv)
    os.environ["HHFFT_LINEAR_ATTENTION_TRITON"] = "1"  # the kernels for every dtype (fp32 is opt-in); this measures them
    bw, fl_rate = measure_rates()
    head = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, copy_tb_s=bw / 1e12, bf16_tflop_s=fl_rate / 1e12)
    print(json.dumps(head), flush=True)
    sink = None
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        sink = open(os.path.join(a.out, "rows.jsonl"), "a")
        sink.write(json.dumps(head) + "\n")
    rows, fl = [], {}
    for L in a.lengths:
        fl[L] = floors(L, max(1, TOKENS // L), bw, fl_rate)
        rows += run_length(L, a.methods, a.quick, sink, a.method_timeout, a.graphs)
        torch.cuda.empty_cache()
    md = table(rows, fl)
    print(md, flush=True)
    if a.out:
        sink.close()
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(dict(head=head, rows=rows, floors=fl), f, indent=1)
        with open(os.path.join(a.out, "table.md"), "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    sys.exit(main())
