"""Monarch FFT convolution in Triton (the maths is in README.md beside this file).

A row of N = N1 * N2 complex values lives in registers as an [N1, N2] tile (n = n1 * N2 + n2). The FFT is
    A = F_N1 @ X,  A *= W_N^(k1 n2),  C = A @ F_N2        (C[k1, k2] = X_f[k1 + N1 k2]: the permuted order)
and the inverse runs the same steps backwards with conjugate matrices, so the kernel spectrum is prepared once
per call in the permuted order and no transpose or bit reversal is ever done. Two real rows of one channel
(batch b and b + 1) travel as the real and imaginary parts of one complex row: the kernel k is real, so
conv(u0 + i u1, k) = conv(u0, k) + i conv(u1, k), and a real FFT of size N costs one complex FFT of size N per
two rows.

Paths:
- fused (N <= 4096 for bf16): each program takes R pairs of rows of one channel through load + gates, FFT, product
  with the spectrum, inverse FFT, epilogue (postgate, bias, skip) and store. Three variants: "loop" (the pairs one
  after another, tables loaded once), "stacked" (side by side in one tile) and "t" (side by side, with every
  product a right product of >= 64 rows). On CUDA the first eager call of a size times them and keeps the fastest.
  Two dot options (FusedConfig): complex products by 3 real dots (Gauss; by default at N = 2048 only) and fp16 DFT
  tables (by default for the "fp16" dots); _fused_config has the timings.
- four-step (N up to 512K for bf16): N = P * Q. A column pass does the size-P DFTs of the [P, Q] view (plus
  twiddles) into an fp32 scratch, the fused row machinery does FFT_Q, spectrum product and inverse on each of
  the P rows, and a second column pass does the inverse size-P DFTs and the epilogue; the batch goes through in
  slices whose scratch fits _SCRATCH_BYTES (_slices: pairs of rows, or one pair by channel slices).
- dk (``fftconv_corr``): one program per (channel, batch slice) accumulates conj(G) * V over its pairs of rows in
  registers, inverse-transforms once and writes its partial sum of lags; the slices are summed on the host. Above
  the fused limit: the four-step column pass on g and on v, one program per (channel, row) accumulating the rows'
  conj(G) * V over the pairs (fftconv_corr_row_kernel), and an inverse column pass writing the lags
  (fftconv_corr_col_kernel).
- the kernel's spectrum: rfft of the rolled kernel, mirrored, scaled and permuted by fftconv_spectrum_kernel; the
  backward's du (flip(k)) reads the forward's spectrum conjugated (CONJ_K; keep_spectrum / note_flip).

Dot precision: "fp16" (fp16 operands, power-of-two scaled, fp32 accumulation) for bf16 inputs, "tf32x3" (split
precision) for fp16 and fp32 inputs. Limits per precision: _MAX_FUSED, _MAX_P. See README.md for the maths,
accuracy and measured limits.
"""
from __future__ import annotations

import collections
import math
import weakref
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "MAX_FUSED_N",
    "MAX_FOURSTEP_N",
    "MIN_N",
    "plan",
    "precision_for",
    "supported",
    "corr_supported",
    "fftconv_fwd",
    "fftconv_corr_fwd",
    "dv_dk_shared",
    "fftconv_dv_dk",
]

MIN_N = 256  # tl.dot needs every tile side >= 16
# Largest row the fused kernel keeps in registers, and largest column DFT of the four-step path, per dot precision
# (measured on an H200: beyond these the kernels spill registers or need more than 227 KB of shared memory).
_MAX_FUSED = {"fp16": 4096, "tf32": 4096, "tf32x3": 2048, "ieee": 2048}
_MAX_P = {"fp16": 128, "tf32": 64, "tf32x3": 32, "ieee": 32}
MAX_FUSED_N = _MAX_FUSED["fp16"]
MAX_FOURSTEP_N = MAX_FUSED_N * _MAX_P["fp16"]

_INTERPRET = triton.runtime.interpreter.InterpretedFunction if hasattr(triton.runtime, "interpreter") else ()


# ------------------------------------------------------------------------------------------------------ planning
def _split(n: int) -> tuple[int, int]:
    """n = n1 * n2, powers of two, n1 <= n2, n1 as large as possible (square-ish tiles)."""
    e = n.bit_length() - 1
    return 1 << (e // 2), 1 << (e - e // 2)


def plan(L: int, K: int, out_len: int) -> int:
    """FFT size: the smallest power of two >= max(L + K - 1, out_len, MIN_N)."""
    need = max(L + K - 1, out_len, MIN_N)
    return 1 << (need - 1).bit_length()


def precision_for(dtype: torch.dtype) -> str:
    """Dot precision that keeps the error within 2x torch.fft's at this dtype (see README.md, Accuracy)."""
    return "fp16" if dtype == torch.bfloat16 else "tf32x3"


def supported(u: Tensor, N: int) -> bool:
    """Whether the op sends this forward to the Triton kernels (else it uses its torch.fft implementation).

    bf16 and fp16 inputs, FFT sizes up to the precision's four-step limit, and for bf16 (fp16 dots) the nested path
    up to _NESTED_MAX_N. fp32 inputs stay on torch.fft (cuFFT): the split precision dots reach about 4e-5 relative
    error, 2-3x cuFFT's fp32 error (fftconv_fwd still takes them).
    """
    if u.dtype not in (torch.float16, torch.bfloat16):
        return False
    prec = precision_for(u.dtype)
    return N <= _MAX_FUSED[prec] * _MAX_P[prec] or (prec == "fp16" and N <= _NESTED_MAX_N)


def corr_supported(g: Tensor, v: Tensor, N: int) -> bool:
    """Whether fftconv_corr goes to the Triton kernels (bf16/fp16 inputs, N within the forward's limits: fused
    kernel, then the four-step path)."""
    dt = torch.promote_types(g.dtype, v.dtype)
    if dt not in (torch.float16, torch.bfloat16):
        return False
    prec = precision_for(dt)
    return N <= _MAX_FUSED[prec] * _MAX_P[prec]


def _num_warps(n1: int, n2: int) -> int:
    # H200 sweep (benchmarks/fftconv_tune.py): 4 warps beat 8 for every tile measured (256 .. 8192 elements),
    # by ~1.6x, even where 4 warps spill a little; 16 warps spill heavily
    return 4


def _tracing(x: Tensor) -> bool:
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode([x]) is not None


_TABLES: dict = {}


def _twiddles(rows: int, cols: int, n: int, sign: float, device) -> Tensor:
    """[2, rows, cols] fp32: exp(sign * 2 pi i * (r * c mod n) / n) as real/imag planes (angles reduced exactly)."""
    r = torch.arange(rows, device=device, dtype=torch.int64)
    c = torch.arange(cols, device=device, dtype=torch.int64)
    ang = ((r[:, None] * c[None, :]) % n).to(torch.float64) * (sign * 2 * math.pi / n)
    return torch.stack([torch.cos(ang), torch.sin(ang)]).to(torch.float32).contiguous()


def _cached(key, like: Tensor, make):
    """Tables are cached per device in eager mode; under tracing they are rebuilt as graph ops (never cached fakes)."""
    if _tracing(like):
        return make()
    if key not in _TABLES:
        _TABLES[key] = make()
    return _TABLES[key]


def _tables(n1: int, n2: int, device, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DFT matrices F_n1 [2, n1, n1], F_n2 [2, n2, n2] and twiddles W_N^(k1 n2) [2, n1, n2] (forward sign)."""
    return _cached(
        (n1, n2, str(device)),
        like,
        lambda: (
            _twiddles(n1, n1, n1, -1.0, device),
            _twiddles(n2, n2, n2, -1.0, device),
            _twiddles(n1, n2, n1 * n2, -1.0, device),
        ),
    )


def _dft4(n: int, dtype: torch.dtype, device) -> Tensor:
    """[4, n, n] table of the fused kernels: Fr, Fi, Fi - Fr, Fr + Fi of F_n (forward sign), each plane rounded once
    from fp64 to dtype. The 4-dot products read the first two planes, the 3-dot (Gauss) ones planes 0, 2, 3."""
    k = torch.arange(n, device=device, dtype=torch.int64)
    ang = ((k[:, None] * k[None, :]) % n).to(torch.float64) * (-2 * math.pi / n)
    fr, fi = torch.cos(ang), torch.sin(ang)
    return torch.stack([fr, fi, fi - fr, fr + fi]).to(dtype).contiguous()


def _fused_tables(n1: int, n2: int, dtype: torch.dtype, device, like: Tensor) -> tuple[Tensor, Tensor]:
    """F_n1 and F_n2 as _dft4 tables in dtype (fp32, or fp16 for the fp16 dots: what the dots read anyway)."""
    return _cached(
        ("dft4", n1, n2, dtype, str(device)), like, lambda: (_dft4(n1, dtype, device), _dft4(n2, dtype, device))
    )


def _launch(kernel, grid, x: Tensor, **kwargs) -> None:
    """Launch through wrap_triton on CUDA (so Inductor sees the kernel); directly under the interpreter."""
    if x.is_cuda and not isinstance(kernel, _INTERPRET):
        torch.library.wrap_triton(kernel)[grid](**kwargs)
    else:
        kernel[grid](**kwargs)


# ------------------------------------------------------------------------------------------------- jit helpers
@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # "fp16": fp16 operands (callers keep them within [-N, N] by power-of-two scaling), fp32 accumulation
    if PREC == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _cdot(ar, ai, br, bi, PREC: tl.constexpr):
    # (ar + i ai) @ (br + i bi)
    cr = _dot(ar, br, PREC) - _dot(ai, bi, PREC)
    ci = _dot(ar, bi, PREC) + _dot(ai, br, PREC)
    return cr, ci


@triton.jit
def _load_plane(p, R: tl.constexpr, C: tl.constexpr):
    o_r = tl.arange(0, R)
    o_c = tl.arange(0, C)
    o = o_r[:, None] * C + o_c[None, :]
    return tl.load(p + o), tl.load(p + R * C + o)


@triton.jit
def _pow2_scale(xr, xi):
    # smallest power of two >= max |x| (1 for an all-zero tile): dividing by it is exact
    m = tl.maximum(tl.max(tl.abs(xr)), tl.max(tl.abs(xi)))
    return tl.where(m > 0, tl.exp2(tl.ceil(tl.log2(tl.maximum(m, 1e-30)))), 1.0)


@triton.jit
def _cdot_l(fr, fd, fs, xr, xi, CONJ: tl.constexpr, GAUSS: tl.constexpr, PREC: tl.constexpr):
    # (F or conj(F)) @ X, the table on the left. GAUSS: 3 dots, with fd = Fi - Fr and fs = Fr + Fi from memory;
    # else 4 dots with fd = Fi (fs unused)
    if GAUSS:
        b_t = _dot(fr, xr + xi, PREC)
        if CONJ:
            cr, ci = b_t + _dot(fd, xi, PREC), b_t - _dot(fs, xr, PREC)
        else:
            cr, ci = b_t - _dot(fs, xi, PREC), b_t + _dot(fd, xr, PREC)
    else:
        if CONJ:
            fd = -fd
        cr, ci = _cdot(fr, fd, xr, xi, PREC)
    return cr, ci


@triton.jit
def _cdot_r(xr, xi, fr, fd, fs, CONJ: tl.constexpr, GAUSS: tl.constexpr, PREC: tl.constexpr):
    # X @ (F or conj(F)), the table on the right; fd, fs as in _cdot_l
    if GAUSS:
        b_t = _dot(xr + xi, fr, PREC)
        if CONJ:
            cr, ci = b_t + _dot(xi, fd, PREC), b_t - _dot(xr, fs, PREC)
        else:
            cr, ci = b_t - _dot(xi, fs, PREC), b_t + _dot(xr, fd, PREC)
    else:
        if CONJ:
            fd = -fd
        cr, ci = _cdot(xr, xi, fr, fd, PREC)
    return cr, ci


@triton.jit
def _load_table(p, R: tl.constexpr, GAUSS: tl.constexpr):
    # DFT table [4, R, R] (Fr, Fi, Fi - Fr, Fr + Fi; fp32 or fp16) -> the planes _cdot_l/_cdot_r take
    o = tl.arange(0, R)[:, None] * R + tl.arange(0, R)[None, :]
    fr = tl.load(p + o)
    if GAUSS:
        fd = tl.load(p + 2 * R * R + o)
        fs = tl.load(p + 3 * R * R + o)
    else:
        fd = tl.load(p + R * R + o)
        fs = fd
    return fr, fd, fs


@triton.jit
def _monarch_fwd(xr, xi, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s, GAUSS: tl.constexpr, PREC: tl.constexpr):
    # x [N1, N2] natural order -> X_f [N1, N2] with X_f[k1, k2] = fft(x)[k1 + N1 k2]
    ar, ai = _cdot_l(f1r, f1i, f1s, xr, xi, False, GAUSS, PREC)
    ar, ai = ar * twr - ai * twi, ar * twi + ai * twr
    return _cdot_r(ar, ai, f2r, f2i, f2s, False, GAUSS, PREC)


@triton.jit
def _monarch_inv(cr, ci, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s, GAUSS: tl.constexpr, PREC: tl.constexpr):
    # N * ifft: conjugate matrices, steps reversed (no 1/N: callers fold it in)
    dr, di = _cdot_r(cr, ci, f2r, f2i, f2s, True, GAUSS, PREC)
    dr, di = dr * twr + di * twi, di * twr - dr * twi
    return _cdot_l(f1r, f1i, f1s, dr, di, True, GAUSS, PREC)


@triton.jit
def _fft_scaled(xr, xi, f1r, f1i, twr, twi, f2r, f2i, PREC: tl.constexpr):
    """FFT of a row scaled into [-1, 1] first (4-dot products): (planes of fft(x / s), s), s the power of two
    _pow2_scale gives; the correlation kernels multiply the scales back."""
    s = _pow2_scale(xr, xi)
    fr, fi = _monarch_fwd(xr / s, xi / s, f1r, f1i, f1i, twr, twi, f2r, f2i, f2i, False, PREC)
    return fr, fi, s


@triton.jit
def _times_spectrum_inv(
    cr, ci, kr, ki, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s,
    N1: tl.constexpr, N2: tl.constexpr, GAUSS: tl.constexpr, PREC: tl.constexpr,
):
    # N ifft(c / N * k_f) for c = fft(x / s) (|c| <= N) and a spectrum k_f = kr + i ki with |k_f| <= 1
    cr, ci = cr * (1.0 / (N1 * N2)), ci * (1.0 / (N1 * N2))
    cr, ci = cr * kr - ci * ki, cr * ki + ci * kr  # |.| <= 1
    return _monarch_inv(cr, ci, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s, GAUSS, PREC)


@triton.jit
def _conv_row(
    xr, xi, kr, ki, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s,
    N1: tl.constexpr, N2: tl.constexpr, GAUSS: tl.constexpr, PREC: tl.constexpr,
):
    # ifft(fft(x) * k_f) for a spectrum k_f = kr + i ki with |k_f| <= 1 (its scale is applied by the caller)
    s = _pow2_scale(xr, xi)
    cr, ci = _monarch_fwd(xr / s, xi / s, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s, GAUSS, PREC)
    yr, yi = _times_spectrum_inv(cr, ci, kr, ki, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s, N1, N2, GAUSS, PREC)
    return yr * s, yi * s


# ------------------------------------------------------------------------------------------------- fused kernel
@triton.jit
def fftconv_fwd_kernel(
    p_u, p_pre, p_post, p_bias, p_skip, p_kf, p_ks, p_f1, p_f2, p_tw, p_y,
    B, H, L, T, LO, HI,
    N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    PREC: tl.constexpr, GAUSS: tl.constexpr, CONJ_K: tl.constexpr,
):
    # program: channel i_h, pairs of rows [R i_g, R i_g + R); tables and spectrum loaded once
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_n = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]  # [N1, N2]
    f1r, f1i, f1s = _load_table(p_f1, N1, GAUSS)
    f2r, f2i, f2s = _load_table(p_f2, N2, GAUSS)
    twr, twi = _load_plane(p_tw, N1, N2)
    kr, ki = _load_plane(p_kf + i_h * 2 * N1 * N2, N1, N2)
    if CONJ_K:  # the flipped kernel's spectrum (du): the conjugate of the stored one
        ki = -ki
    b_ks = tl.load(p_ks + i_h)
    m_u = o_n < L
    m_t = o_n < T
    m_c = (o_n >= LO) & (o_n <= HI)  # t + shift inside the linear convolution's support
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_h).to(tl.float32)
    if HAS_SKIP:
        b_skip = tl.load(p_skip + i_h).to(tl.float32)
    for i_r in range(R):
        i_b0 = 2 * (i_g * R + i_r)
        i_b1 = i_b0 + 1
        m_0 = i_b0 < B
        m_1 = i_b1 < B
        o_0 = (i_b0 * H + i_h) * L + o_n
        o_1 = (i_b1 * H + i_h) * L + o_n
        b_u0 = tl.load(p_u + o_0, mask=m_u & m_0, other=0.0).to(tl.float32)
        b_u1 = tl.load(p_u + o_1, mask=m_u & m_1, other=0.0).to(tl.float32)
        b_xr, b_xi = b_u0, b_u1
        if HAS_PRE:
            b_xr = b_xr * tl.load(p_pre + o_0, mask=m_u & m_0, other=0.0).to(tl.float32)
            b_xi = b_xi * tl.load(p_pre + o_1, mask=m_u & m_1, other=0.0).to(tl.float32)
        b_yr, b_yi = _conv_row(b_xr, b_xi, kr, ki, f1r, f1i, f1s, twr, twi, f2r, f2i, f2s, N1, N2, GAUSS, PREC)
        b_yr = tl.where(m_c, b_yr * b_ks, 0.0)
        b_yi = tl.where(m_c, b_yi * b_ks, 0.0)
        o_y0 = (i_b0 * H + i_h) * T + o_n
        o_y1 = (i_b1 * H + i_h) * T + o_n
        if HAS_POST:
            b_yr = b_yr * tl.load(p_post + o_y0, mask=m_t & m_0, other=0.0).to(tl.float32)
            b_yi = b_yi * tl.load(p_post + o_y1, mask=m_t & m_1, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_yr += b_bias
            b_yi += b_bias
        if HAS_SKIP:
            b_yr += b_skip * b_u0
            b_yi += b_skip * b_u1
        tl.store(p_y + o_y0, b_yr.to(p_y.dtype.element_ty), mask=m_t & m_0)
        tl.store(p_y + o_y1, b_yi.to(p_y.dtype.element_ty), mask=m_t & m_1)


@triton.jit
def fftconv_fwd_stacked_kernel(
    p_u, p_pre, p_post, p_bias, p_skip, p_kf, p_ks, p_f1, p_f2, p_tw, p_y,
    B, H, L, T, LO, HI,
    N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    PREC: tl.constexpr, GAUSS: tl.constexpr, CONJ_K: tl.constexpr,
):
    # R pairs side by side: [N1, R N2] for the left product by F_N1, [R N1, N2] for the right product by F_N2,
    # so every tl.dot is R times larger than in fftconv_fwd_kernel
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_1 = tl.arange(0, N1)
    o_c = tl.arange(0, R * N2)
    o_q = o_c % N2
    i_b0 = 2 * (i_g * R + o_c // N2)  # [R N2]
    i_b1 = i_b0 + 1
    o_n = o_1[:, None] * N2 + o_q[None, :]  # [N1, R N2]
    m_u = (o_n < L)
    m_t = (o_n < T)
    m_0 = (i_b0 < B)[None, :]
    m_1 = (i_b1 < B)[None, :]
    o_0 = ((i_b0 * H + i_h) * L)[None, :] + o_n
    o_1u = ((i_b1 * H + i_h) * L)[None, :] + o_n
    b_u0 = tl.load(p_u + o_0, mask=m_u & m_0, other=0.0).to(tl.float32)
    b_u1 = tl.load(p_u + o_1u, mask=m_u & m_1, other=0.0).to(tl.float32)
    b_xr, b_xi = b_u0, b_u1
    if HAS_PRE:
        b_xr = b_xr * tl.load(p_pre + o_0, mask=m_u & m_0, other=0.0).to(tl.float32)
        b_xi = b_xi * tl.load(p_pre + o_1u, mask=m_u & m_1, other=0.0).to(tl.float32)
    # one power-of-two scale per pair
    b_m = tl.max(tl.maximum(tl.abs(b_xr), tl.abs(b_xi)), axis=0)  # [R N2]
    b_m = tl.max(tl.reshape(b_m, (R, N2)), axis=1)  # [R]
    b_m = tl.where(b_m > 0, tl.exp2(tl.ceil(tl.log2(tl.maximum(b_m, 1e-30)))), 1.0)
    b_s = tl.reshape(tl.broadcast_to(b_m[:, None], (R, N2)), (R * N2,))  # [R N2]
    b_xr = b_xr / b_s[None, :]
    b_xi = b_xi / b_s[None, :]
    # forward: A = F1 @ X, twiddle, C = A @ F2 in the stacked [R N1, N2] layout
    f1r, f1i, f1s = _load_table(p_f1, N1, GAUSS)
    b_ar, b_ai = _cdot_l(f1r, f1i, f1s, b_xr, b_xi, False, GAUSS, PREC)  # [N1, R N2]
    o_tw = o_1[:, None] * N2 + o_q[None, :]
    twr = tl.load(p_tw + o_tw)
    twi = tl.load(p_tw + N1 * N2 + o_tw)
    b_ar, b_ai = b_ar * twr - b_ai * twi, b_ar * twi + b_ai * twr
    b_ar = tl.reshape(tl.permute(tl.reshape(b_ar, (N1, R, N2)), (1, 0, 2)), (R * N1, N2))
    b_ai = tl.reshape(tl.permute(tl.reshape(b_ai, (N1, R, N2)), (1, 0, 2)), (R * N1, N2))
    f2r, f2i, f2s = _load_table(p_f2, N2, GAUSS)
    b_cr, b_ci = _cdot_r(b_ar, b_ai, f2r, f2i, f2s, False, GAUSS, PREC)  # [R N1, N2]
    o_k = (tl.arange(0, R * N1) % N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    kr = tl.load(p_kf + i_h * 2 * N1 * N2 + o_k) * (1.0 / (N1 * N2))
    ki = tl.load(p_kf + i_h * 2 * N1 * N2 + N1 * N2 + o_k) * (1.0 / (N1 * N2))
    if CONJ_K:
        ki = -ki
    b_cr, b_ci = b_cr * kr - b_ci * ki, b_cr * ki + b_ci * kr
    # inverse: D = C @ conj(F2), conj twiddle, back to [N1, R N2], Y = conj(F1) @ D
    b_dr, b_di = _cdot_r(b_cr, b_ci, f2r, f2i, f2s, True, GAUSS, PREC)
    twr2 = tl.load(p_tw + o_k)
    twi2 = tl.load(p_tw + N1 * N2 + o_k)
    b_dr, b_di = b_dr * twr2 + b_di * twi2, b_di * twr2 - b_dr * twi2
    b_dr = tl.reshape(tl.permute(tl.reshape(b_dr, (R, N1, N2)), (1, 0, 2)), (N1, R * N2))
    b_di = tl.reshape(tl.permute(tl.reshape(b_di, (R, N1, N2)), (1, 0, 2)), (N1, R * N2))
    b_yr, b_yi = _cdot_l(f1r, f1i, f1s, b_dr, b_di, True, GAUSS, PREC)  # [N1, R N2]
    b_sk = b_s * tl.load(p_ks + i_h)
    m_c = (o_n >= LO) & (o_n <= HI)
    b_yr = tl.where(m_c, b_yr * b_sk[None, :], 0.0)
    b_yi = tl.where(m_c, b_yi * b_sk[None, :], 0.0)
    o_y0 = ((i_b0 * H + i_h) * T)[None, :] + o_n
    o_y1 = ((i_b1 * H + i_h) * T)[None, :] + o_n
    if HAS_POST:
        b_yr = b_yr * tl.load(p_post + o_y0, mask=m_t & m_0, other=0.0).to(tl.float32)
        b_yi = b_yi * tl.load(p_post + o_y1, mask=m_t & m_1, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_h).to(tl.float32)
        b_yr += b_bias
        b_yi += b_bias
    if HAS_SKIP:
        b_skip = tl.load(p_skip + i_h).to(tl.float32)
        b_yr += b_skip * b_u0
        b_yi += b_skip * b_u1
    tl.store(p_y + o_y0, b_yr.to(p_y.dtype.element_ty), mask=m_t & m_0)
    tl.store(p_y + o_y1, b_yi.to(p_y.dtype.element_ty), mask=m_t & m_1)


@triton.jit
def fftconv_fwd_t_kernel(
    p_u, p_pre, p_post, p_bias, p_skip, p_kf, p_ks, p_f1, p_f2, p_tw, p_y,
    B, H, L, T, LO, HI,
    N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    PREC: tl.constexpr, GAUSS: tl.constexpr, CONJ_K: tl.constexpr,
):
    # R pairs, every product a right product with R N2 or R N1 rows (F symmetric: X^T F1 = (F1 X)^T):
    # X^T [R N2, N1] @ F1 -> A^T, twiddle, per-pair transpose -> A [R N1, N2] @ F2 -> C, * K_f,
    # C @ conj(F2) -> D, twiddle, per-pair transpose -> D^T [R N2, N1] @ conj(F1) -> Y^T
    i_g, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_r = tl.arange(0, R)
    o_1 = tl.arange(0, N1)
    o_2 = tl.arange(0, N2)
    i_b0 = 2 * (i_g * R + o_r)
    i_b1 = i_b0 + 1
    o_n = o_1[None, None, :] * N2 + o_2[None, :, None]  # [1, N2, N1]: position n1 N2 + n2
    m_u = o_n < L
    m_t = o_n < T
    m_0 = (i_b0 < B)[:, None, None]
    m_1 = (i_b1 < B)[:, None, None]
    o_0 = ((i_b0 * H + i_h) * L)[:, None, None] + o_n  # [R, N2, N1]
    o_1u = ((i_b1 * H + i_h) * L)[:, None, None] + o_n
    b_u0 = tl.load(p_u + o_0, mask=m_u & m_0, other=0.0).to(tl.float32)
    b_u1 = tl.load(p_u + o_1u, mask=m_u & m_1, other=0.0).to(tl.float32)
    b_xr, b_xi = b_u0, b_u1
    if HAS_PRE:
        b_xr = b_xr * tl.load(p_pre + o_0, mask=m_u & m_0, other=0.0).to(tl.float32)
        b_xi = b_xi * tl.load(p_pre + o_1u, mask=m_u & m_1, other=0.0).to(tl.float32)
    b_m = tl.max(tl.max(tl.maximum(tl.abs(b_xr), tl.abs(b_xi)), axis=2), axis=1)  # [R]
    b_s = tl.where(b_m > 0, tl.exp2(tl.ceil(tl.log2(tl.maximum(b_m, 1e-30)))), 1.0)[:, None, None]
    b_xr = tl.reshape(b_xr / b_s, (R * N2, N1))
    b_xi = tl.reshape(b_xi / b_s, (R * N2, N1))
    f1r, f1i, f1s = _load_table(p_f1, N1, GAUSS)
    b_ar, b_ai = _cdot_r(b_xr, b_xi, f1r, f1i, f1s, False, GAUSS, PREC)  # A^T [R N2, N1]
    o_tt = o_1[None, None, :] * N2 + o_2[None, :, None]  # T^T[n2, k1] = T[k1, n2]
    twr = tl.load(p_tw + o_tt)
    twi = tl.load(p_tw + N1 * N2 + o_tt)
    b_ar = tl.reshape(b_ar, (R, N2, N1))
    b_ai = tl.reshape(b_ai, (R, N2, N1))
    b_ar, b_ai = b_ar * twr - b_ai * twi, b_ar * twi + b_ai * twr
    b_ar = tl.reshape(tl.permute(b_ar, (0, 2, 1)), (R * N1, N2))
    b_ai = tl.reshape(tl.permute(b_ai, (0, 2, 1)), (R * N1, N2))
    f2r, f2i, f2s = _load_table(p_f2, N2, GAUSS)
    b_cr, b_ci = _cdot_r(b_ar, b_ai, f2r, f2i, f2s, False, GAUSS, PREC)  # C [R N1, N2]
    o_k = o_1[None, :, None] * N2 + o_2[None, None, :]  # [1, N1, N2]
    kr = tl.load(p_kf + i_h * 2 * N1 * N2 + o_k) * (1.0 / (N1 * N2))
    ki = tl.load(p_kf + i_h * 2 * N1 * N2 + N1 * N2 + o_k) * (1.0 / (N1 * N2))
    if CONJ_K:
        ki = -ki
    b_cr = tl.reshape(b_cr, (R, N1, N2))
    b_ci = tl.reshape(b_ci, (R, N1, N2))
    b_cr, b_ci = b_cr * kr - b_ci * ki, b_cr * ki + b_ci * kr
    b_dr, b_di = _cdot_r(
        tl.reshape(b_cr, (R * N1, N2)), tl.reshape(b_ci, (R * N1, N2)), f2r, f2i, f2s, True, GAUSS, PREC
    )
    twr2 = tl.load(p_tw + o_k)
    twi2 = tl.load(p_tw + N1 * N2 + o_k)
    b_dr = tl.reshape(b_dr, (R, N1, N2))
    b_di = tl.reshape(b_di, (R, N1, N2))
    b_dr, b_di = b_dr * twr2 + b_di * twi2, b_di * twr2 - b_dr * twi2
    b_dr = tl.reshape(tl.permute(b_dr, (0, 2, 1)), (R * N2, N1))
    b_di = tl.reshape(tl.permute(b_di, (0, 2, 1)), (R * N2, N1))
    b_yr, b_yi = _cdot_r(b_dr, b_di, f1r, f1i, f1s, True, GAUSS, PREC)  # Y^T [R N2, N1]
    b_sk = b_s * tl.load(p_ks + i_h)
    m_c = (o_n >= LO) & (o_n <= HI)
    b_yr = tl.where(m_c, tl.reshape(b_yr, (R, N2, N1)) * b_sk, 0.0)
    b_yi = tl.where(m_c, tl.reshape(b_yi, (R, N2, N1)) * b_sk, 0.0)
    o_y0 = ((i_b0 * H + i_h) * T)[:, None, None] + o_n
    o_y1 = ((i_b1 * H + i_h) * T)[:, None, None] + o_n
    if HAS_POST:
        b_yr = b_yr * tl.load(p_post + o_y0, mask=m_t & m_0, other=0.0).to(tl.float32)
        b_yi = b_yi * tl.load(p_post + o_y1, mask=m_t & m_1, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + i_h).to(tl.float32)
        b_yr += b_bias
        b_yi += b_bias
    if HAS_SKIP:
        b_skip = tl.load(p_skip + i_h).to(tl.float32)
        b_yr += b_skip * b_u0
        b_yi += b_skip * b_u1
    tl.store(p_y + o_y0, b_yr.to(p_y.dtype.element_ty), mask=m_t & m_0)
    tl.store(p_y + o_y1, b_yi.to(p_y.dtype.element_ty), mask=m_t & m_1)


# -------------------------------------------------------------------------------------------- four-step kernels
@triton.jit
def _col_fwd_tile(
    p_u, p_pre, p_tw, p_s, f_r, f_i, r_0, r_1, m_1, i_q, L,
    P: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, HAS_PRE: tl.constexpr, PREC: tl.constexpr,
):
    # columns [i_q BQ, i_q BQ + BQ) of the scratch row p_s [2, P, Q] from rows r_0, r_1 of u [., L] (x = u[r_0] +
    # i u[r_1], gated; row r_1 only where m_1): s[:, k_p, q] = W_N^(q k_p) * sum_p x[p Q + q] W_P^(p k_p)
    o_t = tl.arange(0, P)[:, None] * Q + (i_q * BQ + tl.arange(0, BQ))[None, :]  # n = p Q + q in, (k_p, q) out
    m_u = o_t < L
    b_xr = tl.load(p_u + r_0 * L + o_t, mask=m_u, other=0.0).to(tl.float32)
    b_xi = tl.load(p_u + r_1 * L + o_t, mask=m_u & m_1, other=0.0).to(tl.float32)
    if HAS_PRE:
        b_xr = b_xr * tl.load(p_pre + r_0 * L + o_t, mask=m_u, other=0.0).to(tl.float32)
        b_xi = b_xi * tl.load(p_pre + r_1 * L + o_t, mask=m_u & m_1, other=0.0).to(tl.float32)
    b_sc = _pow2_scale(b_xr, b_xi)
    b_ar, b_ai = _cdot(f_r, f_i, b_xr / b_sc, b_xi / b_sc, PREC)
    b_tr = tl.load(p_tw + o_t) * b_sc
    b_ti = tl.load(p_tw + P * Q + o_t) * b_sc
    tl.store(p_s + o_t, b_ar * b_tr - b_ai * b_ti)
    tl.store(p_s + P * Q + o_t, b_ar * b_ti + b_ai * b_tr)


@triton.jit
def _row_tile(
    p_s, p_k, b_ks, f1r, f1i, f2r, f2i, twr, twi,
    PQ: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr, CONJ_K: tl.constexpr,
):
    # one scratch row p_s [Q] (imaginary part PQ further on): FFT_Q, times the spectrum row p_k [2, Q] (times b_ks;
    # conjugated if CONJ_K), inverse FFT_Q, in place
    o_n = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    kr, ki = _load_plane(p_k, N1, N2)
    if CONJ_K:
        ki = -ki
    b_yr, b_yi = _conv_row(
        tl.load(p_s + o_n), tl.load(p_s + PQ + o_n), kr, ki, f1r, f1i, f1i, twr, twi, f2r, f2i, f2i, N1, N2, False, PREC
    )
    tl.store(p_s + o_n, b_yr * b_ks)
    tl.store(p_s + PQ + o_n, b_yi * b_ks)


@triton.jit
def _col_inv_tile(
    p_s, p_u, p_post, p_tw, p_y, f_r, f_i, b_bias, b_skip, r_0, r_1, m_1, i_q, L, T, LO, HI,
    P: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr,
    HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, PREC: tl.constexpr,
):
    # columns [i_q BQ, i_q BQ + BQ) of rows r_0 (real part) and r_1 (imaginary part, where m_1) of y [., T] from the
    # scratch row p_s [2, P, Q]: y[p Q + q] = sum_kp W_P^(-p k_p) W_N^(-q k_p) s[k_p, q], kept in [LO, HI], then the
    # fused kernel's epilogue (postgate, bias, skip u * D)
    o_n = tl.arange(0, P)[:, None] * Q + (i_q * BQ + tl.arange(0, BQ))[None, :]  # (k_p, q) in, n = p Q + q out
    b_dr = tl.load(p_s + o_n)
    b_di = tl.load(p_s + P * Q + o_n)
    b_tr = tl.load(p_tw + o_n)
    b_ti = tl.load(p_tw + P * Q + o_n)
    b_dr, b_di = b_dr * b_tr + b_di * b_ti, b_di * b_tr - b_dr * b_ti
    b_sc = _pow2_scale(b_dr, b_di)
    b_yr, b_yi = _cdot(f_r, -f_i, b_dr / b_sc, b_di / b_sc, PREC)
    m_c = (o_n >= LO) & (o_n <= HI)
    b_yr = tl.where(m_c, b_yr * b_sc, 0.0)
    b_yi = tl.where(m_c, b_yi * b_sc, 0.0)
    m_t = o_n < T
    if HAS_POST:
        b_yr = b_yr * tl.load(p_post + r_0 * T + o_n, mask=m_t, other=0.0).to(tl.float32)
        b_yi = b_yi * tl.load(p_post + r_1 * T + o_n, mask=m_t & m_1, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_yr += b_bias
        b_yi += b_bias
    if HAS_SKIP:
        m_u = o_n < L
        b_yr += b_skip * tl.load(p_u + r_0 * L + o_n, mask=m_u, other=0.0).to(tl.float32)
        b_yi += b_skip * tl.load(p_u + r_1 * L + o_n, mask=m_u & m_1, other=0.0).to(tl.float32)
    tl.store(p_y + r_0 * T + o_n, b_yr.to(p_y.dtype.element_ty), mask=m_t)
    tl.store(p_y + r_1 * T + o_n, b_yi.to(p_y.dtype.element_ty), mask=m_t & m_1)


@triton.jit
def fftconv_col_fwd_kernel(
    p_u, p_pre, p_fp, p_tw, p_s,
    B, H, L, B0, H0, HS,
    P: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, NQB: tl.constexpr,
    HAS_PRE: tl.constexpr, PREC: tl.constexpr,
):
    # the column pass of the slice's pair i_r // H (batch rows B0 + 2 (i_r // H) and the next, below B) and channel
    # H0 + i_r % H of u [., HS, L] into scratch row i_r: NQB programs per row, each taking every NQB-th block of BQ
    # columns
    i_r, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = H0 + i_r % H
    i_b0 = B0 + 2 * (i_r // H)
    f_r, f_i = _load_plane(p_fp, P, P)
    for i_q in range(i_s, Q // BQ, NQB):
        _col_fwd_tile(p_u, p_pre, p_tw, p_s + i_r * 2 * P * Q, f_r, f_i, i_b0 * HS + i_h, (i_b0 + 1) * HS + i_h,
                      i_b0 + 1 < B, i_q, L, P, Q, BQ, HAS_PRE, PREC)


@triton.jit
def fftconv_row_kernel(
    p_s, p_kf, p_ks, p_f1, p_f2, p_tw,
    H, NP,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr, PREC: tl.constexpr,
    CONJ_K: tl.constexpr,
):
    # rows k_p in [R i_k, R i_k + R) of s: FFT_Q, times the spectrum row, inverse FFT_Q, in place. Consecutive
    # programs take the NP pairs of one channel, so they read the same spectrum rows (from L2 after the first)
    i_c, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_c // NP
    i_r = (i_c % NP) * H + i_h  # scratch row (pair, channel)
    Q: tl.constexpr = N1 * N2
    f1r, f1i = _load_plane(p_f1, N1, N1)
    f2r, f2i = _load_plane(p_f2, N2, N2)
    twr, twi = _load_plane(p_tw, N1, N2)
    b_ks = tl.load(p_ks + i_h)
    for i_j in range(R):
        i_kp = i_k * R + i_j
        _row_tile(p_s + i_r * 2 * P * Q + i_kp * Q, p_kf + (i_h * P + i_kp) * 2 * Q, b_ks, f1r, f1i, f2r, f2i, twr,
                  twi, P * Q, N1, N2, PREC, CONJ_K)


@triton.jit
def fftconv_col_inv_kernel(
    p_s, p_u, p_post, p_bias, p_skip, p_fp, p_tw, p_y,
    B, H, L, T, LO, HI, B0, H0, HS,
    P: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, NQB: tl.constexpr,
    HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, PREC: tl.constexpr,
):
    # the inverse column pass of scratch row i_r and the epilogue, rows and channels as in the forward one
    i_r, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = H0 + i_r % H
    i_b0 = B0 + 2 * (i_r // H)
    f_r, f_i = _load_plane(p_fp, P, P)
    b_bias = tl.load(p_bias + i_h).to(tl.float32) if HAS_BIAS else 0.0
    b_skip = tl.load(p_skip + i_h).to(tl.float32) if HAS_SKIP else 0.0
    for i_q in range(i_s, Q // BQ, NQB):
        _col_inv_tile(p_s + i_r * 2 * P * Q, p_u, p_post, p_tw, p_y, f_r, f_i, b_bias, b_skip, i_b0 * HS + i_h,
                      (i_b0 + 1) * HS + i_h, i_b0 + 1 < B, i_q, L, T, LO, HI, P, Q, BQ, HAS_POST, HAS_BIAS, HAS_SKIP,
                      PREC)


@triton.jit
def fftconv_four_step_kernel(
    p_u, p_pre, p_post, p_bias, p_skip, p_kf, p_ks, p_fp, p_tw, p_f1, p_f2, p_twq, p_s, p_y,
    B, H, L, T, LO, HI, NP, SH,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BQ: tl.constexpr,
    HAS_PRE: tl.constexpr, HAS_POST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    PREC: tl.constexpr, CONJ_K: tl.constexpr,
):
    # The three four-step passes in one persistent program: for each (channel, pair) item i = h NP + pair it owns
    # (every num_programs-th), the column pass into its own scratch slot [2, P, Q], the row pass on the slot's P
    # rows, and the inverse column pass with the epilogue. A block barrier between the passes makes one thread's
    # stores visible to the others; the slot is rewritten by the next item, so its traffic mostly stays in L2 (the
    # three kernels write and read a scratch of the whole batch through HBM; they are still faster below N = 128K,
    # where the rows' products, not that traffic, set the time: README.md). The spectrum row and scale
    # of an item are those of channel (pair % SH) H + h: SH = 1 normally; the nested four-step's inner call (rows of
    # its scratch as the pairs) sets SH to the number of channels.
    i_g, n_g = tl.program_id(0), tl.num_programs(0)
    Q: tl.constexpr = N1 * N2
    p_slot = p_s + i_g.to(tl.int64) * 2 * P * Q
    for i_c in range(i_g, H * NP, n_g):
        i_h = (i_c // NP).to(tl.int64)
        i_b0 = 2 * (i_c % NP).to(tl.int64)
        i_k = (i_c % NP % SH).to(tl.int64) * H + i_h  # spectrum channel
        r_0 = i_b0 * H + i_h
        r_1 = r_0 + H
        m_1 = i_b0 + 1 < B
        f_r, f_i = _load_plane(p_fp, P, P)
        for i_q in range(Q // BQ):
            _col_fwd_tile(p_u, p_pre, p_tw, p_slot, f_r, f_i, r_0, r_1, m_1, i_q, L, P, Q, BQ, HAS_PRE, PREC)
        tl.debug_barrier()
        f1r, f1i = _load_plane(p_f1, N1, N1)
        f2r, f2i = _load_plane(p_f2, N2, N2)
        twr, twi = _load_plane(p_twq, N1, N2)
        b_ks = tl.load(p_ks + i_k)
        for i_kp in range(P):
            _row_tile(p_slot + i_kp * Q, p_kf + (i_k * P + i_kp) * 2 * Q, b_ks, f1r, f1i, f2r, f2i, twr, twi, P * Q,
                      N1, N2, PREC, CONJ_K)
        tl.debug_barrier()
        f_r, f_i = _load_plane(p_fp, P, P)
        b_bias = tl.load(p_bias + i_h).to(tl.float32) if HAS_BIAS else 0.0
        b_skip = tl.load(p_skip + i_h).to(tl.float32) if HAS_SKIP else 0.0
        for i_q in range(Q // BQ):
            _col_inv_tile(p_slot, p_u, p_post, p_tw, p_y, f_r, f_i, b_bias, b_skip, r_0, r_1, m_1, i_q, L, T, LO, HI,
                          P, Q, BQ, HAS_POST, HAS_BIAS, HAS_SKIP, PREC)
        tl.debug_barrier()


# -------------------------------------------------------------------------------------------------- dk kernel
@triton.jit
def fftconv_corr_kernel(
    p_g, p_v, p_kf, p_ks, p_f1, p_f2, p_tw, p_dv, p_dk,
    B, H, T, L, K, SHIFT, LO, HI, NS,
    N1: tl.constexpr, N2: tl.constexpr, PREC: tl.constexpr, HAS_DV: tl.constexpr, CONJ_K: tl.constexpr,
):
    # dk_s[h, j] = sum_{pairs in slice s} Re ifft(conj(G) V)[shift - j]  (conj(G0 + iG1)(V0 + iV1) has real
    # inverse transform corr(g0, v0) + corr(g1, v1): the cross terms are purely imaginary in time).
    # HAS_DV (fftconv_dv_dk): also dv = conv(g, k_flipped) of every pair it transforms, kept in [LO, HI] as the fused
    # kernel does (its _conv_row with 4 dots): G serves dk's conj(G) V and dv's G K_f, so each of g's rows is read
    # and transformed once for both
    i_h, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    N: tl.constexpr = N1 * N2
    o_n = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    f1r, f1i = _load_plane(p_f1, N1, N1)
    f2r, f2i = _load_plane(p_f2, N2, N2)
    twr, twi = _load_plane(p_tw, N1, N2)
    m_g = o_n < T
    m_v = o_n < L
    if HAS_DV:
        kr, ki = _load_plane(p_kf + i_h * 2 * N, N1, N2)
        if CONJ_K:
            ki = -ki
        b_ks = tl.load(p_ks + i_h)
        m_c = (o_n >= LO) & (o_n <= HI)
    b_sr = tl.zeros([N1, N2], dtype=tl.float32)
    b_si = tl.zeros([N1, N2], dtype=tl.float32)
    for i_p in range(i_s, (B + 1) // 2, NS):
        i_b0 = 2 * i_p
        i_b1 = i_b0 + 1
        m_1 = i_b1 < B
        b_gr = tl.load(p_g + (i_b0 * H + i_h) * T + o_n, mask=m_g, other=0.0).to(tl.float32)
        b_gi = tl.load(p_g + (i_b1 * H + i_h) * T + o_n, mask=m_g & m_1, other=0.0).to(tl.float32)
        b_gr, b_gi, b_sg = _fft_scaled(b_gr, b_gi, f1r, f1i, twr, twi, f2r, f2i, PREC)
        b_vr = tl.load(p_v + (i_b0 * H + i_h) * L + o_n, mask=m_v, other=0.0).to(tl.float32)
        b_vi = tl.load(p_v + (i_b1 * H + i_h) * L + o_n, mask=m_v & m_1, other=0.0).to(tl.float32)
        b_vr, b_vi, b_sv = _fft_scaled(b_vr, b_vi, f1r, f1i, twr, twi, f2r, f2i, PREC)
        b_w = b_sg * b_sv
        b_sr += (b_gr * b_vr + b_gi * b_vi) * b_w
        b_si += (b_gr * b_vi - b_gi * b_vr) * b_w
        if HAS_DV:
            b_yr, b_yi = _times_spectrum_inv(b_gr, b_gi, kr, ki, f1r, f1i, f1i, twr, twi, f2r, f2i, f2i, N1, N2,
                                             False, PREC)  # as _conv_row
            b_yr = tl.where(m_c, b_yr * b_sg * b_ks, 0.0)
            b_yi = tl.where(m_c, b_yi * b_sg * b_ks, 0.0)
            tl.store(p_dv + (i_b0 * H + i_h) * L + o_n, b_yr.to(p_dv.dtype.element_ty), mask=m_v)
            tl.store(p_dv + (i_b1 * H + i_h) * L + o_n, b_yi.to(p_dv.dtype.element_ty), mask=m_v & m_1)
    b_sc = _pow2_scale(b_sr, b_si)
    b_cr, b_ci = _monarch_inv(b_sr / b_sc, b_si / b_sc, f1r, f1i, f1i, twr, twi, f2r, f2i, f2i, False, PREC)
    # lag m of circular index n: n (n < L) or n - N (n > N - T); dk index j = shift - m
    o_m = tl.where(o_n < L, o_n, o_n - N)
    m_lag = (o_n < L) | (o_n > N - T)
    o_j = SHIFT - o_m
    m_j = m_lag & (o_j >= 0) & (o_j < K)
    tl.store(p_dk + (i_s * H + i_h) * K + o_j, b_cr * (b_sc / N), mask=m_j)


@triton.jit
def fftconv_corr_row_kernel(
    p_sg, p_sv, p_kf, p_ks, p_f1, p_f2, p_tw, p_c,
    H, NP,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, R: tl.constexpr, PREC: tl.constexpr,
    HAS_DV: tl.constexpr, CONJ_K: tl.constexpr,
):
    # c[h, :, k_p, :] = Q ifft_Q(sum over the NP pairs of conj(fft_Q(sg[pair, h, k_p])) fft_Q(sv[pair, h, k_p])) for
    # the rows k_p in [R i_k, R i_k + R): fftconv_corr_kernel's accumulation on the rows of the four-step scratch.
    # HAS_DV (fftconv_dv_dk): also fftconv_row_kernel's work on sg, step for step: the same fft_Q of each of g's rows
    # times the spectrum row (conjugated if CONJ_K), inverse, written over the row; so it is read and transformed once
    i_h, i_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    Q: tl.constexpr = N1 * N2
    o_n = tl.arange(0, N1)[:, None] * N2 + tl.arange(0, N2)[None, :]
    f1r, f1i = _load_plane(p_f1, N1, N1)
    f2r, f2i = _load_plane(p_f2, N2, N2)
    twr, twi = _load_plane(p_tw, N1, N2)
    if HAS_DV:
        b_ks = tl.load(p_ks + i_h)
    for i_j in range(R):
        i_kp = i_k * R + i_j
        if HAS_DV:
            kr, ki = _load_plane(p_kf + (i_h * P + i_kp) * 2 * Q, N1, N2)
            if CONJ_K:
                ki = -ki
        b_sr = tl.zeros([N1, N2], dtype=tl.float32)
        b_si = tl.zeros([N1, N2], dtype=tl.float32)
        for i_p in range(NP):
            o_row = (i_p * H + i_h) * 2 * P * Q + i_kp * Q + o_n
            b_gr, b_gi, b_sg = _fft_scaled(tl.load(p_sg + o_row), tl.load(p_sg + o_row + P * Q), f1r, f1i, twr, twi,
                                           f2r, f2i, PREC)
            b_vr, b_vi, b_sv = _fft_scaled(tl.load(p_sv + o_row), tl.load(p_sv + o_row + P * Q), f1r, f1i, twr, twi,
                                           f2r, f2i, PREC)
            b_w = b_sg * b_sv
            b_sr += (b_gr * b_vr + b_gi * b_vi) * b_w
            b_si += (b_gr * b_vi - b_gi * b_vr) * b_w
            if HAS_DV:
                b_yr, b_yi = _times_spectrum_inv(b_gr, b_gi, kr, ki, f1r, f1i, f1i, twr, twi, f2r, f2i, f2i, N1, N2,
                                                 False, PREC)  # as _conv_row
                tl.store(p_sg + o_row, b_yr * b_sg * b_ks)
                tl.store(p_sg + o_row + P * Q, b_yi * b_sg * b_ks)
        b_sc = _pow2_scale(b_sr, b_si)
        b_cr, b_ci = _monarch_inv(b_sr / b_sc, b_si / b_sc, f1r, f1i, f1i, twr, twi, f2r, f2i, f2i, False, PREC)
        o_c = i_h * 2 * P * Q + i_kp * Q + o_n
        tl.store(p_c + o_c, b_cr * b_sc)
        tl.store(p_c + o_c + P * Q, b_ci * b_sc)


@triton.jit
def fftconv_corr_col_kernel(
    p_c, p_fp, p_tw, p_dk,
    T, L, K, SHIFT,
    P: tl.constexpr, Q: tl.constexpr, BQ: tl.constexpr, NQB: tl.constexpr, PREC: tl.constexpr,
):
    # corr[n] = Re sum_kp W_P^(-p k_p) W_N^(-q k_p) c[h, k_p, q] / N at n = p Q + q (fftconv_col_inv_kernel's inverse,
    # real part only), written to dk[h, shift - lag(n)] as fftconv_corr_kernel does
    i_h, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    N: tl.constexpr = P * Q
    o_p = tl.arange(0, P)
    o_q = tl.arange(0, BQ)
    f_r, f_i = _load_plane(p_fp, P, P)
    for i_q in range(i_s, Q // BQ, NQB):
        o_n = o_p[:, None] * Q + (i_q * BQ + o_q)[None, :]  # [P, BQ]: (k_p, q) in, n = p Q + q out
        b_dr = tl.load(p_c + i_h * 2 * N + o_n)
        b_di = tl.load(p_c + i_h * 2 * N + N + o_n)
        b_tr = tl.load(p_tw + o_n)
        b_ti = tl.load(p_tw + N + o_n)
        b_dr, b_di = b_dr * b_tr + b_di * b_ti, b_di * b_tr - b_dr * b_ti
        b_sc = _pow2_scale(b_dr, b_di)
        b_yr = _dot(f_r, b_dr / b_sc, PREC) + _dot(f_i, b_di / b_sc, PREC)  # Re(conj(F_P) @ D)
        o_m = tl.where(o_n < L, o_n, o_n - N)
        m_lag = (o_n < L) | (o_n > N - T)
        o_j = SHIFT - o_m
        m_j = m_lag & (o_j >= 0) & (o_j < K)
        tl.store(p_dk + i_h * K + o_j, b_yr * (b_sc / N), mask=m_j)


@triton.jit
def fftconv_spectrum_kernel(p_r, p_lo, p_hi, p_ks, p_kf, N, P, P2, Q1, Q2, BLOCK: tl.constexpr):
    # kf[h, k_p, :, k1, k2] = f[k_p + P (k1 + Q1 k2)] / ks[h] from the rfft half r of a real row
    # (f[N - m] = conj(f[m]));
    # with P2 > 1 (the nested four-step: k_p = k_o P2 + k_i), f[k_o + (P / P2) (k_i + P2 (k1 + Q1 k2))] instead.
    # ks[h] = the power of two >= max |re|, |im| of the row (from its min p_lo and max p_hi), written by one program
    i_hp, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    i_h = i_hp // P
    i_p = i_hp % P
    Q = Q1 * Q2
    o = i_b * BLOCK + tl.arange(0, BLOCK)
    m = o < Q
    o_f = i_p // P2 + (P // P2) * (i_p % P2 + P2 * (o // Q2 + Q1 * (o % Q2)))
    m_lo = o_f <= N // 2
    p = p_r + (i_h * (N // 2 + 1) + tl.where(m_lo, o_f, N - o_f)) * 2
    b_m = tl.maximum(tl.load(p_hi + i_h), -tl.load(p_lo + i_h))
    b_s = tl.where(b_m > 0, tl.exp2(tl.ceil(tl.log2(tl.maximum(b_m, 1e-30)))), 1.0)
    tl.store(p_ks + i_h, b_s, mask=(i_p == 0) & (i_b == 0))
    b_re = tl.load(p, mask=m, other=0.0)
    b_im = tl.load(p + 1, mask=m, other=0.0)
    b_im = tl.where(m_lo, b_im, -b_im)
    tl.store(p_kf + i_hp * 2 * Q + o, b_re / b_s, mask=m)
    tl.store(p_kf + i_hp * 2 * Q + Q + o, b_im / b_s, mask=m)


# ---------------------------------------------------------------------------------------------------- host side
def _spectrum(k: Tensor, shift: int, N: int, layout: tuple) -> tuple[Tensor, Tensor]:
    """fft(k') in the kernels' order as fp32 planes scaled into [-1, 1], and the per-channel power-of-two scales.

    k'[m] = k[m + shift] circularly (taps before 0 wrap), so the kernels compute a plain circular convolution.
    layout = (P, Q1, Q2): [H, P, 2, Q1, Q2] with [kp, k1, k2] = f[kp + P (k1 + Q1 k2)] (four-step); P = 1 is the
    fused kernels' [H, 2, N1, N2] with [k1, k2] = f[k1 + N1 k2]. layout = (Po, Pi, Q1, Q2) (nested four-step):
    [H, Po, Pi, 2, Q1, Q2] with [ko, ki, k1, k2] = f[ko + Po (ki + Pi (k1 + Q1 k2))].
    Passes: the rolled, zero-padded k' (one write), its rfft, one min/max reduction, one kernel that takes the scale
    from the min/max, mirrors the half spectrum (f[N - m] = conj(f[m])), scales and permutes.
    """
    H, K = k.shape
    P, P2, q1, q2 = layout if len(layout) == 4 else (layout[0], 1, *layout[1:])
    P *= P2
    kp = torch.zeros(H, N, device=k.device, dtype=torch.float32)
    a0 = (-shift) % N  # tap j lands at (j - shift) mod N: a run of K slots that wraps at most once
    n0 = min(K, N - a0)
    kp[:, a0:a0 + n0] = k[:, :n0]
    if n0 < K:
        kp[:, :K - n0] = k[:, n0:]
    r = torch.view_as_real(torch.fft.rfft(kp, dim=-1))  # [H, N/2 + 1, 2]
    lo, hi = torch.aminmax(r.reshape(H, -1), dim=-1)
    scale = torch.empty(H, device=k.device, dtype=torch.float32)
    kf = torch.empty(H, P, 2, q1 * q2, device=k.device, dtype=torch.float32)
    block = min(1024, q1 * q2)
    _launch(fftconv_spectrum_kernel, (H * P, triton.cdiv(q1 * q2, block)), k, p_r=r, p_lo=lo, p_hi=hi, p_ks=scale,
            p_kf=kf, N=N, P=P, P2=P2, Q1=q1, Q2=q2, BLOCK=block)
    return kf, scale


# Spectrum reuse (README, "One spectrum per step"). The backward's du is a convolution with flip(k) at shift
# K - 1 - shift, whose spectrum is exactly the conjugate of the forward's (scale included). In eager autograd the
# forward's spectrum is handed on: the wrapper marks k when a backward will need du (keep_spectrum), the forward
# stores the spectrum it builds for a marked k, the backward names its flipped kernel (note_flip), and the du call
# takes the stored spectrum (conjugated in the kernels, CONJ_K) and drops it. Every entry holds a weak reference to
# its tensor and k._version: it is served only for the same live tensor at the same version, and goes when the
# tensor does. At most one entry per k (a newer one replaces it), and the wrapper clears its mark after the call.
# Under tracing (torch.compile, make_fx in any mode) and CUDA-graph capture nothing is stored or served (the
# spectrum is built in the graph).
_KEEP: dict = {}  # id(k) -> (weakref(k), k._version)
_KEPT: dict = {}  # (id(k), shift, N, layout) -> (weakref(k), k._version, kf, ks); at most one key per id(k)
_FLIPS: dict = {}  # id(flip(k)) -> (weakref(flip(k)), weakref(k), k._version)
SPECTRUM_COUNTS: collections.Counter = collections.Counter()  # "built", "reused" (for tests)


def _weak(x: Tensor, table: dict, key):
    def gone(ref):
        entry = table.get(key)
        if entry is not None and entry[0] is ref:
            del table[key]

    return weakref.ref(x, gone)


try:  # torch 2.11-2.13 have it; make_fx in real mode (no fake mode, is_compiling() False) shows only through it
    from torch.fx.experimental.proxy_tensor import get_proxy_mode as _get_proxy_mode
except ImportError:  # pragma: no cover - other torch versions: real-mode make_fx goes undetected
    _get_proxy_mode = None


def _caching(x: Tensor) -> bool:
    return (
        not _tracing(x)
        and not (_get_proxy_mode is not None and _get_proxy_mode() is not None)
        and not (x.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def keep_spectrum(k: Tensor) -> None:
    """Mark k: the next forward that builds k's spectrum keeps it for the backward's du (see note_flip)."""
    if _caching(k):
        _KEEP[id(k)] = (_weak(k, _KEEP, id(k)), k._version)


def unmark(k: Tensor) -> None:
    """Clear keep_spectrum's mark on k (the wrapper does after its call: a forward that built no spectrum, e.g. on
    the torch.fft path, leaves it unused). A spectrum already kept stays for the backward."""
    entry = _KEEP.get(id(k))
    if entry is not None and entry[0]() is k:
        del _KEEP[id(k)]


def note_flip(k_flipped: Tensor, k: Tensor) -> None:
    """Declare k_flipped = k.flip(-1): a convolution with it takes the conjugate of k's kept spectrum."""
    if _caching(k):
        _FLIPS[id(k_flipped)] = (_weak(k_flipped, _FLIPS, id(k_flipped)), weakref.ref(k), k._version)


def _live(entry, x: Tensor) -> bool:
    return entry is not None and entry[0]() is x and entry[1] == x._version


def _spectrum_for(k: Tensor, shift: int, N: int, layout: tuple) -> tuple[Tensor, Tensor, bool]:
    """(kf, ks, conj): k's spectrum for the kernels; conj=True when it is the kept spectrum of flip(k)."""
    if not _caching(k):
        return (*_spectrum(k, shift, N, layout), False)
    flip = _FLIPS.pop(id(k), None)
    if flip is not None and flip[0]() is k:
        base = flip[1]()
        if base is not None and base._version == flip[2]:
            key = (id(base), k.shape[-1] - 1 - shift, N, layout)
            entry = _KEPT.get(key)
            for other in [x for x in _KEPT if x[0] == id(base)]:  # the backward is the consumer: drop them all
                del _KEPT[other]
            if _live(entry, base):
                SPECTRUM_COUNTS["reused"] += 1
                return entry[2], entry[3], True
    kf, ks = _spectrum(k, shift, N, layout)
    SPECTRUM_COUNTS["built"] += 1
    if _live(_KEEP.get(id(k)), k):
        del _KEEP[id(k)]
        for other in [x for x in _KEPT if x[0] == id(k)]:  # one entry per k (its later call's backward drops all)
            del _KEPT[other]
        key = (id(k), shift, N, layout)
        _KEPT[key] = (_weak(k, _KEPT, key), k._version, kf, ks)
    return kf, ks, False


def _empty_if_none(x: Optional[Tensor], like: Tensor) -> Tensor:
    return like if x is None else x.contiguous()


class FusedConfig(NamedTuple):
    """One configuration of the fused kernel."""

    variant: str  # "loop" (pairs one after another), "stacked" (side by side), "t" (side by side, right products)
    rows: int  # pairs of rows per program
    gauss: bool = False  # complex products by 3 real dots (Gauss) instead of 4
    half_tables: bool = False  # DFT tables read from memory in fp16 (only with the "fp16" dots)


def _fused_config(N: int, prec: str = "fp16") -> FusedConfig:
    """Static configuration of the fused kernel, from H200 sweeps at B*H*L = 2^27 bf16:
    N = 512: loop over 4 pairs 0.94 ms (stacked x4 1.18, loop x1 1.36); N = 2048: "t" x2 with Gauss products and fp16
    tables 1.235 ms (t x2 1.371, stacked x2 1.395, loop x1 1.57); N = 4096: stacked x1 1.63 ms (loop x1 1.77).
    fp16 tables (the same fp16 values enter the dots; fewer registers) were never slower (0.7-3.9% faster in the 6
    pairs timed by ``benchmarks/fftconv_tune.py --dots``); Gauss products were 20% slower at N = 512 and are used only
    where they were timed faster. Both only with the "fp16" dots (bf16 inputs), the precision they were timed with
    (fp16 tables only feed fp16 dots): other precisions (``prec``) keep 4 dots and fp32 tables.
    Used under tracing and on the CPU; on CUDA the first eager call per size times the candidates (_candidates,
    which keep these dot options) and keeps the fastest."""
    fp16 = prec == "fp16"
    if N <= 512:
        return FusedConfig("loop", 4, half_tables=fp16)
    if N == 2048:
        return FusedConfig("t", 2, gauss=fp16, half_tables=fp16)
    return FusedConfig("stacked", max(1, 4096 // N), half_tables=fp16)


def _candidates(N: int, prec: str) -> list[FusedConfig]:
    n1, n2 = _split(N)
    rt = max(1, 64 // n1)  # "t": every product has >= 64 rows
    s = _fused_config(N, prec)
    cands = [s] + [FusedConfig(v, r, s.gauss, s.half_tables) for v, r in [("loop", 1), ("t", rt), ("t", 2 * rt)]]
    return [c for i, c in enumerate(cands) if c not in cands[:i] and c.rows * N <= 8192]


_FUSED_KERNELS = dict(loop=fftconv_fwd_kernel, stacked=fftconv_fwd_stacked_kernel, t=fftconv_fwd_t_kernel)
_CHOICE: dict = {}
# The persistent four-step kernel: its program count per SM (2 x 4 warps fit an SM's registers at Q = 2048), and the
# sizes N it is the default for, with its warp count there. H100, fwd at 2^27 bf16 elements (benchmarks/RESULTS.md):
# three kernels 2.48 / 3.11 ms at N = 8K / 32K, persistent 2.77 / 3.14 (tenth session); three kernels / persistent at
# 4 warps / at 8 warps, 264 programs: 5.08 / 4.81 / 5.77 ms at 128K, 4.44 / 4.67 / 4.03 at 256K, 5.44 / 5.93 / 6.57
# at 512K (twelfth session, `fftconv_tune.py --four-step`)
_PROGRAMS_PER_SM = 2
_PERSISTENT_WARPS = {1 << 17: 4, 1 << 18: 8}
# Largest N the op sends to the nested four-step path (bf16, fp16 dots; beyond the four-step limit): fwd at 2^27
# elements 8.50 ms against torch.fft's 11.02 at N = 2M, but 41.8 against 29.1 at 8M (H100, twelfth session)
_NESTED_MAX_N = 1 << 21
# Largest row of the four-step path where N / P_max allows a shorter one: at N = 128K, Q = 4096 rows spill (186
# bytes) and take 5.50 ms against 5.06 ms for Q = 2048 (H100, same run)
_ROW_Q = 2048
_MIN_TUNE_WORK = 2048  # pairs of rows x channels below which the static choice is used
# Largest fused size where the backward takes fftconv_dv_dk (fftconv_corr_kernel with HAS_DV) by default. Compiled for
# sm_90 (bf16, 4 warps) that kernel spills nothing at N = 512 and 416 / 760 / 2176 bytes at 1K / 2K / 4K, where the
# fused and dk kernels it replaces spill 16 + 112 / 248 + 280 / 1424 + 1400: untimed, so the larger sizes keep the two
# kernels until `fftconv_tune.py --dv-dk` says otherwise
_DV_DK_MAX_FUSED = 512
# The three-kernel four-step paths (fftconv_fwd off _PERSISTENT_WARPS' sizes, dk and dv_dk at every four-step size) take
# the rows in slices whose fp32 scratch (4 B H N bytes for the whole batch: 1 GiB at 2^27 elements and N = 2L) is at
# most this large, so that peak memory stays near the inputs' and outputs' (#6: <= 1/3 of the torch reference's).
# Each batch slice repeats dk's fixed work (its [H, 2, N] fp32 row sums' inverse transform, write and read): H100,
# 2^27 bf16 elements, fwd+bwd peak / time against one whole-batch scratch: -21% / +6% at L = 4K, -25% / +15% at 16K,
# -14% / +6% at 256K (benchmarks/RESULTS.md, twelfth session; before each slice's scratches were freed ahead of the
# next one's, which lowers the peak further)
_SCRATCH_BYTES = 512 << 20


class _Slice(NamedTuple):
    """Batch rows [b0, b1) x channels [h0, h1) of the three-kernel four-step path: whole pairs of rows (b1 - b0 even
    unless b1 = B)."""

    b0: int
    b1: int
    h0: int
    h1: int


def _slices(B: int, H: int, N: int) -> list[_Slice]:
    """The fewest slices whose column-pass scratch [(b1 - b0 + 1) // 2 (h1 - h0), 2, P, Q] fp32 fits
    _SCRATCH_BYTES, of even sizes (no small last slice: each slice costs its fixed work again): batch slices over
    every channel where one pair of rows fits, else one pair at a time by channel slices (one channel at least)."""
    def even(n: int, most: int) -> int:  # the size of ceil(n / most) equal parts of n
        parts = -(-n // max(1, most))
        return -(-n // parts)

    row = 2 * N * 4  # one pair of rows of one channel
    pairs = (B + 1) // 2
    if H * row <= _SCRATCH_BYTES:
        step = 2 * even(pairs, _SCRATCH_BYTES // (H * row))
        return [_Slice(b, min(B, b + step), 0, H) for b in range(0, B, step)]
    hc = even(H, _SCRATCH_BYTES // row)
    return [_Slice(b, min(B, b + 2), h, min(H, h + hc)) for b in range(0, B, 2) for h in range(0, H, hc)]


def _channels(x: Tensor, sl: _Slice) -> Tensor:
    """x [H, ...] (a spectrum, its scales) for the slice's channels; x itself where they are all of them (no view op
    in a traced graph)."""
    return x if sl.h0 == 0 and sl.h1 == x.shape[0] else x[sl.h0:sl.h1]


def _choose(N: int, prec: str, pairs: int, H: int, u: Tensor, run) -> FusedConfig:
    """The fused variant for this size: timed once per (N, precision, work size, device) on the first eager CUDA
    call, like triton.autotune (a candidate that fails to compile is skipped); the static choice otherwise."""
    key = (N, prec, (pairs * H).bit_length(), str(u.device))
    if key in _CHOICE:
        return _CHOICE[key]
    if not u.is_cuda or _tracing(u) or torch.cuda.is_current_stream_capturing() or pairs * H < _MIN_TUNE_WORK:
        return _fused_config(N, prec)  # tiny problems are launch-bound: timing them picks noise and costs compiles
    times = {}
    for cand in _candidates(N, prec):
        try:
            run(cand)
            times[cand] = triton.testing.do_bench(lambda: run(cand), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. OutOfResources for a tile that does not fit
            continue
    _CHOICE[key] = min(times, key=times.get) if times else _fused_config(N, prec)
    return _CHOICE[key]


def fftconv_fwd(
    u: Tensor,
    k: Tensor,
    shift: int,
    out_len: int,
    bias: Optional[Tensor] = None,
    skip: Optional[Tensor] = None,
    pregate: Optional[Tensor] = None,
    postgate: Optional[Tensor] = None,
    *,
    precision: Optional[str] = None,
    max_fused_n: Optional[int] = None,
    rows_per_program: Optional[int] = None,
    variant: Optional[str] = None,
    gauss: Optional[bool] = None,
    half_tables: Optional[bool] = None,
    num_warps: Optional[int] = None,
    programs: Optional[int] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """The fftconv contract (see hhfft.lowering.fftconv.fftconv) by the Monarch kernels.

    Args:
        u: [B, H, L] fp16/bf16/fp32, k: [H, K], bias/skip: [H], pregate: [B, H, L], postgate: [B, H, out_len]
        precision: dot precision ("fp16", "tf32", "tf32x3", "ieee"); default by u's dtype (precision_for)
        max_fused_n: largest N done by the fused kernel (smaller values force the four-step path, for tests)
        rows_per_program: pairs of rows per fused program (default: _fused_config)
        variant: fused kernel: "loop" (pairs one after another), "stacked" (side by side in one tile), "t" (side
            by side, every product a right product with >= 64 rows); default: timed once per size on CUDA (_choose)
        gauss: fused kernel's complex products by 3 real dots instead of 4 (default: _fused_config)
        half_tables: fused kernel reads its DFT tables in fp16; only with precision "fp16" (default: _fused_config,
            which applies only to the fp16 dots)
        num_warps: override the fused or the persistent four-step kernel's warp count (for tuning)
        programs: four-step sizes: the persistent kernel's program count (default on CUDA at N = 128K and 256K,
            _PERSISTENT_WARPS: _PROGRAMS_PER_SM per SM); 0 runs the three-kernel path (a column pass, the row pass
            and the inverse column pass through fp32 scratches, by slices), the default elsewhere. Above the
            four-step limit (max_fused * P_max) the nested path runs: an outer column pass of P_o <= P_max into an
            fp32 scratch, the persistent kernel on each of its rows (a circular convolution of length N / P_o with
            that row's spectrum; programs=0 means 4 there) and the outer inverse column pass with the epilogue
        out: optional contiguous [B, H, out_len] floating buffer to write y into (any float dtype)
    Returns:
        y: [B, H, out_len] in u's dtype (or out)
    """
    B, H, L = u.shape
    K = k.shape[-1]
    N = plan(L, K, out_len)
    prec = precision or precision_for(u.dtype)
    max_fused = max_fused_n or _MAX_FUSED[prec]
    if u.dtype not in (torch.float16, torch.bfloat16, torch.float32) or N > max_fused * _MAX_P[prec] ** 2:
        raise ValueError(
            f"fftconv_fwd: expected u in fp16/bf16/fp32 and FFT size <= {max_fused * _MAX_P[prec] ** 2} at precision "
            f"{prec}, got {u.dtype} and N={N}; use hhfft.lowering.fftconv.fftconv, which falls back to torch.fft"
        )
    u = u.contiguous()
    y = torch.empty(B, H, out_len, device=u.device, dtype=u.dtype) if out is None else out
    if tuple(y.shape) != (B, H, out_len) or not y.is_floating_point() or not y.is_contiguous():
        raise ValueError(
            f"fftconv_fwd: out must be a contiguous floating {(B, H, out_len)} tensor, got {tuple(y.shape)} {y.dtype}"
        )
    flags = dict(HAS_POST=postgate is not None, HAS_BIAS=bias is not None, HAS_SKIP=skip is not None, PREC=prec)
    common = dict(
        p_u=u, p_post=_empty_if_none(postgate, u), p_bias=_empty_if_none(bias, u),
        p_skip=_empty_if_none(skip, u), p_y=y, B=B, H=H, L=L, T=out_len, LO=-shift, HI=L + K - 2 - shift,
    )
    if half_tables and prec != "fp16":
        raise ValueError(f"fftconv_fwd: half_tables=True needs precision 'fp16' (fp16 tables only feed fp16 dots), "
                         f"got {prec!r}; leave half_tables unset or False for this precision")
    pairs = (B + 1) // 2
    if N <= max_fused:
        n1, n2 = _split(N)
        tw = _tables(n1, n2, u.device, u)[2]
        kf, ks, conj_k = _spectrum_for(k, shift, N, (1, n1, n2))
        kw = dict(
            **common, p_pre=_empty_if_none(pregate, u), p_kf=kf, p_ks=ks, p_tw=tw, N1=n1, N2=n2,
            HAS_PRE=pregate is not None, CONJ_K=conj_k, **flags,
        )

        def run(cfg: FusedConfig):
            f1, f2 = _fused_tables(n1, n2, torch.float16 if cfg.half_tables else torch.float32, u.device, u)
            _launch(_FUSED_KERNELS[cfg.variant], (triton.cdiv(pairs, cfg.rows), H), u, **kw, p_f1=f1, p_f2=f2,
                    R=cfg.rows, GAUSS=cfg.gauss, num_warps=num_warps or _num_warps(n1, n2))

        static = _fused_config(N, prec)
        if (variant, rows_per_program, gauss, half_tables) != (None, None, None, None):
            v = variant or static.variant
            cfg = FusedConfig(
                v,
                rows_per_program or (static.rows if v == static.variant else 1),
                static.gauss if gauss is None else gauss,
                static.half_tables if half_tables is None else half_tables,
            )
        else:
            cfg = _choose(N, prec, pairs, H, u, run)
        run(cfg)
        return y
    cap = max_fused * _MAX_P[prec]
    if programs is None:
        programs = _default_programs(u) if N in _PERSISTENT_WARPS or N > cap else 0
    if N > cap:  # nested: an outer column pass, the persistent kernel on each row of its scratch, the outer inverse
        fo = _FourStep.make(N, cap, u, rows=False)
        fi = _FourStep.make(fo.Q, max_fused, u)
        kf, ks, conj_k = _spectrum_for(k, shift, N, (fo.P, fi.P, fi.q1, fi.q2))
        s = _col_fwd(fo, u, B, H, prec, pregate)
        n = s.shape[0]  # rows (pair, channel) of s; as the inner call's pairs, each row's P_o sub-rows its channels
        _persistent(
            fi, kf, (ks / (fo.P * fi.P)).repeat_interleave(fo.P), conj_k, programs or 4, num_warps, NP=n, SH=H,
            p_u=s, p_pre=s, p_post=s, p_bias=s, p_skip=s, p_y=s, B=2 * n, H=fo.P, L=fo.Q, T=fo.Q, LO=0, HI=fo.Q - 1,
            HAS_PRE=False, HAS_POST=False, HAS_BIAS=False, HAS_SKIP=False, PREC=prec,
        )
        _col_inv(fo, s, **common, **flags)
        return y
    fs = _FourStep.make(N, max_fused, u)
    kf, ks, conj_k = _spectrum_for(k, shift, N, (fs.P, fs.q1, fs.q2))
    if programs:  # one persistent kernel, a scratch slot per program
        _persistent(fs, kf, ks / fs.P, conj_k, programs, num_warps or _PERSISTENT_WARPS.get(N), NP=pairs, **common,
                    p_pre=_empty_if_none(pregate, u), HAS_PRE=pregate is not None, **flags)
        return y
    for sl in _slices(B, H, N):  # each slice has its own scratch; the kernels index the whole tensors
        s = _col_fwd(fs, u, B, H, prec, pregate, sl)
        _row_pass(fs, s, _channels(kf, sl), _channels(ks, sl), conj_k, (sl.b1 - sl.b0 + 1) // 2, sl.h1 - sl.h0, prec)
        _col_inv(fs, s, sl, **common, **flags)
        del s  # before the next slice's scratch is made
    return y


def _four_step(N: int, max_fused: int) -> tuple[int, int, int, int, int]:
    """N = P Q for the four-step kernels: (P, Q, BQ, NQB, num_warps) (Q up to the fused limit, P >= 16)."""
    Q = min(max_fused, N // 16)
    P = N // Q
    bq = min(Q, 64 if P <= 32 else 32)
    return P, Q, bq, max(1, min(Q // bq, 8)), 4 if P * bq <= 2048 else 8


class _FourStep(NamedTuple):
    """The four-step factorisation N = P Q of _four_step with its tables (DFT_P, twiddles W_N^(kp q), DFT_Q1/Q2 and the
    row twiddles)."""

    P: int
    Q: int
    q1: int
    q2: int
    bq: int
    nqb: int
    nw: int
    fp: Tensor
    tw: Tensor
    fq1: Tensor
    fq2: Tensor
    twq: Tensor

    @property
    def rr(self) -> int:
        """Rows per program of the row kernels, as the fused kernel's loop (P >= 16 is a multiple of 4)."""
        return 4 if self.Q <= 512 else 1

    @staticmethod
    def make(N: int, max_fused: int, like: Tensor, rows: bool = True) -> "_FourStep":
        """rows=False: the column passes' tables only (the nested path's outer split, whose rows are four-step);
        rows=True keeps the rows at _ROW_Q or shorter where P <= 128 allows it."""
        P, Q, bq, nqb, nw = _four_step(N, min(max_fused, max(_ROW_Q, N // _MAX_P["fp16"])) if rows else max_fused)
        q1, q2 = _split(Q)
        dev = like.device
        fq1, fq2, twq = _tables(q1, q2, dev, like) if rows else (like.new_empty(0),) * 3
        fp = _tables(P, P, dev, like)[0]
        tw = _cached(("tw", P, Q, str(dev)), like, lambda: _twiddles(P, Q, N, -1.0, dev))
        return _FourStep(P, Q, q1, q2, bq, nqb, nw, fp, tw, fq1, fq2, twq)


def _default_programs(x: Tensor) -> int:
    """The persistent kernel's program count on x's device (0 off CUDA: the three kernels)."""
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0


def _persistent(fs: _FourStep, kf: Tensor, ks: Tensor, conj_k: bool, programs: int, num_warps: Optional[int], *,
                NP: int, SH: int = 1, **kw) -> None:
    """fftconv_four_step_kernel on the NP pairs x H channels of kw (its p_u, p_pre, p_post, p_bias, p_skip, p_y, B, H,
    L, T, LO, HI and flags), at most ``programs`` programs with a scratch slot each; ks already holds the 1/P."""
    G = min(programs, NP * kw["H"])
    slots = torch.empty(G, 2, fs.P, fs.Q, device=kf.device, dtype=torch.float32)
    _launch(
        fftconv_four_step_kernel, (G,), kf, **kw, p_kf=kf, p_ks=ks, p_fp=fs.fp, p_tw=fs.tw, p_f1=fs.fq1, p_f2=fs.fq2,
        p_twq=fs.twq, p_s=slots, NP=NP, SH=SH, P=fs.P, N1=fs.q1, N2=fs.q2, BQ=fs.bq, CONJ_K=conj_k,
        num_warps=num_warps or 4,
    )


def _col_fwd(fs: _FourStep, x: Tensor, B: int, H: int, prec: str, pregate: Optional[Tensor] = None,
             sl: Optional[_Slice] = None) -> Tensor:
    """The forward column pass of the slice ``sl`` (default: all) of x [B, H, n] (contiguous; times pregate [B, H, n]
    if given) into a new fp32 scratch [(b1 - b0 + 1) // 2 (h1 - h0), 2, P, Q]."""
    sl = sl or _Slice(0, B, 0, H)
    s = torch.empty((sl.b1 - sl.b0 + 1) // 2 * (sl.h1 - sl.h0), 2, fs.P, fs.Q, device=x.device, dtype=torch.float32)
    _launch(
        fftconv_col_fwd_kernel, (s.shape[0], fs.nqb), x, p_u=x, p_pre=_empty_if_none(pregate, x), p_fp=fs.fp,
        p_tw=fs.tw, p_s=s, B=sl.b1, H=sl.h1 - sl.h0, L=x.shape[-1], B0=sl.b0, H0=sl.h0, HS=H, P=fs.P, Q=fs.Q,
        BQ=fs.bq, NQB=fs.nqb, HAS_PRE=pregate is not None, PREC=prec, num_warps=fs.nw,
    )
    return s


def _row_pass(fs: _FourStep, s: Tensor, kf: Tensor, ks: Tensor, conj_k: bool, pairs: int, H: int, prec: str) -> None:
    """FFT_Q, product with the spectrum (kf, ks from _spectrum_for; conjugated if conj_k) and inverse on every row of
    the scratch s [pairs H, 2, P, Q], in place."""
    _launch(
        fftconv_row_kernel, (pairs * H, fs.P // fs.rr), s, p_s=s, p_kf=kf, p_ks=ks / fs.P, p_f1=fs.fq1, p_f2=fs.fq2,
        p_tw=fs.twq, H=H, NP=pairs, P=fs.P, N1=fs.q1, N2=fs.q2, R=fs.rr, PREC=prec, CONJ_K=conj_k,
        num_warps=_num_warps(fs.q1, fs.q2),
    )


def _col_inv(fs: _FourStep, s: Tensor, sl: Optional[_Slice] = None, *, B: int, H: int, **epilogue) -> None:
    """The inverse column pass of the scratch s of slice ``sl`` (default: all of B x H) and the epilogue
    (fftconv_col_inv_kernel's p_u, p_post, p_bias, p_skip, p_y, L, T, LO, HI, HAS_POST, HAS_BIAS, HAS_SKIP, PREC)
    into p_y [B, H, T]."""
    sl = sl or _Slice(0, B, 0, H)
    _launch(
        fftconv_col_inv_kernel, (s.shape[0], fs.nqb), s, p_s=s, p_fp=fs.fp, p_tw=fs.tw, B=sl.b1, H=sl.h1 - sl.h0,
        B0=sl.b0, H0=sl.h0, HS=H, P=fs.P, Q=fs.Q, BQ=fs.bq, NQB=fs.nqb, num_warps=fs.nw, **epilogue,
    )


def _corr_rows(fs: _FourStep, sg: Tensor, sv: Tensor, H: int, prec: str,
               dv_spectrum: Optional[tuple] = None) -> Tensor:
    """The correlation's row pass on the column passes sg, sv of g and v: c [H, 2, P, Q] (sv read only). With
    dv_spectrum = (kf, ks, conj_k) (fftconv_dv_dk) the same kernel also writes dv's rows over sg (HAS_DV)."""
    c = torch.empty(H, 2, fs.P, fs.Q, device=sg.device, dtype=torch.float32)
    kf, ks, conj_k = dv_spectrum or (sg, sg, False)
    _launch(
        fftconv_corr_row_kernel, (H, fs.P // fs.rr), sg, p_sg=sg, p_sv=sv, p_kf=kf, p_ks=ks, p_f1=fs.fq1,
        p_f2=fs.fq2, p_tw=fs.twq, p_c=c, H=H, NP=sg.shape[0] // H, P=fs.P, N1=fs.q1, N2=fs.q2, R=fs.rr, PREC=prec,
        HAS_DV=dv_spectrum is not None, CONJ_K=conj_k, num_warps=_num_warps(fs.q1, fs.q2),
    )
    return c


def _corr_col(fs: _FourStep, c: Tensor, T: int, L: int, K: int, shift: int, prec: str) -> Tensor:
    """dk [H, K] fp32 from the rows' inverse transforms c [H, 2, P, Q] (the correlation's inverse column pass)."""
    H = c.shape[0]
    dk = torch.zeros(H, K, device=c.device, dtype=torch.float32)  # lags outside the correlation stay 0
    _launch(
        fftconv_corr_col_kernel, (H, fs.nqb), c, p_c=c, p_fp=fs.fp, p_tw=fs.tw, p_dk=dk, T=T, L=L, K=K,
        SHIFT=shift, P=fs.P, Q=fs.Q, BQ=fs.bq, NQB=fs.nqb, PREC=prec, num_warps=fs.nw,
    )
    return dk


def _corr_fused(g: Tensor, v: Tensor, K: int, shift: int, prec: str, dv: Optional[tuple] = None) -> Tensor:
    """dk [H, K] fp32 by fftconv_corr_kernel at a fused size N = plan(T, L, 0), over enough batch slices (H x slices
    >= 264) to fill the GPU, each summing its pairs in registers (the slices' partial sums are added here). With
    dv = (out, kf, ks, conj_k, shift_dv) (fftconv_dv_dk) it also writes dv = conv(g, k_flipped) into out (HAS_DV)."""
    B, H, T = g.shape
    L = v.shape[-1]
    n1, n2 = _split(plan(T, L, 0))
    f1, f2, tw = _tables(n1, n2, g.device, g)
    ns = max(1, min((B + 1) // 2, -(-264 // H)))
    part = torch.zeros(ns, H, K, device=g.device, dtype=torch.float32)
    out, kf, ks, conj_k, shift_dv = dv or (g, g, g, False, None)
    lo, hi = (0, 0) if dv is None else (-shift_dv, T + K - 2 - shift_dv)  # dv's support, as fftconv_fwd's
    _launch(
        fftconv_corr_kernel, (H, ns), g, p_g=g, p_v=v, p_kf=kf, p_ks=ks, p_f1=f1, p_f2=f2, p_tw=tw, p_dv=out,
        p_dk=part, B=B, H=H, T=T, L=L, K=K, SHIFT=shift, LO=lo, HI=hi, NS=ns, N1=n1, N2=n2,
        PREC=prec, HAS_DV=dv is not None, CONJ_K=conj_k, num_warps=_num_warps(n1, n2),
    )
    return part.sum(0)


def fftconv_corr_fwd(
    g: Tensor, v: Tensor, shift: int, K: int, *, precision: Optional[str] = None, max_fused_n: Optional[int] = None
) -> Tensor:
    """dk[h, j] = sum_{b,t} g[b,h,t] v[b,h,t+shift-j], j in [0, K), by the Monarch kernels.

    Up to the fused limit one kernel (fftconv_corr_kernel); above it the four-step path: the column pass of the
    forward on g and on v (two fp32 scratches), a row kernel that accumulates conj(G) V over the pairs of rows and
    inverse-transforms each row of the sum, and a column kernel that finishes the inverse and writes the lags.

    Args:
        g: [B, H, T], v: [B, H, L] (fp16/bf16/fp32); FFT size N = plan(T, L, 0) <= the fused limit x the largest
            column DFT (_MAX_P) of the precision
        precision, max_fused_n: as in fftconv_fwd (max_fused_n < N forces the four-step path)
    Returns:
        dk: [H, K] fp32
    """
    B, H, T = g.shape
    L = v.shape[-1]
    N = plan(T, L, 0)
    prec = precision or precision_for(torch.promote_types(g.dtype, v.dtype))
    max_fused = max_fused_n or _MAX_FUSED[prec]
    if N > max_fused * _MAX_P[prec] or g.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"fftconv_corr_fwd: expected N <= {max_fused * _MAX_P[prec]} and fp16/bf16/fp32, got N={N}, {g.dtype}; "
            "use hhfft.lowering.fftconv.fftconv_corr, which falls back to torch.fft"
        )
    g, v = g.contiguous(), v.contiguous()
    if N > max_fused:
        return _corr_four_step(_FourStep.make(N, max_fused, g), g, v, K, shift, prec)
    return _corr_fused(g, v, K, shift, prec)


def _corr_four_step(fs: _FourStep, g: Tensor, v: Tensor, K: int, shift: int, prec: str,
                    dv: Optional[tuple] = None) -> Tensor:
    """dk [H, K] fp32 by the four-step correlation kernels, slice after slice (_slices; the lags of a channel slice
    add up over the batch slices, dk being linear in the pairs). With dv = (out, kf, ks, conj_k, shift_dv)
    (fftconv_dv_dk; ks already holds the 1/P) the row kernel also writes dv = conv(g, k_flipped) over g's scratch,
    whose inverse column pass puts it into out."""
    B, H, T = g.shape
    L = v.shape[-1]
    parts: dict = {}  # (h0, h1) -> [h1 - h0, K]
    for sl in _slices(B, H, fs.P * fs.Q):
        sg, sv = _col_fwd(fs, g, B, H, prec, sl=sl), _col_fwd(fs, v, B, H, prec, sl=sl)
        spectrum = None if dv is None else (_channels(dv[1], sl), _channels(dv[2], sl), dv[3])
        c = _corr_rows(fs, sg, sv, sl.h1 - sl.h0, prec, spectrum)
        del sv
        lags = _corr_col(fs, c, T, L, K, shift, prec)
        key = (sl.h0, sl.h1)
        parts[key] = lags if key not in parts else parts[key].add_(lags)
        if dv is not None:
            out, shift_dv = dv[0], dv[4]
            _col_inv(fs, sg, sl, p_u=g, p_post=g, p_bias=g, p_skip=g, p_y=out, B=B, H=H, L=T, T=L, LO=-shift_dv,
                     HI=T + K - 2 - shift_dv, HAS_POST=False, HAS_BIAS=False, HAS_SKIP=False, PREC=prec)
        del sg, c  # before the next slice's scratches are made (else two slices' are alive at once)
    return torch.cat([parts[key] for key in sorted(parts)]) if len(parts) > 1 else next(iter(parts.values()))


def dv_dk_shared(g: Tensor, v: Tensor, K: int) -> bool:
    """Whether the backward's dv = conv(g, flip(k); K-1-shift) and dk = corr(g, v; shift) take the kernels at one FFT
    size, so that fftconv_dv_dk can read and transform g once for both (bf16/fp16, same dtypes): every four-step size,
    and the fused sizes up to _DV_DK_MAX_FUSED."""
    if g.dtype not in (torch.float16, torch.bfloat16) or v.dtype != g.dtype:
        return False
    T, L = g.shape[-1], v.shape[-1]
    N = plan(T, K, L)
    prec = precision_for(g.dtype)
    return N == plan(T, L, 0) and (N <= min(_DV_DK_MAX_FUSED, _MAX_FUSED[prec])
                                   or _MAX_FUSED[prec] < N <= _MAX_FUSED[prec] * _MAX_P[prec])


def fftconv_dv_dk(
    g: Tensor, v: Tensor, k_flipped: Tensor, shift: int, *, precision: Optional[str] = None,
    max_fused_n: Optional[int] = None, out: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The backward's two long products, each of g's rows read and transformed once for both:
    dv = fftconv(g, k_flipped, K-1-shift, out_len=L) and dk = fftconv_corr(g, v, shift, K).

    Up to the fused limit: one kernel, fftconv_corr_kernel writing dv for every pair it transforms (HAS_DV). Above
    it (four-step): column passes of g and v; one row kernel (fftconv_corr_row_kernel with HAS_DV) that transforms
    each row of both once, accumulates dk's conj(G) V over the pairs and writes dv's inverse G K_f over g's row;
    dk's inverse column pass; dv's inverse column pass. Saves, against the two ops, one read and one transform of
    each of g's rows (and at the four-step sizes g's second column pass: a read of g and a write of the fp32
    scratch).

    Args:
        g: [B, H, T], v: [B, H, L] (one dtype: fp16/bf16, or fp32 with an explicit precision), k_flipped: [H, K]
            (flip(k); its spectrum is the conjugate of k's kept one when note_flip declared it)
        precision, max_fused_n: as in fftconv_fwd; N = plan(T, K, L) must equal plan(T, L, 0) and be within the
            four-step limit (dv_dk_shared)
        out: optional contiguous [B, H, L] floating buffer to write dv into (any float dtype)
    Returns:
        dv: [B, H, L] in g's dtype (or out); dk: [H, K] fp32
    """
    B, H, T = g.shape
    L = v.shape[-1]
    K = k_flipped.shape[-1]
    N = plan(T, K, L)
    prec = precision or precision_for(g.dtype)
    max_fused = max_fused_n or _MAX_FUSED[prec]
    if (N != plan(T, L, 0) or N > max_fused * _MAX_P[prec] or v.dtype != g.dtype
            or g.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        raise ValueError(
            f"fftconv_dv_dk: expected g and v of one fp16/bf16/fp32 dtype and one FFT size for dv and dk within the "
            f"four-step limit (N <= {max_fused * _MAX_P[prec]}), got {g.dtype}/{v.dtype}, N = {N} (dv) and "
            f"{plan(T, L, 0)} (dk); call fftconv_fwd and fftconv_corr_fwd separately"
        )
    g, v = g.contiguous(), v.contiguous()
    shift_dv = K - 1 - shift
    dv = torch.empty(B, H, L, device=g.device, dtype=g.dtype) if out is None else out
    if tuple(dv.shape) != (B, H, L) or not dv.is_floating_point() or not dv.is_contiguous():
        raise ValueError(f"fftconv_dv_dk: out must be a contiguous floating {(B, H, L)} tensor, got "
                         f"{tuple(dv.shape)} {dv.dtype}")
    if N <= max_fused:
        kf, ks, conj_k = _spectrum_for(k_flipped, shift_dv, N, (1, *_split(N)))
        return dv, _corr_fused(g, v, K, shift, prec, (dv, kf, ks, conj_k, shift_dv))
    fs = _FourStep.make(N, max_fused, g)
    kf, ks, conj_k = _spectrum_for(k_flipped, shift_dv, N, (fs.P, fs.q1, fs.q2))
    return dv, _corr_four_step(fs, g, v, K, shift, prec, (dv, kf, ks / fs.P, conj_k, shift_dv))

