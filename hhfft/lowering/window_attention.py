"""Hedgehog attention with a sliding softmax window (``HedgehogConfig(window=w)``; LoLCATs, Zhang et al. 2024).

Each query attends to the keys within ``window`` positions of it with softmax terms and to all other keys with
Hedgehog's linear terms, in one normalisation; a learned per-head weight f = sigmoid(mix) balances the two (the
formula is in ``hhfft/kernels/linear_attention/naive.py``, the reference this is tested against).

Computed in plain torch, in time and memory linear in L: the sequence is cut into chunks of C >= window positions.
The keys of the neighbouring chunks (the previous one, and the next one when not causal) are scored directly: softmax
terms inside the window, linear terms outside it. Every farther chunk enters through the sum of its phi_k^T v and
phi_k (prefix sums over chunks, and suffix sums when not causal), as in chunked linear attention. Autograd,
forward-mode AD and torch.compile differentiate and fuse it as written; there is no Triton kernel for it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hhfft.kernels.linear_attention.naive import DEN_FLOOR

__all__ = ["hedgehog_window_attention", "MIN_CHUNK"]

MIN_CHUNK = 64  # chunks shorter than this make many small products and (L / C) states of F x Dv per head


def _shift(x: Tensor, by: int, dim: int) -> Tensor:
    """Chunk c of the result is chunk c + by of x (zeros/False outside the sequence), along the chunk axis ``dim``."""
    n = x.shape[dim]
    if by == 0:
        return x
    if abs(by) >= n:
        return torch.zeros_like(x)
    pad = torch.zeros_like(x.narrow(dim, 0, abs(by)))
    if by > 0:
        return torch.cat([x.narrow(dim, by, n - by), pad], dim)
    return torch.cat([pad, x.narrow(dim, 0, n + by)], dim)


def hedgehog_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    mix: Tensor,
    *,
    kind: str = "softmax_split",
    window: int,
    causal: bool,
    key_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Sliding-window softmax + Hedgehog linear attention.

    Args:
        q: [B, Hq, L, D]; k: [B, Hkv, L, D]; v: [B, Hkv, L, Dv] (Hq a multiple of Hkv; no repeated K/V is made)
        wq, bq, wk, bk: the Hedgehog feature maps' weights and biases (as in ``hedgehog_linear_attention``)
        mix: [Hq], the logit of the softmax terms' share f
        kind: the feature map kind; window: w >= 1 (keys with |i - j| < w get softmax terms)
        causal: key j is seen by query i only if j <= i; key_mask: [B, L] bool (True = keep) or None
        scale: of q . k in the softmax terms (None = 1 / sqrt(D), as SDPA)
    Returns:
        o: [B, Hq, L, Dv] in v's dtype; computed in fp32 (fp64 for fp64 inputs)

    Example:
        >>> from hhfft.nn import HedgehogFeatureMap
        >>> fq, fk = HedgehogFeatureMap(4, 8), HedgehogFeatureMap(2, 8)
        >>> q, k, v = torch.randn(1, 4, 100, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 16)
        >>> hedgehog_window_attention(q, k, v, fq.weight, fq.bias, fk.weight, fk.bias, torch.zeros(4), window=16,
        ...                           causal=True).shape
        torch.Size([1, 4, 100, 16])
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"hedgehog_window_attention: window must be an int >= 1, got {window!r}")
    if Hq % Hkv or k.shape[2] != L or v.shape[:3] != k.shape[:3] or tuple(mix.shape) != (Hq,):
        raise ValueError(f"hedgehog_window_attention: expected q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] "
                         f"with Hq a multiple of Hkv and mix [Hq]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, mix {tuple(mix.shape)}")
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores and states, also inside a bf16 autocast region
        return _window_attention(q, k, v, wq, bq, wk, bk, mix, kind, window, causal, key_mask, scale)


def _window_attention(q, k, v, wq, bq, wk, bk, mix, kind, window, causal, key_mask, scale) -> Tensor:
    from hhfft.lowering.linear_attention import _project
    from hhfft.nn.hedgehog import feature_map

    B, Hq, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    keep = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    if key_mask is not None:  # a masked key is nothing: no NaN * 0 in the map's gradients
        k = torch.where(keep[:, None, :, None], k, 0)
    pq = feature_map(_project(q.to(ct), wq.to(ct), None if bq is None else bq.to(ct)), kind)
    pk = feature_map(_project(k.to(ct), wk.to(ct), None if bk is None else bk.to(ct)), kind)

    C = max(window, MIN_CHUNK) if L > window else L
    n = -(-L // C)
    pad = n * C - L

    def padded(x: Tensor, dim: int) -> Tensor:  # zeros (False) after the last position (cat: L may be symbolic)
        if not pad:
            return x
        shape = list(x.shape)
        shape[dim] = pad
        return torch.cat([x, x.new_zeros(shape)], dim)

    def chunks(x: Tensor, group: int) -> Tensor:  # [B, H, L, X] -> [B, Hkv, group, n, C, X]
        return padded(x, 2).reshape(B, Hkv, group, n, C, x.shape[-1])

    g = Hq // Hkv
    qc, pqc = chunks(q.to(ct), g), chunks(pq, g)
    kc, vc, pkc = chunks(k.to(ct), 1), chunks(v.to(ct), 1), chunks(pk, 1)
    keepc = padded(keep, 1).reshape(B, 1, 1, n, C)

    # the neighbouring chunks' keys, scored directly: [B, Hkv, 1, n, M, X] with M = len(offsets) * C
    offsets = (-1, 0) if causal else (-1, 0, 1)
    def near(x: Tensor, dim: int = -3) -> Tensor:  # dim: the chunk axis; the positions axis follows it
        return torch.cat([_shift(x, o, dim) for o in offsets], dim=dim + 1)

    kn, vn, pkn = near(kc), near(vc), near(pkc)
    keepn = near(keepc, dim=-2)
    rel = torch.arange(C, device=q.device)[:, None] - (torch.arange(len(offsets) * C, device=q.device)[None, :]
                                                       + offsets[0] * C)  # query position - key position
    visible = keepn[..., None, :] & ((rel >= 0) if causal else torch.ones_like(rel, dtype=torch.bool))
    inside = rel.abs() < window
    soft, lin = visible & inside, visible & ~inside  # [B, 1, 1, n, C, M]

    s = (qc @ kn.transpose(-1, -2)) * scale
    m = s.masked_fill(~soft, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(soft, torch.exp(s - m), 0)
    a = torch.where(lin, pqc @ pkn.transpose(-1, -2), 0)

    # the farther chunks through their states: chunks <= c - 2 (and >= c + 2 when not causal)
    kv = (pkc * keepc[..., None]).transpose(-1, -2) @ vc  # [B, Hkv, 1, n, F, Dv]
    z = (pkc * keepc[..., None]).sum(-2)  # [B, Hkv, 1, n, F]
    far_kv, far_z = _shift(kv.cumsum(3), -2, 3), _shift(z.cumsum(3), -2, 3)
    if not causal:
        far_kv = far_kv + _shift(kv.flip(3).cumsum(3).flip(3), 2, 3)
        far_z = far_z + _shift(z.flip(3).cumsum(3).flip(3), 2, 3)

    f = torch.sigmoid(mix.to(ct)).reshape(1, Hkv, g, 1, 1, 1)
    num = f * (e @ vn) + (1 - f) * (a @ vn + pqc @ far_kv)
    den = f * e.sum(-1, keepdim=True) + (1 - f) * (a.sum(-1, keepdim=True) + pqc @ far_z[..., None])
    o = num / den.clamp_min(DEN_FLOOR)
    return o.reshape(B, Hq, n * C, Dv)[:, :, :L].to(v.dtype)
