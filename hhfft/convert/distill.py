"""``hhfft.distill``: attention transfer. Train only the Hedgehog feature maps so that, at every converted site,
the Hedgehog weights match the softmax weights of the original model.

Per site, from the q and k the teacher (softmax) path computes,
    a_true = softmax(q k^T * scale + mask)                                  (exactly what SDPA computes)
    a_pred = phi_q(q) phi_k(k)^T * allowed / rowsum                         (allowed: the mask's kept positions)
             (or the sliding-window or sink hybrid's weights, ``HedgehogConfig(window=w)`` / ``(sinks=n)``)
    loss   = mean over rows of  - sum_j a_true log a_pred                   (cross-entropy)
           [+ output_mse * mean (a_pred v - sdpa_out)^2]
and the objective is the mean over sites. The teacher path: the model runs with softmax attention at every site
("tap" mode of the linearize pass: a call inserted after each SDPA computes the loss from the same q, k), so each
site is fed the original model's activations, and all original weights stay frozen.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, TextIO

import torch
from torch import Tensor, nn

from hhfft.convert.core import call_model
from hhfft.convert.modules import hedgehog_mode, hedgehog_sites, hedgehog_weights

__all__ = ["distill", "DistillResult", "site_losses", "site_maps", "record_tap", "tune_maps", "lr_lambda"]

Schedule = Literal["constant", "cosine"]


class _Sink:
    def __init__(self, output_mse: float = 0.0, picture: Optional[tuple] = None) -> None:
        self.output_mse = output_mse
        self.picture = picture  # (site name, head) to keep the maps of, or None
        self.losses: dict = {}
        self.mse: dict = {}
        self.maps: Optional[tuple] = None

    def add(self, site: str, ce: Tensor, mse: Optional[Tensor]) -> None:
        self.losses.setdefault(site, []).append(ce)
        if mse is not None:
            self.mse.setdefault(site, []).append(mse)


_SINK: contextvars.ContextVar = contextvars.ContextVar("hhfft_distill_sink", default=None)


def record_tap(site: str, q: Tensor, k: Tensor, v: Tensor, out: Tensor, mask: Optional[Tensor], wq: Tensor,
               bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor], kind: str, is_causal: bool, scale: Any,
               window: int = 0, mix: Optional[Tensor] = None, sinks: int = 0, lse: Optional[Tensor] = None) -> None:
    """Called from the graph (linearize pass, tap mode) right after a site's SDPA: compute the site's loss."""
    sink = _SINK.get()
    if sink is None:
        return
    qf, kf = q.detach().float(), k.detach().float()
    g = qf.shape[1] // kf.shape[1]
    kr = kf.repeat_interleave(g, dim=1) if g > 1 else kf
    L, S = qf.shape[-2], kf.shape[-2]
    scale = 1.0 / math.sqrt(qf.shape[-1]) if scale is None else float(scale)
    s = (qf @ kr.transpose(-1, -2)) * scale
    allowed = torch.ones(1, 1, L, S, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed = allowed.tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.float()
            allowed = allowed & (mask == 0)
    s = s.masked_fill(~allowed, float("-inf"))
    rows = allowed.any(-1).expand(s.shape[:-1])  # [B, H, L]
    a_true = torch.softmax(s, -1).nan_to_num(0.0)
    a_pred = hedgehog_weights(q.detach(), k.detach(), wq, bq, wk, bk, kind, allowed, window, mix, scale, sinks, lse)
    tiny = torch.finfo(a_pred.dtype).tiny
    ce = -(a_true * torch.log(a_pred.clamp_min(tiny))).sum(-1)
    w = rows.to(ce.dtype)
    ce = (ce * w).sum() / w.sum().clamp_min(1)
    mse = None
    if sink.output_mse:
        vr = v.detach().float().repeat_interleave(g, dim=1) if g > 1 else v.detach().float()
        mse = (((a_pred @ vr - out.detach().float()) ** 2).mean(-1) * w).sum() / w.sum().clamp_min(1)
    sink.add(site, ce, mse)
    if sink.picture is not None and sink.picture[0] == site and sink.maps is None:
        sink.maps = (a_true[0].detach().cpu(), a_pred[0].detach().cpu(), allowed.expand_as(s)[0].cpu())


@dataclass
class DistillResult:
    """Per-site loss (cross-entropy, mean over rows) before and after, and the objective per step."""

    before: dict
    after: dict
    history: list = field(default_factory=list)
    picture: Optional[str] = None

    def __str__(self) -> str:
        w = max([len(s) for s in self.before] + [4])
        lines = [f"{'site'.ljust(w)}  before    after"]
        for s in self.before:
            lines.append(f"{s.ljust(w)}  {self.before[s]:.4f}  {self.after.get(s, float('nan')):.4f}")
        return "\n".join(lines)


def _run(model: nn.Module, inputs: Any, sink: _Sink) -> None:
    tok = _SINK.set(sink)
    try:
        with hedgehog_mode("tap"):
            call_model(model, inputs)
    finally:
        _SINK.reset(tok)


def site_losses(model: nn.Module, batches: Iterable) -> dict:
    """Per-site cross-entropy of the Hedgehog weights against the softmax weights, averaged over ``batches``."""
    sums: dict = {}
    n = 0
    with torch.no_grad():
        for b in batches:
            sink = _Sink()
            _run(model, b, sink)
            for s, ls in sink.losses.items():
                sums[s] = sums.get(s, 0.0) + float(torch.stack(ls).mean())
            n += 1
    return {s: v / max(n, 1) for s, v in sorted(sums.items(), key=lambda kv: _site_order(model, kv[0]))}


def site_maps(model: nn.Module, inputs: Any, site: int = 0) -> tuple:
    """(softmax weights, Hedgehog weights, allowed) [H, L, S] of the first sequence of ``inputs`` at converted site
    number ``site`` (module order), computed from the teacher's q and k."""
    sink = _Sink(picture=(_site_key(hedgehog_sites(model), site, "site_maps"), 0))
    with torch.no_grad():
        _run(model, inputs, sink)
    if sink.maps is None:
        raise RuntimeError(f"site_maps: site {site} was not reached by the forward")
    return sink.maps


def _site_key(sites: list, index: int, who: str) -> str:
    """The name "owner.path#index" of converted site number ``index`` (module order)."""
    if not -len(sites) <= index < len(sites):
        raise ValueError(f"{who}: site {index} does not exist; the model has {len(sites)} converted sites "
                         f"(0 to {len(sites) - 1})")
    return f"{sites[index][0]}#{sites[index][1]}"


def _site_order(model: nn.Module, name: str) -> tuple:
    order = {f"{p}#{i}": j for j, (p, i, _, _) in enumerate(hedgehog_sites(model))}
    return (order.get(name, len(order)), name)


def _picture(path: str, before: tuple, after: tuple, site: str, head: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4))
    FigureCanvasAgg(fig)
    panels = (("softmax", before[0][head]), ("hedgehog, before", before[1][head]), ("hedgehog, after", after[1][head]))
    vmax = float(max(p[1].max() for p in panels))
    for i, (title, m) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(m.numpy(), vmin=0, vmax=vmax, cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(f"{site}, head {head}")
    fig.tight_layout()
    fig.savefig(path)


def distill(
    model: nn.Module,
    batches: Iterable,
    steps: int = 500,
    lr: float = 1e-2,
    *,
    output_mse: float = 0.0,
    eval_batches: Optional[Iterable] = None,
    log_every: int = 10,
    stream: Optional[TextIO] = sys.stderr,
    picture: Optional[str] = None,
    picture_site: int = 0,
    picture_head: int = 0,
    weight_decay: float = 0.0,
    lr_schedule: Schedule = "constant",
    warmup: int = 0,
) -> DistillResult:
    """Attention transfer: fit the feature maps of a converted model (:func:`hhfft.convert.convert`) to its softmax
    attention, with every original weight frozen (restored afterwards). Adam on the maps only.

    Args:
        model: a converted model
        batches: model inputs (tuples of positional inputs, dicts of keyword inputs, or tensors), cycled for
            ``steps`` steps
        steps, lr, weight_decay: the optimisation
        lr_schedule, warmup: "constant" or "cosine" (decay to 0 over ``steps``), after ``warmup`` linear steps
        output_mse: weight of the per-site output MSE term (0 = cross-entropy only)
        eval_batches: inputs to measure the per-site loss on before and after (default: the first 2 of ``batches``)
        log_every: print "step i/n  loss" every this many steps to ``stream`` (None = silent)
        picture: a PNG path: one head's softmax vs Hedgehog attention map, before and after
        picture_site, picture_head: which converted site (index in module order) and head to draw
    Returns:
        :class:`DistillResult` with per-site loss ``before`` / ``after`` (keys "owner.path#index") and ``history``
    """
    sites, batches = _check_args("distill", model, steps, batches)
    eval_batches = list(eval_batches) if eval_batches is not None else batches[:2]
    schedule = lr_lambda(lr_schedule, steps, warmup)
    pic_site = _site_key(sites, picture_site, "distill (picture_site)") if picture else None
    if picture:  # its folder made now: a missing one would fail only after the whole distillation
        os.makedirs(os.path.dirname(os.path.abspath(picture)), exist_ok=True)

    def loss_of(b) -> Tensor:
        sink = _Sink(output_mse=output_mse)
        _run(model, b, sink)
        if not sink.losses:
            raise RuntimeError("distill: no converted site was reached by the forward (were the inputs the kind "
                               "the model was converted with?)")
        loss = torch.stack([torch.stack(v).mean() for v in sink.losses.values()]).mean()
        if output_mse and sink.mse:
            loss = loss + output_mse * torch.stack([torch.stack(v).mean() for v in sink.mse.values()]).mean()
        return loss

    with _maps_only(model, sites) as maps:  # the teacher without dropout
        before = site_losses(model, eval_batches)
        pic_before = None
        if picture:
            sink = _Sink(picture=(pic_site, picture_head))
            with torch.no_grad():
                _run(model, eval_batches[0], sink)
            pic_before = sink.maps
        opt = torch.optim.Adam(maps, lr=lr, weight_decay=weight_decay)
        history = _fit("distill", opt, schedule, batches, steps, loss_of, log_every, stream)
        opt.zero_grad(set_to_none=True)  # no stale gradients on the maps for whatever trains the model next
        after = site_losses(model, eval_batches)
        result = DistillResult(before=before, after=after, history=history)
        if picture:
            sink = _Sink(picture=(pic_site, picture_head))
            with torch.no_grad():
                _run(model, eval_batches[0], sink)
            if pic_before is not None and sink.maps is not None:
                _picture(picture, pic_before, sink.maps, pic_site, picture_head)
                result.picture = picture
        return result


def _check_args(who: str, model: nn.Module, steps: int, batches: Iterable) -> tuple:
    """(converted sites, batches as a list) after checking what :func:`distill` and :func:`tune_maps` share."""
    sites = hedgehog_sites(model)
    if not sites:
        raise ValueError(f"{who}: the model has no Hedgehog sites; run hhfft.convert.convert(model, inputs) first")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{who}: steps must be a non-negative int, got {steps!r}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{who}: no batches given")
    return sites, batches


@contextlib.contextmanager
def _maps_only(model: nn.Module, sites: list):
    """Yields the feature maps' parameters with only them trainable and the model in eval mode (no dropout); every
    requires_grad flag and the train/eval mode are restored afterwards."""
    maps = [p for _, _, _, hh in sites for p in hh.parameters()]
    map_ids = {id(p) for p in maps}
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in map_ids)
        model.eval()
        yield maps
    finally:
        for p, r in frozen.items():
            p.requires_grad_(r)
        model.train(was_training)


def _fit(who: str, opt: torch.optim.Optimizer, schedule: Callable[[int], float], batches: list, steps: int,
         loss_of: Callable[[Any], Tensor], log_every: int, stream: Optional[TextIO]) -> list:
    """``steps`` optimiser steps on ``loss_of(batch)``, batches cycled, lr factor ``schedule(step)``; the losses as
    floats (read once at the end: no device sync per step)."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    history = []
    t0 = time.perf_counter()
    for step, b in zip(range(steps), itertools.cycle(batches)):
        loss = loss_of(b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.detach())
        if stream is not None and log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{who} step {step + 1}/{steps}  loss {float(history[-1]):.4f}  "
                  f"({time.perf_counter() - t0:.1f} s)", file=stream, flush=True)
    return torch.stack(history).float().tolist() if history else []


def lr_lambda(schedule: Schedule, steps: int, warmup: int = 0) -> Callable[[int], float]:
    """The factor on the base lr at step i: linear warmup over ``warmup`` steps, then 1 ("constant") or a cosine
    decay to 0 at ``steps`` ("cosine")."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = (i - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return f


def tune_maps(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    steps: int,
    lr: float = 1e-3,
    *,
    lr_schedule: Schedule = "constant",
    warmup: int = 0,
    log_every: int = 10,
    stream: Optional[TextIO] = sys.stderr,
) -> list:
    """A second conversion stage after :func:`distill`: train the feature maps (and nothing else) through the
    converted model's own Hedgehog forward on a loss of its outputs, e.g. the distance of its sentence embeddings
    or hidden states to the original model's on the calibration text. Attention transfer fits every site to the
    teacher's inputs; this stage corrects the errors that compound from one converted layer to the next. Every
    original weight stays frozen (restored afterwards); dropout is off.

    Args:
        model: a converted model
        batches: items handed to ``loss_fn`` (cycled for ``steps`` steps)
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; calls the converted model (Hedgehog attention)
        steps, lr, lr_schedule, warmup: Adam on the maps, schedule as in :func:`distill`
        log_every, stream: progress ("tune step i/n  loss ...")
    Returns:
        the loss per step (floats)

    Example:
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> x = torch.randn(2, 5, 8)
        >>> from hhfft.convert import convert
        >>> _ = convert(mha, (x, x, x, None, False))
        >>> target = torch.zeros(2, 5, 8)
        >>> hist = tune_maps(mha, [x], lambda m, b: ((m(b, b, b, need_weights=False)[0] - target) ** 2).mean(),
        ...                  steps=2, lr=1e-2, stream=None)
        >>> len(hist)
        2
    """
    sites, batches = _check_args("tune_maps", model, steps, batches)
    schedule = lr_lambda(lr_schedule, steps, warmup)

    def loss_of(b) -> Tensor:
        loss = loss_fn(model, b)
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
            raise ValueError("tune_maps: loss_fn must return a scalar tensor that depends on the feature maps, got "
                             f"{type(loss).__name__} {getattr(loss, 'shape', '')}")
        return loss

    with _maps_only(model, sites) as maps:
        return _fit("tune", torch.optim.Adam(maps, lr=lr), schedule, batches, steps, loss_of, log_every, stream)
