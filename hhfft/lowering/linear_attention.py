"""``hhfft::linear_attention`` and the ops its derivatives are written with.

Ops (torch.library, schema + fake + implementation):
    hhfft::linear_attention(phi_q, phi_k, v, causal, key_mask) -> o                the contract (ARCHITECTURE.md)
    hhfft::linear_attention_fwd(phi_q, phi_k, v, causal, key_mask) -> (o, den)     o and its denominator (fp32)
    hhfft::linear_attention_bwd(phi_q, phi_k, v, o, den, do, dden, causal, key_mask) -> (dq, dk, dv)
    hhfft::linear_attention_product(a, b, c, mode) -> out                          out_i = sum_{j in M(i)} (a_i.b_j) c_j

The maths (``hhfft/kernels/linear_attention/README.md``): with keep_j the key mask, k~ = keep*phi_k, v~ = keep*v,
    num_i = sum_{j<=i} (q_i . k~_j) v~_j,   den_i = sum_{j<=i} q_i . k~_j,   o_i = num_i / max(den_i, DEN_FLOOR)
(``naive.DEN_FLOOR``: an empty row gives 0, a near-empty one fades to 0 with finite gradients), and with
d_i = max(den_i, DEN_FLOOR), g_i = do_i / d_i, s_i = dden_i - [den_i >= DEN_FLOOR] (do_i . o_i) / d_i,
g'_i = [g_i, s_i],  v'_j = [v~_j, 1]:
    dq_i = sum_{j<=i} (g'_i . v'_j) k~_j,   dk_j = keep_j sum_{i>=j} (v'_j . g'_i) q_i,   dv_j = keep_j sum_{i>=j} (k~_j . q_i) g_i
Every one of these is ``product`` in the causal (j <= i), anticausal (j >= i) or full direction, and ``product``'s own
derivatives are ``product`` again, so the wrapper :func:`linear_attention` is differentiable to any order
(double backward, ``torch.func.jvp(torch.func.grad(f))``). First-order backward (the training case) goes through
the single op ``linear_attention_bwd`` instead, which the CUDA path runs as fused Triton kernels.

GQA: a head axis of size Ha against Hb: if Ha = G*Hb, head h of ``a`` pairs with head h // G of ``b, c``; if
Hb = G*Ha, the G heads of ``b, c`` paired with head h are summed. No repeated K/V is ever materialised.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Tuple

import os

import torch
from torch import Tensor

from hhfft.kernels.linear_attention.naive import DEN_FLOOR

__all__ = [
    "linear_attention",
    "linear_attention_product",
    "hedgehog_linear_attention",
    "linear_attention_state",
    "linear_attention_step",
    "Mode",
]

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
    o = num / den.clamp_min(DEN_FLOOR)[..., None]
    return o.to(v.dtype), den


def _bwd_composite(q, k, v, o, den, do, dden, causal, key_mask, product) -> Tuple[Tensor, Tensor, Tensor]:
    ct = _compute_dtype(q, k, v, den)
    mode = _mode(causal)
    rmode = _REVERSE[mode]
    km, vm = _keep(k, key_mask), _keep(v, key_mask)
    den_s = den.clamp_min(DEN_FLOOR).to(ct)
    g = do.to(ct) / den_s[..., None]
    s = dden.to(ct) - torch.where(den >= DEN_FLOOR, (do.to(ct) * o.to(ct)).sum(-1) / den_s, 0)
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


_TRITON_SWITCH = "HHFFT_LINEAR_ATTENTION_TRITON"


def _triton_enabled(dtype: torch.dtype) -> bool:
    """Whether CUDA tensors of ``dtype`` go to the Triton kernels. HHFFT_LINEAR_ATTENTION_TRITON unset (the default):
    fp16 and bf16 do, fp32 stays on the plain-torch path; 1: every supported dtype; 0: none.

    Why fp32 is held back: its kernels pass tests/gpu/test_linear_attention_gpu.py on the H200 since their cancelling
    sums are split into short FMA chains joined in fp64 (63/63, benchmarks/RESULTS.md "linear attention (Hedgehog)"),
    but their speed is not measured and they compile for 1-2 minutes per kernel (the kernels README, "Precision")."""
    value = os.environ.get(_TRITON_SWITCH)
    if value is None:
        return dtype in (torch.float16, torch.bfloat16)
    if value not in ("0", "1"):
        raise ValueError(f"{_TRITON_SWITCH} must be 0 (plain torch on CUDA) or 1 (the Triton kernels for every dtype), "
                         f"or unset (the kernels for fp16/bf16), got {value!r}")
    return value == "1"


def _use_triton(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The Triton kernels serve CUDA tensors of one dtype among fp16/bf16/fp32 with F, D <= 256 (which dtypes: see
    _triton_enabled); anything else (the CPU, fp64 references) runs the plain-torch implementation."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] <= 256
        and v.shape[-1] <= 256
        and _triton_enabled(q.dtype)
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
        live = (den >= DEN_FLOOR)[..., None]  # below the floor o = num / DEN_FLOOR: no term through den
        do = (dnum[..., :-1] - torch.where(live, o.to(ct) * dden[..., None], 0)) / den.clamp_min(DEN_FLOOR)[..., None]
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
    if Hkv == 0 or Hq % Hkv != 0:
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
        if key_mask.device != phi_q.device:
            raise ValueError(f"linear_attention: key_mask is on {key_mask.device} but the inputs on {phi_q.device}; "
                             "move it to their device")


def linear_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool, key_mask: Optional[Tensor] = None
) -> Tensor:
    """Linear attention on feature-mapped queries and keys, differentiable to any order.

    ``o_i = sum_j (phi_q_i . phi_k_j) v_j / sum_j (phi_q_i . phi_k_j)`` over j <= i (causal) or all j, masked keys
    excluded; the denominator is floored at ``naive.DEN_FLOOR`` (1e-6), so a row that meets no key gives 0 and a
    near-empty one stays differentiable. Accumulation in fp32 (fp64 for fp64).

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


# ------------------------------------------------------------------------ fused Hedgehog feature map + attention

def _project(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    y = torch.einsum("bhld,hdf->bhlf", x.to(_compute_dtype(x, w)), w.to(_compute_dtype(x, w)))
    return y if b is None else y + b.to(y.dtype)[None, :, None, :]


def _feature_map_bwd_torch(dphi: Tensor, y: Tensor, kind: str) -> Tensor:
    """dL/dy from dL/dphi for phi = feature_map(y, kind), phi = [phi+, phi-] concatenated (the kernels' formulas)."""
    from hhfft.nn.hedgehog import feature_map

    fh = y.shape[-1]
    phi = feature_map(y, kind)
    p, n = phi[..., :fh], phi[..., fh:]
    dp, dn = dphi[..., :fh], dphi[..., fh:]
    if kind == "softmax_split":
        return p * (dp - (p * dp).sum(-1, keepdim=True)) - n * (dn - (n * dn).sum(-1, keepdim=True))
    c = (p * dp + n * dn).sum(-1, keepdim=True)
    if kind == "joint_softmax":
        return p * (dp - c) - n * (dn - c)
    onehot = torch.nn.functional.one_hot(y.abs().argmax(-1), fh).to(y.dtype)
    return p * dp - n * dn - c * onehot * torch.sign(y)


def _hh_fwd_torch(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask):
    from hhfft.nn.hedgehog import feature_map

    ct = _compute_dtype(xq, xk, v)
    pq = feature_map(_project(xq, wq, bq), kind).to(ct)
    pk = feature_map(_project(xk, wk, bk), kind).to(ct)
    o, den = _fwd_torch(pq, pk, v.to(ct), causal, key_mask)
    return o.to(v.dtype).contiguous(), den


def _hh_use_triton(xq, xk, v, wq, kind) -> bool:
    # the fused kernels take at most 256 features per head (2 x the maps' width: a wider map runs in plain torch)
    if not (_use_triton(xq, xk, v) and xq.shape[-1] <= 256 and 2 * wq.shape[-1] <= 256):
        return False
    from hhfft.kernels.linear_attention.chunk import KINDS  # the maps the fused kernels compute

    return kind in KINDS


_SAVED = 6  # what the fused forward hands its backward (chunk.hedgehog_attention_fwd's ``saved``); 0-d on the CPU


@torch.library.triton_op("hhfft::hedgehog_attention_fwd", mutates_args=())
def _hh_fwd_op(
    xq: Tensor, xk: Tensor, v: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor],
    kind: str, causal: bool, key_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _hh_use_triton(xq, xk, v, wq, kind):
        from hhfft.kernels.linear_attention.chunk import hedgehog_attention_fwd

        o, den, saved = hedgehog_attention_fwd(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask, keep=True)
        return (o, den, *saved)
    from hhfft.kernels.linear_attention.chunk import empties

    return (*_hh_fwd_torch(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask), *empties(xq, _SAVED))


@_hh_fwd_op.register_fake
def _(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask=None):
    B, Hq, L, _ = xq.shape
    o, den = v.new_empty(B, Hq, L, v.shape[-1]), xq.new_empty(B, Hq, L, dtype=_compute_dtype(xq, xk, v))
    from hhfft.kernels.linear_attention.chunk import empties, saved_like

    if _hh_use_triton(xq, xk, v, wq, kind):
        return (o, den, *saved_like(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask))
    return (o, den, *empties(xq, _SAVED))


@torch.library.triton_op("hhfft::hedgehog_attention_bwd", mutates_args=())
def _hh_bwd_op(
    xq: Tensor, xk: Tensor, v: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor, bk: Optional[Tensor],
    o: Tensor, den: Tensor, do: Tensor, dden: Tensor, saved: List[Tensor], kind: str, causal: bool,
    key_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _hh_use_triton(xq, xk, v, wq, kind):
        from hhfft.kernels.linear_attention.chunk import hedgehog_attention_bwd

        dxq, dxk, dv, dwq, dbq, dwk, dbk = hedgehog_attention_bwd(
            xq, xk, v, wq, bq, wk, bk, o, den, do, dden, kind, causal, key_mask, saved)
    else:
        from hhfft.nn.hedgehog import feature_map

        ct = _compute_dtype(xq, xk, v)
        if key_mask is not None:  # a masked key contributes nothing: not even NaN * 0 through the map's backward
            xk = torch.where(key_mask[:, None, :, None], xk, 0)
        yq, yk = _project(xq, wq, bq).to(ct), _project(xk, wk, bk).to(ct)
        pq, pk = feature_map(yq, kind), feature_map(yk, kind)
        dpq, dpk, dv = _bwd_composite(pq, pk, v.to(ct), o, den, do, dden, causal, key_mask, _product_torch)
        dyq, dyk = _feature_map_bwd_torch(dpq, yq, kind), _feature_map_bwd_torch(dpk, yk, kind)
        dxq = torch.einsum("bhlf,hdf->bhld", dyq, wq.to(ct))
        dxk = torch.einsum("bhlf,hdf->bhld", dyk, wk.to(ct))
        dwq, dwk = torch.einsum("bhld,bhlf->hdf", xq.to(ct), dyq), torch.einsum("bhld,bhlf->hdf", xk.to(ct), dyk)
        dbq, dbk = dyq.sum((0, 2)), dyk.sum((0, 2))
    dbq = torch.zeros_like(wq[:, 0]) if bq is None else dbq
    dbk = torch.zeros_like(wk[:, 0]) if bk is None else dbk
    return (dxq.to(xq.dtype).contiguous(), dxk.to(xk.dtype).contiguous(), dv.to(v.dtype).contiguous(),
            dwq.to(wq.dtype).contiguous(), dbq.to(wq.dtype).contiguous(), dwk.to(wk.dtype).contiguous(),
            dbk.to(wk.dtype).contiguous())


@_hh_bwd_op.register_fake
def _(xq, xk, v, wq, bq, wk, bk, o, den, do, dden, saved, kind, causal, key_mask=None):
    return (torch.empty_like(xq), torch.empty_like(xk), torch.empty_like(v), torch.empty_like(wq),
            wq.new_empty(wq.shape[0], wq.shape[2]), torch.empty_like(wk), wk.new_empty(wk.shape[0], wk.shape[2]))


class _HedgehogAttention(torch.autograd.Function):
    @staticmethod
    def forward(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask):
        return torch.ops.hhfft.hedgehog_attention_fwd(xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        xq, xk, v, wq, bq, wk, bk, kind, causal, key_mask = inputs
        ctx.kind, ctx.causal = kind, causal
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)  # else the backward gets zero tensors the size of phi and the states
        ctx.save_for_backward(xq, xk, v, wq, bq, wk, bk, key_mask, *output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dden, *_saved_grads):
        xq, xk, v, wq, bq, wk, bk, key_mask, o, den, *saved = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dden = torch.zeros_like(den) if dden is None else dden
        dxq, dxk, dv, dwq, dbq, dwk, dbk = torch.ops.hhfft.hedgehog_attention_bwd(
            xq, xk, v, wq, bq, wk, bk, o, den, do, dden, saved, ctx.kind, ctx.causal, key_mask)
        return dxq, dxk, dv, dwq, None if bq is None else dbq, dwk, None if bk is None else dbk, None, None, None


def hedgehog_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    *,
    kind: str = "softmax_split",
    causal: bool,
    key_mask: Optional[Tensor] = None,
    fused: Optional[bool] = None,
    with_den: bool = False,
) -> Tensor:
    """Hedgehog attention: ``linear_attention(phi_q(q), phi_k(k), v)`` with phi_q, phi_k Hedgehog feature maps.

    Fused (CUDA, kinds softmax_split / exp / joint_softmax): one op, ``hhfft::hedgehog_attention_fwd/bwd``; by
    default (``HHFFT_LA_FUSED=map``) one Triton feature-map kernel per input writes phi, then the chunk kernels run
    (the backward reuses the forward's phi and chunk states, and turns dphi into dx, dW, db in one kernel per input;
    keeping them holds 2 B (Hq + Hkv) L F + 4 B Hkv (L / 64) F (D + 1) bytes from forward to backward, F = 2 FH:
    about 0.5 GiB per call at 32K tokens, 16 heads, F = 128, D = 64; ``HHFFT_LA_KEEP=phi`` or ``none`` recomputes
    instead, 10-20% slower on the H200); ``HHFFT_LA_FUSED=inkernel`` computes the maps inside the attention kernels instead, so phi never goes to
    memory (slower on the H200).
    Backward gives dq, dk, dv, dW, db; first order only (training).
    Otherwise (``fused=False``, the CPU, other kinds): the feature maps, then :func:`linear_attention`, any order.

    Args:
        q: [B, Hq, L, DX]; k: [B, Hkv, L, DX]; v: [B, Hkv, L, D]
        wq: [Hq, DX, FH], bq: [Hq, FH] or None (a HedgehogFeatureMap's weight and bias); wk, bk likewise with Hkv
        kind: the feature map kind (see :class:`hhfft.nn.HedgehogFeatureMap`)
        causal, key_mask: as in :func:`linear_attention`
        fused: None = fused where available; False = never
        with_den: also return the denominator (differentiable)
    Returns:
        o: [B, Hq, L, D] in v's dtype; with ``with_den``, (o, den) with den [B, Hq, L] = sum_j phi_q_i . phi_k_j over
        the visible keys, in fp32 (fp64 for fp64 inputs)

    Example:
        >>> from hhfft.nn import HedgehogFeatureMap
        >>> fq, fk = HedgehogFeatureMap(4, 8), HedgehogFeatureMap(2, 8)
        >>> q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 16)
        >>> hedgehog_linear_attention(q, k, v, fq.weight, fq.bias, fk.weight, fk.bias, causal=True).shape
        torch.Size([1, 4, 10, 16])
    """
    from hhfft.nn.hedgehog import FeatureMapKind, feature_map

    kind = FeatureMapKind.parse(kind).value
    if fused is not False and _hh_use_triton(q, k, v, wq, kind):
        _check_inputs(q, k, v, key_mask)
        out = _HedgehogAttention.apply(q, k, v, wq, bq, wk, bk, kind, bool(causal), key_mask)
        return (out[0], out[1]) if with_den else out[0]
    pq = feature_map(_project(q, wq.to(q.dtype), None if bq is None else bq.to(q.dtype)).to(q.dtype), kind)
    if isinstance(key_mask, Tensor) and key_mask.shape == (k.shape[0], k.shape[2]):
        k = torch.where(key_mask[:, None, :, None], k, 0)  # a masked key is nothing: no NaN * 0 in the map's grads
    pk = feature_map(_project(k, wk.to(k.dtype), None if bk is None else bk.to(k.dtype)).to(k.dtype), kind)
    if not with_den:
        return linear_attention(pq, pk, v, causal=causal, key_mask=key_mask)
    _check_inputs(pq, pk, v, key_mask)
    return tuple(_LinearAttention.apply(pq, pk, v, bool(causal), key_mask))


# ------------------------------------------------------------------------------------------------------- decoding
def _step_torch(phi_q, phi_k, v, state, normalizer, keep) -> Tensor:
    B, Hq, F = phi_q.shape
    Hkv = phi_k.shape[1]
    k, vv = phi_k.to(state.dtype), v.to(state.dtype)
    if keep is not None:
        k, vv = torch.where(keep[:, None, None], k, 0), torch.where(keep[:, None, None], vv, 0)
    state.add_(k[..., :, None] * vv[..., None, :])
    normalizer.add_(k)
    q = phi_q.to(state.dtype).reshape(B, Hkv, Hq // Hkv, F)
    num = q @ state  # [B, Hkv, G, D]
    den = (q * normalizer[:, :, None, :]).sum(-1, keepdim=True)
    return (num / den.clamp_min(DEN_FLOOR)).reshape(B, Hq, -1).to(v.dtype)


@torch.library.triton_op("hhfft::linear_attention_step", mutates_args=("state", "normalizer"))
def _step_op(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor, keep: Optional[Tensor] = None
) -> Tensor:
    if _use_triton(phi_q, phi_k, v) and state.is_contiguous() and normalizer.is_contiguous():
        from hhfft.kernels.linear_attention.recurrent import linear_attention_step_triton

        return linear_attention_step_triton(phi_q, phi_k, v, state, normalizer, keep)
    return _step_torch(phi_q, phi_k, v, state, normalizer, keep).contiguous()


@_step_op.register_fake
def _(phi_q, phi_k, v, state, normalizer, keep=None):
    return v.new_empty(phi_q.shape[0], phi_q.shape[1], v.shape[-1])


def linear_attention_state(
    phi_k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The decoding state after a prefix: (S [B, Hkv, F, D], z [B, Hkv, F]) in fp32, S = sum_j phi_k_j^T v_j,
    z = sum_j phi_k_j over kept keys. Continue with :func:`linear_attention_step`."""
    k, vv = _keep(phi_k, key_mask).float(), _keep(v, key_mask).float()
    return (k.transpose(-1, -2) @ vv).contiguous(), k.sum(-2).contiguous()


def linear_attention_step(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor, keep: Optional[Tensor] = None
) -> Tensor:
    """One decoding step of causal linear attention, O(F D) per head, state updated in place.

    Args:
        phi_q: [B, Hq, F]; phi_k: [B, Hkv, F]; v: [B, Hkv, D] (the new token)
        state: [B, Hkv, F, D] fp32; normalizer: [B, Hkv, F] fp32 (from :func:`linear_attention_state` or zeros)
        keep: [B] bool or None: False leaves that sequence's state unchanged (a padding token)
    Returns:
        o: [B, Hq, D], equal to the last row of ``linear_attention(..., causal=True)`` over the whole prefix

    Example:
        >>> S, z = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8)
        >>> linear_attention_step(torch.rand(1, 2, 8), torch.rand(1, 2, 8), torch.randn(1, 2, 4), S, z).shape
        torch.Size([1, 2, 4])
    """
    if state.dtype != torch.float32 or normalizer.dtype != torch.float32:
        raise TypeError(f"linear_attention_step: state and normalizer must be fp32, got {state.dtype}, {normalizer.dtype}")
    if phi_q.dim() != 3 or phi_k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"linear_attention_step: expected phi_q [B, Hq, F], phi_k [B, Hkv, F], v [B, Hkv, D]; got "
                         f"{tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}")
    B, Hq, F = phi_q.shape
    Hkv, D = phi_k.shape[1], v.shape[-1]
    if tuple(phi_k.shape) != (B, Hkv, F) or tuple(v.shape[:2]) != (B, Hkv) or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"linear_attention_step: expected phi_q [B, Hq, F], phi_k [B, Hkv, F], v [B, Hkv, D] with Hq a "
                         f"multiple of Hkv; got {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}")
    if tuple(state.shape) != (B, Hkv, F, D) or tuple(normalizer.shape) != (B, Hkv, F):
        raise ValueError(f"linear_attention_step: state must be [B, Hkv, F, D] = {[B, Hkv, F, D]} and normalizer "
                         f"[B, Hkv, F] = {[B, Hkv, F]}, got {list(state.shape)} and {list(normalizer.shape)}")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (B,) or keep.device != v.device):
        raise ValueError(f"linear_attention_step: keep must be a bool tensor [B] = [{B}] on {v.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    return torch.ops.hhfft.linear_attention_step(phi_q, phi_k, v, state, normalizer, keep)
