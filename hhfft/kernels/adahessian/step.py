"""The AdaHessian update for a list of parameters: a compiled multi-tensor step and its readable eager twin.

Both compute, per parameter (maths in the state's dtype: fp32, or fp64 for fp64 parameters),

    t = t + 1
    m = b1 m + (1 - b1) g
    v = b2 v + (1 - b2) Dbar^2
    p = p - lr * (m / (1 - b1^t) / (sqrt(v)^k / sqrt(1 - b2^t)^k + eps) + wd * p)

with ``t`` and ``lr`` 0-d tensors, so neither a new step count nor a new learning rate changes the compiled graph.
The bias corrections are computed as ``1 - b^t = -expm1(t * log(b))``: in fp32, ``1 - 0.999**t`` cancels ~10 bits for
small t (relative error 1e-5..6e-5 from rounding 0.999 and from the pow routine, which differs between ATen and
Inductor's codegen), and v_hat inherits it; the expm1 form is accurate to a few ulps for every t.
The fused step is ``torch.compile(fullgraph=True, dynamic=False)`` over ``torch._foreach_*`` ops: Inductor turns
the whole chain into a few horizontally fused kernels that read p, g, Dbar, m, v once and write p, m, v once.
"""
from __future__ import annotations

import functools
import math
from typing import List

import torch
from torch import Tensor

__all__ = ["adahessian_update", "adahessian_update_fused"]


def _log(beta: float) -> float:
    """log(beta) for the bias correction 1 - beta^t = -expm1(t * log(beta)); beta = 0 gives -inf (correction 1)."""
    return math.log(beta) if beta > 0.0 else -math.inf


def _foreach_update(
    params: List[Tensor],
    grads: List[Tensor],
    hessian: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hessian_diag_sqs: List[Tensor],
    steps: List[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    torch._foreach_add_(steps, 1.0)
    g = [x.to(m.dtype) for x, m in zip(grads, exp_avgs)]
    h = [x.to(m.dtype).expand_as(m) for x, m in zip(hessian, exp_avgs)]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, g, alpha=1 - beta1)
    torch._foreach_mul_(exp_hessian_diag_sqs, beta2)
    torch._foreach_addcmul_(exp_hessian_diag_sqs, h, h, value=1 - beta2)

    log_beta1, log_beta2 = _log(beta1), _log(beta2)
    bias_correction1 = [-torch.expm1(t * log_beta1) for t in steps]
    bias_correction2_k = [(-torch.expm1(t * log_beta2)).sqrt() for t in steps]
    denom = torch._foreach_sqrt(exp_hessian_diag_sqs)
    if hessian_power != 1.0:
        torch._foreach_pow_(denom, hessian_power)
        bias_correction2_k = torch._foreach_pow(bias_correction2_k, hessian_power)
    torch._foreach_div_(denom, bias_correction2_k)
    torch._foreach_add_(denom, eps)

    update = torch._foreach_div(exp_avgs, bias_correction1)
    torch._foreach_div_(update, denom)
    p32 = [p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    if weight_decay != 0.0:
        torch._foreach_add_(update, p32, alpha=weight_decay)
    torch._foreach_mul_(update, lr)
    torch._foreach_sub_(p32, update)
    for p, q in zip(params, p32):
        if q is not p:
            p.copy_(q)


@functools.lru_cache(maxsize=None)
def _compiled_update():
    import torch._inductor.config as inductor_config

    # Inductor's wrapper checks every input's size and stride on each call (6 x n tensors, about a microsecond each),
    # and the alignment of fallback kernels' outputs; under dynamic=False Dynamo's guards have checked sizes and
    # strides already, and misaligned inputs are still copied by Inductor's input alignment handling.
    options = {k: False for k in ("size_asserts", "alignment_asserts") if hasattr(inductor_config, k)}
    return torch.compile(_foreach_update, fullgraph=True, dynamic=False, options=options)


def _check_lists(params, grads, hessian, exp_avgs, exp_hessian_diag_sqs, steps) -> None:
    n = len(params)
    lengths = [len(grads), len(hessian), len(exp_avgs), len(exp_hessian_diag_sqs), len(steps)]
    if any(k != n for k in lengths):
        raise ValueError(
            f"adahessian_update: every list must have one entry per parameter ({n}), got lengths {lengths} for "
            "grads, hessian, exp_avgs, exp_hessian_diag_sqs, steps"
        )


@torch.no_grad()
def adahessian_update(
    params: List[Tensor],
    grads: List[Tensor],
    hessian: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hessian_diag_sqs: List[Tensor],
    steps: List[Tensor],
    lr: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """Eager reference update, one parameter at a time (the ``fused=False`` path). Updates everything in place.

    Args:
        params: [*] each, any float dtype; grads: same shapes and dtypes
        hessian: Dbar per parameter, broadcastable to its parameter ([O, I, 1, 1] for a conv weight, say)
        exp_avgs, exp_hessian_diag_sqs: [*] each, fp32 (fp64 for fp64 parameters)
        steps: 0-d tensors, the steps already taken (incremented here)
        lr: 0-d tensor
    """
    _check_lists(params, grads, hessian, exp_avgs, exp_hessian_diag_sqs, steps)
    k = hessian_power
    log_beta1, log_beta2 = _log(beta1), _log(beta2)
    for p, g, d, m, v, t in zip(params, grads, hessian, exp_avgs, exp_hessian_diag_sqs, steps):
        t.add_(1)
        d = d.to(m.dtype)
        m.mul_(beta1).add_(g.to(m.dtype), alpha=1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        bias_correction1 = -torch.expm1(t * log_beta1)
        bias_correction2 = -torch.expm1(t * log_beta2)
        denom = (v.sqrt() ** k) / (bias_correction2.sqrt() ** k) + eps
        p32 = p.to(m.dtype)
        p.copy_(p32 - lr * (m / bias_correction1 / denom + weight_decay * p32))


@torch.no_grad()
def adahessian_update_fused(
    params: List[Tensor],
    grads: List[Tensor],
    hessian: List[Tensor],
    exp_avgs: List[Tensor],
    exp_hessian_diag_sqs: List[Tensor],
    steps: List[Tensor],
    lr: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """The same update as :func:`adahessian_update`, as one compiled multi-tensor step (same arguments).

    All tensors of one call must be on one device. ``lr`` and ``steps`` are tensors, so changing the learning rate
    or taking another step reuses the compiled graph; the float hyperparameters are compile-time constants.
    """
    _check_lists(params, grads, hessian, exp_avgs, exp_hessian_diag_sqs, steps)
    if not params:
        return
    args = (params, grads, hessian, exp_avgs, exp_hessian_diag_sqs, steps, lr)
    floats = (float(beta1), float(beta2), float(eps), float(weight_decay), float(hessian_power))
    try:
        _compiled_update()(*args, *floats)
    except _RECOMPILE_LIMIT as e:  # raised before the graph runs: nothing was updated yet
        _warn_recompile_limit(e)
        adahessian_update(*args, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                          hessian_power=hessian_power)


# Each new list of parameter shapes and each new value of a float hyperparameter compiles the step again; past
# Dynamo's recompile limit a fullgraph function raises. Those steps run the eager update instead (same maths).
_RECOMPILE_LIMIT = tuple(getattr(torch._dynamo.exc, n) for n in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                         if hasattr(torch._dynamo.exc, n))


def _warn_recompile_limit(e: Exception) -> None:  # Python's default filter shows it once per call site
    import warnings

    warnings.warn(
        "AdaHessian: the fused step reached torch.compile's recompile limit (each new set of stepping parameter "
        "shapes and each new value of betas, eps, weight_decay or hessian_power is another compile), so steps "
        "of new variants run the eager update, which computes the same; keep those hyperparameters fixed (lr may "
        f"change freely), or pass fused=False. ({type(e).__name__})", stacklevel=3)
