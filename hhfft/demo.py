"""``hhfft demo`` / ``make demo``: find, rewrite, check and time the long convolutions of a Hyena-style LM.

1. builds the demo model (hhfft.models.HyenaLM: Hyena operators with explicit FFT convolutions, a long causal
   Conv1d mixer, one softmax attention block) and a byte-level batch of English text that ships with Python;
2. prints hhfft.explain's table: every site, and what hhfft does with it;
3. compiles with ``backend="hhfft"`` and checks the loss and every gradient against fp64, next to the errors that
   eager and ``backend="inductor"`` make at the same precision (the STYLE.md rule: at most 2x theirs);
4. times a training step (forward + backward + AdamW): eager vs inductor vs hhfft.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import sysconfig
import time
from typing import Optional

import torch

import hhfft
from hhfft.models import HyenaConfig, HyenaLM


def text_bytes(limit: int = 1 << 20) -> torch.Tensor:
    """English text available offline: the docstrings and comments of the Python standard library's sources."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            chunks.append(data)
            total += len(data)
            if total >= limit:
                break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def batch(data: torch.Tensor, B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - L - 1, (B,), generator=gen)
    return torch.stack([data[s : s + L + 1] for s in starts.tolist()])


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def check(model: HyenaLM, backends: tuple, tokens: torch.Tensor):
    """Loss and every gradient, relative error against fp64, for each backend and eager.

    Returns the rows (quantity, [error per backend..., eager error]) and, per label, the (module copy, loss fn) that
    produced them, so the timing reuses the compiled functions.
    """
    runners = {b: copy.deepcopy(model) for b in backends}
    runners = {b: (m, torch.compile(m.loss, backend=b)) for b, m in runners.items()}
    eager = copy.deepcopy(model)
    runners["eager"] = (eager, eager.loss)
    ref = copy.deepcopy(model).double()
    results = []
    for m, fn in [*runners.values(), (ref, ref.loss)]:
        m.zero_grad(set_to_none=True)
        loss = fn(tokens)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    names = ["loss"] + [f"grad {n}" for n, _ in model.named_parameters()]
    rows = [(name, [_rel(r[i], results[-1][i]) for r in results[:-1]]) for i, name in enumerate(names)]
    return rows, runners


def time_steps(step, steps: int) -> float:
    step()  # warm-up (compiles)
    step()  # and lets the caching allocator settle
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="hhfft demo", description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024, help="sequence length (default 1024)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="autocast dtype of the timed training steps (the fp64 check always runs in fp32)")
    p.add_argument("--modes", nargs="+", default=["default"], choices=["default", "reduce-overhead"],
                   help="torch.compile modes of the timed compiled steps (reduce-overhead: both backends replay "
                        "CUDA graphs, so the host's kernel launches leave the step)")
    args = p.parse_args(argv)
    for name in ("length", "batch", "layers", "width", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    torch.manual_seed(0)
    cfg = HyenaConfig(width=args.width, n_layers=args.layers, attention_layers=(args.layers - 1,),
                      max_len=max(2048, args.length))
    model = HyenaLM(cfg).to(args.device)
    gen = torch.Generator().manual_seed(0)
    tokens = batch(text_bytes(), args.batch, args.length, gen).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"hhfft {hhfft.__version__} demo: HyenaLM {n_params / 1e6:.2f}M parameters, batch {args.batch} x "
          f"{args.length} bytes of Python's own docs, {args.device}, torch {torch.__version__}\n")

    print("1. What hhfft finds (hhfft.explain):\n")
    print(hhfft.explain(model, tokens[:, :-1]))

    print("\n2. Loss and gradients against fp64 (relative error), compiled vs eager fp32:\n")
    t0 = time.perf_counter()
    rows, runners = check(model, ("hhfft", "inductor"), tokens)
    compile_s = time.perf_counter() - t0
    eps = torch.finfo(torch.float32).eps
    ratio = lambda errs: errs[0] / (max(errs[1:]) + 4 * eps)  # noqa: E731
    worst = max(rows, key=lambda r: ratio(r[1]))
    print(f"   {'quantity':44s} {'hhfft':>10s} {'inductor':>10s} {'eager':>10s}")
    for name, errs in rows[:4] + [worst]:
        print(f"   {name[:44]:44s} " + " ".join(f"{e:10.2e}" for e in errs))
    print(f"   ({len(rows)} quantities; last row: the worst ratio to PyTorch's own error; compiles + checks: {compile_s:.0f} s)")
    bad = [r for r in rows if ratio(r[1]) > 2]
    if bad:
        print(f"\nFAILED: {len(bad)} quantities exceed 2x PyTorch's own error (+4 ulp), e.g. {bad[0]}")
        return 1
    print("   all within 2x of PyTorch's own error at fp32 (+4 ulp)")

    amp = args.amp == "bf16"
    print(f"\n3. Training step (forward + backward + AdamW{', bf16 autocast' if amp else ''}), seconds per step:\n")
    results = {}
    rows = [("eager", "default")] + [(b, mode) for mode in args.modes for b in ("inductor", "hhfft")]
    for label, mode in rows:
        m, fn = runners[label]
        if mode != "default":  # the checked module copy, compiled again in that mode
            fn = torch.compile(m.loss, backend=label, mode=mode)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step(fn=fn, opt=opt, graphs=mode == "reduce-overhead"):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are dead
            opt.zero_grad(set_to_none=True)
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=amp):
                loss = fn(tokens)
            loss.backward()
            opt.step()
            if args.device == "cuda":
                torch.cuda.synchronize()

        results[label, mode] = time_steps(step, args.steps)
        name = label if mode == "default" else f"{label}, {mode}"
        line = f"   {name:26s} {results[label, mode] * 1e3:9.1f} ms   ({results['eager', 'default'] / results[label, mode]:.2f}x eager"
        if label == "hhfft":
            line += f", {results['inductor', mode] / results[label, mode]:.2f}x inductor"
        print(line + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
