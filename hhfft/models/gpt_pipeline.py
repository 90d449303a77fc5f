"""The GPT conversion experiment (issue #8) as commands: one command per row of the table, each seeded.

    hhfft gpt prepare  --data D                                       corpus (hhfft.data.pydocs) -> D/{train,val}.bin
    hhfft gpt train    --data D --attention softmax  --out R/scratch_softmax   pretrain from scratch (the checkpoint)
    hhfft gpt train    --data D --attention hedgehog --out R/scratch_hedgehog   from scratch, maps trained jointly
    hhfft gpt finetune --data D --init R/scratch_softmax --attention hedgehog --out R/ft_hedgehog
                       (convert -> distill the maps -> fine-tune every weight; also elu1, t2r, identity = hedgehog
                        maps left at their identity init, softmax = the unconverted model fine-tuned alike)
    hhfft gpt table    --runs R [--png-dir P]                          the perplexity table and the two PNGs

``train`` and ``finetune`` take ``--window W`` for the linear attentions: the LoLCATs hybrid,
``HedgehogConfig(window=W)``.

Every run writes ``OUT/result.json``: the config, the held-out loss curve (nats per byte at fixed token counts), the
final held-out loss and perplexity per byte, and for ``finetune`` the per-site distillation losses before and after.
Perplexity here is per byte: exp(mean next-byte cross-entropy in nats) on the held-out pages.

Token budgets: ``--tokens N`` fixes the budget. ``--tokens auto --deadline T --sync DIR --group K`` (the GPU
driver, ``examples/convert_gpt.py``) measures the throughput after a few steps, and the K runs of a group agree on the
smallest budget that all of them finish by the wall-clock time T, so the runs of a group see the same tokens; each
result then records the budget it used, and the table prints the equivalent ``--tokens N`` command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hhfft.models.gpt import GPT, GPTConfig

__all__ = [
    "ATTENTIONS",
    "FT_ATTENTIONS",
    "TrainSettings",
    "convert_gpt",
    "evaluate",
    "load_gpt",
    "main",
    "save_gpt",
    "train",
    "val_windows",
    "val_windows_subset",
]

ATTENTIONS = ("softmax", "hedgehog", "elu1", "t2r")  # from scratch
FT_ATTENTIONS = ("softmax", "hedgehog", "identity", "elu1", "t2r")  # fine-tuning from the softmax checkpoint
_KIND = {"hedgehog": "softmax_split", "identity": "softmax_split", "elu1": "elu1", "t2r": "t2r"}


# ------------------------------------------------------------------------------------------------------------ data
def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def val_windows(val: np.ndarray, block: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [N, block + 1] of the held-out bytes: all of them, or ``limit`` evenly spaced ones."""
    n = (len(val) - 1) // block
    if n < 1:
        raise ValueError(f"val_windows: held-out split has {len(val)} bytes, fewer than one window of {block + 1}")
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = idx[np.linspace(0, n - 1, limit).round().astype(int)]
    arr = np.stack([np.asarray(val[i * block:i * block + block + 1]) for i in idx])
    return torch.from_numpy(arr.astype(np.int64))


def val_windows_subset(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` evenly spaced windows of ``windows`` (all of them when n >= N)."""
    if n >= windows.shape[0]:
        return windows
    return windows[torch.linspace(0, windows.shape[0] - 1, n).round().long()]


def _batch(train: np.ndarray, batch: int, block: int, gen: np.random.Generator) -> torch.Tensor:
    starts = gen.integers(0, len(train) - block - 1, size=batch)
    return torch.from_numpy(np.stack([np.asarray(train[s:s + block + 1]) for s in starts]).astype(np.int64))


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _ce(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-byte cross-entropy (nats) of logits [B, T, V] against tokens [B, T + 1] (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                           reduction=reduction)


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch: int = 16, bf16: bool = True) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows`` [N, block + 1], eager, every position counted."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, windows.shape[0], batch):
            w = windows[i:i + batch].to(device)
            with _autocast(device, bf16):
                logits = model(w[:, :-1])
            total += float(_ce(logits, w, reduction="sum"))
            count += w[:, 1:].numel()
    finally:
        model.train(was)
    return total / count


# ------------------------------------------------------------------------------------------------------- training
@dataclass
class TrainSettings:
    """One training or fine-tuning run. ``tokens`` None = decided by the throughput (see the module docstring)."""

    tokens: int | None = 2_000_000
    batch: int = 32
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1  # cosine decay to lr * min_lr_frac
    warmup: int = 100  # steps
    weight_decay: float = 0.1
    evals: int = 8  # held-out evaluations along the way (plus one before the first step)
    eval_windows: int = 128  # windows per evaluation along the way (the final one uses every window)
    seed: int = 0
    compile: bool = True  # torch.compile(backend="hhfft"), eager if it fails (the reason is recorded)
    bf16: bool = True  # bf16 autocast on CUDA
    deadline: float | None = None  # wall-clock time (time.time()) for tokens=None
    sync: str | None = None  # folder where the runs of a group agree on the budget
    group: int = 1
    name: str = "run"
    probe_steps: int = 6  # steps timed for the budget (after 3 steps of warm-up)
    grace: float = 10.0  # seconds past the deadline after which training stops short of the budget


def _lr(step: int, total_steps: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    t = min(1.0, (step - s.warmup) / max(1, total_steps - s.warmup))
    return s.lr * (s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _agree(s: TrainSettings, possible: int, log) -> int:
    """The smallest budget over the group (each run writes what it can do by the deadline, with the deadline: a
    file left in the directory by an earlier group, whose deadline differs, is not counted)."""
    if not s.sync or s.group <= 1:
        return possible
    os.makedirs(s.sync, exist_ok=True)
    with open(os.path.join(s.sync, f"{s.name}.budget"), "w") as f:
        f.write(f"{s.deadline!r} {possible}")

    def reported() -> list:
        vals = []
        for name in os.listdir(s.sync):
            if not name.endswith(".budget"):
                continue
            try:
                with open(os.path.join(s.sync, name)) as fh:
                    deadline, value = fh.read().split()
                if deadline == repr(s.deadline):
                    vals.append(int(value))
            except (OSError, ValueError):
                pass
        return vals

    t0 = time.time()
    vals = reported()
    while len(vals) < s.group and time.time() - t0 <= 60:
        time.sleep(0.5)
        vals = reported()
    budget = min(vals) if vals else possible
    log(f"budget: {possible} tokens possible here, group minimum {budget} ({len(vals)}/{s.group} runs reported)")
    return budget


def train(model: torch.nn.Module, train_data: np.ndarray, windows: torch.Tensor, s: TrainSettings,
          log=print) -> dict:
    """Train every parameter of ``model`` (AdamW, warm-up + cosine) on random windows of ``train_data``.

    Returns {"curve": [[tokens, val_ce], ...] (the first point before the first step, the held-out subset of
    ``eval_windows``), "tokens" and "steps" trained, "skipped_steps" (non-finite gradients), "stopped_early" (past
    the deadline), "budget" (tokens asked), "compiled", "compile_error" (str or None), "tokens_per_s", and the final
    loss on every window: "val_ce" (nats/byte), "val_ppl", "val_bpb" (bits/byte)}."""
    device = next(model.parameters()).device
    block = windows.shape[1] - 1
    gen = np.random.default_rng(s.seed)
    torch.manual_seed(s.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "hedgehog" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "hedgehog" not in n)]
    kw = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95), **kw)
    step_tokens = s.batch * block
    curve_windows = val_windows_subset(windows, s.eval_windows)
    fwd, compiled, compile_error = model, False, None
    if s.compile:
        fwd, compiled = torch.compile(model, backend="hhfft"), True
    budget = s.tokens
    total_steps = None if budget is None else max(1, budget // step_tokens)
    curve = [[0, evaluate(model, curve_windows, bf16=s.bf16)]]
    log(f"[{s.name}] tokens 0  val {curve[0][1]:.4f}")
    next_eval = None
    step, t_probe, t_start, skipped = 0, None, time.time(), 0
    model.train()
    stopped_early = False
    while total_steps is None or step < total_steps:
        if s.deadline is not None and total_steps is not None and time.time() > s.deadline + s.grace:
            # the agreed budget was too optimistic (say, a GPU shared with another row): stop, evaluate, record it
            log(f"[{s.name}] past the deadline: stopped at {step * step_tokens} of {total_steps * step_tokens} tokens")
            stopped_early = True
            break
        x = _batch(train_data, s.batch, block, gen).to(device, non_blocking=True)
        lr = _lr(step, total_steps or 10**9, s)
        for g in opt.param_groups:
            g["lr"] = lr
        try:
            with _autocast(device, s.bf16):
                loss = _ce(fwd(x[:, :-1]), x)
            loss.backward()
        except Exception as e:
            if not compiled or step > 0:
                raise
            compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            log(f"[{s.name}] torch.compile(backend='hhfft') failed, training eagerly: {compile_error}")
            opt.zero_grad(set_to_none=True)
            fwd, compiled = model, False
            continue
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(norm):
            opt.step()
        else:  # a non-finite gradient would poison every weight through clipping and Adam: skip the update
            skipped += 1
            if skipped > max(20, (total_steps or 0) // 10):
                raise FloatingPointError(f"[{s.name}] {skipped} steps with non-finite gradients; giving up")
        opt.zero_grad(set_to_none=True)
        step += 1
        if step == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_probe = time.time()
        if total_steps is None and step == 3 + s.probe_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = s.probe_steps / (time.time() - t_probe)  # steps per second
            eval_cost = 1.15  # the evaluations along the way
            left = (s.deadline - time.time()) / eval_cost if s.deadline else 0.0
            possible = (step + max(0, int(rate * left))) * step_tokens
            budget = max(step * step_tokens, _agree(s, possible, log) // step_tokens * step_tokens)
            total_steps = budget // step_tokens
        if total_steps is not None and next_eval is None:
            next_eval = max(1, total_steps // s.evals)
        if next_eval is not None and step >= next_eval and step < total_steps:
            curve.append([step * step_tokens, evaluate(model, curve_windows, bf16=s.bf16)])
            log(f"[{s.name}] tokens {curve[-1][0]}  val {curve[-1][1]:.4f}  loss {loss.item():.4f}  lr {lr:.2e}  "
                f"({time.time() - t_start:.0f} s)")
            next_eval += max(1, total_steps // s.evals)
    elapsed = time.time() - t_start
    final_curve = evaluate(model, curve_windows, bf16=s.bf16)
    curve.append([step * step_tokens, final_curve])
    log(f"[{s.name}] tokens {step * step_tokens}  val {final_curve:.4f}  (end)")
    final = evaluate(model, windows, bf16=s.bf16)
    log(f"[{s.name}] done: {step * step_tokens} tokens in {elapsed:.0f} s, val {final:.4f} (ppl/byte "
        f"{math.exp(final):.4f})")
    return {"curve": curve, "tokens": step * step_tokens, "steps": step, "skipped_steps": skipped,
            "stopped_early": stopped_early, "budget": (total_steps or step) * step_tokens, "compiled": compiled,
            "compile_error": compile_error, "tokens_per_s": step * step_tokens / max(elapsed, 1e-9),
            "val_ce": final, "val_ppl": math.exp(final), "val_bpb": final / math.log(2)}


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_gpt(model: GPT, directory: str, dtype: torch.dtype = torch.float32, shard_bytes: int = 15 << 20) -> list:
    """The GPT's weights in safetensors shards of at most ``shard_bytes`` (``model-K.safetensors``) plus
    ``gpt_config.json``. Only an unconverted GPT (softmax) is saved this way."""
    from safetensors.torch import save_file

    from hhfft.convert import hedgehog_sites

    sites = hedgehog_sites(model)
    if sites:
        raise ValueError(f"save_gpt: expected an unconverted GPT (softmax attention), found {len(sites)} converted "
                         f"sites ({sites[0][0]}, ...); save a converted model with hhfft.save_converted")
    os.makedirs(directory, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}  # tied to wte.weight
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nb
    shards.append(cur)
    paths = []
    for i, sh in enumerate(shards):
        p = os.path.join(directory, f"model-{i}.safetensors")
        save_file(sh, p)
        paths.append(p)
    with open(os.path.join(directory, "gpt_config.json"), "w") as f:
        json.dump({"config": model.cfg.to_dict(), "shards": len(shards), "dtype": str(dtype)}, f, indent=1)
    return paths


def load_gpt(directory: str, device: torch.device | None = None) -> GPT:
    """A GPT from :func:`save_gpt`'s files (weights cast to fp32)."""
    from safetensors.torch import load_file

    path = os.path.join(directory, "gpt_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --init must be the --out folder of `hhfft gpt train "
                                f"--attention softmax`")
    with open(path) as f:
        meta = json.load(f)
    model = GPT(GPTConfig(**meta["config"]))
    sd = {}
    for i in range(meta["shards"]):
        sd.update({k: v.float() for k, v in load_file(os.path.join(directory, f"model-{i}.safetensors")).items()})
    sd["lm_head.weight"] = sd["wte.weight"]
    model.load_state_dict(sd)
    return model.to(device) if device is not None else model


def convert_gpt(model: GPT, attention: str, feature_dim: int | None = None, window: int = 0):
    """Convert every attention site of ``model`` to linear attention with the feature map of ``attention``
    (hedgehog/identity: softmax_split maps at their identity init; elu1; t2r), ``feature_dim`` projected features
    per head (None: the head dim), ``window``: softmax over the last ``window`` positions (0: none; the LoLCATs
    hybrid, ``HedgehogConfig.window``). Returns the report."""
    from hhfft.convert import HedgehogConfig, convert

    if attention not in _KIND:
        raise ValueError(f"convert_gpt: attention must be one of {sorted(_KIND)}, got {attention!r}")
    example = torch.randint(0, model.cfg.vocab_size, (2, min(64, model.cfg.block_size)),
                            device=next(model.parameters()).device)
    report = convert(model, (example,), HedgehogConfig(kind=_KIND[attention], feature_dim=feature_dim,
                                                                window=window))
    if report.count("hedgehog", "rewritten") != model.cfg.n_layer:
        raise RuntimeError(f"convert_gpt: expected {model.cfg.n_layer} converted sites, got:\n{report}")
    return report


# ------------------------------------------------------------------------------------------------------- commands
def _common(p: argparse.ArgumentParser, lr: float, warmup: int) -> None:
    p.add_argument("--data", required=True, help="folder written by `hhfft gpt prepare`")
    p.add_argument("--out", required=True, help="folder for result.json (and the checkpoint)")
    p.add_argument("--tokens", default="2000000", help="token budget, or 'auto' (with --deadline, --sync, --group)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--evals", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--val-windows", type=int, default=None, help="limit the final held-out windows (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="train eagerly instead of torch.compile(backend='hhfft')")
    p.add_argument("--no-bf16", action="store_true", help="fp32 on CUDA too (bf16 autocast only ever applies there)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--deadline", type=float, default=None, help="wall-clock time.time() to finish by (--tokens auto)")
    p.add_argument("--sync", default=None, help="folder where the runs of a group agree the budget (--tokens auto)")
    p.add_argument("--group", type=int, default=1, help="how many runs agree the budget through --sync")


def _settings(a: argparse.Namespace, name: str) -> TrainSettings:
    for flag, v in (("--batch", a.batch), ("--evals", a.evals), ("--eval-windows", a.eval_windows),
                    ("--val-windows", a.val_windows), ("--group", a.group)):
        if v is not None and v < 1:
            raise SystemExit(f"{flag} must be at least 1, got {v}")
    if a.tokens == "auto":
        if a.deadline is None:
            raise SystemExit("--tokens auto needs --deadline (a time.time() value)")
        tokens = None
    else:
        try:
            tokens = int(float(a.tokens))
        except ValueError:
            raise SystemExit(f"--tokens must be an int or 'auto', got {a.tokens!r}") from None
    return TrainSettings(tokens=tokens, batch=a.batch, lr=a.lr, warmup=a.warmup, weight_decay=a.weight_decay,
                         evals=a.evals, eval_windows=a.eval_windows, seed=a.seed, compile=not a.no_compile,
                         bf16=not a.no_bf16, deadline=a.deadline, sync=a.sync, group=a.group, name=name)


def _logger(out: str):
    os.makedirs(out, exist_ok=True)
    fh = open(os.path.join(out, "log.txt"), "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        fh.write(msg + "\n")
        fh.flush()
    return log


def _write(out: str, result: dict) -> None:
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


def _env() -> dict:
    import platform

    env = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton as _t
        env["triton"] = _t.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def cmd_prepare(argv: list) -> int:
    from hhfft.data.pydocs import main as pydocs_main

    return pydocs_main(argv, prog="hhfft gpt prepare", out_option="--data")


def _window_arg(p: argparse.ArgumentParser) -> None:
    from hhfft.cli import _int_at_least

    p.add_argument("--window", type=_int_at_least(0, "an integer >= 0"), default=0, help="linear attentions: softmax "
                   "over the last WINDOW positions, the linear map beyond them (the LoLCATs hybrid; 0: none)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--context", type=int, default=1024)


def cmd_train(argv: list) -> int:
    """From scratch: softmax (the checkpoint the conversions start from) or a linear attention, maps trained jointly."""
    from hhfft.data.pydocs import load_split

    p = argparse.ArgumentParser(prog="hhfft gpt train", description="Train the GPT from scratch.")
    _common(p, lr=1.5e-3, warmup=100)
    _model_args(p)
    p.add_argument("--attention", choices=ATTENTIONS, default="softmax")
    p.add_argument("--feature-dim", type=int, default=None, help="projected features per head of the linear maps "
                   "(default the head dim)")
    p.add_argument("--save-dtype", choices=("float32", "float16"), default="float32")
    _window_arg(p)
    a = p.parse_args(argv)
    if a.window and a.attention == "softmax":
        p.error("--window: the softmax model attends to every position already; it applies to linear attentions")
    log = _logger(a.out)
    s = _settings(a, name=f"scratch-{a.attention}")
    device = _device(a.device)
    torch.manual_seed(a.seed)
    cfg = GPTConfig(n_layer=a.layers, n_embd=a.width, n_head=a.heads, block_size=a.context)
    model = GPT(cfg).to(device)
    if a.attention != "softmax":
        log(str(convert_gpt(model, a.attention, a.feature_dim, a.window)))
    train_data, val = load_split(a.data, "train"), load_split(a.data, "val")
    windows = val_windows(val, cfg.block_size, a.val_windows)
    res = train(model, train_data, windows, s, log)
    res.update({"stage": "train", "attention": a.attention, "window": a.window, "config": cfg.to_dict(),
                "settings": asdict(s), "argv": ["hhfft", "gpt", "train", *argv], "env": _env()})
    if a.attention == "softmax":
        save_gpt(model, a.out, getattr(torch, a.save_dtype))
    _write(a.out, res)
    return 0


def _maps_crop(model, tokens: torch.Tensor, site: int, n: int) -> dict:
    from hhfft.convert.distill import site_maps

    a_true, a_pred, _ = site_maps(model, (tokens,), site=site)
    return {"softmax": a_true[:, :n, :n].clone(), "linear": a_pred[:, :n, :n].clone()}


def cmd_finetune(argv: list) -> int:
    """From the softmax checkpoint: convert (unless softmax) -> distill (hedgehog/elu1/t2r) -> fine-tune all."""
    from hhfft.convert import distill
    from hhfft.data.pydocs import load_split

    p = argparse.ArgumentParser(prog="hhfft gpt finetune",
                                description="Convert the softmax GPT, distill the maps, fine-tune every weight.")
    _common(p, lr=3e-4, warmup=20)
    p.add_argument("--init", required=True, help="the --out folder of `hhfft gpt train --attention softmax`")
    p.add_argument("--attention", choices=FT_ATTENTIONS, required=True,
                   help="identity = hedgehog maps left at their identity init (no distillation)")
    p.add_argument("--feature-dim", type=int, default=None, help="projected features per head of the linear maps "
                   "(default the head dim)")
    p.add_argument("--distill-steps", type=int, default=200)
    p.add_argument("--distill-lr", type=float, default=1e-2)
    p.add_argument("--distill-batch", type=int, default=8)
    p.add_argument("--distill-context", type=int, default=None, help="sequence length for distillation (default "
                   "the model's context; shorter is cheaper: the teacher's weights are quadratic in it)")
    p.add_argument("--picture-layer", type=int, default=None,
                   help="keep one layer's attention maps before/after distillation (maps.pt)")
    p.add_argument("--picture-size", type=int, default=96)
    _window_arg(p)
    a = p.parse_args(argv)
    if a.window and a.attention == "softmax":
        p.error("--window: the softmax model attends to every position already; it applies to linear attentions")
    log = _logger(a.out)
    s = _settings(a, name=f"ft-{a.attention}")
    device = _device(a.device)
    torch.manual_seed(a.seed)
    model = load_gpt(a.init, device)
    cfg = model.cfg
    train_data, val = load_split(a.data, "train"), load_split(a.data, "val")
    windows = val_windows(val, cfg.block_size, a.val_windows)
    res: dict = {"stage": "finetune", "attention": a.attention, "window": a.window, "config": cfg.to_dict(),
                 "argv": ["hhfft", "gpt", "finetune", *argv], "env": _env()}
    res["val_ce_init"] = evaluate(model, windows, bf16=s.bf16)
    log(f"[{s.name}] softmax checkpoint: val {res['val_ce_init']:.4f}")
    maps: dict = {}
    if a.attention != "softmax":
        log(str(convert_gpt(model, a.attention, a.feature_dim, a.window)))
        res["val_ce_converted"] = evaluate(model, windows, bf16=s.bf16)
        log(f"[{s.name}] converted, before distillation: val {res['val_ce_converted']:.4f}")
        pic_tokens = windows[:1, :-1].to(device)
        if a.picture_layer is not None:
            maps["before"] = _maps_crop(model, pic_tokens, a.picture_layer, a.picture_size)
        if a.attention != "identity" and a.distill_steps > 0:
            gen = np.random.default_rng(a.seed + 1)
            dctx = min(a.distill_context or cfg.block_size, cfg.block_size)
            batches = [(_batch(train_data, a.distill_batch, dctx, gen)[:, :-1].to(device),)
                       for _ in range(min(a.distill_steps, 64))]
            t0 = time.time()
            # fp32 (TF32 matmuls on CUDA): the per-site cross-entropy needs more than bf16's 8 bits
            dres = distill(model, batches, steps=a.distill_steps, lr=a.distill_lr,
                           eval_batches=[(windows[i:i + 4, :-1].to(device),)
                                         for i in range(0, min(8, windows.shape[0]), 4)],
                           log_every=50, stream=sys.stdout)
            seconds = time.time() - t0
            res["distill"] = {"before": dres.before, "after": dres.after, "steps": a.distill_steps,
                              "lr": a.distill_lr, "batch": a.distill_batch, "context": dctx, "seconds": seconds,
                              "history": dres.history[:: max(1, len(dres.history) // 50)]}
            log(f"[{s.name}] distilled in {seconds:.0f} s:\n{dres}")
            res["val_ce_distilled"] = evaluate(model, windows, bf16=s.bf16)
            log(f"[{s.name}] after distillation: val {res['val_ce_distilled']:.4f}")
            if a.picture_layer is not None:
                maps["after"] = _maps_crop(model, pic_tokens, a.picture_layer, a.picture_size)
    res.update(train(model, train_data, windows, s, log))
    res["settings"] = asdict(s)
    if maps:
        maps["layer"] = a.picture_layer
        torch.save(maps, os.path.join(a.out, "maps.pt"))
    _write(a.out, res)
    return 0


# ---------------------------------------------------------------------------------------------------------- table
_ROWS = (("scratch_softmax", "softmax, from scratch (the checkpoint)"),
         ("ft_softmax", "softmax, fine-tuned"),
         ("ft_hedgehog", "Hedgehog: convert -> distill -> fine-tune"),
         ("ft_identity", "Hedgehog, identity maps (no distillation) -> fine-tune"),
         ("ft_elu1", "1+ELU: convert -> distill -> fine-tune"),
         ("ft_t2r", "T2R (ReLU): convert -> distill -> fine-tune"),
         ("scratch_hedgehog", "Hedgehog, from scratch (maps trained jointly)"))


def _rows(runs: str, suffix: str) -> list:
    """_ROWS, then the sliding-window rows found under ``runs`` (``ft_<kind>_w<W><suffix>``, ``scratch_<kind>_w<W>``
    for the maps hedgehog, elu1 and t2r; ``--window W``), by window, fine-tuned before from scratch."""
    labels = {"hedgehog": "Hedgehog", "elu1": "1+ELU", "t2r": "T2R (ReLU)"}
    found: dict = {}
    for entry in os.listdir(runs) if os.path.isdir(runs) else ():
        m = re.fullmatch(r"(ft|scratch)_(hedgehog|elu1|t2r)_w(\d+)(.*)", entry)
        if m and m.group(4) == (suffix if m.group(1) == "ft" else "") and os.path.isdir(os.path.join(runs, entry)):
            stage, kind, w = m.group(1), m.group(2), int(m.group(3))
            what = "convert -> distill -> fine-tune" if stage == "ft" else "from scratch"
            found[(w, stage == "scratch", list(labels).index(kind))] = (
                f"{stage}_{kind}_w{w}", f"{labels[kind]} + {w}-byte softmax window: {what}")
    return list(_ROWS) + [found[key] for key in sorted(found)]


def _folder(name: str, suffix: str) -> str:
    """A row's folder: fine-tuning rows of a variant carry its suffix (``ft_hedgehog_lr1e-3``); the from-scratch
    rows, the checkpoint among them, are shared by every variant of a run."""
    return name + suffix if name.startswith("ft_") else name


def _partial_from_log(runs: str, name: str) -> dict | None:
    """What a run that was stopped before it wrote result.json left in its log.txt (the held-out curve), with its
    command from the driver's log (``driver.log`` beside the runs) when there is one."""
    path = os.path.join(runs, name, "log.txt")
    if not os.path.exists(path):
        return None
    res: dict = {"stage": "finetune" if name.startswith("ft_") else "train", "partial": True, "curve": [],
                 "argv": [], "val_ce": None, "val_ppl": None, "val_bpb": None, "compiled": None}
    keys = {"softmax checkpoint": "val_ce_init", "converted, before distillation": "val_ce_converted",
            "after distillation": "val_ce_distilled"}
    with open(path) as f:
        for line in f:
            m = re.match(r"\[[^\]]+\] tokens (\d+)\s+val (\S+)", line)
            if m:
                res["curve"].append([int(m.group(1)), float(m.group(2))])
            m = re.search(r"group minimum (\d+)", line)
            if m:
                res["budget"] = int(m.group(1))
            for k, v in keys.items():
                m = re.match(rf"\[[^\]]+\] {k}: val (\S+)", line)
                if m:
                    res[v] = float(m.group(1))
    res["tokens"] = res["curve"][-1][0] if res["curve"] else 0
    driver = os.path.join(runs, "driver.log")
    if os.path.exists(driver):
        with open(driver) as f:
            for line in f:  # "[name] [python3 -m ]hhfft.cli gpt ARGS   (GPU ...)", as the driver and lanes.sh print
                m = re.match(rf"\[{re.escape(name)}\] (?:\S+ -m )?hhfft\.cli gpt (.*?)\s*(?:\(GPU.*)?$", line)
                if m:
                    res["argv"] = ["hhfft", "gpt", *m.group(1).split()]
    return res


def _load_results(runs: str, suffix: str = "") -> dict:
    out = {}
    for name, _ in _rows(runs, suffix):
        path = os.path.join(runs, _folder(name, suffix), "result.json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
        else:
            part = _partial_from_log(runs, _folder(name, suffix))
            if part is not None and part["curve"]:
                out[name] = part
    return out


def _common_tokens(res: dict, stage: str) -> int | None:
    """The largest token count at which every run of ``stage`` has a curve point."""
    sets = [{t for t, _ in r["curve"]} for r in res.values() if r["stage"] == stage and r["curve"]]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _curve_at(curve: list, tokens: int) -> float | None:
    for t, v in curve:
        if t == tokens:
            return v
    return None


def _fmt(x: float | None, f: str = ".4f") -> str:
    return "-" if x is None else format(x, f)


def _rel(x: float | None, ref: float | None) -> str:
    return f"{100 * (x / ref - 1):+.2f}%" if x is not None and ref and math.isfinite(x) else "-"


def table(runs: str, suffix: str = "") -> str:
    """The markdown table of the runs under ``runs`` (folders named as in ``_ROWS`` and the window rows of ``_rows``,
    the fine-tuning ones followed by ``suffix``). Two comparisons: the final held-out perplexity (every window), and
    the curve's value at the largest token count that every run of the same stage reached (the curve's evenly spaced
    subset of windows; the only comparison for a run stopped early)."""
    res = _load_results(runs, suffix)
    if not res:
        raise FileNotFoundError(f"table: no result.json under {runs}/<run>/ (expected folders "
                                f"{', '.join(_folder(n, suffix) for n, _ in _ROWS)})")
    common = {st: _common_tokens(res, st) for st in ("train", "finetune")}
    header = ("| row | ppl/byte, end (all held-out windows) | vs softmax | ppl/byte at the common tokens (curve "
              "windows) | vs softmax | tokens trained | ppl after convert (+ distill), before fine-tuning | "
              "compiled | command |")
    lines = [f"common tokens: from scratch {common['train']:,}, fine-tuning {common['finetune']:,}"
             if common["train"] and common["finetune"] else "", header, "|" + " --- |" * 9]

    def at(r):
        st = r["stage"]
        v = _curve_at(r["curve"], common[st]) if common[st] is not None else None
        return None if v is None else math.exp(v)

    ref = {"finetune": res.get("ft_softmax"), "train": res.get("scratch_softmax")}
    for name, label in _rows(runs, suffix):
        r = res.get(name)
        if r is None:
            lines.append(f"| {label} | not run |" + " |" * 7)
            continue
        base = ref["train" if name.startswith("scratch") else "finetune"]
        end = r["val_ppl"]
        base_end, base_at = (base or {}).get("val_ppl"), at(base) if base else None
        pre = r.get("val_ce_distilled", r.get("val_ce_converted"))
        pre_s = _fmt(math.exp(pre), ".3f") if pre is not None else "-"
        argv = list(r.get("argv") or [])
        budget = r.get("budget") if r.get("partial") or r.get("stopped_early") else r["tokens"]  # the budget asked
        if "--tokens" in argv and budget is not None:
            argv[argv.index("--tokens") + 1] = str(budget)
        for flag in ("--deadline", "--sync", "--group"):
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + 2]
        if r.get("compiled") is None:
            comp = "?"
        else:
            comp = "yes" if r["compiled"] else f"no ({r.get('compile_error') or 'eager asked'})"
        stopped = " (stopped early)" if r.get("partial") or r.get("stopped_early") else ""
        lines.append(f"| {label}{stopped} | {_fmt(end)} | {_rel(end, base_end)} | {_fmt(at(r))} | "
                     f"{_rel(at(r), base_at)} | {r['tokens']:,} | {pre_s} | {comp} | "
                     f"`{' '.join(argv) or 'see log'}` |")
    return "\n".join(lines)


def plots(runs: str, png_dir: str, suffix: str = "") -> list:
    """perplexity-vs-fine-tuning-tokens PNG and the attention-maps PNG; returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = _load_results(runs, suffix)
    os.makedirs(png_dir, exist_ok=True)
    written = []
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, label in _ROWS:
        r = res.get(name)
        if r is None or r["stage"] != "finetune":
            continue
        xs = [t / 1e6 for t, _ in r["curve"]]
        ys = [math.exp(v) for _, v in r["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if "scratch_softmax" in res:
        ax.axhline(math.exp(res["scratch_softmax"]["curve"][-1][1]), color="gray", ls="--", lw=1,
                   label="softmax checkpoint")
    ax.set_xlabel("fine-tuning tokens (millions)")
    ax.set_ylabel("held-out perplexity per byte")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("GPT on python3.11-doc: conversion + fine-tuning")
    fig.tight_layout()
    p = os.path.join(png_dir, "gpt_conversion_curves.png")
    fig.savefig(p, dpi=120)
    written.append(p)

    panels = []
    for name, label in (("ft_hedgehog", "Hedgehog"), ("ft_elu1", "1+ELU")):
        path = os.path.join(runs, _folder(name, suffix), "maps.pt")
        if os.path.exists(path):
            m = torch.load(path)
            if not panels:
                panels.append(("softmax", m["before"]["softmax"]))
            panels.append((f"{label}, before distillation", m["before"]["linear"]))
            if "after" in m:
                panels.append((f"{label}, after distillation", m["after"]["linear"]))
            layer = m["layer"]
    if panels:
        heads = min(2, panels[0][1].shape[0])
        fig = Figure(figsize=(3.0 * len(panels), 3.0 * heads))
        FigureCanvasAgg(fig)
        for h in range(heads):
            vmax = float(panels[0][1][h].max())
            for i, (title, m) in enumerate(panels):
                ax = fig.add_subplot(heads, len(panels), h * len(panels) + i + 1)
                ax.imshow(m[h].float().numpy() ** 0.5, vmin=0, vmax=vmax ** 0.5, cmap="viridis")
                ax.set_title(f"{title}\nhead {h}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(f"layer {layer} attention weights on a held-out sequence (sqrt scale)", fontsize=9)
        fig.tight_layout()
        p = os.path.join(png_dir, "gpt_attention_maps.png")
        fig.savefig(p, dpi=110)
        written.append(p)
    return written


def cmd_table(argv: list) -> int:
    p = argparse.ArgumentParser(prog="hhfft gpt table", description="Print the table; draw the PNGs.")
    p.add_argument("--runs", required=True)
    p.add_argument("--png-dir", default=None)
    p.add_argument("--suffix", default="", help="the fine-tuning rows of one variant: folders ft_<row><suffix>, "
                   "e.g. _lr1e-3 (the from-scratch rows keep their names)")
    a = p.parse_args(argv)
    print(table(a.runs, a.suffix))
    if a.png_dir:
        for path in plots(a.runs, a.png_dir, a.suffix):
            print(f"wrote {path}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "finetune": cmd_finetune, "table": cmd_table}


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        helping = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__, file=sys.stdout if helping else sys.stderr)
        if argv and not helping:
            print(f"hhfft gpt: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 0 if helping else 2
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 work (distillation, the optimizer) in TF32 on CUDA
    try:
        return COMMANDS[argv[0]](argv[1:])
    finally:  # for in-process callers (the tests): the setting is this command's, not the process's
        torch.backends.cuda.matmul.allow_tf32 = tf32


if __name__ == "__main__":
    sys.exit(main())
