"""Benchmark hhfft's AdaHessian on one CUDA GPU: a 100M-parameter MLP (24 x Linear 2048, GELU between, fp32
weights, TF32 matmuls, mean squared error), batch 1024.

Rows (median per call over a timed loop, CUDA-event timing via triton.testing.do_bench; peak = max allocated memory
during the iteration, model and optimizer state included, minus what earlier rows left allocated, which is freed
and logged before each row):
  - adam:          torch.optim.Adam(fused=True): zero_grad, forward, backward, step
  - adam step:     its fused step alone
  - adam, CUDA graphs: the model under torch.compile(mode="reduce-overhead"), for information
  - po adahessian: pytorch_optimizer 4.1 AdaHessian: forward, backward(create_graph=True), step (its own HVP)
  - hhfft:         hhfft.optim.AdaHessian (fused step), same usage
  - hhfft step:    the compiled multi-tensor update alone (the lists the optimizer passes it)
  - variants of the step (per-parameter compiled, eager) and of the curvature (update_each=2; forward-over-reverse
    through hutchinson(backend="inductor"), also replayed from a CUDA graph: options={"triton.cudagraphs": True}).
Before any timing, every path is checked on this GPU: compiled step against the eager step, the optimizer against
the naive transcription (fp64, 10 steps, Linear/Conv1d/2d/3d), the jvp-of-grad HVP against the double-backward one.

    PYTHONPATH=. python benchmarks/adahessian.py --out /tmp/adahessian      # on the GPU (~2 min)
    PYTHONPATH=. python benchmarks/adahessian.py --quick                     # CPU smoke run, tiny sizes, no timing
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn

import hhfft  # noqa: F401
from hhfft.kernels.adahessian.naive import adahessian_step_naive, average_curvature_naive, hutchinson_naive
from hhfft.kernels.adahessian.step import adahessian_update, adahessian_update_fused
from hhfft.optim import AdaHessian, hutchinson, rademacher


def sq_err(out, y):
    # written out: F.mse_loss under torch.func.jvp(grad(.)) fails on torch 2.13 ("ZeroTensors are immutable"
    # eagerly, a segfault compiled); the explicit form works in every path
    return (out - y).pow(2).mean()


def mlp(layers: int, width: int, device) -> nn.Sequential:
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.GELU())
    return nn.Sequential(*mods).to(device)


def timer(quick: bool):
    if quick:
        def run(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return run
    import triton

    return lambda fn: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


_BASE = {"bytes": 0}  # memory held by earlier rows (leftovers), measured when the row's model did not exist yet


def peak_mb(fn, device) -> float:
    """Peak allocated memory of two calls of ``fn``, minus what earlier rows left allocated."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - _BASE["bytes"]) / 2**20


# ------------------------------------------------------------------------------------------------- correctness
def check_step(device, log):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = [(64, 32, 3, 3), (257,), (300, 129), (17, 5, 7)]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16]
    mk = lambda s, dt=torch.float32: torch.randn(s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    lists = []
    base = dict(
        p=[mk(s, dt) for s, dt in zip(shapes, dtypes)],
        g=[mk(s, dt) for s, dt in zip(shapes, dtypes)],
        d=[mk((64, 32, 1, 1)).abs(), mk((257,)), mk((300, 129)), mk((17, 5, 1)).abs()],
        m=[mk(s) * 0.1 for s in shapes],
        v=[mk(s).abs() * 0.1 for s in shapes],
        t=[torch.full((), 3.0, device=device) for _ in shapes],
    )
    for _ in range(2):
        lists.append({k: [x.clone() for x in v] for k, v in base.items()})
    lr = torch.tensor(0.1, device=device)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.01, hessian_power=0.7)
    for _ in range(3):
        a, b = lists
        adahessian_update(a["p"], a["g"], a["d"], a["m"], a["v"], a["t"], lr, **kw)
        adahessian_update_fused(b["p"], b["g"], b["d"], b["m"], b["v"], b["t"], lr, **kw)
    worst = 0.0
    for x, y in zip(lists[0]["p"] + lists[0]["v"], lists[1]["p"] + lists[1]["v"]):
        rel = ((x.float() - y.float()).norm() / x.float().norm()).item()
        worst = max(worst, rel)
    ok = worst < 1e-5
    log(f"check fused step vs eager step: max rel err {worst:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


class AllConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv1d(1, 2, 3), nn.Conv2d(1, 2, 3), nn.Conv3d(1, 2, 3)
        self.fc1, self.fc2 = nn.Linear(44, 4), nn.Linear(4, 1)

    def forward(self, x1, x2, x3):
        h = torch.cat([self.c1(x1).flatten(1), self.c2(x2).flatten(1), self.c3(x3).flatten(1)], 1)
        return self.fc2(torch.tanh(self.fc1(torch.tanh(h))))


def check_against_naive(device, log, steps=10):
    torch.manual_seed(0)
    ref = AllConvs().double().to(device)
    model = AllConvs().double().to(device)
    model.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    xs = (torch.randn(6, 1, 7, generator=g), torch.randn(6, 1, 5, 5, generator=g), torch.randn(6, 1, 4, 4, 4, generator=g))
    xs = tuple(x.double().to(device) for x in xs)
    y = torch.randn(6, 1, generator=g).double().to(device)
    opt = AdaHessian(model.parameters(), generator=torch.Generator(device=device).manual_seed(5), fused=True)
    gen = torch.Generator(device=device).manual_seed(5)
    state = {n: {} for n, _ in ref.named_parameters()}
    worst = 0.0
    for _ in range(steps):
        for p in ref.parameters():
            p.grad = None
        (ref(*xs) - y).pow(2).mean().backward(create_graph=True)
        params = list(ref.parameters())
        grads = [p.grad for p in params]
        D = hutchinson_naive(grads, params, [rademacher(params, gen)])
        for (n, p), gr, d in zip(ref.named_parameters(), grads, D):
            adahessian_step_naive(p, gr.detach(), average_curvature_naive(d.detach()), state[n], lr=0.15,
                                  betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0)
        opt.zero_grad()
        (model(*xs) - y).pow(2).mean().backward(create_graph=True)
        opt.step()
        for p, q in zip(ref.parameters(), model.parameters()):
            worst = max(worst, (p - q).abs().max().item())
    ok = worst < 1e-6
    log(f"check AdaHessian(fused) vs naive, fp64, {steps} steps: max abs diff {worst:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def check_functional(device, log):
    torch.manual_seed(0)
    model = mlp(3, 64, device).double()
    x, y = torch.randn(16, 64, device=device, dtype=torch.float64), torch.randn(16, 64, device=device, dtype=torch.float64)
    params = dict(model.named_parameters())

    def loss_fn(ps):
        return sq_err(torch.func.functional_call(model, ps, (x,)), y)

    res = hutchinson(loss_fn, params, generator=torch.Generator(device=device).manual_seed(3), backend="inductor",
                     set_grad=False)
    sq_err(model(x), y).backward(create_graph=True)
    zs = rademacher(list(params.values()), torch.Generator(device=device).manual_seed(3))
    hz = torch.autograd.grad([p.grad for p in params.values()], list(params.values()), grad_outputs=zs)
    worst = max(((res.hessian[n] - z * h).norm() / (z * h).norm()).item() for n, z, h in zip(params, zs, hz))
    ok = worst < 1e-10
    log(f"check hutchinson(jvp of grad, compiled) vs double backward, fp64: max rel err {worst:.2e} -> "
        f"{'OK' if ok else 'FAIL'}")
    return ok


def check_fused_iteration(device, log, steps=3):
    """AdaHessian.hutchinson_step (gradient, HVP and update in one compiled graph; plain and replayed from a CUDA
    graph) against hutchinson() + step(hessian=...), fp64, same seeded probes: parameters after each step."""
    worst = 0.0
    for options in [None, {"triton.cudagraphs": True}] if device.type == "cuda" else [None]:
        models = [mlp(3, 64, device).double() for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        x = torch.randn(16, 64, device=device, dtype=torch.float64)
        y = torch.randn(16, 64, device=device, dtype=torch.float64)
        opts = [AdaHessian(m.parameters(), lr=0.05, weight_decay=0.01,
                           generator=torch.Generator(device=device).manual_seed(4)) for m in models]
        named = [dict(m.named_parameters()) for m in models]
        loss_fns = [lambda ps, m=m: sq_err(torch.func.functional_call(m, ps, (x,)), y) for m in models]
        for _ in range(steps):
            opts[0].hutchinson_step(loss_fns[0], named[0], options=options)
            opts[1].zero_grad(set_to_none=True)
            opts[1].step(hessian=hutchinson(loss_fns[1], named[1], generator=opts[1].generator, backend="inductor"))
            worst = max(worst, max(((a - b).norm() / b.norm()).item()
                                   for a, b in zip(models[0].parameters(), models[1].parameters())))
    ok = worst < 1e-10
    log(f"check AdaHessian.hutchinson_step (one compiled iteration; also under CUDA graphs) vs hutchinson + step, "
        f"fp64, {steps} steps: max rel diff of the parameters {worst:.2e} -> {'OK' if ok else 'FAIL'}")
    return ok


def check_graphed(model, named, loss_fn, graphs, log):
    """hutchinson replayed from a CUDA graph (``options=graphs``) against the plain compiled call, same probes. The
    rows before it have stepped the model's parameters hundreds of times at lr=0.15 (after them, in the 01:24 run,
    this comparison gave NaN; with lr=1e-12 it gave 0): they are reset in place to mlp()'s initial values first (the
    same tensors, so nothing recompiles). A NaN difference fails."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    device = next(iter(named.values())).device
    first = {}
    for name, opts in [("plain", None), ("graphed", graphs)]:
        r = hutchinson(loss_fn, named, generator=torch.Generator(device=device).manual_seed(1), options=opts,
                       set_grad=False)
        # graphed outputs are overwritten by the next replay: copied
        first[name] = [t.clone() for t in [r.loss] + list(r.grads.values()) + list(r.hessian.values())]
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(first["graphed"], first["plain"]))
    ok = worst <= 1e-4  # the same kernels on the same inputs (bit-equal at 01:32 on the H200); NaN fails
    log(f"check hutchinson under CUDA graphs vs without (same parameters and probes, TF32): max rel diff {worst:.2e} "
        f"-> {'OK' if ok else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------------------ timing
def per_param_update(params, grads, hessian, exp_avgs, exp_sqs, steps, lr, beta1, beta2, eps, weight_decay, k):
    """Variant for comparison: the same maths as plain per-parameter ops in one compiled graph."""
    for p, g, d, m, v, t in zip(params, grads, hessian, exp_avgs, exp_sqs, steps):
        t.add_(1)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = v.sqrt() / (-torch.expm1(t * math.log(beta2))).sqrt() + eps
        p.mul_(1 - lr * weight_decay).sub_(lr * m / -torch.expm1(t * math.log(beta1)) / denom)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", default=os.environ.get("OUT", "out/bench_adahessian"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, works on the CPU, no real timing")
    ap.add_argument("--budget-s", type=float, default=170.0, help="skip optional rows once this much time has gone")
    ap.add_argument("--skip", nargs="*", default=[], choices=["po", "variants", "create_graph", "update_each", "graphs"],
                    help="leave out the pytorch_optimizer rows, the step variants (eager, per-parameter compiled), "
                         "hhfft's backward(create_graph=True) rows, the update_each=2 rows, or hhfft's CUDA-graph "
                         "rows")
    args = ap.parse_args()
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.layers, args.width, args.batch = 3, 32, 8
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "adahessian_log.txt"), "w")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"{datetime.datetime.now(datetime.timezone.utc).isoformat()} torch {torch.__version__} device "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    checks = [check_step(device, log), check_against_naive(device, log), check_functional(device, log),
              check_fused_iteration(device, log)]
    if not all(checks):
        log("a correctness check failed: no timing")
        return 1

    torch.set_float32_matmul_precision("high")  # this script only: TF32 matmuls for every method alike
    bench = timer(args.quick)
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randn(args.batch, args.width, device=device)
    rows = {}

    def record(name, ms, mb=float("nan"), note=""):
        rows[name] = {"ms": ms, "peak_mb": mb, "note": note}
        log(f"{name:<34} {ms:9.3f} ms   peak {mb:9.1f} MiB  {note}")

    def release(counted=None):
        """Free what earlier rows left and make it the new base; ``counted``: a model the next row uses (its
        parameters stay in the peak, its gradients are dropped)."""
        gc.collect()  # a backward(create_graph=True) leaves parameter <-> .grad cycles: free them now
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            kept = 0
            if counted is not None:
                for p in counted.parameters():
                    p.grad = None
                kept = sum(p.numel() * p.element_size() for p in counted.parameters())
            _BASE["bytes"] = torch.cuda.memory_allocated() - kept
            log(f"(left allocated by earlier rows: {_BASE['bytes'] / 2**20:.1f} MiB, not counted in peaks)")

    release()

    # Adam ------------------------------------------------------------------------------------------------------
    model = mlp(args.layers, args.width, device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {args.layers} x Linear({args.width}), {n_params / 1e6:.1f}M parameters, batch {args.batch}")
    adam = torch.optim.Adam(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def adam_iter():
        adam.zero_grad(set_to_none=True)
        sq_err(model(x), y).backward()
        adam.step()

    adam_iter()
    record("adam (fused) iteration", bench(adam_iter), peak_mb(adam_iter, device))
    record("adam (fused) step", bench(adam.step))
    if device.type == "cuda":  # for information: Adam's model compiled and replayed from CUDA graphs as well
        graphed_model = torch.compile(model, mode="reduce-overhead")

        def adam_graphed():
            torch.compiler.cudagraph_mark_step_begin()
            adam.zero_grad(set_to_none=True)
            sq_err(graphed_model(x), y).backward()
            adam.step()

        for _ in range(3):
            adam_graphed()
        record("adam (fused), model with CUDA graphs", bench(adam_graphed))
        del graphed_model
    del model, adam
    release()

    # pytorch_optimizer -------------------------------------------------------------------------------------
    try:
        if "po" in args.skip:
            raise ImportError("left out (--skip po)")
        import pytorch_optimizer

        model = mlp(args.layers, args.width, device)
        po = pytorch_optimizer.AdaHessian(model.parameters(), lr=0.15, eps=1e-4)

        def po_iter():
            po.zero_grad(set_to_none=True)
            sq_err(model(x), y).backward(create_graph=True)
            po.step()

        po_iter()
        from importlib.metadata import version

        record(f"pytorch_optimizer {version('pytorch_optimizer')} AdaHessian iteration", bench(po_iter),
               peak_mb(po_iter, device))
        po = pytorch_optimizer.AdaHessian(model.parameters(), lr=0.15, eps=1e-4, update_period=2)

        def po_two():
            for _ in range(2):
                po.zero_grad(set_to_none=True)
                sq_err(model(x), y).backward(create_graph=True)
                po.step()

        po_two()
        record("pytorch_optimizer update_period=2 (per it.)", bench(po_two) / 2)
        del model, po
        release()
    except ImportError as e:
        log(f"pytorch_optimizer not available: {e}")

    # hhfft -----------------------------------------------------------------------------------------------------
    model = mlp(args.layers, args.width, device)
    opt = AdaHessian(model.parameters(), lr=0.15, fused=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if "create_graph" not in args.skip:
        def hh_iter():
            opt.zero_grad(set_to_none=True)
            sq_err(model(x), y).backward(create_graph=True)
            opt.step()

        for _ in range(3):
            hh_iter()
        record("hhfft AdaHessian iteration", bench(hh_iter), peak_mb(hh_iter, device))

        # where the iteration's time goes: forward+backward(create_graph), then step() with and without its HVP
        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            sq_err(model(x), y).backward(create_graph=True)

        def split(fn_before, fn_timed, n=5):
            total = 0.0
            for _ in range(n):
                fn_before()
                sync()
                t = time.perf_counter()
                fn_timed()
                sync()
                total += time.perf_counter() - t
            return total / n * 1e3

        record("  of which forward+backward(create_graph)", split(lambda: None, fwd_bwd))
        record("  of which step() with its HVP", split(fwd_bwd, opt.step))
        given = {p: torch.randn_like(p) for p in model.parameters()}
        record("  of which step(hessian=given)", split(fwd_bwd, lambda: opt.step(hessian=given)))
        del given
        log(f"dynamo stats so far: {dict(torch._dynamo.utils.counters['stats'])}")

    # the step alone: the lists the optimizer hands the compiled update (Dbar of a Linear weight is Hz itself)
    params = list(model.parameters())
    hz = [torch.randn_like(p) for p in params]
    grads = [torch.randn_like(p) for p in params]
    lr_t = torch.tensor(0.15, device=device)
    lists = (params, grads, hz, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
             [torch.zeros((), device=device) for _ in params])
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.0, hessian_power=1.0)
    adahessian_update_fused(*lists, lr_t, **kw)  # compiled here when no earlier row stepped
    record("hhfft fused step", bench(lambda: adahessian_update_fused(*lists, lr_t, **kw)))
    if "variants" not in args.skip:
        record("hhfft eager step (reference)", bench(lambda: adahessian_update(*lists, lr_t, **kw)))
    if "variants" not in args.skip and time.time() - t_start < args.budget_s:
        pp = torch.compile(per_param_update, fullgraph=True, dynamic=False)
        with torch.no_grad():
            call = lambda: pp(*lists, lr_t, 0.9, 0.999, 1e-4, 0.0, 1.0)  # noqa: E731
            call()
            record("variant: per-parameter compiled step", bench(call))
            del call
    # these rows' tensors (5 parameter-sized sets, 1.9 GiB on the 100M model) were once counted in the later peaks
    del opt, hz, grads, lists
    release(counted=model)

    if time.time() - t_start < args.budget_s and "create_graph" not in args.skip:
        opt = AdaHessian(model.parameters(), lr=0.15, fused=True, update_each=2)

        def hh_iter2():
            opt.zero_grad(set_to_none=True)
            sq_err(model(x), y).backward(create_graph=opt.hessian_due)
            opt.step()

        def two():
            hh_iter2()
            hh_iter2()

        two()
        record("hhfft AdaHessian update_each=2 (per it.)", bench(two) / 2, peak_mb(two, device))
        del opt
        release(counted=model)

    if time.time() - t_start < args.budget_s:
        opt = AdaHessian(model.parameters(), lr=0.15, fused=True)
        named = dict(model.named_parameters())

        def loss_fn(ps):
            return sq_err(torch.func.functional_call(model, ps, (x,)), y)

        def hh_func():
            opt.zero_grad(set_to_none=True)
            res = hutchinson(loss_fn, named, generator=opt.generator, backend="inductor")
            opt.step(hessian=res)

        t0 = time.time()
        hh_func()
        log(f"(forward-over-reverse compile: {time.time() - t0:.1f} s)")
        record("hhfft AdaHessian, hutchinson(jvp∘grad, compiled)", bench(hh_func), peak_mb(hh_func, device))
        del opt
        release(counted=model)

        if device.type == "cuda" and "graphs" not in args.skip:  # replayed from a CUDA graph: no host launches
            graphs = {"triton.cudagraphs": True}
            ok = check_graphed(model, named, loss_fn, graphs, log)
            release(counted=model)
            opt = AdaHessian(model.parameters(), lr=0.15, fused=True)

            def hh_graphed():
                opt.zero_grad(set_to_none=True)
                opt.step(hessian=hutchinson(loss_fn, named, generator=opt.generator, options=graphs))

            # the peak: warm-up and recording are where the graph's memory is allocated (replays allocate nothing)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                hh_graphed()
            torch.cuda.synchronize()
            record("hhfft jvp∘grad, CUDA graphs", bench(hh_graphed),
                   (torch.cuda.max_memory_allocated() - _BASE["bytes"]) / 2**20, "" if ok else "(check FAILED)")
            del opt
            release(counted=model)

        # the whole iteration as one compiled function: neither the gradient nor D leaves the graph
        for name, opts in [("hhfft hutchinson_step (one graph)", None),
                           ("hhfft hutchinson_step, CUDA graphs", {"triton.cudagraphs": True})]:
            if opts is not None and (device.type != "cuda" or "graphs" in args.skip):
                continue
            opt = AdaHessian(model.parameters(), lr=0.15, fused=True)
            for p in model.parameters():
                p.grad = None

            def hh_fused():
                opt.hutchinson_step(loss_fn, named, options=opts)

            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            for _ in range(3):
                hh_fused()
            log(f"({name}: compile and first iterations {time.time() - t0:.1f} s)")
            sync()
            # replayed graphs allocate nothing: their peak is the warm-up's and recording's (as for the row above)
            peak = (torch.cuda.max_memory_allocated() - _BASE["bytes"]) / 2**20 if opts else peak_mb(hh_fused, device)
            record(name, bench(hh_fused), peak)
            del opt
            release(counted=model)
        if "update_each" not in args.skip:
            opt = AdaHessian(model.parameters(), lr=0.15, fused=True, update_each=2)
            compiled_model = torch.compile(model)

            def hh_func_two():
                for _ in range(2):
                    opt.zero_grad(set_to_none=True)
                    if opt.hessian_due:
                        opt.step(hessian=hutchinson(loss_fn, named, generator=opt.generator, backend="inductor"))
                    else:
                        sq_err(compiled_model(x), y).backward()
                        opt.step()

            hh_func_two()
            record("hhfft jvp∘grad, update_each=2 (per it.)", bench(hh_func_two) / 2, peak_mb(hh_func_two, device))

    with open(os.path.join(args.out, "adahessian.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
    log(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
