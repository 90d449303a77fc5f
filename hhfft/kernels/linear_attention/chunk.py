"""Chunked linear attention in Triton: forward and backward, causal and non-causal, GQA and key masks.

Kernels (README.md has the maths), chunk size BT, feature dim F, value dim D:
    linear_attention_state_fwd_kernel  h_t = sum_{m<t} K_m^T V_m, z_t = sum_{m<t} K_m^T 1 (fp32) within a segment of
                                       chunks, one program per (F-tile, D-tile, head, segment), and each segment's
                                       total; non-causal: the totals only
    linear_attention_carry_kernel      in place: the segments' totals -> their carry-in (exclusive scan over segments)
    linear_attention_fwd_kernel        per chunk: o = (tril(Q K^T) V + Q h_t) / (tril(Q K^T) 1 + Q z_t)
    linear_attention_bwd_dq_kernel     per chunk: dq = tril(G V^T + s 1^T) K + G h_t^T + s z_t^T; stores s
    linear_attention_state_bwd_kernel  reverse pass: dh_t = sum_{m>t} Q_m^T G_m, dz_t = sum_{m>t} Q_m^T s_m,
                                       summed over the query heads of each GQA group, by segments likewise
    linear_attention_bwd_dkdv_kernel   per chunk: dk = tril(G V^T + s)^T Q + V dh_t^T + dz_t, dv = tril(Q K^T)^T G + K dh_t
    hedgehog_feature_map_fwd_kernel    phi = [f(y), f(-y)], y = x W + b (the fused op's default route, map)
    hedgehog_feature_map_bwd_kernel    dx = dy W^T per chunk; dW = x^T dy, db = sum dy over several chunks per program
with d = max(den, DEN_FLOOR), G = dO / d and s = dden - [den >= DEN_FLOOR] rowsum(dO * O) / d (naive.py's floor).
Queries of head h read key/value head h // (Hq / Hkv).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from hhfft.kernels.linear_attention.naive import DEN_FLOOR

__all__ = [
    "linear_attention_fwd", "linear_attention_bwd", "hedgehog_attention_fwd", "hedgehog_attention_bwd",
    "hedgehog_feature_map_fwd", "hedgehog_feature_map_bwd",
]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DEN_FLOOR = tl.constexpr(DEN_FLOOR)  # o = num / max(den, DEN_FLOOR), as in naive.py
# HHFFT_TRITON_AUTOTUNE=0: one config per kernel (test runs that compile many shapes and time nothing)
_AUTOTUNE = os.environ.get("HHFFT_TRITON_AUTOTUNE", "1") != "0"


def _configs(warps=(4, 8), stages=(2, 3)):
    if _INTERPRET:  # autotune's benchmarker needs a GPU driver
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if not _AUTOTUNE:
        return [triton.Config({}, num_warps=warps[0], num_stages=stages[0])]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot_x(a, b, PS: tl.constexpr):
    """a @ b in fp32 for a [M, K] in the inputs' dtype (exact there) and b [K, N] fp32. PS "split": b as hi + lo in
    a's dtype, two 16-bit dots (~16 significant bits, half the registers of tf32x3); else one dot at precision PS."""
    if PS == "split":
        b_hi = b.to(a.dtype)
        return tl.dot(a, (b - b_hi.to(tl.float32)).to(a.dtype), tl.dot(a, b_hi))
    else:
        return tl.dot(a.to(tl.float32), b, input_precision=PS)


@triton.jit
def _dot_xx(a, b, r, PS: tl.constexpr):
    """a @ b in fp32 for a [M, K] and b [K, N] both fp32; r is any block in the inputs' dtype. PS "split": hi + lo in
    r's dtype, three 16-bit dots (the lo x lo term dropped); else one dot at precision PS."""
    if PS == "split":
        a_hi, b_hi = a.to(r.dtype), b.to(r.dtype)
        a_lo, b_lo = (a - a_hi.to(tl.float32)).to(r.dtype), (b - b_hi.to(tl.float32)).to(r.dtype)
        return tl.dot(a_lo, b_hi, tl.dot(a_hi, b_lo, tl.dot(a_hi, b_hi)))
    else:
        return tl.dot(a, b, input_precision=PS)


@triton.jit
def _halves(x):
    """x [R, K] -> (x[:, 0::2], x[:, 1::2]), each [R, K / 2]."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def _dot_sums(a, b, PARTS: tl.constexpr):
    """a @ b [M, N] in fp64 from PARTS fp32 dots over the classes of k mod PARTS (1, 2, 4 or 8), each dot summing every
    output in its own FMA chain (K / PARTS long), the partial sums added in fp64."""
    if PARTS == 1:
        return tl.dot(a, b, input_precision="ieee").to(tl.float64)
    else:
        a0, a1 = _halves(a)
        b0, b1 = _halves(tl.trans(b))
        return _dot_sums(a0, tl.trans(b0), PARTS // 2) + _dot_sums(a1, tl.trans(b1), PARTS // 2)


@triton.jit
def _dot_c(a, b, PS: tl.constexpr, STATE: tl.constexpr):
    """a @ b for the sums whose result cancels against another term: dq, dk's sums over D against s (g.v_j - g.o_i;
    dq = dden k at L = 1) and o's sum over F, which enters s. fp32 inputs (PS "ieee"): Triton's fp32 dot sums each
    output over K in one FMA chain; here in 8 chains of K / 8 terms, their sum in fp64, which the caller rounds
    after adding the cancelling term (README "Precision"). 16-bit inputs: as the other products, _dot_x(a, b, PS)
    when b is an fp32 state (STATE), else one dot at precision PS."""
    if PS == "ieee":
        if a.shape[1] >= 128:
            return _dot_sums(a, b, 8)
        else:
            return _dot_sums(a, b, a.shape[1] // 16)
    elif STATE:
        return _dot_x(a, b, PS)
    else:
        return tl.dot(a, b, input_precision=PS)


@triton.jit
def _act(b_y, m_f, KIND: tl.constexpr):
    """Hedgehog halves (phi+, phi-) [BT, BFH] in fp32 from y = x W + b; columns outside m_f give 0.
    KIND 0: softmax_split, 1: exp (stabilised by the row max of |y|), 2: joint_softmax."""
    if KIND == 0:
        b_yp = tl.where(m_f, b_y, float("-inf"))
        b_ep = tl.exp(b_yp - tl.max(b_yp, 1)[:, None])
        b_yn = tl.where(m_f, -b_y, float("-inf"))
        b_en = tl.exp(b_yn - tl.max(b_yn, 1)[:, None])
        b_p = b_ep / tl.sum(b_ep, 1)[:, None]
        b_n = b_en / tl.sum(b_en, 1)[:, None]
    else:
        b_m = tl.max(tl.where(m_f, tl.abs(b_y), float("-inf")), 1)[:, None]
        b_p = tl.where(m_f, tl.exp(b_y - b_m), 0)
        b_n = tl.where(m_f, tl.exp(-b_y - b_m), 0)
        if KIND == 2:
            b_Z = tl.sum(b_p, 1)[:, None] + tl.sum(b_n, 1)[:, None]
            b_p = b_p / b_Z
            b_n = b_n / b_Z
    return b_p, b_n


@triton.jit
def _proj(p_x, p_w, p_b, o_t, m_t, DX, FH, BDX: tl.constexpr, BFH: tl.constexpr, PREC: tl.constexpr):
    """x [BT, BDX] (rows o_t of one head, rows outside m_t 0) and y = x W + b [BT, BFH] fp32 (W in x's dtype)."""
    o_d, o_f = tl.arange(0, BDX), tl.arange(0, BFH)
    m_d, m_f = o_d < DX, (o_f < FH)[None, :]
    o_r = tl.where(m_t, o_t, 0)  # in-bounds addresses for masked rows too (pipelined copies may form them)
    b_x = tl.load(p_x + o_r[:, None] * DX + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0)  # [BT, BDX]
    b_w = tl.load(p_w + o_d[:, None] * FH + o_f[None, :], mask=m_d[:, None] & m_f, other=0)  # [BDX, BFH]
    b_y = tl.dot(b_x, b_w.to(b_x.dtype), input_precision=PREC)
    b_y += tl.load(p_b + o_f, mask=o_f < FH, other=0).to(tl.float32)[None, :]  # [BT, BFH]
    return b_x, b_y


@triton.jit
def _feat(p_x, p_w, p_b, o_t, m_t, DX, FH,
          BT: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr, KIND: tl.constexpr, PREC: tl.constexpr):
    """phi(x) for the rows o_t of one head, never stored: [BT, 2*BFH] with the two halves interleaved
    (column 2f is phi+_f, 2f+1 is phi-_f); rows outside m_t are 0. Also returns x [BT, BDX] and y [BT, BFH] fp32."""
    m_f = (tl.arange(0, BFH) < FH)[None, :]
    b_x, b_y = _proj(p_x, p_w, p_b, o_t, m_t, DX, FH, BDX, BFH, PREC)
    b_p, b_n = _act(b_y, m_f, KIND)
    b_phi = tl.reshape(tl.join(b_p, b_n), (BT, 2 * BFH))
    b_phi = tl.where(m_t[:, None], b_phi, 0)
    return b_phi.to(b_x.dtype), b_x, b_y


@triton.jit
def _dy(b_dp, b_dn, b_y, m_t, m_f, o_f, KIND: tl.constexpr):
    """dL/dy [BT, BFH] fp32 from dL/dphi+, dL/dphi- [BT, BFH] (fp32) and y; rows outside m_t and columns outside
    m_f give 0."""
    b_p, b_n = _act(b_y, m_f, KIND)
    if KIND == 0:
        b_dy = b_p * (b_dp - tl.sum(b_p * b_dp, 1)[:, None]) - b_n * (b_dn - tl.sum(b_n * b_dn, 1)[:, None])
    elif KIND == 1:
        b_c = tl.sum(b_p * b_dp + b_n * b_dn, 1)
        b_i = tl.argmax(tl.where(m_f, tl.abs(b_y), float("-inf")), 1)
        b_sgn = tl.where(b_y > 0, 1.0, tl.where(b_y < 0, -1.0, 0.0))
        b_dy = b_p * b_dp - b_n * b_dn - tl.where(o_f[None, :] == b_i[:, None], b_sgn, 0.0) * b_c[:, None]
    else:
        b_c = tl.sum(b_p * b_dp + b_n * b_dn, 1)[:, None]
        b_dy = b_p * (b_dp - b_c) - b_n * (b_dn - b_c)
    return tl.where(m_t[:, None] & m_f, b_dy, 0)


@triton.jit
def _feat_bwd(b_dphi, b_x, b_y, m_t, p_w, p_dw, p_db, DX, FH,
              BT: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr, KIND: tl.constexpr, PREC: tl.constexpr):
    """From dphi [BT, 2*BFH] (interleaved, fp32): returns dx [BT, BDX] fp32; stores this chunk's x^T dy and sum dy
    at p_dw, p_db (per-chunk partials, summed on the host: no atomics, deterministic)."""
    o_d, o_f = tl.arange(0, BDX), tl.arange(0, BFH)
    m_d, m_f = o_d < DX, (o_f < FH)[None, :]
    b_dp, b_dn = tl.split(tl.reshape(b_dphi, (BT, BFH, 2)))
    b_dy = _dy(b_dp, b_dn, b_y, m_t, m_f, o_f, KIND)
    b_w = tl.load(p_w + o_d[:, None] * FH + o_f[None, :], mask=m_d[:, None] & m_f, other=0).to(tl.float32)
    b_dx = _dot_xx(b_dy, tl.trans(b_w), b_x, PREC)  # [BT, BDX]
    b_dw = _dot_x(tl.trans(b_x), b_dy, PREC)  # [BDX, BFH]
    tl.store(p_dw + o_d[:, None] * FH + o_f[None, :], b_dw, mask=m_d[:, None] & m_f)
    tl.store(p_db + o_f, tl.sum(b_dy, 0), mask=o_f < FH)
    return b_dx


@triton.autotune(configs=_configs(warps=(4,), stages=(2, 3)), key=["F", "D", "BK", "BV", "CAUSAL", "FUSED", "SEG"])
@triton.jit
def linear_attention_state_fwd_kernel(
    k, v, mask, h, z, ht, zt, wk, bk,
    L, NT, NC, F, D, Hkv, DX, FH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, KIND: tl.constexpr, PREC: tl.constexpr,
    SEG: tl.constexpr,
):
    # Program (tile, batch-head, segment) walks the segment's NC chunks in order. Causal: it stores at slot t the sum
    # of K^T V and K^T 1 over the segment's chunks before t, and (SEG) the segment's total at ht, zt; the host turns
    # the totals into each segment's carry-in. Non-causal: only the segment's total, at ht, zt.
    i_kv, i_bh, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    NV = tl.cdiv(D, BV)
    i_k, i_v = i_kv // NV, i_kv % NV  # FUSED: one F tile (BK covers F)
    i_b = i_bh // Hkv
    NG = tl.num_programs(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < D
    m_kv = m_k[:, None] & m_v[None, :]
    p_v = v + i_bh * L * D
    p_h = h + i_bh * NT * F * D + o_k[:, None] * D + o_v[None, :]
    p_z = z + i_bh * NT * F + o_k
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_z = tl.zeros([BK], dtype=tl.float32)
    i_0 = i_g * NC
    for i_i in range(tl.minimum(NC, NT - i_0)):
        i_t = i_0 + i_i
        if CAUSAL:
            tl.store(p_h + i_t * F * D, b_h, mask=m_kv)
            if i_v == 0:
                tl.store(p_z + i_t * F, b_z, mask=m_k)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        o_r = tl.where(m_t, o_t, 0)  # in-bounds addresses for masked rows too (pipelined copies may form them)
        if HAS_MASK:
            m_t = m_t & (tl.load(mask + i_b * L + o_r, mask=o_t < L, other=0) != 0)
        if FUSED:
            b_k, b_xk, b_yk = _feat(k + i_bh * L * DX, wk + (i_bh % Hkv) * DX * FH, bk + (i_bh % Hkv) * FH, o_t, m_t,
                                    DX, FH, BT, BDX, BFH, KIND, PREC)
        else:
            b_k = tl.load(k + i_bh * L * F + o_r[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
        b_v = tl.load(p_v + o_r[:, None] * D + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)  # [BT, BV]
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
        b_z += tl.sum(b_k.to(tl.float32), 0)
    if SEG or not CAUSAL:
        tl.store(ht + (i_bh * NG + i_g) * F * D + o_k[:, None] * D + o_v[None, :], b_h, mask=m_kv)
        if i_v == 0:
            tl.store(zt + (i_bh * NG + i_g) * F + o_k, b_z, mask=m_k)


@triton.jit
def _carry(x, i_e, i_bh, NG, E, BE: tl.constexpr, REVERSE: tl.constexpr):
    o_e = i_e * BE + tl.arange(0, BE)
    m_e = o_e < E
    p_x = x + i_bh * NG * E + o_e
    b_run = tl.zeros([BE], dtype=tl.float32)
    for i_r in range(NG):
        i_g = NG - 1 - i_r if REVERSE else i_r
        b_x = tl.load(p_x + i_g * E, mask=m_e, other=0)
        tl.store(p_x + i_g * E, b_run, mask=m_e)
        b_run += b_x


# One config only: the autotuner reruns a kernel to time its configs, and this one works in place (a second scan of
# the same buffer would be wrong).
@triton.autotune(configs=_configs(warps=(4,), stages=(3,)), key=["F", "D", "BE", "REVERSE"])
@triton.jit
def linear_attention_carry_kernel(h, z, NG, F, D, BE: tl.constexpr, REVERSE: tl.constexpr):
    """In place, per head: x[g] <- sum_{m < g} x[m] (REVERSE: sum_{m > g}) for x = h [B*H, NG, F*D] and z
    [B*H, NG, F] fp32: the segments' totals in, their carry-in out. Blocks of h first, then of z."""
    i_e, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    NH = tl.cdiv(F * D, BE)
    if i_e < NH:
        _carry(h, i_e, i_bh, NG, F * D, BE, REVERSE)
    else:
        _carry(z, i_e - NH, i_bh, NG, F, BE, REVERSE)


@triton.jit
def _state(h, z, hc, zc, i_h, i_t, NT, NC, F, D, o_k, o_v, m_k, m_v, CAUSAL: tl.constexpr, SEG: tl.constexpr):
    """The state [BK, BV] and normaliser [BK] that chunk i_t of head i_h sees: causal, the sum over the chunks of its
    segment before it (h, z: one slot per chunk) plus the segment's carry-in (SEG: hc, zc, one slot per segment);
    non-causal, the total (one slot)."""
    i_s = i_h * NT + i_t if CAUSAL else i_h
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.load(h + i_s * F * D + o_k[:, None] * D + o_v[None, :], mask=m_kv, other=0)
    b_z = tl.load(z + i_s * F + o_k, mask=m_k, other=0)
    if CAUSAL and SEG:
        i_c = i_h * tl.cdiv(NT, NC) + i_t // NC
        b_h += tl.load(hc + i_c * F * D + o_k[:, None] * D + o_v[None, :], mask=m_kv, other=0)
        b_z += tl.load(zc + i_c * F + o_k, mask=m_k, other=0)
    return b_h, b_z


@triton.autotune(configs=_configs(warps=(4, 8), stages=(1, 2)), key=["F", "D", "BK", "BV", "CAUSAL", "FUSED", "SEG"])
@triton.jit
def linear_attention_fwd_kernel(
    q, k, v, mask, h, z, hc, zc, o, den, wq, bq, wk, bk,
    L, NT, NC, F, D, Hq, G, DX, FH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, KIND: tl.constexpr,
    PREC: tl.constexpr, PREC_STATE: tl.constexpr, SEG: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hq
    i_kvh = i_bh // G  # = i_b * Hkv + (i_bh % Hq) // G
    o_t = i_t * BT + tl.arange(0, BT)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < F, o_v < D
    if FUSED:
        b_q, b_xq, b_yq = _feat(q + i_bh * L * DX, wq + (i_bh % Hq) * DX * FH, bq + (i_bh % Hq) * FH, o_t, m_t,
                                DX, FH, BT, BDX, BFH, KIND, PREC)
    else:
        b_q = tl.load(q + i_bh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
    b_h, b_z = _state(h, z, hc, zc, i_kvh, i_t, NT, NC, F, D, o_k, o_v, m_k, m_v, CAUSAL, SEG)
    b_o = _dot_c(b_q, b_h, PREC_STATE, True)  # [BT, BV] (fp64 on fp32 inputs)
    b_d = tl.sum(b_q.to(tl.float32) * b_z[None, :], 1)  # [BT]
    if CAUSAL:
        m_j = m_t
        if HAS_MASK:
            m_j = m_j & (tl.load(mask + i_b * L + o_t, mask=m_t, other=0) != 0)
        if FUSED:
            Hkv = Hq // G
            b_k, b_xk, b_yk = _feat(k + i_kvh * L * DX, wk + (i_kvh % Hkv) * DX * FH, bk + (i_kvh % Hkv) * FH, o_t,
                                    m_j, DX, FH, BT, BDX, BFH, KIND, PREC)
        else:
            b_k = tl.load(k + i_kvh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0)
        b_v = tl.load(v + i_kvh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=PREC)  # [BT, BT]
        b_A = tl.where((o_t[:, None] >= o_t[None, :]) & m_j[None, :], b_A, 0)
        b_A = b_A.to(b_v.dtype)  # the weights the product with v uses: the denominator sums the same ones, so that
        b_o += tl.dot(b_A, b_v, input_precision=PREC)  # they sum to 1 (o = v at L = 1; fp16 dq relies on it)
        b_d += tl.sum(b_A.to(tl.float32), 1)
    b_ds = tl.maximum(b_d, _DEN_FLOOR)
    tl.store(o + i_bh * L * D + o_t[:, None] * D + o_v[None, :], (b_o / b_ds[:, None]).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])
    tl.store(den + i_bh * L + o_t, b_d, mask=m_t)


@triton.autotune(configs=_configs(warps=(4, 8), stages=(1, 2)), key=["F", "D", "BK", "BV", "CAUSAL", "FUSED", "SEG"])
@triton.jit
def linear_attention_bwd_dq_kernel(
    q, k, v, mask, h, z, hc, zc, o, den, do, dden, dq, s, wq, bq, wk, bk, dwq, dbq,
    L, NT, NC, F, D, Hq, G, DX, FH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, KIND: tl.constexpr,
    PREC: tl.constexpr, PREC_STATE: tl.constexpr, SEG: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_b = i_bh // Hq
    i_kvh = i_bh // G
    o_t = i_t * BT + tl.arange(0, BT)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < F, o_v < D
    p_ov = i_bh * L * D + o_t[:, None] * D + o_v[None, :]
    m_ov = m_t[:, None] & m_v[None, :]
    # g = dO / den enters every product as dO, the row scale 1 / den after it: dO is exact in the inputs' dtype, so
    # G V^T is one exact 16-bit product and G h^T needs no fp32 left operand
    b_do = tl.load(do + p_ov, mask=m_ov, other=0)  # [BT, BV]
    b_o = tl.load(o + p_ov, mask=m_ov, other=0).to(tl.float32)
    b_dr = tl.load(den + i_bh * L + o_t, mask=m_t, other=1)
    b_den = tl.maximum(b_dr, _DEN_FLOOR)
    # below the floor o = num / DEN_FLOOR: the gradient has no term through den
    if PREC == "ieee":  # fp32 inputs: s in fp64 (s z cancels against G h^T below)
        b_s = tl.where(b_dr >= _DEN_FLOOR, tl.sum(b_do.to(tl.float64) * b_o.to(tl.float64), 1) / b_den, 0)
    else:
        b_s = tl.where(b_dr >= _DEN_FLOOR, tl.sum(b_do.to(tl.float32) * b_o, 1) / b_den, 0)
    b_s = tl.load(dden + i_bh * L + o_t, mask=m_t, other=0) - b_s  # [BT]
    tl.store(s + i_bh * L + o_t, b_s, mask=m_t)
    b_h, b_z = _state(h, z, hc, zc, i_kvh, i_t, NT, NC, F, D, o_k, o_v, m_k, m_v, CAUSAL, SEG)
    b_dq = _dot_c(b_do, tl.trans(b_h), PREC_STATE, True)  # fp64 on fp32 inputs: s z joins before the rounding
    b_dq = (b_dq / b_den[:, None] + b_s.to(b_dq.dtype)[:, None] * b_z[None, :]).to(tl.float32)  # [BT, BK]
    if CAUSAL:
        m_j = m_t
        if HAS_MASK:
            m_j = m_j & (tl.load(mask + i_b * L + o_t, mask=m_t, other=0) != 0)
        if FUSED:
            Hkv = Hq // G
            b_k, b_xk, b_yk = _feat(k + i_kvh * L * DX, wk + (i_kvh % Hkv) * DX * FH, bk + (i_kvh % Hkv) * FH, o_t,
                                    m_j, DX, FH, BT, BDX, BFH, KIND, PREC)
        else:
            b_k = tl.load(k + i_kvh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0)
        b_v = tl.load(v + i_kvh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
        b_P = _dot_c(b_do, tl.trans(b_v), PREC, False) / b_den[:, None] + b_s[:, None]  # [BT, BT]
        b_P = tl.where((o_t[:, None] >= o_t[None, :]) & m_j[None, :], b_P, 0)
        b_dq += tl.dot(b_P.to(b_k.dtype), b_k, input_precision=PREC)
    if FUSED:
        b_q, b_xq, b_yq = _feat(q + i_bh * L * DX, wq + (i_bh % Hq) * DX * FH, bq + (i_bh % Hq) * FH, o_t, m_t,
                                DX, FH, BT, BDX, BFH, KIND, PREC)
        i_p = i_t * tl.num_programs(1) + i_bh  # partial dW, db slot of this (chunk, batch, head)
        b_dx = _feat_bwd(b_dq, b_xq, b_yq, m_t, wq + (i_bh % Hq) * DX * FH, dwq + i_p * DX * FH,
                         dbq + i_p * FH, DX, FH, BT, BDX, BFH, KIND, PREC_STATE)
        o_d = tl.arange(0, BDX)
        tl.store(dq + i_bh * L * DX + o_t[:, None] * DX + o_d[None, :], b_dx.to(dq.dtype.element_ty),
                 mask=m_t[:, None] & (o_d < DX)[None, :])
    else:
        tl.store(dq + i_bh * L * F + o_t[:, None] * F + o_k[None, :], b_dq.to(dq.dtype.element_ty),
                 mask=m_t[:, None] & m_k[None, :])


@triton.autotune(configs=_configs(warps=(4,), stages=(2, 3)), key=["F", "D", "BK", "BV", "CAUSAL", "FUSED", "SEG"])
@triton.jit
def linear_attention_state_bwd_kernel(
    q, do, den, s, dh, dz, dht, dzt, wq, bq,
    L, NT, NC, F, D, Hkv, G, DX, FH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr,
    CAUSAL: tl.constexpr, FUSED: tl.constexpr, KIND: tl.constexpr, PREC: tl.constexpr, PREC_STATE: tl.constexpr,
    SEG: tl.constexpr,
):
    # As the forward state kernel, in reverse: slot t gets the sum over the segment's chunks after t
    i_kv, i_bh, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    NV = tl.cdiv(D, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    NG = tl.num_programs(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < D
    m_kv = m_k[:, None] & m_v[None, :]
    p_dh = dh + i_bh * NT * F * D + o_k[:, None] * D + o_v[None, :]
    p_dz = dz + i_bh * NT * F + o_k
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK], dtype=tl.float32)
    n_t = tl.minimum(NC, NT - i_g * NC)
    for i_i in range(n_t):
        i_t = i_g * NC + n_t - 1 - i_i
        if CAUSAL:
            tl.store(p_dh + i_t * F * D, b_dh, mask=m_kv)
            if i_v == 0:
                tl.store(p_dz + i_t * F, b_dz, mask=m_k)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < L
        o_r = tl.where(m_t, o_t, 0)
        for i_q in range(G):
            i_qh = i_bh * G + i_q
            if FUSED:
                i_h = i_qh % (Hkv * G)
                b_q, b_xq, b_yq = _feat(q + i_qh * L * DX, wq + i_h * DX * FH, bq + i_h * FH, o_t, m_t,
                                        DX, FH, BT, BDX, BFH, KIND, PREC)
            else:
                b_q = tl.load(q + i_qh * L * F + o_r[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            b_do = tl.load(do + i_qh * L * D + o_r[:, None] * D + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
            b_den = tl.load(den + i_qh * L + o_r, mask=m_t, other=1)
            b_den = tl.maximum(b_den, _DEN_FLOOR)
            b_s = tl.load(s + i_qh * L + o_r, mask=m_t, other=0)
            b_g = b_do.to(tl.float32) / b_den[:, None]
            b_dh += _dot_x(tl.trans(b_q), b_g, PREC_STATE)  # [BK, BV]
            b_dz += tl.sum(b_q.to(tl.float32) * b_s[:, None], 0)
    if SEG or not CAUSAL:
        tl.store(dht + (i_bh * NG + i_g) * F * D + o_k[:, None] * D + o_v[None, :], b_dh, mask=m_kv)
        if i_v == 0:
            tl.store(dzt + (i_bh * NG + i_g) * F + o_k, b_dz, mask=m_k)


@triton.autotune(configs=_configs(warps=(4, 8), stages=(1, 2)), key=["F", "D", "BK", "BV", "CAUSAL", "FUSED", "SEG", "DK", "DV"])
@triton.jit
def linear_attention_bwd_dkdv_kernel(
    q, k, v, mask, den, do, s, dh, dz, dhc, dzc, dk, dv, wq, bq, wk, bk, dwk, dbk,
    L, NT, NC, F, D, Hkv, G, DX, FH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr, KIND: tl.constexpr,
    PREC: tl.constexpr, PREC_STATE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, SEG: tl.constexpr,
):
    # DK, DV: which of the two this launch computes (both in one launch, or one each: half the live registers)
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # i_bh over B * Hkv
    i_b = i_bh // Hkv
    o_t = i_t * BT + tl.arange(0, BT)
    o_k, o_v = tl.arange(0, BK), tl.arange(0, BV)
    m_t, m_k, m_v = o_t < L, o_k < F, o_v < D
    m_j = m_t
    if HAS_MASK:
        m_j = m_j & (tl.load(mask + i_b * L + o_t, mask=m_t, other=0) != 0)
    if FUSED:
        b_k, b_xk, b_yk = _feat(k + i_bh * L * DX, wk + (i_bh % Hkv) * DX * FH, bk + (i_bh % Hkv) * FH, o_t, m_j,
                                DX, FH, BT, BDX, BFH, KIND, PREC)
    else:
        b_k = tl.load(k + i_bh * L * F + o_t[:, None] * F + o_k[None, :], mask=m_j[:, None] & m_k[None, :], other=0)
    b_v = tl.load(v + i_bh * L * D + o_t[:, None] * D + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
    b_dh, b_dz = _state(dh, dz, dhc, dzc, i_bh, i_t, NT, NC, F, D, o_k, o_v, m_k, m_v, CAUSAL, SEG)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    if DK:
        b_dk = (_dot_c(b_v, tl.trans(b_dh), PREC_STATE, True) + b_dz[None, :]).to(tl.float32)  # [BT, BK]
    if DV:
        b_dv = _dot_x(b_k, b_dh, PREC_STATE)  # [BT, BV]
    if CAUSAL:
        m_ji = o_t[None, :] >= o_t[:, None]  # [BT(j), BT(i)]: i >= j
        o_r = tl.where(m_t, o_t, 0)
        for i_g in range(G):
            i_qh = i_bh * G + i_g
            if FUSED:
                i_h = i_qh % (Hkv * G)
                b_q, b_xq, b_yq = _feat(q + i_qh * L * DX, wq + i_h * DX * FH, bq + i_h * FH, o_t, m_t,
                                        DX, FH, BT, BDX, BFH, KIND, PREC)
            else:
                b_q = tl.load(q + i_qh * L * F + o_r[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            p_do = do + i_qh * L * D
            b_den = tl.load(den + i_qh * L + o_r, mask=m_t, other=1)
            b_den = tl.maximum(b_den, _DEN_FLOOR)
            if DV:
                b_do = tl.load(p_do + o_r[:, None] * D + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0)
                b_At = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)  # [BT(j), BT(i)] = A^T
                # A_ij / den_i lies in [0, 1] (its row sums to at most 1), so it fits any 16-bit dtype; g = dO / den
                # would overflow fp16 on a near-empty row (den near DEN_FLOOR)
                b_At = tl.where(m_ji, b_At / b_den[None, :], 0)
                b_dv += tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
            if DK:
                b_doT = tl.load(p_do + o_r[None, :] * D + o_v[:, None], mask=m_t[None, :] & m_v[:, None], other=0)
                b_s = tl.load(s + i_qh * L + o_r, mask=m_t, other=0)
                b_Pt = _dot_c(b_v, b_doT, PREC, False) / b_den[None, :] + b_s[None, :]  # [BT(j), BT(i)]
                b_Pt = tl.where(m_ji, b_Pt, 0)
                b_dk += tl.dot(b_Pt.to(b_q.dtype), b_q, input_precision=PREC)
    if DV:
        b_dv = tl.where(m_j[:, None], b_dv, 0)
        tl.store(dv + i_bh * L * D + o_t[:, None] * D + o_v[None, :], b_dv.to(dv.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
    if DK:
        b_dk = tl.where(m_j[:, None], b_dk, 0)
        if FUSED:
            i_p = i_t * tl.num_programs(1) + i_bh
            b_dx = _feat_bwd(b_dk, b_xk, b_yk, m_j, wk + (i_bh % Hkv) * DX * FH, dwk + i_p * DX * FH,
                             dbk + i_p * FH, DX, FH, BT, BDX, BFH, KIND, PREC_STATE)
            o_d = tl.arange(0, BDX)
            tl.store(dk + i_bh * L * DX + o_t[:, None] * DX + o_d[None, :], b_dx.to(dk.dtype.element_ty),
                     mask=m_t[:, None] & (o_d < DX)[None, :])
        else:
            tl.store(dk + i_bh * L * F + o_t[:, None] * F + o_k[None, :], b_dk.to(dk.dtype.element_ty),
                     mask=m_t[:, None] & m_k[None, :])


@triton.autotune(configs=_configs(warps=(4, 8), stages=(1, 2)), key=["DX", "FH", "BDX", "BFH", "KIND"])
@triton.jit
def hedgehog_feature_map_fwd_kernel(
    x, w, b, mask, phi,
    L, H, DX, FH,
    BT: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr, KIND: tl.constexpr, PREC: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    # the map alone (HHFFT_LA_FUSED=map): phi = [f(y), f(-y)] concatenated, y = x W + b, stored in x's dtype;
    # padded keys (mask False) get phi = 0 and x is not read there (it may hold NaN)
    i_t, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_t, o_f = i_t * BT + tl.arange(0, BT), tl.arange(0, BFH)
    m_t, m_f = o_t < L, (o_f < FH)[None, :]
    m_j = m_t
    if HAS_MASK:
        m_j = m_j & (tl.load(mask + (i_bh // H) * L + o_t, mask=m_t, other=0) != 0)
    b_x, b_y = _proj(x + i_bh * L * DX, w + i_h * DX * FH, b + i_h * FH, o_t, m_j, DX, FH, BDX, BFH, PREC)
    b_p, b_n = _act(b_y, m_f, KIND)  # [BT, BFH] each
    b_p, b_n = tl.where(m_j[:, None], b_p, 0), tl.where(m_j[:, None], b_n, 0)
    p_phi = phi + i_bh * L * 2 * FH + o_t[:, None] * (2 * FH) + o_f[None, :]
    m_phi = m_t[:, None] & m_f
    tl.store(p_phi, b_p.to(phi.dtype.element_ty), mask=m_phi)
    tl.store(p_phi + FH, b_n.to(phi.dtype.element_ty), mask=m_phi)


# 8 warps first (the config without autotuning): compiled for sm_90 at 4 warps it spills ~400 bytes per thread
@triton.autotune(configs=_configs(warps=(8, 4), stages=(1, 2)), key=["DX", "FH", "BDX", "BFH", "KIND"])
@triton.jit
def hedgehog_feature_map_bwd_kernel(
    x, w, b, mask, dphi, dx, dw, db,
    L, H, DX, FH, CPB,
    BT: tl.constexpr, BDX: tl.constexpr, BFH: tl.constexpr, KIND: tl.constexpr,
    PREC: tl.constexpr, PREC_STATE: tl.constexpr, HAS_MASK: tl.constexpr,
):
    # program (s, bh) walks chunks s*CPB .. s*CPB+CPB-1: dx per chunk, x^T dy and sum dy summed over them in
    # registers and stored once at slot (s, bh) (summed on the host: no atomics, deterministic)
    i_s, i_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    o_d, o_f = tl.arange(0, BDX), tl.arange(0, BFH)
    m_d, m_f = o_d < DX, (o_f < FH)[None, :]
    b_w = tl.load(w + i_h * DX * FH + o_d[:, None] * FH + o_f[None, :], mask=m_d[:, None] & m_f, other=0)
    b_wt = tl.trans(b_w.to(tl.float32))  # [BFH, BDX]
    b_dw = tl.zeros([BDX, BFH], dtype=tl.float32)
    b_db = tl.zeros([BFH], dtype=tl.float32)
    for i_c in range(CPB):
        o_t = (i_s * CPB + i_c) * BT + tl.arange(0, BT)
        m_t = o_t < L
        m_j = m_t  # padded keys: dy = 0 (dx = 0, nothing into dW, db), x not read
        if HAS_MASK:
            m_j = m_j & (tl.load(mask + (i_bh // H) * L + o_t, mask=m_t, other=0) != 0)
        b_x, b_y = _proj(x + i_bh * L * DX, w + i_h * DX * FH, b + i_h * FH, o_t, m_j, DX, FH, BDX, BFH, PREC)
        p_dphi = dphi + i_bh * L * 2 * FH + o_t[:, None] * (2 * FH) + o_f[None, :]
        b_dp = tl.load(p_dphi, mask=m_j[:, None] & m_f, other=0).to(tl.float32)  # [BT, BFH]
        b_dn = tl.load(p_dphi + FH, mask=m_j[:, None] & m_f, other=0).to(tl.float32)
        b_dy = _dy(b_dp, b_dn, b_y, m_j, m_f, o_f, KIND)  # [BT, BFH]
        b_dx = _dot_xx(b_dy, b_wt, b_x, PREC_STATE)  # [BT, BDX]
        tl.store(dx + i_bh * L * DX + o_t[:, None] * DX + o_d[None, :], b_dx.to(dx.dtype.element_ty),
                 mask=m_t[:, None] & m_d[None, :])
        b_dw += _dot_x(tl.trans(b_x), b_dy, PREC_STATE)  # [BDX, BFH]
        b_db += tl.sum(b_dy, 0)
    i_p = i_s * tl.num_programs(1) + i_bh
    tl.store(dw + i_p * DX * FH + o_d[:, None] * FH + o_f[None, :], b_dw, mask=m_d[:, None] & m_f)
    tl.store(db + i_p * FH + o_f, b_db, mask=o_f < FH)


# ------------------------------------------------------------------------------------------------------------- host
BT = 64
KINDS = {"softmax_split": 0, "exp": 1, "joint_softmax": 2}  # the feature maps the fused kernels compute


def _launcher(kernel):
    """wrap_triton so that Inductor sees the kernel inside a triton_op; the interpreter's kernels are launched as is."""
    if _INTERPRET:
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _precisions(dtype: torch.dtype) -> Tuple[str, str]:
    """(dot precision for products of inputs, for products with an fp32 operand). fp32 inputs: exact fp32 dots.

    fp32 operands (states, g = dO / den) on 16-bit inputs need about fp32 accuracy for the backward's cancellation
    g.v_j - g.o_i (plain tf32 measured 30x PyTorch's error at L=1, fp16, on the H200). bf16 inputs (default
    ``HHFFT_LA_PREC=split``) split the fp32 operand into bf16 hi + lo (16 significant bits, two or three bf16 dots):
    half the registers of tf32x3 and 1.35-1.5x faster fwd+bwd on the H200 (L = 8K-64K), within the GPU tests'
    tolerance. ``HHFFT_LA_PREC=tf32x3`` opts out (tf32x3 keeps big and small fp32 halves of both operands: register
    spills). fp16 always uses tf32x3: fp16 halves of a state beyond 65504 would overflow."""
    if dtype == torch.float32:
        return "ieee", "ieee"
    mode = os.environ.get("HHFFT_LA_PREC", "split")
    if mode not in ("tf32x3", "split"):
        raise ValueError(f"HHFFT_LA_PREC must be split (the default, bf16 inputs only) or tf32x3, got {mode!r}")
    return "tf32", "split" if mode == "split" and dtype == torch.bfloat16 else "tf32x3"


# Every tl.dot dimension is at least 64 (but _dot_c's split sums on fp32 inputs: FMA dots, no tensor cores). Triton's
# sm_90 (Hopper) code for kernels with two or more tl.dot gives illegal addresses or silently wrong results when a dot
# dimension is 16 or 32 (pytorch/helion#1905 works around the same bug; triton-lang/triton#10486, #11366); each
# failure of these kernels on the H200 had F or D = 32.
_MIN_BLOCK = 64
_STATE_PROGRAMS = (2, 4)  # state passes: segments below 2 programs per SM, then enough for about 4


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 for other devices: the interpreter's tests, the H100/H200)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _block(n: int) -> int:
    """A block covering n: a power of two, at least _MIN_BLOCK (masks cover the padding)."""
    return max(_MIN_BLOCK, triton.next_power_of_2(n))


def _new(ref: torch.Tensor, *shape: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (tests poison it with NaN)."""
    return ref.new_empty(*shape, dtype=dtype or ref.dtype)


def _mask_arg(key_mask: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    if key_mask is None:
        return ref.new_empty(1, dtype=torch.uint8)
    # a copy, not .view(torch.uint8): Inductor cannot lower a bool -> uint8 dtype view (torch 2.11: "torch.bool is
    # not supported by torch.iinfo"); B x L bytes. contiguous() first: .to() keeps the strides of a dense
    # non-contiguous mask (a transpose), and the kernels index it as [B, L] row-major
    return key_mask.contiguous().to(torch.uint8)


class _Plan:
    """Sizes, blocks and the feature-map arguments shared by the forward and backward launches."""

    def __init__(self, q, k, v, causal, key_mask, fmap):
        B, Hq, L, Fin = q.shape
        Hkv, D = k.shape[1], v.shape[-1]
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"linear_attention (Triton): inputs must share one of fp16/bf16/fp32, got "
                            f"{q.dtype}, {k.dtype}, {v.dtype}")
        self.B, self.Hq, self.Hkv, self.L, self.D, self.G = B, Hq, Hkv, L, D, Hq // Hkv
        self.causal, self.has_mask = bool(causal), key_mask is not None
        self.NT = triton.cdiv(L, BT)
        self.BV = _block(D)
        self.prec, self.prec_state = _precisions(q.dtype)
        self.mask = _mask_arg(key_mask, q)
        self.fused = fmap is not None
        if self.fused:
            wq, bq, wk, bk, kind = fmap
            if kind not in KINDS:
                raise ValueError(f"fused Hedgehog attention: kind must be one of {sorted(KINDS)}, got {kind!r}; "
                                 "use the unfused path (feature map, then linear_attention) for the others")
            self.DX, self.FH = Fin, wq.shape[-1]
            self.F = 2 * self.FH
            self.BDX, self.BFH = _block(self.DX), _block(self.FH)
            self.BK = 2 * self.BFH
            self.kind = KINDS[kind]
            zq = torch.zeros(Hq, self.FH, device=q.device, dtype=wq.dtype)
            zk = torch.zeros(Hkv, self.FH, device=q.device, dtype=wk.dtype)
            self.w = (wq.contiguous(), (zq if bq is None else bq).contiguous(),
                      wk.contiguous(), (zk if bk is None else bk).contiguous())
            self.BKS = self.BK  # the map needs whole rows: one F tile
        else:
            self.DX = self.FH = self.BDX = self.BFH = 16
            self.F, self.kind = Fin, 0
            self.BK = _block(Fin)
            self.w = (q, q, q, q)  # unused
            self.BKS = min(_MIN_BLOCK, self.BK)  # state tiles [BKS, BVS]: more programs per head
        self.BVS = min(_MIN_BLOCK, self.BV)
        # dk and dv in one launch (default) or one launch each (HHFFT_LA_DKDV=apart: each holds half the registers,
        # compiled for sm_90 the spills drop from 1272 to 344 + 8 bytes per thread at 8 warps). H200, bf16 fwd+bwd,
        # L = 2K-64K: with tf32x3 operands 1.10-1.20x faster unfused, 1.30-1.52x on the in-kernel route; with the
        # default split 1.6-3.7% slower on the in-kernel route (benchmark of code 094dd93, when tf32x3 and in-kernel
        # were the defaults); unfused with split: the benchmark's hhfft-apart row now, not yet timed
        dkdv = os.environ.get("HHFFT_LA_DKDV", "joint")
        if dkdv not in ("joint", "apart"):
            raise ValueError(f"HHFFT_LA_DKDV must be joint (the default) or apart, got {dkdv!r}")
        self.dkdv_parts = ((True, True),) if dkdv == "joint" else ((True, False), (False, True))
        if self.F > 256 or D > 256:
            raise ValueError(f"linear_attention (Triton): F and D must be <= 256, got F={self.F}, D={D}")
        self.n_tiles = triton.cdiv(self.F, self.BKS) * triton.cdiv(D, self.BVS)
        # The state passes walk the chunks of a segment in order, one program per (tile, head, segment); a head's
        # segments run in parallel and the chunk kernels add each segment's carry-in (the sum of the segments before
        # it). One segment per head is a chain of NT dependent steps: at L = 32K, B = 1, H = 16 (32 programs) it took
        # 2.3 of the 3.1 ms of forward+backward on the H200, 0.49 ms with 17 segments. Segments cost a carry pass and
        # an extra state load in every chunk kernel (at L = 2K, B = 16: 512 programs, 3 segments were 0.3 ms slower
        # than one), so they are used only below _STATE_PROGRAMS programs per SM. HHFFT_LA_STATES: chunks per
        # segment, "sequential" (one segment) or "parallel" (one chunk); unset: chosen from the GPU's size.
        mode = os.environ.get("HHFFT_LA_STATES", "")
        if mode == "":
            sms, programs = _sm_count(q.device), max(1, self.n_tiles * B * Hkv)  # B = 0: no program, one segment
            nc = self.NT if programs >= _STATE_PROGRAMS[0] * sms else triton.cdiv(
                self.NT, triton.cdiv(_STATE_PROGRAMS[1] * sms, programs))
        elif mode in ("sequential", "parallel"):
            nc = self.NT if mode == "sequential" else 1
        elif mode.isascii() and mode.isdigit() and int(mode) > 0:
            nc = int(mode)
        else:
            raise ValueError(f"HHFFT_LA_STATES must be sequential, parallel or a number of chunks per segment "
                             f"(or unset: chosen from the GPU's size), got {mode!r}")
        self.NC = max(1, min(nc, self.NT))
        self.NG = max(1, triton.cdiv(self.NT, self.NC))  # L = 0: one empty segment (non-causal: zero totals)
        self.seg = self.causal and self.NG > 1

    def consts(self, state: bool = False):
        return dict(BT=BT, BK=self.BKS if state else self.BK, BV=self.BVS if state else self.BV, BDX=self.BDX,
                    BFH=self.BFH, CAUSAL=self.causal, FUSED=self.fused, KIND=self.kind, SEG=self.seg)

    def state_shapes(self):
        """Shapes of the states the chunk kernels read: ((h, z), (hc, zc) or None). Causal: h, z [B, Hkv, NT, F(, D)]
        within each segment, and with segments (``seg``) the carry-in hc, zc [B, Hkv, NG, F(, D)]; non-causal: the
        totals h, z [B, Hkv, 1, F(, D)]."""
        B, H, F, D, NG = self.B, self.Hkv, self.F, self.D, self.NG
        NS = self.NT if self.causal else 1
        return ((B, H, NS, F, D), (B, H, NS, F)), (((B, H, NG, F, D), (B, H, NG, F)) if self.seg else None)

    def states(self, ref, launch, reverse):
        """Run a state kernel: ``launch(grid, h, z, ht, zt)``. Returns (h, z, hc, zc) for the chunk kernels, shaped as
        ``state_shapes`` says: causal, h, z within each segment and the segments' carry-in hc, zc (the sum of the
        totals ht, zt of the segments before, or after when ``reverse``; hc, zc = h, z with one segment); non-causal,
        the totals (hc, zc = h, z)."""
        B, H, F, D, NG = self.B, self.Hkv, self.F, self.D, self.NG
        new = lambda *shape: _new(ref, *shape, dtype=torch.float32)  # noqa: E731
        if self.causal:
            (sh, sz), _ = self.state_shapes()
            h, z = new(*sh), new(*sz)
            ht, zt = (new(B, H, NG, F, D), new(B, H, NG, F)) if self.seg else (h, z)  # the segments' totals
        else:
            ht, zt = new(B, H, NG, F, D), new(B, H, NG, F)  # each segment's total
            h, z = ht, zt  # not written: the non-causal kernel stores the totals only
        launch((self.n_tiles, B * H, NG), h, z, ht, zt)
        if not self.causal:
            h, z = (ht.sum(2, keepdim=True), zt.sum(2, keepdim=True)) if NG > 1 else (ht, zt)
            return h, z, h, z
        if not self.seg:
            return h, z, h, z  # one segment: no carry (the kernels do not read hc, zc)
        BE = min(1024, triton.next_power_of_2(F * D))  # the totals become each segment's carry-in, in place
        _launcher(linear_attention_carry_kernel)[(triton.cdiv(F * D, BE) + triton.cdiv(F, BE), B * H)](
            ht, zt, NG, F, D, BE=BE, REVERSE=reverse)
        return h, z, ht, zt

    def matches(self, states) -> bool:
        """Whether kept states (h, z, hc, zc) are laid out as this plan's kernels read them: the shapes, and a carry
        apart exactly when this plan has segments. A forward planned otherwise (HHFFT_LA_STATES changed before its
        backward) fails this unless both plans cut the same number of segments of different lengths, which shapes
        cannot tell: do not change HHFFT_LA_STATES between a forward and its backward."""
        h, z, hc, zc = states
        (sh, sz), carry = self.state_shapes()
        if (tuple(h.shape), tuple(z.shape)) != (sh, sz) or (hc is h) != (carry is None):
            return False
        return carry is None or (tuple(hc.shape), tuple(zc.shape)) == carry


def _states_fwd(p, q, k, v):
    def launch(grid, h, z, ht, zt):
        _launcher(linear_attention_state_fwd_kernel)[grid](
            k, v, p.mask, h, z, ht, zt, p.w[2], p.w[3], p.L, p.NT, p.NC, p.F, p.D, p.Hkv, p.DX, p.FH,
            HAS_MASK=p.has_mask, PREC=p.prec, **p.consts(state=True),
        )

    return p.states(q, launch, reverse=False)


def _fwd(q, k, v, causal, key_mask, fmap):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    p = _Plan(q, k, v, causal, key_mask, fmap)
    o = _new(v, p.B, p.Hq, p.L, p.D)
    den = _new(q, p.B, p.Hq, p.L, dtype=torch.float32)
    states = _states_fwd(p, q, k, v)
    _launcher(linear_attention_fwd_kernel)[(p.NT, p.B * p.Hq)](
        q, k, v, p.mask, *states, o, den, *p.w, p.L, p.NT, p.NC, p.F, p.D, p.Hq, p.G, p.DX, p.FH,
        HAS_MASK=p.has_mask, PREC=p.prec, PREC_STATE=p.prec_state, **p.consts(),
    )
    return o, den, states


def _bwd(q, k, v, o, den, do, dden, causal, key_mask, fmap, states=None):
    q, k, v, o = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()
    do = do.contiguous().to(v.dtype)
    den, dden = den.contiguous().float(), dden.contiguous().float()
    p = _Plan(q, k, v, causal, key_mask, fmap)
    s = _new(q, p.B, p.Hq, p.L, dtype=torch.float32)
    dq, dk, dv = _new(q, *q.shape), _new(k, *k.shape), _new(v, *v.shape)
    if p.fused:  # per-(chunk, batch, head) partials of dW, db
        dwq, dbq = _new(q, p.NT, p.B, p.Hq, p.DX, p.FH, dtype=torch.float32), _new(q, p.NT, p.B, p.Hq, p.FH, dtype=torch.float32)
        dwk, dbk = _new(q, p.NT, p.B, p.Hkv, p.DX, p.FH, dtype=torch.float32), _new(q, p.NT, p.B, p.Hkv, p.FH, dtype=torch.float32)
    else:
        dwq = dbq = dwk = dbk = s
    if states is None or not p.matches(states):
        states = _states_fwd(p, q, k, v)
    h, z, hc, zc = states
    _launcher(linear_attention_bwd_dq_kernel)[(p.NT, p.B * p.Hq)](
        q, k, v, p.mask, h, z, hc, zc, o, den, do, dden, dq, s, *p.w, dwq, dbq,
        p.L, p.NT, p.NC, p.F, p.D, p.Hq, p.G, p.DX, p.FH,
        HAS_MASK=p.has_mask, PREC=p.prec, PREC_STATE=p.prec_state, **p.consts(),
    )
    del h, z, hc, zc

    def launch(grid, dh, dz, dht, dzt):
        _launcher(linear_attention_state_bwd_kernel)[grid](
            q, do, den, s, dh, dz, dht, dzt, p.w[0], p.w[1], p.L, p.NT, p.NC, p.F, p.D, p.Hkv, p.G, p.DX, p.FH,
            PREC=p.prec, PREC_STATE=p.prec_state, **p.consts(state=True),
        )

    dh, dz, dhc, dzc = p.states(q, launch, reverse=True)
    for part_dk, part_dv in p.dkdv_parts:
        _launcher(linear_attention_bwd_dkdv_kernel)[(p.NT, p.B * p.Hkv)](
            q, k, v, p.mask, den, do, s, dh, dz, dhc, dzc, dk, dv, *p.w, dwk, dbk,
            p.L, p.NT, p.NC, p.F, p.D, p.Hkv, p.G, p.DX, p.FH,
            HAS_MASK=p.has_mask, PREC=p.prec, PREC_STATE=p.prec_state, DK=part_dk, DV=part_dv, **p.consts(),
        )
    if p.fused:
        dwq, dbq, dwk, dbk = (x.sum((0, 1)) for x in (dwq, dbq, dwk, dbk))
    return dq, dk, dv, (dwq, dbq, dwk, dbk)


_MAP_PROGRAMS = 1024  # the map's backward: about this many programs, each summing dW, db over several chunks


def _fused_route() -> str:
    """HHFFT_LA_FUSED: "map" (the default: one feature-map kernel writes phi, then the unfused chunk kernels) or
    "inkernel" (phi recomputed inside every chunk kernel, never stored; on the H200 it took 2.4x the time of the
    unfused kernels on precomputed phi)."""
    route = os.environ.get("HHFFT_LA_FUSED", "map")
    if route not in ("map", "inkernel"):
        raise ValueError(f"HHFFT_LA_FUSED must be map (the default) or inkernel, got {route!r}")
    return route


def _map_args(x, w, bias, kind):
    if x.dim() != 4 or w.dim() != 3 or tuple(w.shape[:2]) != (x.shape[1], x.shape[3]) or (
            bias is not None and tuple(bias.shape) != (x.shape[1], w.shape[2])):
        raise ValueError(f"Hedgehog feature map (Triton): expected x [B, H, L, DX], W [H, DX, FH], b [H, FH] or None "
                         f"(one map per head of x); got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{None if bias is None else tuple(bias.shape)}: pass the heads' maps stacked on dim 0")
    B, H, L, DX = x.shape
    if kind not in KINDS:
        raise ValueError(f"Hedgehog feature map (Triton): kind must be one of {sorted(KINDS)}, got {kind!r}")
    FH = w.shape[2]
    bias = torch.zeros(H, FH, device=x.device, dtype=w.dtype) if bias is None else bias
    return x.contiguous(), w.contiguous(), bias.contiguous(), (B, H, L, DX, FH)


def hedgehog_feature_map_fwd(
    x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], kind: str, key_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """phi = feature_map(x W + b, kind): x [B, H, L, DX], W [H, DX, FH], b [H, FH] or None -> phi [B, H, L, 2*FH] in
    x's dtype, the halves concatenated as hhfft.nn.feature_map gives them (W cast to x's dtype, fp32 maths).
    key_mask [B, L] bool or None: rows where it is False get phi = 0 (x there is not read: padding may hold NaN)."""
    x, w, bias, (B, H, L, DX, FH) = _map_args(x, w, bias, kind)
    phi = _new(x, B, H, L, 2 * FH)
    _launcher(hedgehog_feature_map_fwd_kernel)[(triton.cdiv(L, BT), B * H)](
        x, w, bias, _mask_arg(key_mask, x), phi, L, H, DX, FH, BT=BT, BDX=_block(DX), BFH=_block(FH),
        KIND=KINDS[kind], PREC=_precisions(x.dtype)[0], HAS_MASK=key_mask is not None,
    )
    return phi


def hedgehog_feature_map_bwd(
    x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], dphi: torch.Tensor, kind: str,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`hedgehog_feature_map_fwd`: dphi [B, H, L, 2*FH] -> (dx [B, H, L, DX] in x's dtype,
    dW [H, DX, FH] fp32, db [H, FH] fp32). y is recomputed from x, never stored. Rows where key_mask is False give
    dx = 0 and add nothing to dW, db."""
    x, w, bias, (B, H, L, DX, FH) = _map_args(x, w, bias, kind)
    NT = triton.cdiv(L, BT)
    progs = max(1, min(NT, triton.cdiv(_MAP_PROGRAMS, B * H)))  # programs along L
    cpb = max(1, triton.cdiv(NT, progs))  # chunks per program (L = 0: no program, dW = db = 0)
    NS = triton.cdiv(NT, cpb)
    dx = _new(x, B, H, L, DX)
    dw = _new(x, NS, B, H, DX, FH, dtype=torch.float32)
    db = _new(x, NS, B, H, FH, dtype=torch.float32)
    prec, prec_state = _precisions(x.dtype)
    _launcher(hedgehog_feature_map_bwd_kernel)[(NS, B * H)](
        x, w, bias, _mask_arg(key_mask, x), dphi.contiguous(), dx, dw, db, L, H, DX, FH, cpb, BT=BT,
        BDX=_block(DX), BFH=_block(FH), KIND=KINDS[kind], PREC=prec, PREC_STATE=prec_state,
        HAS_MASK=key_mask is not None,
    )
    return dx, dw.sum((0, 1)), db.sum((0, 1))


def linear_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_mask: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: q [B, Hq, L, F], k [B, Hkv, L, F], v [B, Hkv, L, D], key_mask [B, L] bool or None ->
    (o [B, Hq, L, D] in v's dtype, den [B, Hq, L] fp32)."""
    return _fwd(q, k, v, causal, key_mask, None)[:2]


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
    return _bwd(q, k, v, o, den, do, dden, causal, key_mask, None)[:3]


def _kept() -> frozenset:
    """HHFFT_LA_KEEP: what the fused op's forward keeps for its backward instead of recomputing it there, a comma list
    of "phi" (the map route's phi_q, phi_k: 2 B (Hq + Hkv) L F bytes in 16 bits, F = 2 FH; saves two map launches) and
    "states" (the chunk states h, z: 4 B Hkv (L / BT) F (D + 1) bytes in fp32, plus the segments' carry-in; saves the
    backward's state pass and its carry), or "none". Default "phi,states": on the H200 (bf16, Hq = Hkv = 16, D = 64,
    F = 128, 32K tokens, under torch.compile) fwd+bwd took 1.72 / 1.92 / 1.92 / 3.68 ms at L = 2K / 8K / 32K / 64K,
    against 1.89 / 2.12 / 2.12 / 4.08 keeping phi only (benchmarks/RESULTS.md). The price is memory held from forward
    to backward, per layer: 256 MiB of phi and 260 MiB of states at that size; "phi" or "none" give it back."""
    value = os.environ.get("HHFFT_LA_KEEP", "phi,states")
    kept = frozenset() if value == "none" else frozenset(value.split(","))
    if not kept <= {"phi", "states"}:
        raise ValueError(f"HHFFT_LA_KEEP must be none or a comma list of phi and states, got {value!r}")
    return kept


def empties(ref: torch.Tensor, n: int) -> tuple:
    """n marks of tensors not kept: 0-d, one element each (distinct storages, as an op's outputs must be)."""
    return tuple(ref.new_empty(()) for _ in range(n))


def _pack(states, ref):
    """(h, z, hc, zc) as distinct tensors (an op's outputs may not alias): hc, zc empty when they are h, z."""
    h, z, hc, zc = states
    return (h, z) + (empties(ref, 2) if hc is h else (hc, zc))


def _unpack(saved):
    h, z, hc, zc = saved
    return (h, z, h, z) if hc.dim() == 0 else (h, z, hc, zc)


def hedgehog_attention_fwd(
    xq: torch.Tensor, xk: torch.Tensor, v: torch.Tensor,
    wq: torch.Tensor, bq: Optional[torch.Tensor], wk: torch.Tensor, bk: Optional[torch.Tensor],
    kind: str, causal: bool, key_mask: Optional[torch.Tensor] = None, keep: bool = False,
):
    """Fused forward: phi = Hedgehog map of kind ``kind``, by one feature-map kernel per input before the chunk
    kernels (HHFFT_LA_FUSED=map, the default) or inside the chunk kernels, never stored (HHFFT_LA_FUSED=inkernel).
    xq [B, Hq, L, DX], xk [B, Hkv, L, DX], v [B, Hkv, L, D], wq [Hq, DX, FH], bq [Hq, FH] or None, wk [Hkv, DX, FH],
    bk [Hkv, FH] or None -> (o [B, Hq, L, D], den [B, Hq, L] fp32), and with ``keep`` a third item, ``saved``: six
    tensors (phi_q, phi_k, h, z, hc, zc) for :func:`hedgehog_attention_bwd`, those not kept (``_kept``) 0-d."""
    kept = _kept()
    if _fused_route() == "map":
        pq, pk = hedgehog_feature_map_fwd(xq, wq, bq, kind), hedgehog_feature_map_fwd(xk, wk, bk, kind, key_mask)
        o, den, states = _fwd(pq, pk, v, causal, key_mask, None)
        phis = (pq, pk) if "phi" in kept else empties(xq, 2)
    else:
        o, den, states = _fwd(xq, xk, v, causal, key_mask, (wq, bq, wk, bk, kind))
        phis = empties(xq, 2)
    if not keep:
        return o, den
    return o, den, phis + (_pack(states, xq) if "states" in kept else empties(xq, 4))


def saved_like(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask=None):
    """Empty tensors shaped as ``hedgehog_attention_fwd(..., keep=True)``'s ``saved`` (for the op's fake)."""
    kept = _kept()
    if _fused_route() == "map":
        F = 2 * wq.shape[-1]
        pq, pk = xq.new_empty(*xq.shape[:3], F), xk.new_empty(*xk.shape[:3], F)
        phis = (pq, pk) if "phi" in kept else empties(xq, 2)
        p = _Plan(pq, pk, v, causal, key_mask, None)
    else:
        phis = empties(xq, 2)
        p = _Plan(xq, xk, v, causal, key_mask, (wq, bq, wk, bk, kind))
    if "states" not in kept:
        return phis + empties(xq, 4)
    new = lambda shape: xq.new_empty(*shape, dtype=torch.float32)  # noqa: E731
    (sh, sz), carry = p.state_shapes()
    return phis + (new(sh), new(sz)) + ((new(carry[0]), new(carry[1])) if carry else empties(xq, 2))


def hedgehog_attention_bwd(
    xq, xk, v, wq, bq, wk, bk, o, den, do, dden, kind: str, causal: bool, key_mask=None, saved=None,
):
    """Fused backward -> (dxq, dxk, dv, dwq, dbq, dwk, dbk); dW, db in fp32 (None for a None bias). The map route
    takes phi from ``saved`` (the forward's, see hedgehog_attention_fwd) or recomputes it (one feature-map kernel per
    input), runs the unfused backward for dphi (the forward's states from ``saved`` or recomputed), then one kernel
    per input turns dphi into dx, dW, db."""
    saved = saved if saved is not None else empties(xq, 6)
    states = _unpack(saved[2:]) if saved[2].dim() else None
    if _fused_route() == "map":
        F = 2 * wq.shape[-1]
        if saved[0].dim() and saved[0].shape == (*xq.shape[:3], F) and saved[1].shape == (*xk.shape[:3], F):
            pq, pk = saved[0], saved[1]
        else:
            pq, pk = hedgehog_feature_map_fwd(xq, wq, bq, kind), hedgehog_feature_map_fwd(xk, wk, bk, kind, key_mask)
        dpq, dpk, dv = _bwd(pq, pk, v, o, den, do, dden, causal, key_mask, None, states)[:3]
        dq, dwq, dbq = hedgehog_feature_map_bwd(xq, wq, bq, dpq, kind)
        dk, dwk, dbk = hedgehog_feature_map_bwd(xk, wk, bk, dpk, kind, key_mask)
    else:
        dq, dk, dv, (dwq, dbq, dwk, dbk) = _bwd(xq, xk, v, o, den, do, dden, causal, key_mask,
                                                (wq, bq, wk, bk, kind), states)
    return dq, dk, dv, dwq, None if bq is None else dbq, dwk, None if bk is None else dbk
