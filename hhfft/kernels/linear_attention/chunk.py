"""Chunked linear attention in Triton: forward and backward, causal and non-causal, GQA and key masks.

Kernels (README.md has the maths), chunk size BT, feature dim F, value dim D:
    linear_attention_state_fwd_kernel  h_t = sum_{m<t} K_m^T V_m, z_t = sum_{m<t} K_m^T 1 (fp32), one pass over the
                                       chunks per (head, F-tile, D-tile); non-causal: the totals only
    linear_attention_fwd_kernel        per chunk: o = (tril(Q K^T) V + Q h_t) / (tril(Q K^T) 1 + Q z_t)
    linear_attention_bwd_dq_kernel     per chunk: dq = tril(G V^T + s 1^T) K + G h_t^T + s z_t^T; stores s
    linear_attention_state_bwd_kernel  reverse pass: dh_t = sum_{m>t} Q_m^T G_m, dz_t = sum_{m>t} Q_m^T s_m,
                                       summed over the query heads of each GQA group
    linear_attention_bwd_dkdv_kernel   per chunk: dk = tril(G V^T + s)^T Q + V dh_t^T + dz_t, dv = tril(Q K^T)^T G + K dh_t
with G = dO / den and s = dden - rowsum(dO * O) / den. Queries of head h read key/value head h // (Hq / Hkv).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["linear_attention_fwd", "linear_attention_bwd"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(warps=(4, 8), stages=(2, 3)):
    if _INTERPRET:  # autotune's benchmarker needs a GPU driver
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.autotune(configs=_configs(warps=(2, 4), stages=(2, 3, 4)), key=["F", "D", "BK", "BV", "CAUSAL"])
@triton.jit
def linear_attention_state_fwd_kernel(
    k, v, mask, h, z,
    L, NT, F, D, Hkv,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
):
    i_kv, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NV = tl.cdiv(D, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_b = i_bh // Hkv
    NS = NT if CAUSAL else 1
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < D
    p_k, p_v = k + i_bh * L * F, v + i_bh * L * D
    p_h = h + i_bh * NS * F * D + o_k[:, None] * D + o_v[None, :]
    p_z = z + i_bh * NS * F + o_k
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    for i_t in range(NT):
        if CAUSAL:
            tl.store(p_h + i_t * F * D, b_h, mask=m_k[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(p_z + i_t * F, b_z, mask=m_k)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        if HAS_MASK:
            m_t = m_t & (tl.load(mask + i_b * L + o_t, mask=o_t < L, other=0) != 0)
        b_k = tl.load(p_k + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)  # [BT, BK]
        b_v = tl.load(p_v + o_t[:, None] * D + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)  # [BT, BV]
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
        b_z += tl.sum(b_k.to(tl.float32), 0)
    if not CAUSAL:
        tl.store(p_h, b_h, mask=m_k[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(p_z, b_z, mask=m_k)


@triton.autotune(configs=_configs(), key=["F", "D", "BK", "BV", "CAUSAL"])
@triton.jit
def linear_attention_fwd_kernel(
    q, k, v, mask, h, z, o, den,
    L, NT, F, D, Hq, G,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, PREC_STATE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hq
    i_kvh = i_bh // G  # = i_b * Hkv + (i_bh % Hq) // G
    NS = NT if CAUSAL else 1
    i_s = i_t if CAUSAL else 0
    o_t = i_t * BT + tl.arange(0, BT)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < F, o_v < D
    b_q = tl.load(q + i_bh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
    b_h = tl.load(h + (i_kvh * NS + i_s) * F * D + o_k[:, None] * D + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
    b_z = tl.load(z + (i_kvh * NS + i_s) * F + o_k, mask=m_k, other=0)
    b_o = tl.dot(b_q.to(tl.float32), b_h, input_precision=PREC_STATE)  # [BT, BV]
    b_d = tl.sum(b_q.to(tl.float32) * b_z[None, :], 1)  # [BT]
    if CAUSAL:
        m_j = m_t
        if HAS_MASK:
            m_j = m_j & (tl.load(mask + i_b * L + o_t, mask=m_t, other=0) != 0)
        b_k = tl.load(k + i_kvh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0)
        b_v = tl.load(v + i_kvh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT, BT]
        b_A = tl.where((o_t[:, None] >= o_t[None, :]) & m_j[None, :], b_A, 0)
        b_o += tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)
        b_d += tl.sum(b_A, 1)
    b_ds = tl.where(b_d == 0, 1, b_d)
    tl.store(o + i_bh * L * D + o_t[:, None] * D + o_v[None, :], (b_o / b_ds[:, None]).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])
    tl.store(den + i_bh * L + o_t, b_d, mask=m_t)


@triton.autotune(configs=_configs(), key=["F", "D", "BK", "BV", "CAUSAL"])
@triton.jit
def linear_attention_bwd_dq_kernel(
    k, v, mask, h, z, o, den, do, dden, dq, s,
    L, NT, F, D, Hq, G,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, PREC_STATE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hq
    i_kvh = i_bh // G
    NS = NT if CAUSAL else 1
    i_s = i_t if CAUSAL else 0
    o_t = i_t * BT + tl.arange(0, BT)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < F, o_v < D
    p_ov = i_bh * L * D + o_t[:, None] * D + o_v[None, :]
    m_ov = m_t[:, None] & m_v[None, :]
    b_do = tl.load(do + p_ov, mask=m_ov, other=0).to(tl.float32)  # [BT, BV]
    b_o = tl.load(o + p_ov, mask=m_ov, other=0).to(tl.float32)
    b_den = tl.load(den + i_bh * L + o_t, mask=m_t, other=1)
    b_den = tl.where(b_den == 0, 1, b_den)
    b_g = b_do / b_den[:, None]
    b_s = tl.load(dden + i_bh * L + o_t, mask=m_t, other=0) - tl.sum(b_do * b_o, 1) / b_den  # [BT]
    tl.store(s + i_bh * L + o_t, b_s, mask=m_t)
    b_h = tl.load(h + (i_kvh * NS + i_s) * F * D + o_k[:, None] * D + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
    b_z = tl.load(z + (i_kvh * NS + i_s) * F + o_k, mask=m_k, other=0)
    b_dq = tl.dot(b_g, tl.trans(b_h), input_precision=PREC_STATE) + b_s[:, None] * b_z[None, :]  # [BT, BK]
    if CAUSAL:
        m_j = m_t
        if HAS_MASK:
            m_j = m_j & (tl.load(mask + i_b * L + o_t, mask=m_t, other=0) != 0)
        b_k = tl.load(k + i_kvh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0)
        b_v = tl.load(v + i_kvh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
        b_P = tl.dot(b_g.to(b_v.dtype), tl.trans(b_v), input_precision=PREC) + b_s[:, None]  # [BT, BT]
        b_P = tl.where((o_t[:, None] >= o_t[None, :]) & m_j[None, :], b_P, 0)
        b_dq += tl.dot(b_P.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(dq + i_bh * L * F + o_t[:, None] * F + o_k[None, :], b_dq.to(dq.dtype.element_ty),
             mask=m_t[:, None] & m_k[None, :])


@triton.autotune(configs=_configs(warps=(2, 4), stages=(2, 3, 4)), key=["F", "D", "BK", "BV", "CAUSAL"])
@triton.jit
def linear_attention_state_bwd_kernel(
    q, do, den, s, dh, dz,
    L, NT, F, D, G,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr,
):
    i_kv, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # i_bh over B * Hkv
    NV = tl.cdiv(D, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    NS = NT if CAUSAL else 1
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < D
    p_dh = dh + i_bh * NS * F * D + o_k[:, None] * D + o_v[None, :]
    p_dz = dz + i_bh * NS * F + o_k
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK], dtype=tl.float32)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        if CAUSAL:
            tl.store(p_dh + i_t * F * D, b_dh, mask=m_k[:, None] & m_v[None, :])
            if i_v == 0:
                tl.store(p_dz + i_t * F, b_dz, mask=m_k)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        for i_g in range(G):
            i_qh = i_bh * G + i_g
            b_q = tl.load(q + i_qh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            b_do = tl.load(do + i_qh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
            b_den = tl.load(den + i_qh * L + o_t, mask=m_t, other=1)
            b_den = tl.where(b_den == 0, 1, b_den)
            b_s = tl.load(s + i_qh * L + o_t, mask=m_t, other=0)
            b_g = (b_do.to(tl.float32) / b_den[:, None]).to(b_q.dtype)
            b_dh += tl.dot(tl.trans(b_q), b_g, input_precision=PREC)  # [BK, BV]
            b_dz += tl.sum(b_q.to(tl.float32) * b_s[:, None], 0)
    if not CAUSAL:
        tl.store(p_dh, b_dh, mask=m_k[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(p_dz, b_dz, mask=m_k)


@triton.autotune(configs=_configs(), key=["F", "D", "BK", "BV", "CAUSAL"])
@triton.jit
def linear_attention_bwd_dkdv_kernel(
    q, k, v, mask, den, do, s, dh, dz, dk, dv,
    L, NT, F, D, Hkv, G,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, PREC_STATE: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # i_bh over B * Hkv
    i_b = i_bh // Hkv
    NS = NT if CAUSAL else 1
    i_s = i_t if CAUSAL else 0
    o_t = i_t * BT + tl.arange(0, BT)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < F, o_v < D
    m_j = m_t
    if HAS_MASK:
        m_j = m_j & (tl.load(mask + i_b * L + o_t, mask=m_t, other=0) != 0)
    b_k = tl.load(k + i_bh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0)
    b_v = tl.load(v + i_bh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
    b_dh = tl.load(dh + (i_bh * NS + i_s) * F * D + o_k[:, None] * D + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0)
    b_dz = tl.load(dz + (i_bh * NS + i_s) * F + o_k, mask=m_k, other=0)
    b_dk = tl.dot(b_v.to(tl.float32), tl.trans(b_dh), input_precision=PREC_STATE) + b_dz[None, :]  # [BT, BK]
    b_dv = tl.dot(b_k.to(tl.float32), b_dh, input_precision=PREC_STATE)  # [BT, BV]
    if CAUSAL:
        m_ij = o_t[:, None] >= o_t[None, :]
        for i_g in range(G):
            i_qh = i_bh * G + i_g
            b_q = tl.load(q + i_qh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            b_do = tl.load(do + i_qh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
            b_den = tl.load(den + i_qh * L + o_t, mask=m_t, other=1)
            b_den = tl.where(b_den == 0, 1, b_den)
            b_s = tl.load(s + i_qh * L + o_t, mask=m_t, other=0)
            b_g = (b_do.to(tl.float32) / b_den[:, None]).to(b_v.dtype)  # [BT, BV]
            b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT(i), BT(j)]
            b_A = tl.where(m_ij, b_A, 0)
            b_dv += tl.dot(tl.trans(b_A.to(b_g.dtype)), b_g, input_precision=PREC)
            b_P = tl.dot(b_g, tl.trans(b_v), input_precision=PREC) + b_s[:, None]  # [BT(i), BT(j)]
            b_P = tl.where(m_ij, b_P, 0)
            b_dk += tl.dot(tl.trans(b_P.to(b_q.dtype)), b_q, input_precision=PREC)
    b_dk = tl.where(m_j[:, None], b_dk, 0)
    b_dv = tl.where(m_j[:, None], b_dv, 0)
    tl.store(dk + i_bh * L * F + o_t[:, None] * F + o_k[None, :], b_dk.to(dk.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
    tl.store(dv + i_bh * L * D + o_t[:, None] * D + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


# ------------------------------------------------------------------------------------------------------------- host
BT = 64


def _launcher(kernel):
    """wrap_triton so that Inductor sees the kernel inside a triton_op; the interpreter's kernels are launched as is."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JIT/interpreted function
    if _INTERPRET or isinstance(fn, InterpretedFunction):
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _precisions(dtype: torch.dtype) -> Tuple[str, str]:
    """(dot precision for products of inputs, for products with the fp32 states). fp32 inputs: exact fp32 dots."""
    if dtype == torch.float32:
        return "ieee", "ieee"
    return "tf32", "tf32"


def _tiles(F: int, D: int, n_heads: int) -> Tuple[int, int]:
    """Tiles of the sequential state passes: smaller tiles when there are few heads, so the GPU has enough programs."""
    t = 32 if n_heads < 64 else 64
    return min(t, _block(F)), min(t, _block(D))


def _block(n: int) -> int:
    """A block covering n: a power of two, at least 16 (the smallest tl.dot operand the GPU compiler accepts)."""
    return max(16, triton.next_power_of_2(n))


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[int, int, int, int, int, int]:
    B, Hq, L, F = q.shape
    Hkv, D = k.shape[1], v.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"linear_attention (Triton): phi_q, phi_k, v must share one of fp16/bf16/fp32, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if F > 256 or D > 256:
        raise ValueError(f"linear_attention (Triton): F and D must be <= 256, got F={F}, D={D}; split the heads")
    return B, Hq, Hkv, L, F, D


def _new(ref: torch.Tensor, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (tests poison it with NaN)."""
    return ref.new_empty(*shape, dtype=dtype or ref.dtype)


def _mask_arg(key_mask: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    if key_mask is None:
        return ref.new_empty(1, dtype=torch.uint8)
    return key_mask.contiguous().view(torch.uint8)


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: q [B, Hq, L, F], k [B, Hkv, L, F], v [B, Hkv, L, D], key_mask [B, L] bool or None ->
    (o [B, Hq, L, D] in v's dtype, den [B, Hq, L] fp32)."""
    B, Hq, Hkv, L, F, D = _check(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    NT = triton.cdiv(L, BT)
    NS = NT if causal else 1
    BK, BV = _block(F), _block(D)
    BKS, BVS = _tiles(F, D, B * Hkv)
    prec, prec_state = _precisions(q.dtype)
    m = _mask_arg(key_mask, q)
    h = _new(q, B, Hkv, NS, F, D, dtype=torch.float32)
    z = _new(q, B, Hkv, NS, F, dtype=torch.float32)
    o = _new(v, B, Hq, L, D)
    den = _new(q, B, Hq, L, dtype=torch.float32)
    _launcher(linear_attention_state_fwd_kernel)[(triton.cdiv(F, BKS) * triton.cdiv(D, BVS), B * Hkv)](
        k, v, m, h, z, L, NT, F, D, Hkv,
        BT=BT, BK=BKS, BV=BVS, CAUSAL=causal, HAS_MASK=key_mask is not None, PREC=prec,
    )
    _launcher(linear_attention_fwd_kernel)[(NT, B * Hq)](
        q, k, v, m, h, z, o, den, L, NT, F, D, Hq, Hq // Hkv,
        BT=BT, BK=BK, BV=BV, CAUSAL=causal, HAS_MASK=key_mask is not None, PREC=prec, PREC_STATE=prec_state,
    )
    return o, den


def linear_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    den: torch.Tensor,
    do: torch.Tensor,
    dden: torch.Tensor,
    causal: bool,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of (o, den) = linear_attention_fwd(...): do [B, Hq, L, D], dden [B, Hq, L] -> (dq, dk, dv) in the
    dtypes of q, k, v. The forward states are recomputed (one pass), not stored."""
    B, Hq, Hkv, L, F, D = _check(q, k, v)
    q, k, v, o, do = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous(), do.contiguous().to(v.dtype)
    den, dden = den.contiguous().float(), dden.contiguous().float()
    NT = triton.cdiv(L, BT)
    NS = NT if causal else 1
    G = Hq // Hkv
    BK, BV = _block(F), _block(D)
    BKS, BVS = _tiles(F, D, B * Hkv)
    prec, prec_state = _precisions(q.dtype)
    has_mask = key_mask is not None
    m = _mask_arg(key_mask, q)
    h = _new(q, B, Hkv, NS, F, D, dtype=torch.float32)
    z = _new(q, B, Hkv, NS, F, dtype=torch.float32)
    dh = _new(q, B, Hkv, NS, F, D, dtype=torch.float32)
    dz = _new(q, B, Hkv, NS, F, dtype=torch.float32)
    s = _new(q, B, Hq, L, dtype=torch.float32)
    dq, dk, dv = _new(q, *q.shape), _new(k, *k.shape), _new(v, *v.shape)
    n_tiles = triton.cdiv(F, BKS) * triton.cdiv(D, BVS)
    _launcher(linear_attention_state_fwd_kernel)[(n_tiles, B * Hkv)](
        k, v, m, h, z, L, NT, F, D, Hkv,
        BT=BT, BK=BKS, BV=BVS, CAUSAL=causal, HAS_MASK=has_mask, PREC=prec,
    )
    _launcher(linear_attention_bwd_dq_kernel)[(NT, B * Hq)](
        k, v, m, h, z, o, den, do, dden, dq, s, L, NT, F, D, Hq, G,
        BT=BT, BK=BK, BV=BV, CAUSAL=causal, HAS_MASK=has_mask, PREC=prec, PREC_STATE=prec_state,
    )
    _launcher(linear_attention_state_bwd_kernel)[(n_tiles, B * Hkv)](
        q, do, den, s, dh, dz, L, NT, F, D, G,
        BT=BT, BK=BKS, BV=BVS, CAUSAL=causal, PREC=prec,
    )
    _launcher(linear_attention_bwd_dkdv_kernel)[(NT, B * Hkv)](
        q, k, v, m, den, do, s, dh, dz, dk, dv, L, NT, F, D, Hkv, G,
        BT=BT, BK=BK, BV=BV, CAUSAL=causal, HAS_MASK=has_mask, PREC=prec, PREC_STATE=prec_state,
    )
    return dq, dk, dv
