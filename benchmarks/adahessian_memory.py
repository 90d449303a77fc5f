"""Where AdaHessian's peak memory goes, on the CPU: a scaled-down copy of the GPU benchmark's model (default
8 x Linear(512), GELU between, batch 256: the same batch / width ratio as 24 x Linear(2048) at batch 1024, so
activations : parameters is the same), every path of ``benchmarks/adahessian.py`` measured in a fresh model.

Memory is read from ``torch.profiler(profile_memory=True)`` (every CPU allocation, Inductor's buffers included):
peak = bytes of the parameters, gradients and optimizer state alive when the measured iterations start, plus the
largest increase of allocated bytes during them. Peaks are printed in MiB and in units of P = the parameters' bytes
(P = 384 MiB on the GPU benchmark's model, so "x P" translates directly). ``--breakdown`` lists what is alive at the
peak, by the innermost recorded op that allocated it.

    PYTHONPATH=.:/tmp/site nice python benchmarks/adahessian_memory.py            # po rows need pytorch_optimizer
    PYTHONPATH=. nice python benchmarks/adahessian_memory.py --rows hhfft hhfft-ue2 --breakdown
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import torch
import torch.nn as nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

from hhfft.optim import AdaHessian, hutchinson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adahessian as adahessian_bench  # noqa: E402


def sq_err(out, y):
    return (out - y).pow(2).mean()


def mlp(layers: int, width: int) -> nn.Sequential:
    return adahessian_bench.mlp(layers, width, "cpu")  # the GPU benchmark's model, scaled


def live_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages of the parameters, their .grad and the optimizer state."""
    seen, total = set(), 0
    tensors = []
    for p in model.parameters():
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _walk(prof):
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        stack.extend(ev.children)
        yield ev


def _allocations(prof):
    """(time, ptr, signed bytes, innermost op name) of every CPU allocation and free, in time order."""
    out = []
    for ev in _walk(prof):
        kind, fields = ev.typed
        if kind != _EventType.Allocation or fields.device.type != "cpu":
            continue
        names, parent = [], ev.parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.parent
        phase = next((n for n in names if n.startswith("phase:")), "")
        op = next((n for n in names if not n.startswith("phase:")), "?")
        out.append((ev.start_time_ns, fields.ptr, fields.alloc_size, f"{phase} {op}".strip()))
    out.sort(key=lambda x: x[0])
    return out


def measure(fn, model, opt, iters: int = 2):
    """Peak bytes over ``iters`` calls of ``fn`` (see the module docstring) and what is alive at the peak.

    One more call runs first under the profiler and is not counted: blocks allocated before profiling starts are
    never reported freed, so only blocks allocated under the profiler are tracked; after a first call, everything
    an iteration frees (last iteration's gradients, a replaced curvature) was allocated under the profiler.
    """
    marks = []  # live bytes of params, grads and state at the start of each counted call
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        for _ in range(iters):
            marks.append(live_bytes(model, opt))
            with record_function("mark"):
                pass
            fn()
    events = _allocations(prof)
    starts = sorted(ev.start_time_ns for ev in _walk(prof) if ev.name == "mark")
    best, best_live = 0, {}
    cur, live, k = 0, {}, -1
    base = None
    for t, ptr, size, op in events:
        while k + 1 < len(starts) and t >= starts[k + 1]:
            k += 1
            base = (cur, marks[k])
        cur += size
        if size > 0:
            live[ptr] = (size, op)
        else:
            live.pop(ptr, None)
        if base is not None and base[1] + cur - base[0] > best:
            best, best_live = base[1] + cur - base[0], dict(live)
    by_op = collections.Counter()
    for size, op in best_live.values():
        by_op[op] += size
    return best, marks[0], by_op


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rows", nargs="*", default=None, help="subset of the rows (names printed by --list)")
    ap.add_argument("--breakdown", action="store_true", help="what is alive at each row's peak")
    ap.add_argument("--time", action="store_true", help="also time each row (median of 5 iterations, CPU)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.width)
    y = torch.randn(args.batch, args.width)

    def po_rows(update_period):
        def make():
            import pytorch_optimizer

            model = mlp(args.layers, args.width)
            opt = pytorch_optimizer.AdaHessian(model.parameters(), lr=0.15, eps=1e-4, update_period=update_period)

            def it():
                opt.zero_grad(set_to_none=True)
                with record_function("phase:fwd_bwd"):
                    sq_err(model(x), y).backward(create_graph=True)
                with record_function("phase:step"):
                    opt.step()
            return model, opt, it
        return make

    def hh_rows(update_each, always_graph=False):
        """always_graph: a graph on every step, also those that reuse the curvature (the official loop, unchanged)."""
        def make():
            model = mlp(args.layers, args.width)
            opt = AdaHessian(model.parameters(), lr=0.15, update_each=update_each)

            def it():
                opt.zero_grad(set_to_none=True)
                with record_function("phase:fwd_bwd"):
                    sq_err(model(x), y).backward(create_graph=always_graph or opt.hessian_due)
                with record_function("phase:step"):
                    opt.step()
            return model, opt, it
        return make

    def func_rows(update_each):
        def make():
            model = mlp(args.layers, args.width)
            opt = AdaHessian(model.parameters(), lr=0.15, update_each=update_each)
            named = dict(model.named_parameters())
            compiled_model = torch.compile(model)

            def loss_fn(ps):
                return sq_err(torch.func.functional_call(model, ps, (x,)), y)

            def it():
                opt.zero_grad(set_to_none=True)
                if opt.hessian_due:
                    with record_function("phase:hutchinson"):
                        res = hutchinson(loss_fn, named, generator=opt.generator, backend="inductor")
                    with record_function("phase:step"):
                        opt.step(hessian=res)
                else:
                    with record_function("phase:fwd_bwd"):
                        sq_err(compiled_model(x), y).backward()
                    with record_function("phase:step"):
                        opt.step()
            return model, opt, it
        return make

    def fused_rows(update_each):
        def make():
            model = mlp(args.layers, args.width)
            opt = AdaHessian(model.parameters(), lr=0.15, update_each=update_each)
            named = dict(model.named_parameters())

            def loss_fn(ps):
                return sq_err(torch.func.functional_call(model, ps, (x,)), y)

            def it():
                with record_function("phase:hutchinson_step"):
                    opt.hutchinson_step(loss_fn, named)
            return model, opt, it
        return make

    rows = {
        "po": po_rows(1),
        "po-up2": po_rows(2),
        "hhfft": hh_rows(1),
        "hhfft-ue2": hh_rows(2),
        "hhfft-ue2-graph-always": hh_rows(2, always_graph=True),
        "jvp": func_rows(1),
        "jvp-ue2": func_rows(2),
        "step": fused_rows(1),
        "step-ue2": fused_rows(2),
    }
    names = args.rows if args.rows else list(rows)
    n_params = sum(p.numel() for p in mlp(args.layers, args.width).parameters())
    P = 4 * n_params
    print(f"model {args.layers} x Linear({args.width}), batch {args.batch}: {n_params / 1e6:.2f}M params, "
          f"P = {P / 2**20:.2f} MiB; torch {torch.__version__}")
    print(f"{'row':<24} {'peak MiB':>9} {'x P':>6} {'start x P':>9} {'ms/it':>8}")
    for name in names:
        try:
            model, opt, it = rows[name]()
        except ImportError as e:
            print(f"{name:<24} skipped: {e}")
            continue
        for _ in range(4):  # warm-up: compile, state creation
            it()
        peak, start, by_op = measure(it, model, opt)
        ms = float("nan")
        if args.time:
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                it()
                ts.append((time.perf_counter() - t) * 1e3)
            ms = sorted(ts)[2]
        print(f"{name:<24} {peak / 2**20:9.2f} {peak / P:6.2f} {start / P:9.2f} {ms:8.2f}", flush=True)
        if args.breakdown:
            for op, b in by_op.most_common(12):
                if b >= 0.02 * P:
                    print(f"    {b / P:5.2f} P  {op}")
        del model, opt, it
    return 0


if __name__ == "__main__":
    sys.exit(main())
