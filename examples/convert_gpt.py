"""Reproduce Hedgehog's conversion claim on a GPT trained here (issue #8).

What it shows: a byte-level GPT (6 layers, width 384, 6 heads, context 1024) pretrained with softmax attention on the
Python 3.11 documentation (Debian's ``python3.11-doc``, see ``hhfft.data.pydocs``), then, from that checkpoint,
``hhfft.convert`` -> ``hhfft.distill`` (attention transfer, maps only) -> fine-tuning of every weight, for Hedgehog
maps, 1+ELU and T2R maps, and undistilled (identity) Hedgehog maps, beside the softmax model fine-tuned for the
same tokens; and Hedgehog vs softmax trained from scratch for the same tokens. Held-out perplexity per byte for each
row, a perplexity-vs-fine-tuning-tokens PNG and one layer's attention maps PNG.

Each row is one ``hhfft gpt ...`` command (``hhfft.models.gpt_pipeline``); this script runs them as stages, the runs
of a stage in parallel (one GPU each, round robin), and agrees one token budget per stage from the measured
throughput and a wall-clock limit (``--tokens auto``), so that the runs of a stage see the same tokens:

    python examples/convert_gpt.py --runs out/gpt --stage all --scratch-seconds 110 --finetune-seconds 150   # GPU
    python examples/convert_gpt.py --runs /tmp/gpt --tiny          # CPU smoke test: tiny model, fixed tiny budgets
    hhfft gpt table --runs out/gpt --png-dir docs                  # the table and the PNGs

The data (``hhfft gpt prepare --data .data/pydocs``) is prepared on the CPU and carried to the GPU. Keep this
script's output as ``RUNS/driver.log`` (``... | tee out/gpt/driver.log``): for a row stopped before it wrote its
``result.json``, the table reads the row's command from there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--context", "64"]
TINY_RUN = ["--batch", "4", "--evals", "2", "--eval-windows", "8", "--val-windows", "16"]


def _launch(jobs: list, gpus: int, log_dir: str) -> list:
    """Start every job (name, argv); job i sees GPU i % gpus. Returns (name, Popen, log file)."""
    procs = []
    for i, (name, argv) in enumerate(jobs):
        env = dict(os.environ)
        if gpus > 0:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        log = open(os.path.join(log_dir, f"{name}.log"), "w")
        cmd = [sys.executable, "-m", "hhfft.cli", "gpt", *argv]
        print(f"[{name}] {' '.join(cmd[2:])}" + (f"   (GPU {i % gpus})" if gpus else ""), flush=True)
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs: list, timeout: float) -> dict:
    t_end = time.time() + timeout
    codes = {}
    for name, p, log in procs:
        try:
            codes[name] = p.wait(timeout=max(1.0, t_end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = "killed"
        log.close()
        print(f"[{name}] exit {codes[name]}", flush=True)
    return codes


def _stage(names_argv: list, args, seconds: float, tag: str) -> dict:
    os.makedirs(args.runs, exist_ok=True)
    if args.tiny:
        jobs = [(n, [*a, *TINY_RUN, "--no-compile"]) for n, a in names_argv]
        codes = {}
        for job in jobs:  # sequential on the CPU
            codes.update(_wait(_launch([job], 0, args.runs), 900))
        return codes
    deadline = time.time() + seconds
    sync = os.path.join(args.runs, f".sync_{tag}_{int(deadline)}")
    jobs = [(n, [*a, "--tokens", "auto", "--deadline", f"{deadline:.0f}", "--sync", sync,
                 "--group", str(len(names_argv)), *(["--no-compile"] if args.no_compile else [])])
            for n, a in names_argv]
    return _wait(_launch(jobs, args.gpus, args.runs), seconds + 30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="folder of the runs (one subfolder per row)")
    p.add_argument("--data", default=".data/pydocs")
    p.add_argument("--stage", choices=("scratch", "finetune", "all"), default="all")
    p.add_argument("--scratch-seconds", type=float, default=110)
    p.add_argument("--finetune-seconds", type=float, default=150)
    p.add_argument("--gpus", type=int, default=None, help="default: torch.cuda.device_count()")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, fixed tiny budgets")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--distill-context", type=int, default=512)
    p.add_argument("--picture-layer", type=int, default=2)
    args = p.parse_args(argv)
    if args.gpus is None:
        import torch

        args.gpus = torch.cuda.device_count()
    if not args.tiny and args.gpus == 0:
        print("no GPU: use --tiny for the CPU smoke test (the full sizes need a GPU)", file=sys.stderr)
        return 2
    model = TINY if args.tiny else []
    seed = ["--seed", str(args.seed)]
    d = ["--data", args.data]
    R = args.runs
    codes = {}
    if args.stage in ("scratch", "all"):
        sc = ["--tokens", "30000"] if args.tiny else []
        codes.update(_stage([
            ("scratch_softmax", ["train", *d, *model, *seed, *sc, "--attention", "softmax",
                                 "--out", f"{R}/scratch_softmax",
                                 "--save-dtype", "float32" if args.tiny else "float16"]),
            ("scratch_hedgehog", ["train", *d, *model, *seed, *sc, "--attention", "hedgehog",
                                  "--out", f"{R}/scratch_hedgehog"]),
        ], args, args.scratch_seconds, "scratch"))
        if codes.get("scratch_softmax") != 0:
            print("the softmax pretraining failed: no fine-tuning stage", file=sys.stderr)
            return 1
    if args.stage in ("finetune", "all"):
        ft = ["--tokens", "6000"] if args.tiny else []
        dist = ["--distill-steps", "20" if args.tiny else str(args.distill_steps),
                "--distill-context", str(min(args.distill_context, 64) if args.tiny else args.distill_context)]
        pic = ["--picture-layer", str(min(args.picture_layer, 1) if args.tiny else args.picture_layer)]
        base = ["finetune", *d, *seed, *ft, "--init", f"{R}/scratch_softmax"]
        codes.update(_stage([
            ("ft_hedgehog", [*base, "--attention", "hedgehog", *dist, *pic, "--out", f"{R}/ft_hedgehog"]),
            ("ft_elu1", [*base, "--attention", "elu1", *dist, *pic, "--out", f"{R}/ft_elu1"]),
            ("ft_t2r", [*base, "--attention", "t2r", *dist, "--out", f"{R}/ft_t2r"]),
            ("ft_softmax", [*base, "--attention", "softmax", "--out", f"{R}/ft_softmax"]),
            ("ft_identity", [*base, "--attention", "identity", "--out", f"{R}/ft_identity"]),
        ], args, args.finetune_seconds, "finetune"))
    from hhfft.models.gpt_pipeline import table

    print(table(R))
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
