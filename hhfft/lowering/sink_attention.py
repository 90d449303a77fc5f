"""Hedgehog attention with softmax attention sinks (``HedgehogConfig(sinks=n)``).

The first n keys of the sequence (BERT's [CLS], a decoder's first token) take a large share of softmax attention in
trained models: 45-53% of it in layers 1-4 of all-MiniLM-L6-v2 on short sentences. Here these keys get exact
softmax terms, and every other key Hedgehog's linear terms, in one normalisation. A learned per-query
log-normaliser lam_i = q_i . u + beta (per head; ``lse`` = [u, beta]) puts the linear terms on the scale of
exp(q . k * scale), so the sinks' share follows their own scores (the formula is in
``hhfft/kernels/linear_attention/naive.py``, the reference this is tested against). On MiniLM it lowers the
attention-transfer loss but not the embeddings' error (benchmarks/RESULTS.md, twelfth session).

Cost: the linear part is ``hedgehog_linear_attention`` on the non-sink keys (the Triton kernels on CUDA), which
also gives its denominator; the sinks add n scores per query. Time and memory stay linear in L.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from hhfft.kernels.linear_attention.naive import DEN_FLOOR

__all__ = ["hedgehog_sink_attention"]


def hedgehog_sink_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    lse: Tensor,
    *,
    kind: str = "softmax_split",
    sinks: int,
    causal: bool,
    key_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Softmax over the first ``sinks`` keys + Hedgehog linear attention over the others.

    Args:
        q: [B, Hq, L, D]; k: [B, Hkv, L, D]; v: [B, Hkv, L, Dv] (Hq a multiple of Hkv; no repeated K/V is made)
        wq, bq, wk, bk: the Hedgehog feature maps' weights and biases (as in ``hedgehog_linear_attention``)
        lse: [Hq, D + 1], the log-normaliser's weights u (first D columns) and bias beta (last column)
        kind: the feature map kind; sinks: n >= 1 (keys at positions < n get softmax terms)
        causal: key j is seen by query i only if j <= i; key_mask: [B, L] bool (True = keep) or None
        scale: of q . k in the softmax terms (None = 1 / sqrt(D), as SDPA)
    Returns:
        o: [B, Hq, L, Dv] in v's dtype; computed in fp32 (fp64 for fp64 inputs)

    Example:
        >>> from hhfft.nn import HedgehogFeatureMap
        >>> fq, fk = HedgehogFeatureMap(4, 8), HedgehogFeatureMap(2, 8)
        >>> q, k, v = torch.randn(1, 4, 100, 8), torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 16)
        >>> hedgehog_sink_attention(q, k, v, fq.weight, fq.bias, fk.weight, fk.bias, torch.zeros(4, 9), sinks=1,
        ...                         causal=True).shape
        torch.Size([1, 4, 100, 16])
    """
    from hhfft.lowering.linear_attention import hedgehog_linear_attention

    B, Hq, L, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 1:
        raise ValueError(f"hedgehog_sink_attention: sinks must be an int >= 1, got {sinks!r}")
    if Hq % Hkv or k.shape[2] != L or v.shape[:3] != k.shape[:3] or tuple(lse.shape) != (Hq, D + 1):
        raise ValueError(f"hedgehog_sink_attention: expected q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] "
                         f"with Hq a multiple of Hkv and lse [Hq, D + 1]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, lse {tuple(lse.shape)}")
    pos = torch.arange(L, device=q.device)
    keep = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    o_lin, den = hedgehog_linear_attention(q, k, v, wq, bq, wk, bk, kind=kind, causal=causal,
                                           key_mask=keep & (pos >= sinks), with_den=True)
    with torch.autocast(q.device.type, enabled=False):  # fp32 scores, also inside a bf16 autocast region
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        g = Hq // Hkv
        qc = q.to(ct)
        qf = qc.reshape(B, Hkv, g, L, D)
        seen = keep[:, None, None, None, :sinks]  # [B, 1, 1, 1, n]; n = min(sinks, L)
        # a masked sink is nothing: zeros, so that NaN in padding reaches neither o nor the gradients
        ks, vs = (torch.where(keep[:, None, :sinks, None], x[:, :, :sinks].to(ct), 0)[:, :, None] for x in (k, v))
        s = (qf @ ks.transpose(-1, -2)) * scale  # [B, Hkv, g, L, n]
        if causal:
            seen = seen & (pos[:sinks][None, :] <= pos[:, None])
        lam = torch.einsum("bhld,hd->bhl", qc, lse[:, :D].to(ct)) + lse[:, D].to(ct)[None, :, None]
        den = den.to(ct)
        lin_logit = torch.where(den > 0, lam + torch.log(den.clamp_min(torch.finfo(ct).tiny)), float("-inf"))
        lin_logit = lin_logit.reshape(B, Hkv, g, L, 1)
        m = torch.maximum(s.masked_fill(~seen, float("-inf")).amax(-1, keepdim=True), lin_logit)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # o does not depend on m
        e = torch.where(seen, torch.exp(s - m), 0)
        f = torch.exp(lin_logit - m)  # the linear terms' total weight, exp(lam + log den - m)
        num = e @ vs + f * o_lin.to(ct).reshape(B, Hkv, g, L, Dv)
        o = num / (e.sum(-1, keepdim=True) + f).clamp_min(DEN_FLOOR)
    return o.reshape(B, Hq, L, Dv).to(v.dtype)
