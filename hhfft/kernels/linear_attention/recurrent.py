"""Recurrent (decoding) step of causal linear attention in Triton: O(F D) per token and head, a constant-size state.

For one new token with features phi_q [Hq, F], phi_k [Hkv, F] and value v [Hkv, D], per key/value head:
    S += phi_k^T v   [F, D]      z += phi_k   [F]        (fp32, updated in place)
    o_h = phi_q_h S / max(phi_q_h . z, DEN_FLOOR)   for the G query heads h of the group   (naive.py's floor)
which equals row L of the chunked/quadratic forms over the whole prefix.

One program per (sequence, key/value head) holds the whole [F, D] state in registers: it reads S once, writes it
once, and serves the G query heads of its group from the updated tile (GQA without repeating K/V). A tiling of D
over several programs would race on z (each program must see z before the update, and one of them writes it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hhfft.kernels.linear_attention.naive import DEN_FLOOR

__all__ = ["linear_attention_step_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DEN_FLOOR = tl.constexpr(DEN_FLOOR)  # o = num / max(den, DEN_FLOOR), as in naive.py


@triton.jit
def linear_attention_step_kernel(
    q, k, v, keep, state, norm, o,
    F, D, G, Hkv,
    BK: tl.constexpr, BV: tl.constexpr, HAS_MASK: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)  # over B * Hkv
    i_b = i_bh // Hkv
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < D
    m_kk, m_vk = m_k, m_v
    if HAS_MASK:
        b_keep = tl.load(keep + i_b) != 0
        m_kk, m_vk = m_k & b_keep, m_v & b_keep
    b_k = tl.load(k + i_bh * F + o_k, mask=m_kk, other=0).to(tl.float32)  # [BK]
    b_v = tl.load(v + i_bh * D + o_v, mask=m_vk, other=0).to(tl.float32)  # [BV]
    m_s = m_k[:, None] & m_v[None, :]
    p_s = state + i_bh * F * D + o_k[:, None] * D + o_v[None, :]
    b_s = tl.load(p_s, mask=m_s, other=0) + b_k[:, None] * b_v[None, :]  # [BK, BV]
    b_z = tl.load(norm + i_bh * F + o_k, mask=m_k, other=0) + b_k  # [BK]
    tl.store(p_s, b_s, mask=m_s)
    tl.store(norm + i_bh * F + o_k, b_z, mask=m_k)
    for i_g in range(G):
        i_qh = i_bh * G + i_g
        b_q = tl.load(q + i_qh * F + o_k, mask=m_k, other=0).to(tl.float32)  # [BK]
        b_num = tl.sum(b_q[:, None] * b_s, 0)  # [BV]
        b_den = tl.sum(b_q * b_z, 0)
        b_den = tl.maximum(b_den, _DEN_FLOOR)
        tl.store(o + i_qh * D + o_v, (b_num / b_den).to(o.dtype.element_ty), mask=m_v)


def linear_attention_step_triton(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, normalizer: torch.Tensor,
    keep: torch.Tensor | None = None, *, wrap: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step on CUDA (or the Triton interpreter).

    Args:
        phi_q: [B, Hq, F]; phi_k: [B, Hkv, F]; v: [B, Hkv, D]; Hq a multiple of Hkv; F, D <= 256
        state: [B, Hkv, F, D] fp32, contiguous; normalizer: [B, Hkv, F] fp32, contiguous (both updated in place)
        keep: [B] bool or None (False: this token is padding, the state is left as it is)
        wrap: launch through ``torch.library.wrap_triton`` (inside a ``triton_op``); False for a plain launch
        out: [B, Hq, D] buffer to write o into (default: a new tensor in v's dtype)
    Returns:
        o: [B, Hq, D]
    """
    B, Hq, F = phi_q.shape
    Hkv, D = phi_k.shape[1], v.shape[-1]
    if tuple(phi_k.shape) != (B, Hkv, F) or tuple(v.shape) != (B, Hkv, D) or Hq % Hkv:
        raise ValueError("linear_attention_step_triton: expected phi_q [B, Hq, F], phi_k [B, Hkv, F], v [B, Hkv, D] "
                         f"with Hq a multiple of Hkv; got {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}")
    if state.dtype != torch.float32 or normalizer.dtype != torch.float32 or not state.is_contiguous() \
            or not normalizer.is_contiguous():
        raise TypeError("linear_attention_step_triton: state and normalizer must be contiguous fp32 tensors, got "
                        f"{state.dtype} (contiguous: {state.is_contiguous()}) and {normalizer.dtype} (contiguous: "
                        f"{normalizer.is_contiguous()}); pass state.float().contiguous()")
    if tuple(state.shape) != (B, Hkv, F, D) or tuple(normalizer.shape) != (B, Hkv, F):
        raise ValueError(f"linear_attention_step_triton: state must be [B, Hkv, F, D] = {[B, Hkv, F, D]} and "
                         f"normalizer [B, Hkv, F] = {[B, Hkv, F]}, got {list(state.shape)} and "
                         f"{list(normalizer.shape)}")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (B,)):
        raise ValueError(f"linear_attention_step_triton: keep must be a bool tensor [B] = [{B}], got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    if out is not None and (tuple(out.shape) != (B, Hq, D) or not out.is_contiguous()):
        raise ValueError(f"linear_attention_step_triton: out must be a contiguous [B, Hq, D] = {[B, Hq, D]} tensor, "
                         f"got {tuple(out.shape)} (contiguous: {out.is_contiguous()})")
    if F > 256 or D > 256:
        raise ValueError(f"linear_attention_step_triton: F and D must be <= 256 (the whole [F, D] state is one tile), "
                         f"got F={F}, D={D}; use hhfft.lowering.decode.linear_attention_decode, which falls back to "
                         "PyTorch there")
    # blocks of at least 64, as chunk.py's _MIN_BLOCK (masks cover the padding): on the H200 the 32-wide tile
    # (F = 32, D = 128, G = 4, fp32) gave wrong outputs from the second step on; its sm_90 PTX reads correctly, the
    # 64-wide tiles passed every case
    BK = max(64, triton.next_power_of_2(F))
    BV = max(64, triton.next_power_of_2(D))
    o = v.new_empty(B, Hq, D) if out is None else out
    # a copy, not a dtype view: Inductor cannot lower a bool -> uint8 view (see chunk._mask_arg)
    k_arg = keep.to(torch.uint8) if keep is not None else phi_q.new_empty(1, dtype=torch.uint8)
    kernel = linear_attention_step_kernel
    if wrap and not _INTERPRET:
        from torch.library import wrap_triton

        kernel = wrap_triton(kernel)
    kernel[(B * Hkv,)](
        phi_q.contiguous(), phi_k.contiguous(), v.contiguous(), k_arg, state, normalizer, o, F, D, Hq // Hkv, Hkv,
        BK=BK, BV=BV, HAS_MASK=keep is not None, num_warps=4 if BK * BV <= 8192 else 8,
    )
    return o
