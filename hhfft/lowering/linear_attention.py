"""``hhfft::linear_attention`` and the ops its derivatives are written with.

Ops (torch.library, schema + fake + implementation):
    hhfft::linear_attention(phi_q, phi_k, v, causal, key_mask) -> o                the contract (ARCHITECTURE.md)
    hhfft::linear_attention_fwd(phi_q, phi_k, v, causal, key_mask) -> (o, den)     o and its denominator (fp32)
    hhfft::linear_attention_bwd(phi_q, phi_k, v, o, den, do, dden, causal, key_mask) -> (dq, dk, dv)
    hhfft::linear_attention_product(a, b, c, mode) -> out                          out_i = sum_{j in M(i)} (a_i.b_j) c_j

The maths (``hhfft/kernels/linear_attention/README.md``): with keep_j the key mask, k~ = keep*phi_k, v~ = keep*v,
    num_i = sum_{j<=i} (q_i . k~_j) v~_j,   den_i = sum_{j<=i} q_i . k~_j,   o_i = num_i / den_i (0 where den_i = 0)
and with g_i = do_i / den_i, s_i = dden_i - (do_i . o_i) / den_i,  g'_i = [g_i, s_i],  v'_j = [v~_j, 1]:
    dq_i = sum_{j<=i} (g'_i . v'_j) k~_j,   dk_j = keep_j sum_{i>=j} (v'_j . g'_i) q_i,   dv_j = keep_j sum_{i>=j} (k~_j . q_i) g_i
Every one of these is ``product`` in the causal (j <= i), anticausal (j >= i) or full direction, and ``product``'s own
derivatives are ``product`` again, so the wrapper :func:`linear_attention` is differentiable to any order
(double backward, ``torch.func.jvp(torch.func.grad(f))``). First-order backward (the training case) goes through
the single op ``linear_attention_bwd`` instead, which the CUDA path runs as fused Triton kernels.

GQA: a head axis of size Ha against Hb: if Ha = G*Hb, head h of ``a`` pairs with head h // G of ``b, c``; if
Hb = G*Ha, the G heads of ``b, c`` paired with head h are summed. No repeated K/V is ever materialised.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["linear_attention", "linear_attention_product", "Mode"]

Mode = Literal["causal", "anticausal", "full"]
_MODES = ("causal", "anticausal", "full")
_REVERSE = {"causal": "anticausal", "anticausal": "causal", "full": "full"}
_CHUNK = 64


def _compute_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _mode(causal: bool) -> str:
    return "causal" if causal else "full"


def _keep(x: Tensor, key_mask: Optional[Tensor]) -> Tensor:
    """x [B, H, L, *] with the rows of masked keys set to zero (where, not multiply: NaN in padding stays out)."""
    return x if key_mask is None else torch.where(key_mask[:, None, :, None], x, 0)


# --------------------------------------------------------------------------------------------------- CPU (plain torch)
def _causal_chunked(a5: Tensor, b5: Tensor, c5: Tensor, sum_b: bool) -> Tensor:
    """Causal product on [B, X, G, L, *] tensors: chunks of _CHUNK, intra-chunk tril(a b^T) c + a @ (exclusive prefix
    of per-chunk states b^T c), the state in the compute dtype. Never forms an [L, L] matrix."""
    L = a5.shape[-2]
    n = -(-L // _CHUNK)
    pad = n * _CHUNK - L

    def chunks(x):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.reshape(*x.shape[:-2], n, _CHUNK, x.shape[-1])

    a, b, c = chunks(a5), chunks(b5), chunks(c5)  # [B, X, G, N, C, *]
    tril = torch.ones(_CHUNK, _CHUNK, dtype=torch.bool, device=a.device).tril()
    att = (a @ b.transpose(-1, -2)) * tril  # [B, X, G, N, C, C]
    intra = att @ c  # [B, X, G, N, C, D]
    states = b.transpose(-1, -2) @ c  # [B, X, Gb, N, F, D]
    if sum_b:
        intra, states = intra.sum(2, keepdim=True), states.sum(2, keepdim=True)
    prefix = states.cumsum(3) - states  # state before chunk n
    out = intra + a @ prefix
    return out.reshape(*out.shape[:-3], n * _CHUNK, out.shape[-1])[..., :L, :]


def _product_torch(a: Tensor, b: Tensor, c: Tensor, mode: str) -> Tensor:
    ct = _compute_dtype(a, b, c)
    a, b, c = a.to(ct), b.to(ct), c.to(ct)
    B, Ha, L, F = a.shape
    Hb, D = b.shape[1], c.shape[-1]
    if Ha >= Hb:
        a5, b5, c5, sum_b = a.reshape(B, Hb, Ha // Hb, L, F), b[:, :, None], c[:, :, None], False
    else:
        g = Hb // Ha
        a5, b5, c5, sum_b = a[:, :, None], b.reshape(B, Ha, g, L, F), c.reshape(B, Ha, g, L, D), g > 1
    if mode == "full":
        state = b5.transpose(-1, -2) @ c5  # [B, X, Gb, F, D]
        out = a5 @ (state.sum(2, keepdim=True) if sum_b else state)
    elif mode == "causal":
        out = _causal_chunked(a5, b5, c5, sum_b)
    else:
        out = _causal_chunked(a5.flip(-2), b5.flip(-2), c5.flip(-2), sum_b).flip(-2)
    return out.reshape(B, Ha, L, D)


def _fwd_torch(q, k, v, causal, key_mask, product=_product_torch) -> Tuple[Tensor, Tensor]:
    ct = _compute_dtype(q, k, v)
    k, v = _keep(k, key_mask), _keep(v, key_mask)
    v1 = torch.cat([v.to(ct), v.new_ones(*v.shape[:-1], 1, dtype=ct)], dim=-1)
    nd = product(q, k, v1, _mode(causal))
    num, den = nd[..., :-1], nd[..., -1].contiguous()
    o = num / torch.where(den == 0, 1, den)[..., None]
    return o.to(v.dtype), den


def _bwd_composite(q, k, v, o, den, do, dden, causal, key_mask, product) -> Tuple[Tensor, Tensor, Tensor]:
    ct = _compute_dtype(q, k, v, den)
    mode = _mode(causal)
    rmode = _REVERSE[mode]
    km, vm = _keep(k, key_mask), _keep(v, key_mask)
    den_s = torch.where(den == 0, 1, den).to(ct)
    g = do.to(ct) / den_s[..., None]
    s = dden.to(ct) - (do.to(ct) * o.to(ct)).sum(-1) / den_s
    g1 = torch.cat([g, s[..., None]], dim=-1)  # [B, Hq, L, D+1]
    v1 = torch.cat([vm.to(ct), vm.new_ones(*vm.shape[:-1], 1, dtype=ct)], dim=-1)  # [B, Hkv, L, D+1]
    dq = product(g1, v1, km, mode)
    dk = _keep(product(v1, g1, q, rmode), key_mask)
    dv = _keep(product(km, q, g, rmode), key_mask)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---------------------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("hhfft::linear_attention_product", mutates_args=())
def _product_op(a: Tensor, b: Tensor, c: Tensor, mode: str) -> Tensor:
    return _product_torch(a, b, c, mode).contiguous()


@_product_op.register_fake
def _(a, b, c, mode):
    return a.new_empty(*a.shape[:-1], c.shape[-1], dtype=_compute_dtype(a, b, c))


def _use_triton(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The Triton kernels serve CUDA tensors of one dtype among fp16/bf16/fp32 with F, D <= 256; anything else (the
    CPU, fp64 references) runs the plain-torch implementation."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] <= 256
        and v.shape[-1] <= 256
    )


def _fwd_impl(q, k, v, causal, key_mask) -> Tuple[Tensor, Tensor]:
    if _use_triton(q, k, v):
        from hhfft.kernels.linear_attention.chunk import linear_attention_fwd

        return linear_attention_fwd(q, k, v, causal, key_mask)
    o, den = _fwd_torch(q, k, v, causal, key_mask)
    return o.contiguous(), den


# triton_op: on CUDA, Inductor sees the Triton kernels launched through wrap_triton; on the CPU the body takes the
# plain-torch branch, which Inductor traces like any torch code.
@torch.library.triton_op("hhfft::linear_attention_fwd", mutates_args=())
def _fwd_op(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, key_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return _fwd_impl(phi_q, phi_k, v, causal, key_mask)


@_fwd_op.register_fake
def _(phi_q, phi_k, v, causal, key_mask=None):
    B, Hq, L, _ = phi_q.shape
    o = v.new_empty(B, Hq, L, v.shape[-1])
    return o, phi_q.new_empty(B, Hq, L, dtype=_compute_dtype(phi_q, phi_k, v))


@torch.library.triton_op("hhfft::linear_attention", mutates_args=())
def _contract_op(phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, key_mask: Optional[Tensor] = None) -> Tensor:
    return _fwd_impl(phi_q, phi_k, v, causal, key_mask)[0]


@_contract_op.register_fake
def _(phi_q, phi_k, v, causal, key_mask=None):
    return v.new_empty(*phi_q.shape[:-1], v.shape[-1])


@torch.library.triton_op("hhfft::linear_attention_bwd", mutates_args=())
def _bwd_op(
    phi_q: Tensor,
    phi_k: Tensor,
    v: Tensor,
    o: Tensor,
    den: Tensor,
    do: Tensor,
    dden: Tensor,
    causal: bool,
    key_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    if _use_triton(phi_q, phi_k, v):
        from hhfft.kernels.linear_attention.chunk import linear_attention_bwd

        return linear_attention_bwd(phi_q, phi_k, v, o, den, do, dden, causal, key_mask)
    dq, dk, dv = _bwd_composite(phi_q, phi_k, v, o, den, do, dden, causal, key_mask, _product_torch)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(phi_q, phi_k, v, o, den, do, dden, causal, key_mask=None):
    return torch.empty_like(phi_q), torch.empty_like(phi_k), torch.empty_like(v)


# ------------------------------------------------------------------------------------------------ differentiation
def _first_order(*ts: Optional[Tensor]) -> bool:
    """True when this backward will not itself be differentiated: no grad mode (create_graph=False), no functorch
    wrapper and no forward-mode tangent on any saved tensor. Then the fused backward op is used."""
    if torch.is_grad_enabled():
        return False
    from torch._C._functorch import is_functorch_wrapped_tensor

    for t in ts:
        if t is None:
            continue
        if is_functorch_wrapped_tensor(t) or torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            return False
    return True


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(a, b, c, mode):
        return torch.ops.hhfft.linear_attention_product(a, b, c, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, c, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(a, b, c)
        ctx.save_for_forward(a, b, c)

    @staticmethod
    def backward(ctx, dout):
        a, b, c = ctx.saved_tensors
        rmode = _REVERSE[ctx.mode]
        need = ctx.needs_input_grad
        da = linear_attention_product(dout, c, b, ctx.mode).to(a.dtype) if need[0] else None
        db = linear_attention_product(c, dout, a, rmode).to(b.dtype) if need[1] else None
        dc = linear_attention_product(b, a, dout, rmode).to(c.dtype) if need[2] else None
        return da, db, dc, None

    @staticmethod
    def jvp(ctx, da, db, dc, _mode):
        a, b, c = ctx.saved_tensors
        out = None
        for x, y, z in ((da, b, c), (a, db, c), (a, b, dc)):
            if x is not None and y is not None and z is not None:
                t = linear_attention_product(x, y, z, ctx.mode)
                out = t if out is None else out + t
        if out is None:
            out = a.new_zeros(*a.shape[:-1], c.shape[-1], dtype=_compute_dtype(a, b, c))
        return out


def linear_attention_product(a: Tensor, b: Tensor, c: Tensor, mode: Mode) -> Tensor:
    """``out_i = sum_{j in M(i)} (a_i . b_j) c_j``, M(i) = {j <= i} (causal), {j >= i} (anticausal), all (full).

    Differentiable to any order. Args: a [B, Ha, L, F], b [B, Hb, L, F], c [B, Hb, L, D], with Ha a multiple of
    Hb or Hb a multiple of Ha (see the module docstring). Returns [B, Ha, L, D] in fp32 (fp64 for fp64 inputs).
    """
    if mode not in _MODES:
        raise ValueError(f"linear_attention_product: mode must be one of {_MODES}, got {mode!r}")
    return _Product.apply(a, b, c, mode)


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, causal, key_mask):
        return torch.ops.hhfft.linear_attention_fwd(q, k, v, causal, key_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, causal, key_mask = inputs
        o, den = output
        ctx.causal = causal
        ctx.save_for_backward(q, k, v, key_mask, o, den)
        ctx.save_for_forward(q, k, v, key_mask, o, den)

    @staticmethod
    def backward(ctx, do, dden):
        q, k, v, key_mask, o, den = ctx.saved_tensors
        if dden is None:
            dden = torch.zeros_like(den)
        if do is None:
            do = torch.zeros_like(o)
        if _first_order(q, k, v, o, den, do, dden):
            dq, dk, dv = torch.ops.hhfft.linear_attention_bwd(q, k, v, o, den, do, dden, ctx.causal, key_mask)
        else:
            dq, dk, dv = _bwd_composite(q, k, v, o, den, do, dden, ctx.causal, key_mask, linear_attention_product)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, _causal, _key_mask):
        q, k, v, key_mask, o, den = ctx.saved_tensors
        ct = _compute_dtype(q, k, v, den)
        mode = _mode(ctx.causal)
        km = _keep(k, key_mask)
        v1 = torch.cat([_keep(v, key_mask).to(ct), v.new_ones(*v.shape[:-1], 1, dtype=ct)], dim=-1)
        dnum = None
        if dq is not None:
            dnum = linear_attention_product(dq, km, v1, mode)
        if dk is not None:
            t = linear_attention_product(q, _keep(dk, key_mask), v1, mode)
            dnum = t if dnum is None else dnum + t
        if dv is not None:
            dv1 = torch.cat([_keep(dv, key_mask).to(ct), dv.new_zeros(*dv.shape[:-1], 1, dtype=ct)], dim=-1)
            t = linear_attention_product(q, km, dv1, mode)
            dnum = t if dnum is None else dnum + t
        if dnum is None:
            return torch.zeros_like(o), torch.zeros_like(den)
        dden = dnum[..., -1]
        den_s = torch.where(den == 0, 1, den)
        do = (dnum[..., :-1] - o.to(ct) * dden[..., None]) / den_s[..., None]
        return do.to(o.dtype), dden.to(den.dtype)


# ------------------------------------------------------------------------------------------------ public functions
def _check_inputs(phi_q, phi_k, v, key_mask) -> None:
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(
                f"linear_attention: {name} must be a 4-d tensor [B, H, L, *], got {getattr(x, 'shape', type(x).__name__)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"linear_attention: {name} must be floating point, got {x.dtype}")
    B, Hq, L, F = phi_q.shape
    Bk, Hkv, Lk, Fk = phi_k.shape
    if (Bk, Lk, Fk) != (B, L, F) or tuple(v.shape[:3]) != (B, Hkv, L):
        raise ValueError(
            "linear_attention: expected phi_q [B, Hq, L, F], phi_k [B, Hkv, L, F], v [B, Hkv, L, D]; got "
            f"{tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}"
        )
    if Hq % Hkv != 0:
        raise ValueError(
            f"linear_attention: the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})"
        )
    if not (phi_q.device == phi_k.device == v.device):
        raise ValueError(f"linear_attention: inputs on different devices: {phi_q.device}, {phi_k.device}, {v.device}")
    if key_mask is not None:
        if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, L):
            raise ValueError(
                f"linear_attention: key_mask must be a bool tensor [B, L] = [{B}, {L}] (True = keep), got "
                f"{getattr(key_mask, 'dtype', type(key_mask).__name__)} {tuple(getattr(key_mask, 'shape', ()))}; "
                "convert an additive mask with `mask == 0`"
            )


def linear_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool, key_mask: Optional[Tensor] = None
) -> Tensor:
    """Linear attention on feature-mapped queries and keys, differentiable to any order.

    ``o_i = sum_j (phi_q_i . phi_k_j) v_j / sum_j (phi_q_i . phi_k_j)`` over j <= i (causal) or all j, masked keys
    excluded; rows whose denominator is 0 (every visible key masked) give 0. Accumulation in fp32 (fp64 for fp64).

    Args:
        phi_q: [B, Hq, L, F] (non-negative features, e.g. from :class:`hhfft.nn.HedgehogFeatureMap`)
        phi_k: [B, Hkv, L, F], Hq a multiple of Hkv (GQA; K/V are never repeated in memory)
        v: [B, Hkv, L, D]
        causal: query i sees keys j <= i only
        key_mask: [B, L] bool, True = keep, or None
    Returns:
        o: [B, Hq, L, D] in v's dtype

    Example:
        >>> q, k, v = torch.rand(1, 4, 10, 8), torch.rand(1, 2, 10, 8), torch.randn(1, 2, 10, 16)
        >>> linear_attention(q, k, v, causal=True).shape
        torch.Size([1, 4, 10, 16])
    """
    _check_inputs(phi_q, phi_k, v, key_mask)
    return _LinearAttention.apply(phi_q, phi_k, v, bool(causal), key_mask)[0]
