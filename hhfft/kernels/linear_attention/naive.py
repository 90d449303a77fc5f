"""Reference for ``hhfft::linear_attention``: the quadratic form, an explicit [L, L] weight matrix. The ground truth
every implementation is tested against (call it with fp64 inputs).

    A[i, j] = (phi_q[i] . phi_k[j]) * keep[j] * [j <= i if causal]
    o[i]    = sum_j A[i, j] v[j] / max(sum_j A[i, j], DEN_FLOOR)

The floor keeps the op differentiable where the features of a query barely meet any key's (near one-hot feature
maps: the denominator underflows and 1 / den^2 overflows): below it the output fades to 0 (an empty row gives 0),
and the gradient through the denominator is 0 there. It is far below a real denominator (a Hedgehog map's features
sum to 1 per half, so one visible key alone gives phi_q . phi_k of order 1 / F).

GQA: query head h reads key/value head h // (Hq // Hkv).

The sliding-window hybrid (``HedgehogConfig(window=w)``, LoLCATs-style): softmax terms for the keys within the
window, Hedgehog terms for the rest, in one normalisation with a per-head weight f = sigmoid(mix) in (0, 1):

    near[i, j] = |i - j| < w                                     (and j <= i if causal: the visible keys)
    m[i]       = max of s[i, j] = q_i . k_j * scale over the visible near keys (0 if there is none)
    A[i, j]    = f exp(s[i, j] - m[i])      for visible near keys
               = (1 - f) phi_q[i] . phi_k[j]  for the other visible keys
    o[i]       = sum_j A[i, j] v[j] / max(sum_j A[i, j], DEN_FLOOR)

The sink hybrid (``HedgehogConfig(sinks=n)``): the first n keys (the attention sinks: [CLS], <bos>, which take a
large share of softmax attention) get exact softmax terms, every other key Hedgehog's linear terms. A learned
per-query log-normaliser lam[i] = q_i . u + beta (``lse`` = [u, beta] per head) puts the linear terms on the scale
of exp(s): exp(lam[i]) phi_q[i] . phi_k[j] stands for exp(s[i, j]), so the sinks' share follows their scores:

    sink[j]    = j < n                                           (visible keys as above)
    lin[i]     = sum of phi_q[i] . phi_k[j] over the visible keys with not sink[j]
    m[i]       = max(s[i, j] over the visible sinks, lam[i] + log lin[i])   (0 if there is no visible key)
    A[i, j]    = exp(s[i, j] - m[i])                             for visible sinks
               = exp(lam[i] - m[i]) phi_q[i] . phi_k[j]          for the other visible keys
    o[i]       = sum_j A[i, j] v[j] / max(sum_j A[i, j], DEN_FLOOR)
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DEN_FLOOR", "linear_attention_naive", "linear_attention_weights_naive", "window_weights_naive",
           "window_attention_naive", "sink_weights_naive", "sink_attention_naive"]

DEN_FLOOR = 1e-6


def linear_attention_weights_naive(
    phi_q: torch.Tensor, phi_k: torch.Tensor, *, causal: bool, key_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Unnormalised weights A: phi_q [B, Hq, L, F], phi_k [B, Hkv, L, F] -> [B, Hq, L, L]."""
    group = phi_q.shape[1] // phi_k.shape[1]
    k = phi_k.repeat_interleave(group, dim=1)
    a = phi_q @ k.transpose(-1, -2)
    L = a.shape[-1]
    if causal:
        a = a * torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    if key_mask is not None:
        a = a * key_mask[:, None, None, :].to(a.dtype)
    return a


def linear_attention_naive(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Quadratic evaluation in the inputs' dtype.

    Args:
        phi_q: [B, Hq, L, F]; phi_k: [B, Hkv, L, F]; v: [B, Hkv, L, D]
        causal: key j is seen by query i only if j <= i
        key_mask: [B, L] bool (True = keep) or None
    Returns:
        o: [B, Hq, L, D]
    """
    a = linear_attention_weights_naive(phi_q, phi_k, causal=causal, key_mask=key_mask)
    group = phi_q.shape[1] // phi_k.shape[1]
    vv = v.repeat_interleave(group, dim=1)
    if key_mask is not None:
        vv = torch.where(key_mask[:, None, :, None], vv, 0)
    den = a.sum(-1, keepdim=True)
    return (a @ vv) / den.clamp_min(DEN_FLOOR)


def _per_query_head(k: torch.Tensor, v: torch.Tensor, phi_k: torch.Tensor, Hq: int, causal: bool,
                    key_mask: Optional[torch.Tensor]) -> tuple:
    """(k, v (masked keys' rows zero), phi_k) repeated to the Hq query heads, and the visible keys [B or 1, 1, L, L]."""
    group = Hq // k.shape[1]
    kr, vr, pkr = (x.repeat_interleave(group, dim=1) for x in (k, v, phi_k))
    L = k.shape[-2]
    allowed = torch.ones(1, 1, L, L, dtype=torch.bool, device=k.device)
    if causal:
        allowed = allowed.tril()
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
        vr = torch.where(key_mask[:, None, :, None], vr, 0)
    return kr, vr, pkr, allowed


def window_weights_naive(s: torch.Tensor, lin: torch.Tensor, allowed: torch.Tensor, factor: torch.Tensor,
                         window: int) -> torch.Tensor:
    """Normalised weights of the sliding-window hybrid (module docstring): s (scaled q.k) and lin (phi_q.phi_k)
    [B, Hq, L, L], allowed bool (broadcastable to them: the visible keys), factor [Hq] in (0, 1) -> [B, Hq, L, L]."""
    L, S = s.shape[-2:]
    pos_q = torch.arange(L, device=s.device)[:, None]
    pos_k = torch.arange(S, device=s.device)[None, :]
    near = (pos_q - pos_k).abs() < window
    soft = allowed & near
    m = s.masked_fill(~soft, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    f = factor.to(s.dtype)[None, :, None, None]
    a = torch.where(soft, f * torch.exp(s - m), 0) + torch.where(allowed & ~near, (1 - f) * lin, 0)
    return a / a.sum(-1, keepdim=True).clamp_min(DEN_FLOOR)


def window_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor,
    factor: torch.Tensor, *, window: int, causal: bool, key_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Quadratic evaluation of the sliding-window hybrid: q, k [B, H, L, D] (Hq and Hkv heads), v [B, Hkv, L, Dv],
    phi_q, phi_k their features, factor [Hq] -> o [B, Hq, L, Dv]."""
    kr, vr, pkr, allowed = _per_query_head(k, v, phi_k, q.shape[1], causal, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    a = window_weights_naive((q @ kr.transpose(-1, -2)) * scale, phi_q @ pkr.transpose(-1, -2), allowed, factor,
                             window)
    return a @ vr


def sink_weights_naive(s: torch.Tensor, lin: torch.Tensor, allowed: torch.Tensor, lam: torch.Tensor,
                       sinks: int) -> torch.Tensor:
    """Normalised weights of the sink hybrid (module docstring): s (scaled q.k) and lin (phi_q.phi_k) [B, Hq, L, S],
    allowed bool (broadcastable to them: the visible keys), lam [B, Hq, L] -> [B, Hq, L, S]."""
    sink = torch.arange(s.shape[-1], device=s.device) < sinks
    soft, linear = allowed & sink, allowed & ~sink
    lin = torch.where(linear, lin, 0)
    total = lin.sum(-1)
    lin_logit = torch.where(total > 0, lam + torch.log(total.clamp_min(torch.finfo(total.dtype).tiny)), float("-inf"))
    m = torch.maximum(s.masked_fill(~soft, float("-inf")).amax(-1), lin_logit)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.where(soft, torch.exp(s - m[..., None]), 0) + torch.exp(lam - m)[..., None] * lin
    return a / a.sum(-1, keepdim=True).clamp_min(DEN_FLOOR)


def sink_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi_q: torch.Tensor, phi_k: torch.Tensor, lse: torch.Tensor,
    *, sinks: int, causal: bool, key_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
) -> torch.Tensor:
    """Quadratic evaluation of the sink hybrid: q, k [B, H, L, D] (Hq and Hkv heads), v [B, Hkv, L, Dv], phi_q,
    phi_k their features, lse [Hq, D + 1] (lam = q . lse[:, :D] + lse[:, D]) -> o [B, Hq, L, Dv]."""
    kr, vr, pkr, allowed = _per_query_head(k, v, phi_k, q.shape[1], causal, key_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lam = torch.einsum("bhld,hd->bhl", q, lse[:, :-1]) + lse[:, -1][None, :, None]
    a = sink_weights_naive((q @ kr.transpose(-1, -2)) * scale, phi_q @ pkr.transpose(-1, -2), allowed, lam, sinks)
    return a @ vr
