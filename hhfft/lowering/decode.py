"""Constant-state decoding of causal linear attention: the ops a converted model's KV-cache sites become.

Ops (torch.library):
    hhfft::linear_attention_decode(phi_q, phi_k, v, state, normalizer, keep) -> o      (mutates state, normalizer)
        L new tokens attend causally to each other and to everything folded into the state before them:
            num_i = phi_q_i S + sum_{j <= i} (phi_q_i . k~_j) v~_j      den_i = phi_q_i . z + sum_{j <= i} phi_q_i . k~_j
            o_i = num_i / max(den_i, DEN_FLOOR);   then S += sum_j k~_j^T v~_j,  z += sum_j k~_j
        with k~_j = keep_j phi_k_j, v~_j = keep_j v_j. L = 1 is the recurrent step (a Triton kernel on CUDA,
        ``hhfft/kernels/linear_attention/recurrent.py``); L > 1 (a prompt) is the chunked causal product plus the
        state's contribution, so a long prompt never forms an [L, L] matrix.
    hhfft::hedgehog_cache_kv(k, v, state, normalizer, past) -> (k_all, v_all)
        The marker a :class:`hhfft.convert.decode.HedgehogCache` layer returns from ``update``: to the model's code
        it looks like a KV cache's keys and values over the past + L tokens (shapes only: the fake implementation),
        so masks and shapes downstream stay what the model expects. The linearize pass replaces the attention that
        reads it by :func:`hedgehog_decode` on the new k, v and the state. Executed for real (the pass did not run:
        another backend, or attention the pass could not pair), it raises.

GQA: query head h reads key/value head h // (Hq // Hkv); K/V are never repeated.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hhfft.kernels.linear_attention.naive import DEN_FLOOR

__all__ = ["linear_attention_decode", "hedgehog_decode"]


def _triton_step_ok(phi_q: Tensor, v: Tensor, state: Tensor, normalizer: Tensor) -> bool:
    return (phi_q.is_cuda and phi_q.shape[2] == 1 and state.dtype == torch.float32 and normalizer.dtype == torch.float32
            and state.is_contiguous() and normalizer.is_contiguous()
            and phi_q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and phi_q.shape[-1] <= 256 and v.shape[-1] <= 256)


def _decode_torch(phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor,
                  keep: Optional[Tensor]) -> Tensor:
    from hhfft.lowering.linear_attention import linear_attention_product

    ct = state.dtype
    B, Hq, L, F = phi_q.shape
    Hkv, D = phi_k.shape[1], v.shape[-1]
    k, vv = phi_k.to(ct), v.to(ct)
    if keep is not None:
        k, vv = torch.where(keep[:, None, :, None], k, 0), torch.where(keep[:, None, :, None], vv, 0)
    q = phi_q.to(ct)

    def fold() -> None:  # the new tokens into the state, in place
        state.add_(k.transpose(-1, -2) @ vv)
        normalizer.add_(k.sum(-2))

    if L == 1:  # the recurrent step: update, then read (the Triton kernel's order)
        fold()
    s1 = torch.cat([state, normalizer[..., None]], dim=-1)  # [B, Hkv, F, D + 1]: num and den in one product
    nd = (q.reshape(B, Hkv, Hq // Hkv, L, F) @ s1[:, :, None]).reshape(B, Hq, L, D + 1)
    if L > 1:  # a prompt: the chunked causal product over the new tokens on top of what the state held before them
        v1 = torch.cat([vv, vv.new_ones(B, Hkv, L, 1)], dim=-1)
        nd = nd + linear_attention_product(q, k, v1, "causal").to(ct)
        fold()
    num, den = nd[..., :-1], nd[..., -1:]
    o = num / den.clamp_min(DEN_FLOOR)
    return o.to(v.dtype)


@torch.library.custom_op("hhfft::linear_attention_decode", mutates_args=("state", "normalizer"))
def _decode_op(phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor,
               keep: Optional[Tensor] = None) -> Tensor:
    if _triton_step_ok(phi_q, v, state, normalizer):
        from hhfft.kernels.linear_attention.recurrent import linear_attention_step_triton

        o = linear_attention_step_triton(phi_q[:, :, 0], phi_k[:, :, 0], v[:, :, 0], state, normalizer,
                                         None if keep is None else keep[:, 0], wrap=False)
        return o[:, :, None]
    return _decode_torch(phi_q, phi_k, v, state, normalizer, keep).contiguous()


@_decode_op.register_fake
def _(phi_q, phi_k, v, state, normalizer, keep=None):
    return v.new_empty(*phi_q.shape[:-1], v.shape[-1])


def linear_attention_decode(phi_q: Tensor, phi_k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor,
                            keep: Optional[Tensor] = None) -> Tensor:
    """Causal linear attention of L new tokens on top of a state, the state updated in place (no autograd).

    Args:
        phi_q: [B, Hq, L, F]; phi_k: [B, Hkv, L, F]; v: [B, Hkv, L, D]; Hq a multiple of Hkv
        state: [B, Hkv, F, D] and normalizer: [B, Hkv, F], fp32 (fp64 for an fp64 reference), zeros at the start
        keep: [B, L] bool (False: a padding token, left out of the state and of every sum) or None
    Returns:
        o: [B, Hq, L, D] in v's dtype: rows of ``linear_attention(..., causal=True)`` over the whole sequence so far

    Example:
        >>> S, z = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8)
        >>> q, k, v = torch.rand(1, 2, 5, 8), torch.rand(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
        >>> o = linear_attention_decode(q, k, v, S, z)               # a prompt of 5 tokens
        >>> o1 = linear_attention_decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], S, z)   # then one more
        >>> o.shape, o1.shape
        (torch.Size([1, 2, 5, 4]), torch.Size([1, 2, 1, 4]))
    """
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"linear_attention_decode: {name} must be [B, H, L, *], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    B, Hq, L, F = phi_q.shape
    Hkv, D = phi_k.shape[1], v.shape[-1]
    if tuple(phi_k.shape) != (B, Hkv, L, F) or tuple(v.shape[:3]) != (B, Hkv, L) or Hkv == 0 or Hq % Hkv:
        raise ValueError("linear_attention_decode: expected phi_q [B, Hq, L, F], phi_k [B, Hkv, L, F], v [B, Hkv, L, D] "
                         f"with Hq a multiple of Hkv; got {tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}")
    if tuple(state.shape) != (B, Hkv, F, D) or tuple(normalizer.shape) != (B, Hkv, F):
        raise ValueError(f"linear_attention_decode: state must be [B, Hkv, F, D] = {[B, Hkv, F, D]} and normalizer "
                         f"[B, Hkv, F] = {[B, Hkv, F]}, got {list(state.shape)} and {list(normalizer.shape)}")
    if state.dtype not in (torch.float32, torch.float64) or normalizer.dtype != state.dtype:
        raise TypeError(f"linear_attention_decode: state and normalizer must both be fp32 (fp64 for references), got "
                        f"{state.dtype} and {normalizer.dtype}")
    if keep is not None and (keep.dtype != torch.bool or tuple(keep.shape) != (B, L) or keep.device != v.device):
        raise ValueError(f"linear_attention_decode: keep must be a bool tensor [B, L] = [{B}, {L}] on {v.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    return torch.ops.hhfft.linear_attention_decode(phi_q, phi_k, v, state, normalizer, keep)


def hedgehog_decode(q: Tensor, k: Tensor, v: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Tensor,
                    bk: Optional[Tensor], kind: str, state: Tensor, normalizer: Tensor,
                    keep: Optional[Tensor] = None) -> Tensor:
    """Hedgehog attention of L new tokens on top of a decoding state (what a converted cache site computes).

    The feature maps are computed exactly as :func:`hhfft.hedgehog_linear_attention` computes them unfused, so a
    model decoding through the state and the same model run over the whole prefix see the same features.

    Args:
        q: [B, Hq, L, DX]; k: [B, Hkv, L, DX]; v: [B, Hkv, L, D]; wq [Hq, DX, FH], bq, wk, bk, kind: the maps
        state, normalizer, keep: as in :func:`linear_attention_decode`
    Returns:
        o: [B, Hq, L, D] in v's dtype
    """
    from hhfft.lowering.linear_attention import _project
    from hhfft.nn.hedgehog import feature_map

    pq = feature_map(_project(q, wq.to(q.dtype), None if bq is None else bq.to(q.dtype)).to(q.dtype), kind)
    pk = feature_map(_project(k, wk.to(k.dtype), None if bk is None else bk.to(k.dtype)).to(k.dtype), kind)
    return linear_attention_decode(pq, pk, v, state, normalizer, keep)


# ------------------------------------------------------------------------------------------------ the cache marker
@torch.library.custom_op("hhfft::hedgehog_cache_kv", mutates_args=())
def _cache_kv(k: Tensor, v: Tensor, state: Tensor, normalizer: Tensor, past: int) -> tuple[Tensor, Tensor]:
    raise RuntimeError(
        "hhfft: a HedgehogCache layer's keys and values were used as a KV cache: the attention that reads them was "
        "not rewritten to constant-state Hedgehog decoding. This happens when the converted model runs under "
        "torch.compile with a backend other than 'hhfft', or when the attention of that layer could not be paired "
        "with its feature maps (see hhfft.explain). Use the model's own eager forward or backend='hhfft', or decode "
        "with a transformers DynamicCache instead."
    )


@_cache_kv.register_fake
def _(k, v, state, normalizer, past):
    return (k.new_empty(k.shape[0], k.shape[1], past + k.shape[2], k.shape[3]),
            v.new_empty(v.shape[0], v.shape[1], past + v.shape[2], v.shape[3]))


torch.fx.node.has_side_effect(torch.ops.hhfft.hedgehog_cache_kv.default)
