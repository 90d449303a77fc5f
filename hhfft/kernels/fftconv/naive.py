"""Reference for ``hhfft::fftconv``: direct summation, no FFT. The ground truth every kernel is tested against.

    y[b, h, t] = postgate[b, h, t] * sum_j k[h, j] * v[b, h, t + shift - j]  + bias[h] + skip[h] * u[b, h, t]
    v = pregate * u, zero outside [0, L);  t in [0, out_len)

and the kernel-gradient primitive (the correlation that the backward needs):

    dk[h, j] = sum_b sum_t g[b, h, t] * v[b, h, t + shift - j],   j in [0, K)
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["fftconv_naive", "fftconv_corr_naive"]


def _shifted(v: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """w[..., t] = v[..., t + offset] for t in [0, length), zero where t + offset is outside [0, L)."""
    L = v.shape[-1]
    out = v.new_zeros(*v.shape[:-1], length)
    lo, hi = max(0, -offset), min(length, L - offset)
    if hi > lo:
        out[..., lo:hi] = v[..., lo + offset : hi + offset]
    return out


def fftconv_naive(
    u: torch.Tensor,
    k: torch.Tensor,
    shift: int,
    out_len: int,
    bias: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
    pregate: Optional[torch.Tensor] = None,
    postgate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Direct O(L*K) evaluation of the fftconv contract in the dtype of the inputs (call it with fp64 for a reference).

    Args:
        u: [B, H, L]
        k: [H, K]
        shift, out_len: see the module docstring
        bias, skip: [H] or None
        pregate: [B, H, L] or None;  postgate: [B, H, out_len] or None
    Returns:
        y: [B, H, out_len]
    """
    v = u if pregate is None else u * pregate
    K = k.shape[-1]
    y = v.new_zeros(*u.shape[:-1], out_len)
    for j in range(K):
        y = y + k[:, j, None] * _shifted(v, shift - j, out_len)
    if postgate is not None:
        y = y * postgate
    if bias is not None:
        y = y + bias[:, None]
    if skip is not None:
        y = y + skip[:, None] * _shifted(u, 0, out_len)
    return y


def fftconv_corr_naive(g: torch.Tensor, v: torch.Tensor, shift: int, K: int) -> torch.Tensor:
    """dk[h, j] = sum_{b, t} g[b, h, t] * v[b, h, t + shift - j].   g: [B, H, T], v: [B, H, L] -> dk: [H, K]."""
    T = g.shape[-1]
    cols = [(g * _shifted(v, shift - j, T)).sum(dim=(0, 2)) for j in range(K)]
    return torch.stack(cols, dim=-1)
