"""``hhfft::fftconv``, its kernel-gradient primitive ``hhfft::fftconv_corr``, and ``hhfft::fftconv_dv_dk`` (the
backward's two products in one call, so the four-step kernels share g's column pass; first-order backward only).

All three are ``torch.library.triton_op``s (schema, fake): on CUDA they run the Monarch Triton kernels
(``hhfft/kernels/fftconv/monarch.py``) for fp16/bf16/fp32 inputs up to the kernels' largest FFT size, elsewhere (CPU,
fp64, longer sequences) their plain-torch implementation. Differentiation goes through two
``torch.autograd.Function`` wrappers whose backward and jvp are written with the same two functions, so the set is
closed under differentiation: double backward (``loss.backward(create_graph=True)``) and forward-over-reverse
(``torch.func.jvp(torch.func.grad(f))``) both work. Graph rewrites insert :func:`fftconv`, the wrapper.

The maths (see ``hhfft/kernels/fftconv/README.md``): with v = pregate * u and g = dy * postgate,
    y  = postgate * conv(v, k; shift) + bias + skip * u
    dv = conv(g, flip(k); K - 1 - shift)           (same op, flipped kernel)
    dk = corr(g, v; shift)                          (summed over the batch)
and corr's own derivatives are again conv calls.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the Monarch kernels need triton; without it every device uses the torch.fft implementation
    from hhfft.kernels.fftconv import monarch as _monarch
except ImportError:  # pragma: no cover - triton is an optional dependency
    _monarch = None

__all__ = ["fftconv", "fftconv_corr", "fft_size"]


def fft_size(n: int) -> int:
    """Smallest 2^a * 3^b * 5^c >= n (sizes pocketfft/cuFFT handle fastest). Works on python ints only."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 5
        p3 *= 3
    return best


def _fast_size(n) -> int:
    # Under dynamic shapes n is a SymInt: n itself (any length is exact; int(n) would specialize the graph to this
    # length, so that every new length compiled again).
    return fft_size(n) if isinstance(n, int) else n


def _compute_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _fit(x: Tensor, n) -> Tensor:
    """Zero-pad or crop the last dimension to length n (F.pad crops with a negative pad)."""
    return F.pad(x, (0, n - x.shape[-1]))


def _window(c: Tensor, valid, offset, length) -> Tensor:
    """w[..., t] = c[..., t + offset] for t + offset in [0, valid), else 0; t in [0, length)."""
    if offset >= valid or offset + length <= 0:
        return c.new_zeros(*c.shape[:-1], length)
    return F.pad(_fit(c, valid), (-offset, length + offset - valid))


# --------------------------------------------------------------------------------------------------- CPU (plain torch)
def _fftconv_torch(u, k, shift, out_len, bias, skip, pregate, postgate) -> Tensor:
    ct = _compute_dtype(u, k, bias, skip, pregate, postgate)
    if u.shape[0] == 0 or u.shape[1] == 0:  # pocketfft/MKL refuse an empty batch of transforms: an empty result
        return u.new_zeros(*u.shape[:-1], out_len)
    L, K = u.shape[-1], k.shape[-1]
    v = u.to(ct) if pregate is None else u.to(ct) * pregate.to(ct)
    n = _fast_size(L + K - 1)
    c = torch.fft.irfft(torch.fft.rfft(v, n=n) * torch.fft.rfft(k.to(ct), n=n), n=n)
    y = _window(c, L + K - 1, shift, out_len)
    if postgate is not None:
        y = y * postgate.to(ct)
    if bias is not None:
        y = y + bias.to(ct)[:, None]
    if skip is not None:
        y = y + skip.to(ct)[:, None] * _fit(u.to(ct), out_len)
    return y.to(u.dtype)


def _fftconv_corr_torch(g, v, shift, K) -> Tensor:
    ct = _compute_dtype(g, v)
    if g.shape[0] == 0 or g.shape[1] == 0:  # an empty batch: the correlation sums nothing
        return g.new_zeros(g.shape[1], K, dtype=ct)
    T, L = g.shape[-1], v.shape[-1]
    n = _fast_size(T + L - 1)
    spec = (torch.fft.rfft(g.to(ct), n=n).conj() * torch.fft.rfft(v.to(ct), n=n)).sum(0)
    c = torch.fft.irfft(spec, n=n)  # c[m mod n] = sum_{b,t} g[t] v[t + m],  m in (-T, L)
    # dk[j] = c[shift - j]: lay c out as m = -(T-1) .. L-1, then read it backwards from m = shift.
    lin = torch.cat([c[..., n - (T - 1):], c[..., :L]], dim=-1) if T > 1 else c[..., :L]
    rev = lin.flip(-1)  # rev[i] = c[L - 1 - i]
    return _window(rev, T + L - 1, L - 1 - shift, K)


# ---------------------------------------------------------------------------------------------------------- the ops
# The three ops are torch.library.triton_op: Inductor traces into them, so on CUDA the compiled code calls the
# Monarch Triton kernels directly (no graph break, CUDA graphs work). The device branch is static at trace time, so
# on the CPU the traced body holds only torch.fft ops and no Triton kernel reaches Inductor's CPU codegen.
def _use_kernels(x: Tensor, *others: Optional[Tensor]) -> bool:
    return (
        _monarch is not None
        and x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and all(o is None or o.dtype != torch.float64 for o in others)
    )


@torch.library.triton_op("hhfft::fftconv", mutates_args=())
def _fftconv_op(
    u: Tensor,
    k: Tensor,
    shift: int,
    out_len: int,
    bias: Optional[Tensor] = None,
    skip: Optional[Tensor] = None,
    pregate: Optional[Tensor] = None,
    postgate: Optional[Tensor] = None,
) -> Tensor:
    if _use_kernels(u, k, bias, skip, pregate, postgate):
        N = _monarch.plan(u.shape[-1], k.shape[-1], out_len)
        if _monarch.supported(u, N):
            return _monarch.fftconv_fwd(
                u, k, shift, out_len, bias=bias, skip=skip, pregate=pregate, postgate=postgate
            )
    return _fftconv_torch(u, k, shift, out_len, bias, skip, pregate, postgate)


@_fftconv_op.register_fake
def _(u, k, shift, out_len, bias=None, skip=None, pregate=None, postgate=None):
    return u.new_empty(u.shape[0], u.shape[1], out_len)


@torch.library.triton_op("hhfft::fftconv_corr", mutates_args=())
def _fftconv_corr_op(g: Tensor, v: Tensor, shift: int, K: int) -> Tensor:
    if _use_kernels(g, v) and _monarch.corr_supported(g, v, _monarch.plan(g.shape[-1], v.shape[-1], 0)):
        return _monarch.fftconv_corr_fwd(g, v, shift, K)
    return _fftconv_corr_torch(g, v, shift, K)


@_fftconv_corr_op.register_fake
def _(g, v, shift, K):
    return g.new_empty(g.shape[1], K, dtype=_compute_dtype(g, v))


@torch.library.triton_op("hhfft::fftconv_dv_dk", mutates_args=())
def _fftconv_dv_dk_op(g: Tensor, v: Tensor, k_flipped: Tensor, shift: int) -> tuple[Tensor, Tensor]:
    """The backward's dv = fftconv(g, k_flipped, K-1-shift, out_len=L) and dk = fftconv_corr(g, v, shift, K) in one
    call, so that the kernels read and transform g once for both (the backward uses it when dv_dk_shared)."""
    K, L = k_flipped.shape[-1], v.shape[-1]
    if _use_kernels(g, v, k_flipped) and _monarch.dv_dk_shared(g, v, K):
        return _monarch.fftconv_dv_dk(g, v, k_flipped, shift)
    dv = _fftconv_torch(g, k_flipped, K - 1 - shift, L, None, None, None, None)
    return dv, _fftconv_corr_torch(g, v, shift, K)


@_fftconv_dv_dk_op.register_fake
def _(g, v, k_flipped, shift):
    return g.new_empty(g.shape[0], g.shape[1], v.shape[-1]), g.new_empty(
        g.shape[1], k_flipped.shape[-1], dtype=_compute_dtype(g, v)
    )


# ------------------------------------------------------------------------------------------------ differentiation
def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


def _mul(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return None if a is None or b is None else a * b


def _gated(x: Tensor, gate: Optional[Tensor]) -> Tensor:
    return x if gate is None else x * gate


class _FFTConv(torch.autograd.Function):
    @staticmethod
    def forward(u, k, shift, out_len, bias, skip, pregate, postgate):
        return torch.ops.hhfft.fftconv(
            u, k, shift, out_len, bias=bias, skip=skip, pregate=pregate, postgate=postgate
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, k, shift, out_len, bias, skip, pregate, postgate = inputs
        ctx.shift, ctx.out_len = shift, out_len
        ctx.save_for_backward(u, k, bias, skip, pregate, postgate)
        ctx.save_for_forward(u, k, bias, skip, pregate, postgate)

    @staticmethod
    def backward(ctx, dy):
        u, k, bias, skip, pregate, postgate = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad) + (False,) * 8  # the raw op's ctx omits defaulted arguments
        shift, out_len = ctx.shift, ctx.out_len
        L, K = u.shape[-1], k.shape[-1]
        g, v = _gated(dy, postgate), _gated(u, pregate)
        du = dk = dbias = dskip = dpre = dpost = None
        if need[0] or need[6]:
            k_flipped = k.flip(-1)
            if not torch.compiler.is_compiling() and _use_kernels(g, k):
                _monarch.note_flip(k_flipped, k)  # du's spectrum: the conjugate of the one the forward kept
            if (
                need[1]
                and not torch.is_grad_enabled()  # no double backward through this step: one op for dv and dk
                and _use_kernels(g, v, k)
                and _monarch.dv_dk_shared(g, v, K)
            ):
                dv, dk = torch.ops.hhfft.fftconv_dv_dk(g, v, k_flipped, shift)
                dk = dk.to(k.dtype)
            else:
                dv = fftconv(g, k_flipped, shift=K - 1 - shift, out_len=L)
            if need[0]:
                du = _gated(dv, pregate)
                if skip is not None:
                    du = du + skip[:, None].to(dy.dtype) * _fit(dy, L)
            if need[6]:
                dpre = dv * u
        if need[1] and dk is None:
            dk = fftconv_corr(g, v, shift=shift, K=K).to(k.dtype)
        if need[4]:
            dbias = dy.sum(dim=(0, 2)).to(bias.dtype)
        if need[5]:
            dskip = (dy * _fit(u, out_len)).sum(dim=(0, 2)).to(skip.dtype)
        if need[7]:
            dpost = dy * fftconv(v, k, shift=shift, out_len=out_len)
        return du, dk, None, None, dbias, dskip, dpre, dpost

    @staticmethod
    def jvp(ctx, du, dk, _shift, _out_len, dbias, dskip, dpre, dpost):
        u, k, bias, skip, pregate, postgate = ctx.saved_tensors
        shift, out_len = ctx.shift, ctx.out_len
        v = _gated(u, pregate)
        dv = _add(None if du is None else _gated(du, pregate), _mul(dpre, u))
        dc = None
        if dv is not None:
            dc = fftconv(dv, k, shift=shift, out_len=out_len)
        if dk is not None:
            dc = _add(dc, fftconv(v, dk, shift=shift, out_len=out_len))
        dy = None if dc is None else _gated(dc, postgate)
        if dpost is not None:
            dy = _add(dy, dpost * fftconv(v, k, shift=shift, out_len=out_len))
        if dbias is not None:
            dy = _add(dy, dbias[:, None])
        if dskip is not None:
            dy = _add(dy, dskip[:, None] * _fit(u, out_len))
        if skip is not None and du is not None:
            dy = _add(dy, skip[:, None] * _fit(du, out_len))
        if dy is None:
            dy = u.new_zeros(u.shape[0], u.shape[1], out_len)
        return dy.to(u.dtype)


class _FFTConvCorr(torch.autograd.Function):
    @staticmethod
    def forward(g, v, shift, K):
        return torch.ops.hhfft.fftconv_corr(g, v, shift, K)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, v, shift, K = inputs
        ctx.shift, ctx.K = shift, K
        ctx.save_for_backward(g, v)
        ctx.save_for_forward(g, v)

    @staticmethod
    def backward(ctx, w):
        g, v = ctx.saved_tensors
        dg = dv = None
        if ctx.needs_input_grad[0]:
            dg = fftconv(v, w, shift=ctx.shift, out_len=g.shape[-1]).to(g.dtype)
        if ctx.needs_input_grad[1]:
            dv = fftconv(g, w.flip(-1), shift=ctx.K - 1 - ctx.shift, out_len=v.shape[-1]).to(v.dtype)
        return dg, dv, None, None

    @staticmethod
    def jvp(ctx, dg, dv, _shift, _K):
        g, v = ctx.saved_tensors
        out = None
        if dg is not None:
            out = fftconv_corr(dg, v, shift=ctx.shift, K=ctx.K)
        if dv is not None:
            out = _add(out, fftconv_corr(g, dv, shift=ctx.shift, K=ctx.K))
        return out if out is not None else g.new_zeros(g.shape[1], ctx.K, dtype=_compute_dtype(g, v))


# ------------------------------------------------------------------------------------------------ public functions
def _check(name: str, x: Optional[Tensor], shape, ref: Tensor) -> None:
    if x is None:
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"fftconv: {name} must be a Tensor or None, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"fftconv: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"fftconv: {name} is on {x.device} but u is on {ref.device}; move them to one device")


def fftconv(
    u: Tensor,
    k: Tensor,
    *,
    shift: int = 0,
    out_len: Optional[int] = None,
    bias: Optional[Tensor] = None,
    skip: Optional[Tensor] = None,
    pregate: Optional[Tensor] = None,
    postgate: Optional[Tensor] = None,
    taps: Optional[int] = None,
) -> Tensor:
    """Long depthwise convolution by FFT, differentiable to any order (backward, double backward, jvp).

    ``y[b,h,t] = postgate * sum_j k[h,j] * (pregate*u)[b,h,t+shift-j] + bias[h] + skip[h]*u[b,h,t]``, u zero
    outside [0, L). shift=0 is a causal convolution; ``nn.Conv1d`` with padding p is ``k=flip(weight), shift=K-1-p``.

    Args:
        u: [B, H, L] fp16, bf16, fp32 (or fp64 for references)
        k: [H, K] (fp32 usually)
        shift: output t reads input t + shift - j
        out_len: output length (default L)
        bias, skip: [H] or None
        pregate: [B, H, L] or None; postgate: [B, H, out_len] or None
        taps: partial convolution: use only k[:, :taps] (exact for that truncated kernel; the FFT size shrinks
            to fit L + taps - 1, so the zero tail costs nothing; k's gradient is zero beyond taps); an int, not bool
    Returns:
        y: [B, H, out_len] in u's dtype; maths in fp32 (fp64 if any input is fp64)

    Example:
        >>> u, k = torch.randn(2, 4, 100), torch.randn(4, 31)
        >>> fftconv(u, k).shape
        torch.Size([2, 4, 100])
    """
    if not isinstance(u, Tensor) or u.dim() != 3:
        raise ValueError(f"fftconv: u must be a [B, H, L] tensor, got {getattr(u, 'shape', type(u).__name__)}")
    if not isinstance(k, Tensor) or k.dim() != 2 or k.shape[0] != u.shape[1]:
        raise ValueError(
            f"fftconv: k must be [H, K] with H = u.shape[1] = {u.shape[1]}, got {getattr(k, 'shape', type(k))}"
        )
    if not (u.is_floating_point() and k.is_floating_point()):
        raise TypeError(f"fftconv: u and k must be floating point, got {u.dtype} and {k.dtype}")
    if k.device != u.device:
        raise ValueError(f"fftconv: k is on {k.device} but u on {u.device}; move k to u's device")
    B, H, L = u.shape
    out_len = L if out_len is None else out_len
    _check("bias", bias, (H,), u)
    _check("skip", skip, (H,), u)
    _check("pregate", pregate, (B, H, L), u)
    _check("postgate", postgate, (B, H, out_len), u)
    if taps is not None:
        if not isinstance(taps, int) or not 1 <= taps <= k.shape[-1]:
            raise ValueError(
                f"fftconv: taps must be an int in [1, K={k.shape[-1]}] (the number of kernel taps kept), got {taps!r}"
            )
        k = k[:, :taps]
    marked = _keeps_spectrum(u, k, out_len, bias, skip, pregate, postgate)
    if marked:
        _monarch.keep_spectrum(k)  # the backward's du reuses the forward's spectrum of k (conjugated)
    try:
        return _FFTConv.apply(u, k, shift, out_len, bias, skip, pregate, postgate)
    finally:
        if marked:
            _monarch.unmark(k)  # a mark the forward did not take (it built no spectrum) must not outlive the call


def _keeps_spectrum(u, k, out_len, bias, skip, pregate, postgate) -> bool:
    """Whether the forward's spectrum of k is worth keeping for the backward's du: eager, a du to compute (u or
    pregate requires grad), and y and du both on the Monarch kernels at one FFT size (out_len = L usually), the only
    case in which du can take it. Otherwise it would be held (8 H N bytes) from the forward to the backward for
    nothing."""
    if (
        _monarch is None
        or torch.compiler.is_compiling()
        or not torch.is_grad_enabled()
        or not (u.requires_grad or (pregate is not None and pregate.requires_grad))
        or not _use_kernels(u, k, bias, skip, pregate, postgate)
    ):
        return False
    L, K = u.shape[-1], k.shape[-1]
    N = _monarch.plan(L, K, out_len)
    return N == _monarch.plan(out_len, K, L) and _monarch.supported(u, N)


def fftconv_corr(g: Tensor, v: Tensor, *, shift: int, K: int) -> Tensor:
    """``dk[h, j] = sum_{b,t} g[b,h,t] * v[b,h,t+shift-j]`` for j in [0, K): the gradient of fftconv w.r.t. k.

    Args:
        g: [B, H, T]; v: [B, H, L]
    Returns:
        [H, K] in fp32 (fp64 if an input is fp64)
    """
    return _FFTConvCorr.apply(g, v, shift, K)
