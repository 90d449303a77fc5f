"""Recurrent (decoding) step of causal linear attention in Triton: O(F D) per token and head, a constant-size state.

For one new token with features phi_q [Hq, F], phi_k [Hkv, F] and value v [Hkv, D], per key/value head:
    S += phi_k^T v   [F, D]      z += phi_k   [F]        (fp32, updated in place)
    o_h = phi_q_h S / (phi_q_h . z)   for the G query heads h of the group   (0 where the denominator is 0)
which equals row L of the chunked/quadratic forms over the whole prefix.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["linear_attention_step_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def linear_attention_step_kernel(
    q, k, v, keep, state, norm, o,
    F, D, G, Hkv,
    BK: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # i_bh over B * Hkv
    i_b = i_bh // Hkv
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < D
    m_kk, m_vk = m_k, m_v
    if HAS_MASK:
        b_keep = tl.load(keep + i_b) != 0
        m_kk, m_vk = m_k & b_keep, m_v & b_keep
    b_k = tl.load(k + i_bh * F + o_k, mask=m_kk, other=0).to(tl.float32)  # [BK]
    b_v = tl.load(v + i_bh * D + o_v, mask=m_vk, other=0).to(tl.float32)  # [BV]
    p_s = state + i_bh * F * D + o_k[:, None] * D + o_v[None, :]
    b_s = tl.load(p_s, mask=m_k[:, None] & m_v[None, :], other=0) + b_k[:, None] * b_v[None, :]  # [BK, BV]
    b_z = tl.load(norm + i_bh * F + o_k, mask=m_k, other=0) + b_k  # [BK]
    tl.store(p_s, b_s, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(norm + i_bh * F + o_k, b_z, mask=m_k)
    for i_g in range(G):
        i_qh = i_bh * G + i_g
        b_q = tl.load(q + i_qh * F + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        b_num = tl.sum(b_q[:, None] * b_s, 0)  # [BV]
        b_den = tl.sum(b_q * b_z, 0)
        b_den = tl.where(b_den == 0, 1, b_den)
        tl.store(o + i_qh * D + o_v, (b_num / b_den).to(o.dtype.element_ty), mask=m_v)


def linear_attention_step_triton(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, normalizer: torch.Tensor,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """phi_q [B, Hq, F], phi_k [B, Hkv, F], v [B, Hkv, D], state [B, Hkv, F, D] fp32 and normalizer [B, Hkv, F] fp32
    (both updated in place), keep [B] bool or None (False: this token is padding, the state is left as is)
    -> o [B, Hq, D] in v's dtype."""
    B, Hq, F = phi_q.shape
    Hkv, D = phi_k.shape[1], v.shape[-1]
    if state.dtype != torch.float32 or normalizer.dtype != torch.float32 or not state.is_contiguous():
        raise TypeError("linear_attention_step: state and normalizer must be contiguous fp32 tensors "
                        f"[B, Hkv, F, D] and [B, Hkv, F], got {state.dtype} and {normalizer.dtype}")
    BK = max(16, triton.next_power_of_2(F))
    BV = min(32, max(16, triton.next_power_of_2(D)))
    o = v.new_empty(B, Hq, D)
    k_arg = keep.contiguous().view(torch.uint8) if keep is not None else phi_q.new_empty(1, dtype=torch.uint8)
    kernel = linear_attention_step_kernel
    if not _INTERPRET:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    kernel[(triton.cdiv(D, BV), B * Hkv)](
        phi_q.contiguous(), phi_k.contiguous(), v.contiguous(), k_arg, state, normalizer, o, F, D, Hq // Hkv, Hkv,
        BK=BK, BV=BV, HAS_MASK=keep is not None, PREC="ieee", num_warps=4,
    )
    return o
