"""Reference for ``hhfft::linear_attention``: the quadratic form, an explicit [L, L] weight matrix. The ground truth
every implementation is tested against (call it with fp64 inputs).

    A[i, j] = (phi_q[i] . phi_k[j]) * keep[j] * [j <= i if causal]
    o[i]    = sum_j A[i, j] v[j] / max(sum_j A[i, j], DEN_FLOOR)

The floor keeps the op differentiable where the features of a query barely meet any key's (near one-hot feature
maps: the denominator underflows and 1 / den^2 overflows): below it the output fades to 0 (an empty row gives 0),
and the gradient through the denominator is 0 there. It is far below a real denominator (a Hedgehog map's features
sum to 1 per half, so one visible key alone gives phi_q . phi_k of order 1 / F).

GQA: query head h reads key/value head h // (Hq // Hkv).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["DEN_FLOOR", "linear_attention_naive", "linear_attention_weights_naive"]

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
