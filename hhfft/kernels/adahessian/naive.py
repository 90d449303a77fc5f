"""Reference for AdaHessian: the official algorithm (amirgholami/adahessian), transcribed one step at a time.

Per parameter p with gradient g, at step t (1-based), given Rademacher probes z_1..z_S (entries exactly +1/-1):

    D      = 1/S sum_s z_s * (H z_s)                       Hutchinson estimate of diag(H)
    Dbar   = |D|                                           1-D tensors (biases, norms)
           = mean |D| over dims 2..n (kept, broadcast)     convolution weights, any rank n >= 3
           = mean |D| over consecutive blocks of B         2-D tensors when block_length B is given (fairseq variant)
    m      = b1 m + (1 - b1) g
    v      = b2 v + (1 - b2) Dbar^2
    denom  = (sqrt(v) ** k) / (sqrt(1 - b2^t) ** k) + eps        i.e. v_hat^(k/2) + eps
    p      = p - lr * (m / (1 - b1^t) / denom + wd * p)             decoupled weight decay

The official code's known defects are not reproduced: the probes come from an explicit generator instead of the
global RNG (its fairseq variant's all-reduce of z made z non-Rademacher), Conv1d/Conv3d weights are averaged like Conv2d
ones (the official 4-D-only branch), and the cross-rank average of D is one sum divided by the world size (the official
``all_reduce(x / n)`` reduced a temporary and discarded it).

Everything here is per parameter, in plain torch, in the parameters' dtype (use fp64 for references).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["hutchinson_naive", "average_curvature_naive", "adahessian_step_naive"]


def hutchinson_naive(grads: Sequence[Tensor], params: Sequence[Tensor], probes: Sequence[Sequence[Tensor]]) -> list:
    """D = mean over probes of z * (H z), with H z = d(g . z)/dp from a gradient computed with create_graph=True.

    Args:
        grads: gradients of the loss w.r.t. ``params``, each with a graph (``backward(create_graph=True)``)
        params: the parameters, [any shape] each
        probes: ``probes[s][i]`` is the s-th probe for ``params[i]`` (same shape, entries +-1)
    Returns:
        list of D, one per parameter, same shapes
    """
    total = [torch.zeros_like(p) for p in params]
    for zs in probes:
        hz = torch.autograd.grad(grads, params, grad_outputs=list(zs), retain_graph=True, allow_unused=True)
        for i, (z, h) in enumerate(zip(zs, hz)):
            if h is not None:
                total[i] = total[i] + z * h
    return [d / len(probes) for d in total]


def average_curvature_naive(d: Tensor, block_length: Optional[int] = None) -> Tensor:
    """|D| with the official spatial averaging: conv weights (ndim >= 3) over kernel dims, 2-D by blocks if asked."""
    a = d.abs()
    if d.dim() >= 3:
        return a.mean(dim=tuple(range(2, d.dim())), keepdim=True).expand_as(d)
    if d.dim() == 2 and block_length is not None:
        blocks = a.reshape(-1, block_length).mean(dim=1)
        return blocks.repeat_interleave(block_length).reshape(d.shape)
    return a


def adahessian_step_naive(
    p: Tensor,
    grad: Tensor,
    dbar: Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """One AdaHessian update of ``p`` in place. ``state`` holds ``step`` (int), ``exp_avg``, ``exp_hessian_diag_sq``."""
    if len(state) == 0:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_hessian_diag_sq"] = torch.zeros_like(p)
    exp_avg, exp_hessian_diag_sq = state["exp_avg"], state["exp_hessian_diag_sq"]
    beta1, beta2 = betas
    state["step"] += 1

    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_hessian_diag_sq.mul_(beta2).addcmul_(dbar, dbar, value=1 - beta2)

    bias_correction1 = 1 - beta1 ** state["step"]
    bias_correction2 = 1 - beta2 ** state["step"]

    k = hessian_power
    denom = ((exp_hessian_diag_sq.sqrt() ** k) / math.sqrt(bias_correction2) ** k).add_(eps)

    p.data = p.data - lr * (exp_avg / bias_correction1 / denom + weight_decay * p.data)
