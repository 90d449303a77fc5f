"""Find softmax attention in any spelling, prove it, and rewrite it exactly to F.scaled_dot_product_attention.

A dataflow analysis, not a list of patterns. From every softmax over the last dimension:

- forward, the weights must reach the left operand of a matmul/bmm/einsum (the value product) through casts,
  dropout and batch-only views, each used once;
- backward, the scores must reach the query-key product through casts, scalar scales (``* s``, ``/ s``, on either
  side), additive masks (``+ m``), ``masked_fill(c, v)`` and ``where(c, scores, v)`` with v = -inf or finfo.min, and
  batch-only views, each used once (so scores and weights are used nowhere else);
- the product's right operand is k transposed (peeled through transpose/permute/mT, scales on k or on q are folded
  into the scale), q/k/v are followed back through GQA repeats (``repeat_interleave``, ``[:, :, None].expand(...)
  .reshape(...)``) and merged-head views ((B*H, L, D) from (B, H, L, D));
- the mask is classified by ``attention_mask``'s structural proof (none / causal / key padding / both / additive).

Each site becomes an ``AttentionSite`` and, with ``attention="canonical"``, is rewritten to one SDPA call: q, k, v in
(B, H, L, D), ``scale`` the product of the scales found, ``is_causal=True`` when the mask is proved causal and nothing
else, otherwise the original mask pieces turned into one additive ``attn_mask`` (exact: a -inf/finfo.min fill
absorbs the score it replaces). Existing SDPA calls are recorded (decision "kept"); ``nn.MultiheadAttention``'s
opaque ``multi_head_attention_forward`` is decomposed into projections + SDPA when ``need_weights=False``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from hhfft.passes._fx import as_int, bump, insert_call, known_eq, val
from hhfft.passes.attention_mask import (
    _CASTS,
    _IDENT,
    Allowed,
    MaskAnalyzer,
    _is_pred,
    _neg,
    _Sel,
    absorbing,
    classify,
    op_name,
)
from hhfft.passes.report import Site, describe_shape, module_path

__all__ = ["AttentionSite", "run", "analyze", "find"]

_SDPA = torch._C._nn.scaled_dot_product_attention
_MAX_CHAIN = 32  # ops between softmax and either product: bounds the work per softmax (linear pass)


@dataclass
class AttentionSite:
    """One attention site, as proved. Shapes may be SymInts.

    layout: how q was laid out where the model wrote it: "bhld" (heads before length), "blhd" (einsum/permute of
    (B, L, H, D)), "merged" ((B*H, L, D) bmm/matmul), "mha". mask_kind: "none", "causal", "key_padding",
    "causal+key_padding" or "additive". scale: the softmax scale (a number; for symbolic scales the list of
    ("mul" | "div", node) factors, which the rewrite folds into q).
    q/k/v: the site's q, k, v in (B, H, L, D) (k/v with kv_heads heads when gqa); attn_mask: its mask; SDPA receives
    them, except that a rewritten site with a mask passes q and the mask through ``_guard_blank_rows``; sdpa: the
    SDPA node (after the rewrite, or the model's own); key_padding: [(node, keep_when_true)] broadcastable to
    (B, 1, 1, S).
    """

    module_path: str
    spelling: str
    layout: str = "bhld"
    batch: Any = None
    heads: Any = None
    kv_heads: Any = None
    head_dim: Any = None
    q_len: Any = None
    kv_len: Any = None
    scale: Any = None
    mask_kind: str = "none"
    causal: bool = False
    dropout: float = 0.0
    softmax_dtype: Optional[torch.dtype] = None
    gqa: Optional[str] = None
    q: Optional[fx.Node] = None
    k: Optional[fx.Node] = None
    v: Optional[fx.Node] = None
    attn_mask: Optional[fx.Node] = None
    key_padding: list = field(default_factory=list)
    sdpa: Optional[fx.Node] = None
    owner: str = ""
    reason: str = ""


class _Fail(Exception):
    """The shape is not attention (or not provably the same function as SDPA): the message says why."""


# -------------------------------------------------------------------------------------------------------- helpers
def _users(n: fx.Node) -> list:
    return list(n.users)


def _shape_only(u: fx.Node, n: fx.Node) -> bool:
    """u reads only n's shape (``m.expand_as(n)``)."""
    return op_name(u) == "expand_as" and len(u.args) == 2 and u.args[1] is n and u.args[0] is not n


# elementwise ops through which a mask may flow into the attention: each broadcasts, so feeding them the mask
# before or after ``expand_as(scores)`` gives the same values where the attention reads them
_MASK_ELEMENTWISE = {"eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "logical_and", "logical_or",
                     "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "where", "neg", "mul", "add", "sub",
                     "div", "true_divide", "to", "float", "half", "bfloat16", "double", "bool", "long", "int", "type",
                     "type_as", "_to_copy", "contiguous", "clone"}


def _feeds_only(x: fx.Node, chain: set) -> bool:
    """Every use of x flows, through elementwise mask ops only, into ``chain`` (and nowhere else)."""
    stack, seen = list(x.users), set()
    while stack:
        y = stack.pop()
        if y in chain or y in seen:
            continue
        seen.add(y)
        if op_name(y) not in _MASK_ELEMENTWISE or not y.users:
            return False
        stack.extend(y.users)
    return True


def _single_user(n: fx.Node, what: str, allow_shape: bool = False) -> fx.Node:
    us = [u for u in _users(n) if not (allow_shape and _shape_only(u, n))]
    if len(us) != 1:
        raise _Fail(f"{what} ({n.name}) is used {len(us)} times (also returned or reused): not a pure attention")
    return us[0]


def _shape(n: Any) -> tuple:
    v = val(n)
    if not isinstance(v, torch.Tensor):
        raise _Fail(f"{getattr(n, 'name', n)} has no example tensor")
    return tuple(v.shape)


def _dtype(n: Any) -> torch.dtype:
    return val(n).dtype


def _ndim_arg(d: Any, nd: int) -> int:
    if not isinstance(d, int):
        raise _Fail(f"dimension {d!r} is not a constant")
    return d + nd if d < 0 else d


def _softmax_parts(n: fx.Node) -> tuple:
    """(input, dim, dtype) of a softmax node."""
    a, kw = n.args, n.kwargs
    x = a[0] if a else kw.get("input")
    dim = a[1] if len(a) > 1 else kw.get("dim")
    dtype = kw.get("dtype")
    if n.op == "call_function" and n.target is F.softmax and len(a) > 3:
        dtype = a[3]
    elif n.op == "call_function" and n.target is torch.softmax and len(a) > 2:
        dtype = a[2]
    elif n.op == "call_method" and len(a) > 2:
        dtype = a[2]
    return x, dim, dtype


def _is_cast(n: fx.Node) -> bool:
    name = op_name(n)
    if name not in _CASTS and name not in _IDENT:
        return False
    if name in {"to", "type"} and any(isinstance(x, fx.Node) for x in n.args[1:]):
        return False
    return isinstance(val(n), torch.Tensor) and _shape(n) == _shape(n.args[0])


def _batch_view(n: fx.Node) -> bool:
    """A view/reshape that keeps the last two dims and only regroups the batch dims (merged heads <-> B, H)."""
    if op_name(n) not in {"view", "reshape", "_unsafe_view"}:
        return False
    si, so = _shape(n.args[0]), _shape(n)
    return len(si) >= 2 and len(so) >= 2 and known_eq(si[-1], so[-1]) and known_eq(si[-2], so[-2])


def _number(x: Any, depth: int = 0) -> Any:
    """x as a python number, a SymFloat/SymInt node, or None when it is a tensor or depends on data.

    0-d tensors built in the graph from numbers only (torch.full([], c), torch.tensor(c)) are folded."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return x
    if not isinstance(x, fx.Node):
        return None
    v = val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return x
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    if isinstance(v, torch.Tensor) and v.dim() == 0 and depth < 6 and x.op == "call_function":
        name = op_name(x)
        if name in {"full", "tensor", "ones", "zeros", "mul", "div", "sqrt", "rsqrt", "add", "sub"} or name in _CASTS:
            for a in list(x.args) + list(x.kwargs.values()):
                if isinstance(a, fx.Node):
                    r = _number(a, depth + 1)
                    if not isinstance(r, (int, float)):
                        return None
            try:
                from torch.fx.node import map_arg

                real = map_arg(x.args, lambda a: torch.tensor(_number(a, depth + 1)))
                kw = map_arg(x.kwargs, lambda a: torch.tensor(_number(a, depth + 1)))
                kw = {k: (w if not isinstance(w, torch.device) else torch.device("cpu")) for k, w in kw.items()}
                out = x.target(*real, **kw) if x.op == "call_function" else None
            except Exception:  # noqa: BLE001 - not foldable: treat as data
                return None
            if isinstance(out, torch.Tensor) and out.numel() == 1:
                return out.item()
    return None


def _is_scalarish(x: Any) -> bool:
    v = val(x) if isinstance(x, fx.Node) else x
    return not isinstance(v, torch.Tensor) or v.dim() == 0 or v.numel() == 1


# --------------------------------------------------------------------------------------------------------- matches
@dataclass
class _Match:
    softmax: fx.Node
    pv: fx.Node
    product: fx.Node
    chain: list  # nodes owned by the site (erased after the rewrite), product ... pv
    q: fx.Node
    k: fx.Node  # (.., S, D) (not transposed); may be a node to transpose (k_needs_t)
    k_needs_t: bool
    v: fx.Node
    scale: list  # factors (numbers or nodes), multiplied
    pieces: list  # [(op, scale_after_list, args, frame_shape)] op in add/fill/keep
    dropout: float
    spelling: str
    q_perm: Optional[tuple] = None  # einsum permutes to (batch..., L, D)
    k_perm: Optional[tuple] = None
    v_perm: Optional[tuple] = None
    out_perm: Optional[tuple] = None
    layout: str = "bhld"
    softmax_dtype: Any = None


def _walk_weights(sm: fx.Node) -> tuple:
    """softmax -> (value product, weights operand chain, dropout p)."""
    chain, cur, p = [], sm, 0.0
    for _ in range(_MAX_CHAIN):
        u = _single_user(cur, "the attention weights")
        name = op_name(u)
        if _is_cast(u) and u.args[0] is cur:
            chain.append(u)
            cur = u
            continue
        if name == "dropout" and u.args[0] is cur:
            prob = u.kwargs.get("p", u.args[1] if len(u.args) > 1 else 0.5)
            training = u.kwargs.get("training", u.kwargs.get("train", u.args[2] if len(u.args) > 2 else True))
            if u.kwargs.get("inplace", u.args[3] if len(u.args) > 3 else False):
                raise _Fail("in-place dropout on the weights")
            if not isinstance(prob, (int, float)) or not isinstance(training, bool):
                raise _Fail("dropout probability or training flag is not a constant")
            p = float(prob) if training else p
            chain.append(u)
            cur = u
            continue
        if _batch_view(u) and u.args[0] is cur:
            chain.append(u)
            cur = u
            continue
        if name in {"matmul", "bmm"}:
            if u.args[0] is not cur or u.args[1] is cur:
                raise _Fail("the softmax weights are the right operand of the value product (weights transposed)")
            chain.append(u)
            return u, chain, p
        if name == "einsum":
            if _einsum_args(u)[1] is not cur or _einsum_args(u)[2] is cur:
                raise _Fail("the softmax weights are not the first operand of the value einsum")
            chain.append(u)
            return u, chain, p
        raise _Fail(f"the softmax weights feed {name or u.op} ({u.name}), not a product with the values")
    raise _Fail("too many ops between softmax and the value product")


def _walk_scores(x: fx.Node, sm: fx.Node) -> tuple:
    """softmax input -> (product node, chain, scale factors, mask pieces). Pieces are in application order."""
    chain, scale, pieces = [], [], []
    cur = x
    for _ in range(_MAX_CHAIN):
        if not isinstance(cur, fx.Node):
            raise _Fail("the softmax input is not a tensor computed in the graph")
        _single_user(cur, "the attention scores", allow_shape=True)
        name = op_name(cur)
        chain.append(cur)
        a = cur.args
        if name in {"matmul", "bmm", "einsum"}:
            pieces.reverse()
            scale.reverse()
            return cur, chain, scale, pieces
        if _is_cast(cur):
            cur = a[0]
            continue
        if _batch_view(cur):
            cur = a[0]
            continue
        if name in {"mul", "div"}:
            lhs, rhs = a[0], a[1]
            if name == "div" and (cur.kwargs.get("rounding_mode") or (len(a) > 2 and a[2] is not None)):
                raise _Fail("integer division of the scores")
            s_node, c = (lhs, rhs)
            if not (isinstance(lhs, fx.Node) and not _is_scalarish(lhs)):
                s_node, c = rhs, lhs
                if name == "div":
                    raise _Fail("the scores are a divisor")
            num = _number(c)
            if num is None:
                raise _Fail(f"the scale {getattr(c, 'name', c)} depends on data or is not a scalar")
            f = ("mul", num) if name == "mul" else ("div", num)
            scale.append(f)
            pieces.append(("scale", f))
            cur = s_node
            continue
        if name in {"add", "sub"}:
            if cur.kwargs.get("alpha", 1) != 1:
                raise _Fail("add with alpha")
            lhs, rhs = a[0], a[1]
            # the scores are the operand that continues the chain: the one used only here and not scalar
            cand = [o for o in (lhs, rhs) if isinstance(o, fx.Node) and len(o.users) == 1 and not _is_scalarish(o)]
            if len(cand) == 2:
                cand = [o for o in cand if _reaches_product(o)]
            if len(cand) != 1:
                raise _Fail("cannot tell the scores from the mask in an addition")
            s_node = cand[0]
            m = rhs if s_node is lhs else lhs
            if name == "sub" and s_node is rhs:
                raise _Fail("the scores are subtracted")
            if _is_scalarish(m):
                pieces.append(("const", m))  # softmax is invariant to adding a constant
            else:
                if _dtype(m) == torch.bool:
                    raise _Fail("a bool tensor is added to the scores")
                pieces.append(("add" if name == "add" else "sub", m, _shape(cur)))
            cur = s_node
            continue
        if name == "masked_fill":
            fill = a[2] if len(a) > 2 else cur.kwargs.get("value")
            num = _number(fill)
            if not isinstance(num, (int, float)) or not absorbing(num, _dtype(cur)):
                raise _Fail(f"masked_fill with {num!r} is not an additive mask (use -inf or finfo.min)")
            pieces.append(("fill", a[1], num, _shape(cur)))
            cur = a[0]
            continue
        if name == "where":
            c, t, f = a[0], a[1], a[2]
            if isinstance(t, fx.Node) and not _is_scalarish(t) and len(t.users) == 1 and _is_scalarish(f):
                num, kind, s_node = _number(f), "fill_not", t
            elif isinstance(f, fx.Node) and not _is_scalarish(f) and len(f.users) == 1 and _is_scalarish(t):
                num, kind, s_node = _number(t), "fill", f
            else:
                raise _Fail("torch.where over the scores with a non-constant fill")
            if not isinstance(num, (int, float)) or not absorbing(num, _dtype(cur)):
                raise _Fail(f"torch.where fills {num!r}: not an additive mask (use -inf or finfo.min)")
            pieces.append((kind, c, num, _shape(cur)))
            cur = s_node
            continue
        raise _Fail(f"the scores pass through {name or cur.op} ({cur.name})")
    raise _Fail("too many ops between the product and softmax")


def _reaches_product(n: fx.Node) -> bool:
    """Whether n is computed from a matmul/bmm/einsum through ops a score chain may contain (bounded search)."""
    stack, budget = [n], 64
    while stack and budget > 0:
        budget -= 1
        x = stack.pop()
        if not isinstance(x, fx.Node) or _is_scalarish(x):
            continue
        name = op_name(x)
        if name in {"matmul", "bmm", "einsum"}:
            return True
        if _is_cast(x) or _batch_view(x) or name in {"mul", "div", "add", "sub", "masked_fill"}:
            stack.extend(a for a in x.args[:2] if isinstance(a, fx.Node))
        elif name == "where":
            stack.extend(a for a in x.args[1:3] if isinstance(a, fx.Node))
    return False


def _peel_transpose(n: fx.Node) -> Optional[fx.Node]:
    """x if n is x with its last two dims swapped, else None."""
    name = op_name(n)
    if not isinstance(n, fx.Node) or not isinstance(val(n), torch.Tensor):
        return None
    nd = len(_shape(n))
    if name == "transpose" and len(n.args) >= 3:
        d0, d1 = sorted(_ndim_arg(d, nd) for d in n.args[1:3])
        return n.args[0] if (d0, d1) == (nd - 2, nd - 1) else None
    if name == "permute":
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
        dims = [_ndim_arg(d, nd) for d in dims]
        want = list(range(nd - 2)) + [nd - 1, nd - 2]
        return n.args[0] if dims == want else None
    if name in {"mT", "t"} and (name == "mT" or nd == 2):
        return n.args[0]
    return None


def _peel_scale(n: fx.Node, scale: list) -> fx.Node:
    """Fold ``x * s`` / ``x / s`` with a scalar s into ``scale``; return x."""
    for _ in range(4):
        name = op_name(n)
        if name in {"mul", "div"} and len(n.args) == 2:
            lhs, rhs = n.args
            x, c = (lhs, rhs) if isinstance(lhs, fx.Node) and not _is_scalarish(lhs) else (rhs, lhs)
            if name == "div" and x is rhs:
                return n
            num = _number(c)
            if num is None or not isinstance(x, fx.Node):
                return n
            scale.append((name, num))
            n = x
            continue
        return n
    return n


def _peel_ident(n: fx.Node) -> fx.Node:
    while isinstance(n, fx.Node) and op_name(n) in _IDENT:
        n = n.args[0]
    return n


def _einsum_parts(eq: str) -> tuple:
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise _Fail(f"einsum {eq!r}: only explicit two-operand equations without ellipsis are handled")
    ins, out = eq.split("->")
    ins = ins.split(",")
    if len(ins) != 2:
        raise _Fail(f"einsum {eq!r} has {len(ins)} operands")
    return ins[0], ins[1], out


def _einsum_args(n: fx.Node) -> tuple:
    eq = n.args[0]
    ops = n.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if not isinstance(eq, str) or len(ops) != 2:
        raise _Fail("einsum with an unsupported signature")
    return eq, ops[0], ops[1]


def _analyze_product(prod: fx.Node, scale: list) -> tuple:
    """q @ k^T: (q, k, k_needs_t, q_perm, k_perm, layout, batch letters) in matmul terms."""
    name = op_name(prod)
    if name == "einsum":
        eq, qa, ka = _einsum_args(prod)
        lq, lk, lo = _einsum_parts(eq)
        if len(lo) < 2:
            raise _Fail(f"einsum {eq!r} does not produce (..., L, S) scores")
        qi, ki, batch = lo[-2], lo[-1], lo[:-2]
        contracted = (set(lq) & set(lk)) - set(lo)
        bset = set(batch)
        if len(contracted) != 1 or set(lq) != bset | {qi} | contracted or set(lk) != bset | {ki} | contracted:
            raise _Fail(f"einsum {eq!r} is not a query-key product over one head dimension")
        d = contracted.pop()
        if len(set(lq)) != len(lq) or len(set(lk)) != len(lk):
            raise _Fail(f"einsum {eq!r} repeats a letter")
        q_perm = tuple(lq.index(c) for c in batch + qi + d)
        k_perm = tuple(lk.index(c) for c in batch + ki + d)
        layout = "blhd" if lq.index(qi) < len(lq) - 2 else "bhld"
        q = _peel_scale(qa, scale)
        k = _peel_scale(ka, scale)
        return q, k, False, q_perm, k_perm, layout, batch + qi + ki
    a, b = prod.args[0], prod.args[1]
    q = _peel_scale(a, scale)
    kt = _peel_scale(b, scale)
    k = _peel_transpose(_peel_ident(kt))
    if k is None:
        return q, kt, True, None, None, "bhld", None
    k = _peel_scale(k, scale)
    return q, k, False, None, None, "bhld", None


def _value_operand(pv: fx.Node, batch_letters: Optional[str]) -> tuple:
    """(v node, v_perm to (batch..., S, Dv), out_perm from (batch..., L, Dv) to the pv output layout)."""
    name = op_name(pv)
    if name != "einsum":
        return pv.args[1], None, None
    eq, wa, va = _einsum_args(pv)
    lw, lv, lo = _einsum_parts(eq)
    if len(lw) < 2:
        raise _Fail(f"einsum {eq!r}: weights are not (..., L, S)")
    qi, ki, batch = lw[-2], lw[-1], lw[:-2]
    e = set(lv) - set(lw)
    if ki in lo or len(e) != 1 or set(lv) != set(batch) | {ki} | e or set(lo) != set(batch) | {qi} | e:
        raise _Fail(f"einsum {eq!r} is not a weights-value product over the key dimension")
    e = e.pop()
    v_perm = tuple(lv.index(c) for c in batch + ki + e)
    canon = batch + qi + e
    out_perm = tuple(canon.index(c) for c in lo)
    return va, v_perm, out_perm


def _match(sm: fx.Node) -> _Match:
    x, dim, sdtype = _softmax_parts(sm)
    if not isinstance(x, fx.Node) or not isinstance(val(x), torch.Tensor):
        raise _Fail("softmax of a non-tensor")
    nd = len(_shape(x))
    if nd < 2 or _ndim_arg(dim, nd) != nd - 1:
        raise _Fail(f"softmax over dim {dim} of a {nd}-d tensor, not over the keys (last dim)")
    pv, wchain, p = _walk_weights(sm)
    if isinstance(sm.target, torch._ops.OpOverload) and sm.target.__name__.startswith("_softmax"):
        if len(sm.args) > 2 and sm.args[2]:
            sdtype = torch.float32
    prod, schain, scale, pieces = _walk_scores(x, sm)
    q, k, k_needs_t, q_perm, k_perm, layout, letters = _analyze_product(prod, scale)
    v, v_perm, out_perm = _value_operand(pv, letters)
    # the weights reaching the value product must be in the product's batch frame
    w_at_pv = pv.args[0] if op_name(pv) != "einsum" else _einsum_args(pv)[1]
    sp, sw = _shape(prod), _shape(w_at_pv)
    if op_name(prod) == "einsum" or op_name(pv) == "einsum":
        if op_name(prod) != op_name(pv):
            raise _Fail("mixed einsum and matmul products")
        _, _, lo = _einsum_parts(_einsum_args(prod)[0])
        lw, _, _ = _einsum_parts(_einsum_args(pv)[0])
        if len(lo) != len(lw):
            raise _Fail("scores and weights einsums disagree on rank")
    elif len(sp) != len(sw) or not all(known_eq(a, b) for a, b in zip(sp, sw)):
        raise _Fail("the weights are reshaped between the scores and the value product")
    cdt = _dtype(prod)
    if cdt.is_floating_point:
        for n in [*schain, sm, *wchain]:
            d = _dtype(n)
            if d.is_floating_point and torch.finfo(d).eps > torch.finfo(cdt).eps:
                raise _Fail(f"{n.name} rounds the {cdt} attention to {d}: SDPA would not round the same")
    spelling = op_name(prod)
    chain = [n for n in reversed(schain)] + [sm] + wchain
    return _Match(sm, pv, prod, chain, q, k, k_needs_t, v, scale, pieces, p, spelling, q_perm, k_perm, v_perm,
                  out_perm, layout, sdtype)


# ------------------------------------------------------------------------------------------------------ canonical form
def _peel_gqa(n: fx.Node) -> Optional[tuple]:
    """(x, n_rep, how) when n repeats each head of x n_rep times along dim 1 (4-D), else None."""
    name = op_name(n)
    if name == "repeat_interleave":
        reps = n.kwargs.get("repeats", n.args[1] if len(n.args) > 1 else None)
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
        x = n.args[0]
        if isinstance(reps, int) and isinstance(dim, int) and len(_shape(x)) == 4 and _ndim_arg(dim, 4) == 1:
            return x, reps, "repeat_interleave"
        return None
    if name in {"reshape", "view"}:
        e = n.args[0]
        if op_name(e) != "expand":
            return None
        g = e.args[0]
        se, sg = _shape(e), _shape(g)
        so = _shape(n)
        if len(se) != 5 or len(so) != 4 or len(sg) != 5 or as_int(sg[2]) != 1:
            return None
        if op_name(g) == "unsqueeze" and _ndim_arg(g.args[1], 5) == 2:
            x = g.args[0]
        elif op_name(g) == "getitem":
            idx = g.args[1]
            if not (isinstance(idx, tuple) and len(idx) >= 3 and idx[0] == slice(None) and idx[1] == slice(None)
                    and idx[2] is None and all(i == slice(None) or i is Ellipsis for i in idx[3:])):
                return None
            x = g.args[0]
        else:
            return None
        rep = as_int(se[2])
        sx = _shape(x)
        if rep is None or len(sx) != 4 or not known_eq(so[1], sx[1] * rep) or not known_eq(so[2], sx[2]):
            return None
        return x, rep, "expand_reshape"
    return None


def _unmerge(n: fx.Node) -> Optional[fx.Node]:
    """The (B, H, L, D) tensor a (B*H, L, D) view came from, else None."""
    if op_name(n) not in {"view", "reshape"}:
        return None
    x = n.args[0]
    si, so = _shape(x), _shape(n)
    if len(si) == 4 and len(so) == 3 and known_eq(si[0] * si[1], so[0]) and all(
        known_eq(si[d + 1], so[d]) for d in (1, 2)
    ):
        return x
    return None


class _Builder:
    """Inserts calls like ``like`` (meta filled under the fake mode) and remembers them, so a rewrite that fails
    half-way can take them out again."""

    def __init__(self, graph: fx.Graph, like: fx.Node) -> None:
        self.g, self.like, self.made = graph, like, []

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        n = insert_call(self.g, target, args, kwargs, like=self.like)
        self.made.append(n)
        return n

    def undo(self) -> None:
        for n in reversed(self.made):
            if not n.users:
                self.g.erase_node(n)
        self.made = []


def _mul_scale(scale: list) -> tuple:
    """(number or None, list of symbolic factors)."""
    num, sym = 1.0, []
    for op, c in scale:
        if isinstance(c, fx.Node):
            sym.append((op, c))
        else:
            num = num * c if op == "mul" else num / c
    return num, sym


def _rewrite(gm: fx.GraphModule, m: _Match, site: AttentionSite, an: MaskAnalyzer) -> None:
    b = _Builder(gm.graph, m.pv)
    try:
        _rewrite_with(gm, m, site, an, b)
    except Exception as e:  # noqa: BLE001 - a failed proof (or an unforeseen graph) leaves the graph as it was
        b.undo()
        raise e if isinstance(e, _Fail) else _Fail(f"not rewritten: {type(e).__name__}: {e}") from e


def _rewrite_with(gm: fx.GraphModule, m: _Match, site: AttentionSite, an: MaskAnalyzer, b: "_Builder") -> None:
    g = gm.graph
    with g.inserting_before(m.pv):
        q, k, v = m.q, m.k, m.v
        if m.q_perm is not None:
            q, k = _permute(b, q, m.q_perm, m.scale), _permute(b, k, m.k_perm, m.scale)
        elif m.k_needs_t:
            k = b(torch.transpose, k, -2, -1)
        if m.v_perm is not None:
            v = _permute(b, v, m.v_perm)
        rank = len(_shape(q))
        squeeze = 0
        if rank == 3:
            uq, uk, uv = _unmerge(_peel_ident(q)), _unmerge(_peel_ident(k)), _unmerge(_peel_ident(v))
            if uq is not None and uk is not None and uv is not None and all(
                known_eq(_shape(uq)[i], _shape(x)[i]) for x in (uk, uv) for i in (0, 1)
            ):
                q, k, v = _peel_scale(uq, m.scale), _peel_scale(uk, m.scale), uv
                squeeze = -1  # flatten (B, H) back
                site.layout = "merged"
            else:
                q, k, v = (b(torch.unsqueeze, t, 0) for t in (q, k, v))
                squeeze = 1
                site.layout = "merged"
        elif rank == 2:
            q, k, v = (b(torch.unsqueeze, b(torch.unsqueeze, t, 0), 0) for t in (q, k, v))
            squeeze = 2
        elif rank != 4:
            raise _Fail(f"{rank}-d attention operands")
        # GQA: k and v repeated the same way -> enable_gqa on the un-repeated tensors
        gk, gv = _peel_gqa(k), _peel_gqa(v)
        enable_gqa = False
        if gk is not None and gv is not None and gk[1] == gv[1] and gk[1] > 1:
            k, v = gk[0], gv[0]
            enable_gqa = True
            site.gqa = gk[2]
        sq, sk, sv = _shape(q), _shape(k), _shape(v)
        for i in (0, 1):
            if enable_gqa and i == 1:
                ok = known_eq(sk[1], sv[1])
            else:
                ok = known_eq(sq[i], sk[i]) and known_eq(sk[i], sv[i])
            if not ok:
                raise _Fail(f"q, k, v disagree on batch dim {i} ({sq[i]}, {sk[i]}, {sv[i]}): broadcast attention")
        if not known_eq(sk[2], sv[2]) or not known_eq(sq[3], sk[3]):
            raise _Fail("k and v lengths or q and k head dims differ")
        cdt = _dtype(q)
        if _dtype(k) != cdt:
            raise _Fail(f"q is {cdt} but k is {_dtype(k)}")
        if _dtype(v) != cdt:
            src = v
            while _is_cast(src) and _dtype(src) != cdt:
                src = src.args[0]
            v = src if _dtype(src) == cdt else b(torch.Tensor.to, v, cdt)
        # scale
        num, sym = _mul_scale(m.scale)
        scale_arg: Any = num
        if sym:
            for op, c in sym:
                q = b(operator.mul if op == "mul" else operator.truediv, q, c)
            if num != 1.0:
                q = b(operator.mul, q, num)
            scale_arg = 1.0
        # mask: ``m.expand_as(scores)`` only broadcasts m; SDPA broadcasts attn_mask itself. The graph is changed
        # only once the rewrite cannot fail any more (below): a skipped site leaves it as it was.
        swap = {u: u.args[0] for n in m.chain for u in n.users if _shape_only(u, n)}
        if any(not _feeds_only(u, set(m.chain)) for u in swap):
            raise _Fail("a mask expanded to the scores' shape is also used outside the attention")
        m.pieces = [tuple(swap.get(x, x) if isinstance(x, fx.Node) else x for x in p) for p in m.pieces]
        allowed = Allowed()
        attn_mask = None
        frames = {len(p[-1]) for p in m.pieces if p[0] not in {"scale", "const"}}
        if len(frames) > 1:
            raise _Fail("mask pieces are applied in frames of different rank")
        for piece in m.pieces:
            kind = piece[0]
            if kind == "scale":
                if attn_mask is not None:
                    op, c = piece[1]
                    attn_mask = b(operator.mul if op == "mul" else operator.truediv, attn_mask, c)
                continue
            if kind == "const":
                continue
            frame = piece[-1]
            if kind in {"add", "sub"}:
                mnode = piece[1]
                t = an.of(mnode)
                val_ = t.value
                if isinstance(val_, _Sel) and val_.a == 0 and absorbing(val_.b, cdt):
                    classify(an, val_.pred, _align(t.dims, len(frame)), allowed)
                elif isinstance(val_, _Sel) and val_.b == 0 and absorbing(val_.a, cdt):
                    classify(an, _neg(val_.pred), _align(t.dims, len(frame)), allowed)
                else:
                    allowed.general = True
                mm = mnode if kind == "add" else b(torch.neg, mnode)
                attn_mask = mm if attn_mask is None else b(operator.add, attn_mask, mm)
            else:
                cond, fill = piece[1], piece[2]
                t = an.of(cond)
                if _is_pred(t.value):
                    pred = _neg(t.value) if kind == "fill" else t.value
                    classify(an, pred, _align(t.dims, len(frame)), allowed)
                else:
                    allowed.general = True
                base = attn_mask if attn_mask is not None else b(torch.zeros_like, cond, dtype=cdt)
                attn_mask = b(torch.where, cond, fill, base) if kind == "fill" else b(torch.where, cond, base, fill)
        is_causal = False
        if allowed.causal and not allowed.key_padding and not allowed.general:
            attn_mask = None
            is_causal = True
        if attn_mask is not None:
            if _dtype(attn_mask) != cdt:
                attn_mask = b(torch.Tensor.to, attn_mask, cdt)
            frame = frames.pop()
            ms = _shape(attn_mask)
            if frame - len(ms) > 0:  # broadcast from the left inside its frame: make the frame's rank explicit
                for _ in range(frame - len(ms)):
                    attn_mask = b(torch.unsqueeze, attn_mask, 0)
                ms = _shape(attn_mask)
            if (squeeze in (0, -1) and frame == 4) or (squeeze == 1 and frame == 3) or (squeeze == 2 and frame == 2):
                for _ in range(max(squeeze, 0)):
                    attn_mask = b(torch.unsqueeze, attn_mask, 0)
            elif squeeze == -1 and frame == 3 and as_int(ms[0]) == 1:
                attn_mask = b(torch.unsqueeze, attn_mask, 0)
            else:
                raise _Fail("the mask is applied in a different batch frame than the product")
        site_q, site_mask = q, attn_mask
        if attn_mask is not None:
            q, attn_mask = _guard_blank_rows(b, q, attn_mask, cdt)
        kwargs: dict = {"attn_mask": attn_mask, "dropout_p": m.dropout, "is_causal": is_causal, "scale": scale_arg}
        if enable_gqa:
            kwargs["enable_gqa"] = True
        out = b(_SDPA, q, k, v, **kwargs)
        out.meta["hhfft_attention"] = True
        sdpa = out
        if squeeze == 1:
            out = b(torch.squeeze, out, 0)
        elif squeeze == 2:
            out = b(torch.squeeze, b(torch.squeeze, out, 0), 0)
        elif squeeze == -1:
            out = b(torch.flatten, out, 0, 1)
        if m.out_perm is not None and m.out_perm != tuple(range(len(m.out_perm))):
            out = b(torch.permute, out, m.out_perm)
        if _dtype(out) != _dtype(m.pv):
            out = b(torch.Tensor.to, out, _dtype(m.pv))
        if tuple(_shape(out)) != tuple(_shape(m.pv)) and not all(
            known_eq(x, y) for x, y in zip(_shape(out), _shape(m.pv))
        ):
            raise _Fail("internal: rewritten shape differs")
    m.pv.replace_all_uses_with(out)
    _fill(site, sdpa, allowed, is_causal, scale_arg if not sym else m.scale)
    site.q, site.attn_mask = site_q, site_mask
    for u, src in swap.items():  # every use broadcasts (_feeds_only): the unexpanded mask computes the same
        u.replace_all_uses_with(src)
        g.erase_node(u)
    for n in reversed(m.chain):
        if not n.users:
            g.erase_node(n)
    _erase_dead(g, [m.q, m.k, m.v] + [p[1] for p in m.pieces if p[0] not in {"scale", "const"}])


def _guard_blank_rows(b: "_Builder", q: fx.Node, mask: fx.Node, dtype: torch.dtype) -> tuple:
    """Rows whose keys are all masked, made exact: (q, mask) -> (q with those rows zeroed, mask with their maximum
    subtracted). On such a row every mask entry absorbs the score, so eager computes softmax(mask row), and a
    masked_fill/where stops the scores' gradient. SDPA's fused kernels recompute the weights in the backward from
    the row's log-sum-exp, which loses log(S) next to a fill of -1e30 or finfo.min (CPU flash: the value gradient was
    S times eager's); with the maximum subtracted the row is softmax(mask - max) = the same weights, well
    conditioned, and q = 0 makes its scores exactly 0. The one difference left: where the blank row came from an
    additive mask, eager also passes a gradient to the absorbed scores (to q and k) that the rewrite does not (the
    output does not depend on them). A -inf row stays NaN, as in eager."""
    top = b(torch.amax, mask, -1, keepdim=True)
    blank = b(operator.le, top, torch.finfo(torch.float16).min if dtype == torch.float16 else -1e30)
    return b(torch.where, blank, 0.0, q), b(torch.where, blank, b(operator.sub, mask, top), mask)


def _perm_of(n: fx.Node) -> Optional[tuple]:
    """The permutation a transpose/permute node applies, else None."""
    name = op_name(n)
    if not isinstance(n, fx.Node) or not isinstance(val(n), torch.Tensor):
        return None
    nd = len(_shape(n))
    if name == "transpose" and len(n.args) >= 3:
        p = list(range(nd))
        d0, d1 = (_ndim_arg(d, nd) for d in n.args[1:3])
        p[d0], p[d1] = p[d1], p[d0]
        return tuple(p)
    if name == "permute":
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
        return tuple(_ndim_arg(d, nd) for d in dims)
    return None


def _permute(b: "_Builder", x: fx.Node, perm: tuple, scale: Optional[list] = None) -> fx.Node:
    """x.permute(perm), folded into the transposes/permutes x came from (so q/k/v are the model's own tensors);
    with ``scale``, scalar scales met on the way are folded into it (they commute with permutes)."""
    perm = tuple(perm)
    while True:
        if scale is not None:
            x = _peel_scale(x, scale)
        inner = _perm_of(x)
        if inner is None or len(inner) != len(perm):
            break
        perm = tuple(inner[p] for p in perm)
        x = x.args[0]
    return x if perm == tuple(range(len(perm))) else b(torch.permute, x, perm)


def _align(dims: tuple, rank: int) -> tuple:
    if len(dims) >= rank:
        return dims
    return (None,) * (rank - len(dims)) + tuple(dims)


def _erase_dead(g: fx.Graph, roots: list) -> None:
    """Erase side-effect-free nodes the rewrite left without users (transposes of k, scale muls, ...)."""
    stack = [r for r in roots if isinstance(r, fx.Node)]
    while stack:
        n = stack.pop()
        if n.users or n.op != "call_function" and n.op != "call_method":
            continue
        if op_name(n) not in {"transpose", "permute", "mul", "div", "mT", "t", "contiguous", "clone", "view",
                              "reshape", "expand", "unsqueeze", "getitem", "repeat_interleave", "to", "float",
                              "type", "half", "bfloat16", "eq", "ne", "where", "and", "or", "not", "le", "lt",
                              "ge", "gt", "masked_fill", "add", "sub", "neg"}:
            continue
        ins = n.all_input_nodes
        g.erase_node(n)
        stack.extend(ins)


def _fill(site: AttentionSite, sdpa: fx.Node, allowed: Allowed, is_causal: bool, scale: Any) -> None:
    q, k, v = sdpa.args[:3]
    sq, sk = _shape(q), _shape(k)
    site.q, site.k, site.v, site.sdpa = q, k, v, sdpa
    site.batch, site.heads, site.kv_heads, site.head_dim = sq[0], sq[1], sk[1], sq[3]
    site.q_len, site.kv_len = sq[2], sk[2]
    site.attn_mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
    site.mask_kind = allowed.kind
    site.causal = allowed.causal or is_causal
    site.key_padding = list(allowed.key_padding)
    site.scale = scale


# ------------------------------------------------------------------------------------------------------ existing SDPA
def _record_sdpa(n: fx.Node, an: MaskAnalyzer) -> AttentionSite:
    site = AttentionSite(module_path=module_path(n), spelling="sdpa", owner=module_path(n))
    a, kw = n.args, n.kwargs
    mask = kw.get("attn_mask", a[3] if len(a) > 3 else None)
    is_causal = kw.get("is_causal", a[5] if len(a) > 5 else False)
    allowed = Allowed()
    if isinstance(mask, fx.Node):
        t = an.of(mask)
        if _dtype(mask) == torch.bool and _is_pred(t.value):
            classify(an, t.value, _align(t.dims, 4), allowed)
        elif isinstance(t.value, _Sel) and t.value.a == 0 and absorbing(t.value.b, _dtype(mask)):
            classify(an, t.value.pred, _align(t.dims, 4), allowed)
        elif isinstance(t.value, _Sel) and t.value.b == 0 and absorbing(t.value.a, _dtype(mask)):
            classify(an, _neg(t.value.pred), _align(t.dims, 4), allowed)
        else:
            allowed.general = True
    if is_causal is True:
        allowed.causal = True
    _fill(site, n, allowed, bool(is_causal), kw.get("scale"))
    site.dropout = kw.get("dropout_p", a[4] if len(a) > 4 else 0.0)
    if kw.get("enable_gqa"):
        site.gqa = "enable_gqa"
    elif len(_shape(site.k)) == 4:
        # k and v repeated per head before the call (HF's repeat_kv when a mask is given): the site's own k, v are
        # the un-repeated ones, so a Hedgehog site keeps kv_heads maps and state (the SDPA call itself is kept)
        gk, gv = _peel_gqa(site.k), _peel_gqa(site.v)
        if gk is not None and gv is not None and gk[1] == gv[1] and gk[1] > 1:
            site.k, site.v, site.kv_heads, site.gqa = gk[0], gv[0], _shape(gk[0])[1], gk[2]
    return site


# ------------------------------------------------------------------------------------------------------------- MHA
def _mha(gm: fx.GraphModule, n: fx.Node, site: AttentionSite, an: MaskAnalyzer, rewrite: bool) -> None:
    """Decompose F.multi_head_attention_forward (need_weights=False) into in-projections + SDPA + out-projection."""
    import inspect

    params = list(inspect.signature(F.multi_head_attention_forward).parameters)
    bound = dict(zip(params, n.args))
    bound.update(n.kwargs)
    defaults = {k: p.default for k, p in inspect.signature(F.multi_head_attention_forward).parameters.items()}
    arg = lambda k: bound.get(k, defaults[k])  # noqa: E731
    site.layout = "mha"
    if arg("need_weights"):
        raise _Fail("nn.MultiheadAttention with need_weights=True returns the attention weights")
    for k in ("bias_k", "bias_v", "static_k", "static_v"):
        if arg(k) is not None:
            raise _Fail(f"nn.MultiheadAttention with {k}")
    if arg("add_zero_attn"):
        raise _Fail("nn.MultiheadAttention with add_zero_attn")
    query = arg("query")
    if len(_shape(query)) != 3:
        raise _Fail("unbatched nn.MultiheadAttention input")
    E, H = arg("embed_dim_to_check"), arg("num_heads")
    if not isinstance(E, int) or not isinstance(H, int) or E % H:
        raise _Fail("embed dim / heads are not constants")
    hd = E // H
    kpm, am = arg("key_padding_mask"), arg("attn_mask")
    users = list(n.users)
    if any(op_name(u) != "getitem" or (u.args[1] != 0 and u.users) for u in users):
        raise _Fail("the attention weights output of nn.MultiheadAttention is used")
    p = float(arg("dropout_p")) if arg("training") else 0.0
    allowed = Allowed()
    if isinstance(kpm, fx.Node):
        t = an.of(kpm)
        if len(t.dims) != 2:
            raise _Fail("key_padding_mask is not (N, S)")
        dims = (t.dims[0], None, None, t.dims[1])
        if _dtype(kpm) == torch.bool and _is_pred(t.value):
            classify(an, _neg(t.value), dims, allowed)  # True = ignore (blocked)
        elif isinstance(t.value, _Sel) and t.value.b == 0 and absorbing(t.value.a, _dtype(kpm)):
            classify(an, _neg(t.value.pred), dims, allowed)
        elif isinstance(t.value, _Sel) and t.value.a == 0 and absorbing(t.value.b, _dtype(kpm)):
            classify(an, t.value.pred, dims, allowed)
        else:
            allowed.general = True
    if isinstance(am, fx.Node):
        t = an.of(am)
        if _dtype(am) == torch.bool and _is_pred(t.value):
            classify(an, _neg(t.value), _align(t.dims, 2), allowed)
        elif isinstance(t.value, _Sel) and t.value.b == 0 and absorbing(t.value.a, _dtype(am)):
            classify(an, _neg(t.value.pred), _align(t.dims, 2), allowed)
        elif isinstance(t.value, _Sel) and t.value.a == 0 and absorbing(t.value.b, _dtype(am)):
            classify(an, t.value.pred, _align(t.dims, 2), allowed)
        else:
            allowed.general = True
        if len(_shape(am)) != 2:
            raise _Fail("3-d attn_mask of nn.MultiheadAttention")
    elif arg("is_causal"):
        raise _Fail("is_causal without attn_mask")
    site.dropout = p
    if not rewrite:
        site.mask_kind = allowed.kind
        site.causal = allowed.causal
        return
    g = gm.graph
    b = _Builder(g, n)
    try:
        o, sdpa = _mha_build(g, n, b, arg, E, H, hd, kpm, am, p)
    except Exception as e:  # noqa: BLE001
        b.undo()
        raise e if isinstance(e, _Fail) else _Fail(f"not rewritten: {type(e).__name__}: {e}") from e
    for u in users:
        if u.args[1] == 0:
            u.replace_all_uses_with(o)
        g.erase_node(u)
    g.erase_node(n)
    _fill(site, sdpa, allowed, sdpa.kwargs["is_causal"], None)


def _mha_build(g: fx.Graph, n: fx.Node, b: "_Builder", arg: Any, E: int, H: int, hd: int, kpm: Any, am: Any,
               p: float) -> tuple:
    with g.inserting_before(n):
        if arg("use_separate_proj_weight"):
            wq, wk, wv = arg("q_proj_weight"), arg("k_proj_weight"), arg("v_proj_weight")
        else:
            w = arg("in_proj_weight")
            wq, wk, wv = (b(operator.getitem, w, slice(i * E, (i + 1) * E)) for i in range(3))
        bias = arg("in_proj_bias")
        bq = bk = bv = None
        if bias is not None:
            bq, bk, bv = (b(operator.getitem, bias, slice(i * E, (i + 1) * E)) for i in range(3))

        def heads(x: fx.Node) -> fx.Node:  # (L, N, E) -> (N, H, L, hd)
            return b(torch.permute, b(torch.unflatten, x, -1, (H, hd)), (1, 2, 0, 3))

        q = heads(b(F.linear, arg("query"), wq, bq))
        k = heads(b(F.linear, arg("key"), wk, bk))
        v = heads(b(F.linear, arg("value"), wv, bv))
        cdt = _dtype(q)
        mask = None
        if isinstance(am, fx.Node):
            mask = b(torch.where, am, float("-inf"), 0.0) if _dtype(am) == torch.bool else am
            mask = b(torch.Tensor.to, mask, cdt)
        if isinstance(kpm, fx.Node):
            km = b(torch.where, kpm, float("-inf"), 0.0) if _dtype(kpm) == torch.bool else kpm
            km = b(torch.Tensor.to, km, cdt)
            km = b(torch.unsqueeze, b(torch.unsqueeze, km, 1), 1)  # (N, 1, 1, S)
            mask = km if mask is None else b(operator.add, mask, km)
        is_causal = bool(arg("is_causal")) and mask is None
        sdpa = b(_SDPA, q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        sdpa.meta["hhfft_attention"] = True
        o = b(torch.flatten, b(torch.permute, sdpa, (2, 0, 1, 3)), 2)  # (L, N, E)
        o = b(F.linear, o, arg("out_proj_weight"), arg("out_proj_bias"))
    return o, sdpa


# --------------------------------------------------------------------------------------------------------------- run
def find(gm: fx.GraphModule) -> list:
    """Every softmax / SDPA / MHA node of the graph, in order."""
    out = []
    for n in gm.graph.nodes:
        name = op_name(n)
        if name in {"softmax", "sdpa", "mha"}:
            out.append(n)
    return out


def _site_record(report: Any, site: AttentionSite, decision: str, reason: str, dtype: Any, shapes: str) -> None:
    site.reason = reason
    report.add(Site(kind="attention", spelling=site.spelling, module_path=site.module_path, shapes=shapes,
                    dtype=str(dtype).replace("torch.", ""), decision=decision, reason=reason, record=site))


def run(gm: fx.GraphModule, opts: Any, report: Any) -> None:
    """Find attention sites; rewrite them to SDPA when ``opts.attention == "canonical"``; record every one."""
    rewrite = getattr(opts, "attention", "canonical") == "canonical"
    an = MaskAnalyzer()
    for n in find(gm):
        if getattr(n, "_erased", False):
            continue
        name = op_name(n)
        path = module_path(n)
        site = AttentionSite(module_path=path, spelling=name, owner=path)
        if name == "sdpa":
            try:
                site = _record_sdpa(n, an)
            except Exception as e:  # noqa: BLE001 - recording must never break a compile
                site.reason = f"{type(e).__name__}: {e}"
            reason = _with_notes("already F.scaled_dot_product_attention", site, an, [site.attn_mask])
            _site_record(report, site, "kept", reason, _dtype(n.args[0]), describe_shape(*(val(x) for x in n.args[:3])))
            bump("attention_sdpa_found")
            continue
        if name == "mha":
            site.spelling = "mha"
            dtype, shapes = _dtype(n.args[0]), describe_shape(*(val(x) for x in n.args[:3]))
            try:
                _mha(gm, n, site, an, rewrite)
            except _Fail as e:
                _site_record(report, site, "skipped", str(e), dtype, shapes)
                bump("attention_skipped")
                continue
            _site_record(report, site, "rewritten" if rewrite else "kept",
                         "" if rewrite else "attention='keep'", dtype, shapes)
            bump("attention_rewritten" if rewrite else "attention_kept")
            continue
        try:
            m = _match(n)
        except Exception as e:  # noqa: BLE001 - a softmax that is not provably attention is recorded, never fatal
            x = _softmax_parts(n)[0]
            if not (isinstance(x, fx.Node) and _reaches_product(x)) and not any(
                op_name(u) in {"matmul", "bmm", "einsum"} for u in n.users
            ):
                bump("softmax_not_attention")  # a softmax over logits, not over products: not an attention site
                continue
            reason = str(e) if isinstance(e, _Fail) else f"not attention: {type(e).__name__}: {e}"
            xv = val(x) if isinstance(x, fx.Node) else None
            _site_record(report, site, "skipped", reason, xv.dtype if isinstance(xv, torch.Tensor) else "-",
                         describe_shape(xv))
            bump("attention_skipped")
            continue
        site.spelling = m.spelling
        site.layout = m.layout
        site.dropout = m.dropout
        site.softmax_dtype = m.softmax_dtype
        shapes = describe_shape(val(m.q), val(m.k), val(m.v))
        dtype = _dtype(m.q)
        if not rewrite:
            try:
                _classify_only(m, site, an)
            except Exception as e:  # noqa: BLE001
                site.reason = str(e)
            mask_nodes = [x for p in m.pieces for x in p if isinstance(x, fx.Node)]
            _site_record(report, site, "kept", _with_notes("attention='keep'", site, an, mask_nodes), dtype, shapes)
            bump("attention_kept")
            continue
        try:
            _rewrite(gm, m, site, an)
        except _Fail as e:
            _site_record(report, site, "skipped", str(e), dtype, shapes)
            bump("attention_skipped")
            continue
        mask_nodes = [x for p in m.pieces for x in p if isinstance(x, fx.Node)]
        if site.causal:  # the mask is gone from the graph: the buffers it read are checked per call by the backend
            gm.meta.setdefault("hhfft_buffer_proofs", {}).update(an.proofs(*mask_nodes))
        _site_record(report, site, "rewritten", _with_notes("", site, an, mask_nodes), dtype, shapes)
        bump("attention_rewritten")


def _with_notes(reason: str, site: AttentionSite, an: MaskAnalyzer, mask_nodes: list) -> str:
    """``reason`` and, unless the mask was proved causal, why mask buffers it reads were not proved (a buffer too
    large to check stays a general mask: otherwise the report would not say why)."""
    notes = [] if site.causal else an.notes(*[x for x in mask_nodes if isinstance(x, fx.Node)])
    return "; ".join([r for r in [reason, *notes] if r])


def _classify_only(m: _Match, site: AttentionSite, an: MaskAnalyzer) -> None:
    allowed = Allowed()
    for piece in m.pieces:
        if piece[0] in {"scale", "const"}:
            continue
        frame = piece[-1]
        if piece[0] in {"add", "sub"}:
            t = an.of(piece[1])
            if piece[0] == "add" and isinstance(t.value, _Sel) and t.value.a == 0 and absorbing(t.value.b, _dtype(m.q)):
                classify(an, t.value.pred, _align(t.dims, len(frame)), allowed)
            else:
                allowed.general = True
        else:
            t = an.of(piece[1])
            if _is_pred(t.value):
                classify(an, _neg(t.value) if piece[0] == "fill" else t.value, _align(t.dims, len(frame)), allowed)
            else:
                allowed.general = True
    site.mask_kind = allowed.kind
    site.causal = allowed.causal
    site.key_padding = allowed.key_padding
    site.scale = _mul_scale(m.scale)[0]


def analyze(gm: fx.GraphModule, opts: Any, report: Any) -> None:
    """Record attention sites without rewriting anything."""
    import dataclasses

    try:
        opts = dataclasses.replace(opts, attention="keep")
    except TypeError:
        opts = type("O", (), {"attention": "keep"})()
    run(gm, opts, report)
