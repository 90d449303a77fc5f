"""Prove what an attention mask is, structurally: causal, key padding, both, or a general additive mask.

The masks models build are small input-independent programs (aranges, comparisons, tril/triu of ones, constant
buffers) combined with per-batch inputs (a padding mask). This module interprets the mask subgraph of a Dynamo graph
abstractly: every tensor is a function of *index variables*, one per dimension it varies along.

- integer tensors built from ``arange`` are affine in the index variables (``_Aff``);
- comparisons of affine tensors are predicates ``aff <= 0`` (``_Cmp``), combined with and/or/not;
- anything that depends on a model input or parameter is opaque data (``_Data``) that varies only along the index
  variables of its non-broadcast dimensions (a (B, 1, 1, S) tensor can only depend on the batch and key index);
- ``where(pred, a, b)`` with constant a, b is ``_Sel``.

Broadcasting two tensors that both vary along one dimension unifies their variables; slicing ``x[a:]`` substitutes
``v = w + a``. Nothing is evaluated on sample sizes, so the proofs hold for symbolic sequence lengths. A mask is
*causal* when its allowed set is exactly ``j - i <= 0`` (key index j, query index i: what SDPA's ``is_causal``
means), *key padding* when its blocking part is opaque data over batch and key indices only.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from hhfft.passes._fx import as_int, known_eq, val

__all__ = ["MaskAnalyzer", "Allowed", "classify", "absorbing", "op_name"]


# ----------------------------------------------------------------------------------------------------------- values
@dataclass(frozen=True)
class _Aff:
    """sum(c * var) + const over index variables (integer tensors)."""

    coef: tuple  # ((var, int), ...) sorted by var
    const: Any = 0

    @staticmethod
    def var(v: int, const: Any = 0) -> "_Aff":
        return _Aff(((v, 1),), const)

    def add(self, other: "_Aff", sign: int = 1) -> "_Aff":
        d = dict(self.coef)
        for v, c in other.coef:
            d[v] = d.get(v, 0) + sign * c
        return _Aff(tuple(sorted((v, c) for v, c in d.items() if c != 0)), self.const + sign * other.const)

    def scale(self, k: int) -> "_Aff":
        return _Aff(tuple((v, c * k) for v, c in self.coef if c * k != 0), self.const * k)


@dataclass(frozen=True)
class _Cmp:
    aff: _Aff  # predicate: aff <= 0


@dataclass(frozen=True)
class _And:
    parts: tuple


@dataclass(frozen=True)
class _Or:
    parts: tuple


@dataclass(frozen=True)
class _Const:
    value: Any


@dataclass(frozen=True)
class _Data:
    """Opaque input-dependent values varying along ``vars`` only; ``node`` computes them, ``negated`` for bools."""

    node: fx.Node
    vars: frozenset
    negated: bool = False


@dataclass(frozen=True)
class _Sel:
    pred: Any
    a: Any  # value where pred holds (number)
    b: Any


@dataclass(frozen=True)
class _T:
    dims: tuple  # per dimension: an index variable, or None when the tensor does not vary along it
    value: Any


class _Opaque(Exception):
    pass


def _neg(p: Any) -> Any:
    if isinstance(p, _Cmp):
        return _Cmp(p.aff.scale(-1).add(_Aff((), 1)))  # not(a <= 0)  <=>  -a + 1 <= 0 for integers
    if isinstance(p, _And):
        return _Or(tuple(_neg(x) for x in p.parts))
    if isinstance(p, _Or):
        return _And(tuple(_neg(x) for x in p.parts))
    if isinstance(p, _Data):
        return _Data(p.node, p.vars, not p.negated)
    if isinstance(p, _Const):
        return _Const(not p.value)
    raise _Opaque("cannot negate")


def _is_pred(x: Any) -> bool:
    return isinstance(x, (_Cmp, _And, _Or)) or (isinstance(x, _Const) and isinstance(x.value, bool)) or (
        isinstance(x, _Data) and _dtype_of(x.node) == torch.bool
    )


def _dtype_of(n: Any) -> Optional[torch.dtype]:
    v = val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def absorbing(v: Any, dtype: Optional[torch.dtype]) -> bool:
    """True when ``score + v == v`` for every score that matters: -inf, or a fill at least as low as finfo.min of a
    16-bit dtype that the computation is in, or <= -1e30 (fp32/fp64/bf16: exact for |score| < 1e22)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if v == -math.inf:
        return True
    if math.isnan(v) or v > 0:
        return False
    if v <= -1e30:
        return True
    return dtype == torch.float16 and v <= torch.finfo(torch.float16).min


# --------------------------------------------------------------------------------------------------------- op names
_FN_NAMES = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm", torch.einsum: "einsum",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.neg: "neg", torch.neg: "neg",
    torch.softmax: "softmax", torch.nn.functional.softmax: "softmax", torch.transpose: "transpose",
    torch.permute: "permute", torch.reshape: "reshape", torch.masked_fill: "masked_fill", torch.where: "where",
    torch.nn.functional.dropout: "dropout", torch.dropout: "dropout", torch.repeat_interleave: "repeat_interleave",
    operator.getitem: "getitem", torch.arange: "arange", operator.le: "le", operator.lt: "lt", operator.ge: "ge",
    operator.gt: "gt", operator.eq: "eq", operator.ne: "ne", torch.le: "le", torch.lt: "lt", torch.ge: "ge",
    torch.gt: "gt", torch.eq: "eq", torch.ne: "ne", operator.and_: "and", operator.or_: "or", operator.invert: "not",
    torch.logical_and: "and", torch.logical_or: "or", torch.logical_not: "not", torch.bitwise_and: "and",
    torch.bitwise_or: "or", torch.bitwise_not: "not", torch.tril: "tril", torch.triu: "triu", torch.ones: "ones",
    torch.zeros: "zeros", torch.full: "full", torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze",
    torch.clone: "clone", torch.tensor: "tensor", torch.scalar_tensor: "tensor", torch.ones_like: "ones_like",
    torch.zeros_like: "zeros_like", torch.full_like: "full_like", torch.sqrt: "sqrt", torch.rsqrt: "rsqrt",
    torch.flatten: "flatten", torch._C._nn.scaled_dot_product_attention: "sdpa",
    torch.nn.functional.multi_head_attention_forward: "mha", torch.t: "t",
}
# Tensor methods, including the operator dunders that some Dynamo versions record as call_method (torch 2.11 traces
# ``a == b`` inside transformers' mask functions as ``a.__eq__(b)``). Only the unreflected dunders: their operands
# come in the function's order.
_METHOD_NAMES = {
    "__and__": "and", "__or__": "or", "__invert__": "not", "logical_and": "and", "logical_or": "or",
    "logical_not": "not", "bitwise_and": "and", "bitwise_or": "or", "bitwise_not": "not", "__getitem__": "getitem",
    "true_divide": "div", "mT": "mT", "__eq__": "eq", "__ne__": "ne", "__le__": "le", "__lt__": "lt", "__ge__": "ge",
    "__gt__": "gt", "__add__": "add", "__sub__": "sub", "__mul__": "mul", "__truediv__": "div", "__neg__": "neg",
    "__matmul__": "matmul",
}
_ATEN = {"_safe_softmax": "softmax", "_softmax": "softmax", "bitwise_and": "and", "bitwise_or": "or",
         "logical_not": "not", "bitwise_not": "not", "scaled_dot_product_attention": "sdpa", "_to_copy": "to",
         "true_divide": "div", "expand_as": "expand_as", "view": "view", "_unsafe_view": "view"}


def op_name(n: Any) -> str:
    """A canonical name for what node ``n`` computes ("matmul", "softmax", "view", ...), or "" when not a call."""
    if not isinstance(n, fx.Node):
        return ""
    if n.op == "call_method":
        return _METHOD_NAMES.get(n.target, n.target)
    if n.op != "call_function":
        return ""
    name = _FN_NAMES.get(n.target)
    if name is not None:
        return name
    if isinstance(n.target, torch._ops.OpOverload):
        packet = n.target._overloadpacket.__name__
        return _ATEN.get(packet, packet)
    if isinstance(n.target, torch._ops.OpOverloadPacket):
        packet = n.target.__name__
        return _ATEN.get(packet, packet)
    return getattr(n.target, "__name__", "")


_CASTS = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "bool", "long", "int"}
_IDENT = {"contiguous", "clone"}


# ------------------------------------------------------------------------------------------------- constant buffers
# A constant mask buffer is proved a tril/triu pattern from its value: on its own device, in row blocks of about
# _BUFFER_BLOCK elements (the temporaries: a pattern block and one block in the buffer's dtype, 4M elements each),
# and not attempted above BUFFER_PROOF_LIMIT elements (32768 x 32768). It runs once per compiled graph: a 16384 x
# 16384 buffer takes about 0.5 s (bool) / 1 s (fp32) on two CPU cores.
BUFFER_PROOF_LIMIT = 1 << 30
_BUFFER_BLOCK = 1 << 22


def _triangle(t: torch.Tensor) -> Optional[tuple]:
    """``(kind, k, top, other)`` when the 2-d tensor ``t`` holds ``top = t[0, 0]`` exactly where ``c - r <= k``
    (kind "tril") or ``c - r >= k`` ("triu") and the single value ``other`` everywhere else (None when the pattern
    covers all of t); None for any other content. Reads t block by block, compares it with the pattern built from
    index comparisons, and never copies t."""
    rows, cols = t.shape
    top = t[0, 0]
    if bool(torch.isnan(top)):
        return None
    # row 0 of tril(k) keeps columns 0..k, of triu(k > 0) columns k.., of triu(k <= 0) all of them: then k is read
    # off column 0, which triu(k) keeps in rows 0..-k, or off the last row (tril: columns 0..rows-1+k)
    n0, nl, nc = int((t[0] == top).sum()), int((t[-1] == top).sum()), int((t[:, 0] == top).sum())
    step = max(1, _BUFFER_BLOCK // cols)
    idt = torch.int32 if rows + cols < 2**31 else torch.int64  # r + k < rows + cols; int32 compares faster
    c_idx = torch.arange(cols, device=t.device, dtype=idt)
    # a bool buffer is compared with the pattern itself (top True) or with its complement (top False)
    flip = t.dtype == torch.bool and not bool(top)
    for kind, k in dict.fromkeys((("tril", n0 - 1), ("triu", cols - n0), ("triu", 1 - nc), ("tril", nl - rows))):
        other = None
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            blk = t[r0:r1]
            bound = torch.arange(r0, r1, device=t.device, dtype=idt)[:, None] + k
            # [r1 - r0, cols]: where t should be top (not top when flip)
            if kind == "tril":
                pat = c_idx > bound if flip else c_idx <= bound
            else:
                pat = c_idx < bound if flip else c_idx >= bound
            if other is None:
                # one position outside the pattern in these rows (tril: most in the first row, triu: in the last)
                pos = (r0, max(r0 + k + 1, 0)) if kind == "tril" else (r1 - 1, 0)
                if (pos[1] < cols) if kind == "tril" else (pos[0] + k > 0):
                    other = blk[pos[0] - r0, pos[1]]
                    if bool(other == top) or bool(torch.isnan(other)):
                        break
            if t.dtype == torch.bool:
                same = torch.equal(blk, pat)
            elif other is None:
                same = torch.equal(blk == top, pat)
            else:  # the other value is uniform: t == where(pattern, top, other), element by element
                same = torch.equal(blk, torch.where(pat, top, other))
            if not same:
                break
        else:
            if other is None:  # a uniform buffer
                return None
            return kind, k, top.item(), other.item()
    return None


@dataclass(frozen=True)
class BufferProof:
    """A constant buffer proved to hold ``tri = (kind, k, top, other)`` (see ``_triangle``) when the graph was compiled,
    with the buffer's version counter and address then: Dynamo does not guard on a buffer's value, so the backend
    checks these on every call (``hhfft.lowering.backend``)."""

    name: str
    rows: int
    cols: int
    tri: tuple
    version: Optional[int]
    data_ptr: int

    @staticmethod
    def version_of(t: torch.Tensor) -> Optional[int]:
        """``t._version``; None for an inference tensor, which has no version counter (only its address is checked)."""
        return None if t.is_inference() else t._version

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (the buffer as passed to the compiled graph now) still holds the proved pattern."""
        with torch.no_grad():
            return _triangle(t.detach().reshape(self.rows, self.cols)) == self.tri


# -------------------------------------------------------------------------------------------------------- interpreter
class MaskAnalyzer:
    """Abstract interpretation of mask subgraphs; one per pass run (results are memoised, so the cost is linear).

    Index variables are positional and private to each abstract tensor: every op gives its result fresh variables
    and rewrites its operands' values in terms of them (a substitution), so one tensor used along two different
    dimensions (``r[:, None] >= r[None, :]``) stays two different indices.
    """

    def __init__(self) -> None:
        self._memo: dict = {}
        self._notes: dict = {}  # node -> why a buffer it reads was not proved (set on the buffer, inherited by users)
        # node -> {placeholder name: BufferProof} of the buffers proved from their value that it reads (as _notes)
        self._proofs: dict = {}
        self._n = 0

    def _fresh(self) -> int:
        self._n += 1
        return self._n

    # -- substitution ---------------------------------------------------------------------------------------------
    def _subst(self, x: Any, m: dict) -> Any:
        """Rewrite value ``x`` with variable map ``m`` (var -> _Aff)."""
        if isinstance(x, _Aff):
            out = _Aff((), x.const)
            for v, c in x.coef:
                out = out.add(m[v].scale(c) if v in m else _Aff(((v, c),)))
            return out
        if isinstance(x, _Cmp):
            return _Cmp(self._subst(x.aff, m))
        if isinstance(x, (_And, _Or)):
            return type(x)(tuple(self._subst(p, m) for p in x.parts))
        if isinstance(x, _Data):
            vs: set = set()
            for v in x.vars:
                vs |= {w for w, _ in m[v].coef} if v in m else {v}
            return _Data(x.node, frozenset(vs), x.negated)
        if isinstance(x, _Sel):
            return _Sel(self._subst(x.pred, m), x.a, x.b)
        return x

    def _moved(self, t: _T, new_dims: list) -> Any:
        """t's value with its variables renamed to ``new_dims`` (same length, None where t does not vary)."""
        m = {d: _Aff.var(nd) for d, nd in zip(t.dims, new_dims) if d is not None}
        return self._subst(t.value, m)

    # -- broadcasting -----------------------------------------------------------------------------------------------
    def _broadcast(self, *ts: _T) -> tuple:
        """Result dims (fresh variables) and each operand's value rewritten over them."""
        rank = max(len(t.dims) for t in ts)
        varies = [False] * rank
        for t in ts:
            for i, v in enumerate(t.dims):
                if v is not None:
                    varies[rank - len(t.dims) + i] = True
        dims = tuple(self._fresh() if f else None for f in varies)
        vals = []
        for t in ts:
            nd = list(dims[rank - len(t.dims):])
            vals.append(self._moved(t, nd))
        return dims, vals

    # -- entry point ------------------------------------------------------------------------------------------------
    def of(self, n: Any) -> _T:
        """Abstract value of node (or constant) ``n``; opaque data when the structure is not understood."""
        if not isinstance(n, fx.Node):
            if isinstance(n, (bool, int, float)) or isinstance(n, torch.SymInt):
                return _T((), _Const(n))
            raise _Opaque(f"constant {type(n).__name__}")
        if n in self._memo:
            return self._memo[n]
        try:
            muts = [u for u in n.users if u.op == "call_method" and u.target.endswith("_")
                    and not u.target.startswith("__") and u.args and u.args[0] is n]
            if muts:
                # mutated in place: its uses see the mutated value. One masked_fill_ is understood, else opaque.
                if len(muts) != 1 or muts[0].target != "masked_fill_":
                    raise _Opaque("mutated in place")
                r = self._masked_fill(muts[0], self._eval(n))
                self._memo[muts[0]] = r
            else:
                r = self._eval(n)
        except (_Opaque, TypeError, ValueError, IndexError, AttributeError, KeyError):
            r = self._data(n)
        self._memo[n] = r
        inherited = self.notes(n, *n.all_input_nodes)
        if inherited:
            self._notes[n] = tuple(inherited)
        reads = self.proofs(n, *n.all_input_nodes)
        if reads:
            self._proofs[n] = reads
        return r

    def _data(self, n: fx.Node) -> _T:
        v = val(n)
        if not isinstance(v, torch.Tensor):
            raise _Opaque("not a tensor")
        dims = tuple(None if as_int(s) == 1 else self._fresh() for s in v.shape)
        return _T(dims, _Data(n, frozenset(d for d in dims if d is not None)))

    def _eval(self, n: fx.Node) -> _T:  # noqa: C901 - one branch per op, flat on purpose
        name = op_name(n)
        a = n.args
        if n.op == "placeholder":
            return self._placeholder(n)
        if name == "arange":
            start, end, step = (0, a[0], 1) if len(a) == 1 else (a[0], a[1], a[2] if len(a) > 2 else 1)
            step = n.kwargs.get("step", step)
            if isinstance(start, fx.Node):
                start = val(start)
            if not isinstance(start, (int, torch.SymInt)) or isinstance(start, bool):
                raise _Opaque("arange start is not an integer")
            if as_int(step) != 1:
                raise _Opaque("arange with a step")
            v = self._fresh()
            return _T((v,), _Aff.var(v, start))
        if name in _CASTS or name in _IDENT or name == "expand_as":
            if name in {"type", "to"} and len(a) > 1 and isinstance(a[1], fx.Node):
                raise _Opaque("cast to a tensor's device")
            x = self.of(a[0])
            if name == "expand_as":
                dims, (v, _) = self._broadcast(x, _T(tuple(None for _ in val(n).shape), _Const(0)))
                return _T(dims, v)
            return x
        if name in {"new_ones", "new_zeros", "new_full", "ones", "zeros", "full", "ones_like", "zeros_like",
                    "full_like", "tensor"}:
            fill = {"ones": 1, "zeros": 0, "new_ones": 1, "new_zeros": 0, "ones_like": 1, "zeros_like": 0}.get(name)
            if fill is None:
                fill = a[-1] if name in {"full", "new_full", "full_like", "tensor"} else None
                fill = n.kwargs.get("fill_value", fill) if name != "tensor" else a[0]
            if not isinstance(fill, (bool, int, float)):
                raise _Opaque("fill is not a number")
            dt = _dtype_of(n)
            fill = bool(fill) if dt == torch.bool else fill
            return _T(tuple(None for _ in val(n).shape), _Const(fill))
        if name in {"getitem"}:
            return self._getitem(n)
        if name == "diff":
            return self._diff(n)
        if name == "cumsum":
            x = self.of(a[0])
            if isinstance(x.value, _Const) and x.value.value in (0, False):
                return _T(tuple(None for _ in val(n).shape), _Const(0))
            raise _Opaque("cumsum")
        if name in {"unsqueeze", "view", "reshape", "expand", "squeeze", "flatten"}:
            return self._reshape(n)
        if name in {"tril", "triu"}:
            x = self.of(a[0])
            k = n.kwargs.get("diagonal", a[1] if len(a) > 1 else 0)
            if not isinstance(k, int) or len(x.dims) < 2 or not isinstance(x.value, _Const):
                raise _Opaque("tril/triu of a non-constant")
            r = x.dims[-2] if x.dims[-2] is not None else self._fresh()
            c = x.dims[-1] if x.dims[-1] is not None else self._fresh()
            # tril: keep c - r <= k;  triu: keep c - r >= k
            cmp = _Aff(((r, -1), (c, 1)) if r < c else ((c, 1), (r, -1)), -k)
            pred = _Cmp(cmp) if name == "tril" else _Cmp(cmp.scale(-1))
            dims = x.dims[:-2] + (r, c)
            if x.value.value is True:
                return _T(dims, pred)
            return _T(dims, _Sel(pred, x.value.value, False if isinstance(x.value.value, bool) else 0))
        if name in {"add", "sub", "mul", "neg", "rsub"}:
            return self._arith(n, name)
        if name in {"le", "lt", "ge", "gt", "eq", "ne"}:
            return self._compare(n, name)
        if name in {"and", "or"}:
            x, y = self.of(a[0]), self.of(a[1])
            dims, (xv, yv) = self._broadcast(x, y)
            return _T(dims, self._combine(name, xv, yv, n))
        if name == "not":
            x = self.of(a[0])
            return _T(x.dims, _neg(x.value))
        if name == "where":
            c, x, y = (self.of(v) for v in a[:3])
            dims, (cv, xv, yv) = self._broadcast(c, x, y)
            if not _is_pred(cv) or not isinstance(xv, _Const) or not isinstance(yv, _Const):
                return _T(dims, _Data(n, frozenset(d for d in dims if d is not None)))
            return _T(dims, _Sel(cv, xv.value, yv.value))
        if name == "masked_fill_":
            return self.of(a[0])
        if name == "masked_fill":
            return self._masked_fill(n, self.of(a[0]))
        # anything else: opaque data along the dimensions it has
        ins = [self.of(x) for x in n.all_input_nodes]
        if not ins:
            raise _Opaque(f"unknown source {name}")
        return self._data(n)

    def _masked_fill(self, n: fx.Node, x: _T) -> _T:
        a = n.args
        if True:
            c = self.of(a[1])
            fill = a[2]
            if isinstance(fill, fx.Node):
                fill = self.of(fill).value
                fill = fill.value if isinstance(fill, _Const) else None
            dims, (xv, cv) = self._broadcast(x, c)
            if not isinstance(xv, _Const) or not _is_pred(cv) or not isinstance(fill, (int, float)):
                return _T(dims, _Data(n, frozenset(d for d in dims if d is not None)))
            return _T(dims, _Sel(cv, fill, xv.value))
        # anything else: opaque data along the dimensions it has
        ins = [self.of(x) for x in n.all_input_nodes]
        if not ins:
            raise _Opaque(f"unknown source {name}")
        return self._data(n)

    def _placeholder(self, n: fx.Node) -> _T:
        """A constant buffer holding a tril/triu pattern is proved from its value; anything else is data."""
        ga = n.meta.get("grapharg")
        ex = getattr(ga, "example", None)
        if not (
            isinstance(ex, torch.Tensor)
            and not isinstance(ex, torch.nn.Parameter)
            and "_buffers_" in n.name
            and ex.dim() >= 2
            and all(s == 1 for s in ex.shape[:-2])
            and ex.numel() > 0
        ):
            return self._data(n)
        rows, cols = ex.shape[-2], ex.shape[-1]
        name = getattr(getattr(ga, "source", None), "name", None)  # a property on torch 2.13, a method before
        name = (name() if callable(name) else name) or n.name
        if ex.numel() > BUFFER_PROOF_LIMIT:
            self._notes[n] = ((f"buffer {name} ({rows}x{cols}) is above the {BUFFER_PROOF_LIMIT}-element limit of the "
                               "causal-buffer proof (attention_mask.BUFFER_PROOF_LIMIT): kept as a general mask"),)
            return self._data(n)
        try:
            with torch.no_grad():
                tri = _triangle(ex.detach().reshape(rows, cols))
            proof = tri and BufferProof(name, rows, cols, tri, BufferProof.version_of(ex), ex.data_ptr())
        except RuntimeError as e:  # out of memory on the buffer's device, or a tensor without data
            self._notes[n] = ((f"buffer {name} ({rows}x{cols}) could not be checked for a tril/triu pattern "
                               f"({type(e).__name__}): kept as a general mask"),)
            return self._data(n)
        if tri is None:
            return self._data(n)
        self._proofs[n] = {n.name: proof}
        kind, k, top, other = tri
        r, c = self._fresh(), self._fresh()
        aff = _Aff(((r, -1), (c, 1)), -k)
        pred = _Cmp(aff) if kind == "tril" else _Cmp(aff.scale(-1))
        dims = (None,) * (ex.dim() - 2) + (r, c)
        if ex.dtype == torch.bool:  # True on the pattern, or (top False) on its complement
            return _T(dims, pred if top else _neg(pred))
        return _T(dims, _Sel(pred, top, other))

    def proofs(self, *nodes: Any) -> dict:
        """The buffers proved from their value that the analysed values of ``nodes`` read: placeholder name ->
        BufferProof."""
        out: dict = {}
        for x in nodes:
            if isinstance(x, fx.Node):
                out.update(self._proofs.get(x, {}))
        return out

    def notes(self, *nodes: Any) -> list:
        """Why buffers that the values of ``nodes`` read were not checked (too large, or the check failed), deduplicated."""
        out: dict = {}
        for x in nodes:
            if isinstance(x, fx.Node):
                out.update(dict.fromkeys(self._notes.get(x, ())))
        return list(out)

    def _getitem(self, n: fx.Node) -> _T:
        x = self.of(n.args[0])
        idx = n.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) for i in idx):
            # advanced indexing: data read at index tensors -> data along the index tensors' variables
            if not all(isinstance(i, fx.Node) for i in idx) or len(idx) != len(x.dims):
                raise _Opaque("mixed advanced indexing")
            its = [self.of(i) for i in idx]
            dims, ivals = self._broadcast(*its)
            if isinstance(x.value, _Const):
                return _T(dims, x.value)
            if isinstance(x.value, _Data):
                vs = frozenset(d for d in dims if d is not None)
                return _T(dims, _Data(n, vs))
            # x[i0, i1, ...] with affine indices: substitute each indexed dimension's variable
            m = {}
            for d, iv in zip(x.dims, ivals):
                if d is None:
                    continue
                if isinstance(iv, _Const) and isinstance(iv.value, int):
                    iv = _Aff((), iv.value)
                if not isinstance(iv, _Aff):
                    raise _Opaque("index is not affine")
                m[d] = iv
            return _T(dims, self._subst(x.value, m))
        nd = len(x.dims)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out: list = []
        src = 0
        m: dict = {}
        for i in idx:
            if i is Ellipsis:
                k = nd - n_real
                for d in x.dims[src:src + k]:
                    if d is not None:
                        w = self._fresh()
                        m[d] = _Aff.var(w)
                        d = w
                    out.append(d)
                src += k
            elif i is None:
                out.append(None)
            elif isinstance(i, slice):
                if i.step not in (None, 1):
                    raise _Opaque("strided slice")
                d = x.dims[src]
                start = 0 if i.start is None else i.start
                if isinstance(start, fx.Node):
                    start = val(start)
                xv = val(n.args[0])
                size = as_int(xv.shape[src]) if isinstance(xv, torch.Tensor) and src < xv.dim() else None
                if isinstance(start, int) and start < 0 and size is not None:  # x[-L:]: from size - L (or 0)
                    start = max(0, size + start)
                if not isinstance(start, (int, torch.SymInt)) or (as_int(start) is not None and as_int(start) < 0):
                    raise _Opaque("slice start")
                if d is not None:
                    w = self._fresh()
                    m[d] = _Aff.var(w, start)  # old index = new index + start
                    d = w
                out.append(d)
                src += 1
            elif isinstance(i, int) and i >= 0:
                d = x.dims[src]
                if d is not None:
                    m[d] = _Aff((), i)
                src += 1
            else:
                raise _Opaque("index")
        for d in x.dims[src:]:
            if d is not None:
                m[d] = _Aff.var(self._fresh())
                d = m[d].coef[0][0]
            out.append(d)
        return _T(tuple(out), self._subst(x.value, m))

    def _diff(self, n: fx.Node) -> _T:
        """diff along dim d of an affine tensor c*v + ..., prepended with its value at index -1: constant c."""
        x = self.of(n.args[0])
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else -1)
        nn_ = n.kwargs.get("n", n.args[1] if len(n.args) > 1 else 1)
        pre = n.kwargs.get("prepend")
        if nn_ != 1 or "append" in n.kwargs or not isinstance(x.value, _Aff) or not isinstance(pre, fx.Node):
            raise _Opaque("diff")
        d = x.dims[dim]
        coef = dict(x.value.coef)
        if d is None or d not in coef:
            raise _Opaque("diff along a constant dimension")
        p = self.of(pre)
        if not isinstance(p.value, _Aff) or len(p.dims) != len(x.dims):
            raise _Opaque("diff prepend")
        pd = p.dims[dim]
        want = self._subst(x.value, {d: _Aff((), -1)})
        got = self._subst(p.value, {pd: _Aff((), 0)} if pd is not None else {})
        # match the other dims positionally
        m = {a: _Aff.var(b) for a, b in zip(p.dims, x.dims) if a is not None and b is not None and a != pd}
        got = self._subst(got, m)
        if got != want:
            raise _Opaque("diff prepend is not the value before the first")
        return _T(tuple(None for _ in val(n).shape), _Const(coef[d]))

    def _reshape(self, n: fx.Node) -> _T:
        """Views that only add, drop or broadcast size-1 dimensions keep the index variables in order."""
        x = self.of(n.args[0])
        vin, vout = val(n.args[0]), val(n)
        name = op_name(n)
        if name == "expand":
            pad = len(vout.shape) - len(x.dims)
            nd = [None if d is None else self._fresh() for d in x.dims]
            return _T((None,) * pad + tuple(nd), self._moved(x, nd))
        ins = [(s, d) for s, d in zip(vin.shape, x.dims) if as_int(s) != 1]
        outs = [i for i, s in enumerate(vout.shape) if as_int(s) != 1]
        if len(ins) != len(outs) or not all(known_eq(vout.shape[o], s) for o, (s, _) in zip(outs, ins)):
            raise _Opaque("reshape that moves data")
        dims: list = [None] * len(vout.shape)
        m = {}
        for o, (_, d) in zip(outs, ins):
            if d is not None:
                dims[o] = self._fresh()
                m[d] = _Aff.var(dims[o])
        return _T(tuple(dims), self._subst(x.value, m))

    def _arith(self, n: fx.Node, name: str) -> _T:
        a = n.args
        if name == "neg":
            x = self.of(a[0])
            return _T(x.dims, self._num("mul", x.value, _Const(-1), n))
        x, y = self.of(a[0]), self.of(a[1])
        if name == "rsub":
            x, y, name = y, x, "sub"
        if n.kwargs.get("alpha", 1) != 1:
            raise _Opaque("alpha")
        dims, (xv, yv) = self._broadcast(x, y)
        return _T(dims, self._num(name, xv, yv, n))

    def _num(self, name: str, x: Any, y: Any, n: fx.Node) -> Any:
        fn = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}[name]
        if isinstance(x, _Const) and isinstance(y, _Const):
            return _Const(fn(x.value, y.value))
        if isinstance(x, _Aff) or isinstance(y, _Aff):
            xa = x if isinstance(x, _Aff) else (_Aff((), x.value) if isinstance(x, _Const) else None)
            ya = y if isinstance(y, _Aff) else (_Aff((), y.value) if isinstance(y, _Const) else None)
            if xa is None or ya is None:
                raise _Opaque("affine with data")
            if name == "add":
                return xa.add(ya)
            if name == "sub":
                return xa.add(ya, -1)
            k = as_int(y.value) if isinstance(y, _Const) else (as_int(x.value) if isinstance(x, _Const) else None)
            if k is None:
                raise _Opaque("product of index tensors")
            return (xa if isinstance(x, _Aff) else ya).scale(k)
        # numeric masks: a bool predicate used as a number is Sel(p, 1, 0)
        xs, ys = self._as_sel(x), self._as_sel(y)
        if isinstance(xs, _Sel) and isinstance(y, _Const):
            return _Sel(xs.pred, fn(xs.a, y.value), fn(xs.b, y.value))
        if isinstance(ys, _Sel) and isinstance(x, _Const):
            return _Sel(ys.pred, fn(x.value, ys.a), fn(x.value, ys.b))
        vs = frozenset()
        for v in (x, y):
            if isinstance(v, _Data):
                vs |= v.vars
            elif not isinstance(v, _Const):
                raise _Opaque("numeric combination of structured masks")
        return _Data(n, vs)

    @staticmethod
    def _as_sel(x: Any) -> Any:
        if _is_pred(x) and not isinstance(x, _Const):
            return _Sel(x, 1, 0)
        return x

    def _compare(self, n: fx.Node, name: str) -> _T:
        x, y = self.of(n.args[0]), self.of(n.args[1])
        dims, (xv, yv) = self._broadcast(x, y)
        if isinstance(xv, (_Aff, _Const)) and isinstance(yv, (_Aff, _Const)) and (
            isinstance(xv, _Aff) or isinstance(yv, _Aff)
        ):
            xa = xv if isinstance(xv, _Aff) else _Aff((), xv.value)
            ya = yv if isinstance(yv, _Aff) else _Aff((), yv.value)
            if not all(isinstance(c, (int, torch.SymInt)) for c in (xa.const, ya.const)):
                raise _Opaque("non-integer comparison")
            d = xa.add(ya, -1)  # x - y
            if name == "le":
                return _T(dims, _Cmp(d))
            if name == "lt":
                return _T(dims, _Cmp(d.add(_Aff((), 1))))
            if name == "ge":
                return _T(dims, _Cmp(d.scale(-1)))
            if name == "gt":
                return _T(dims, _Cmp(d.scale(-1).add(_Aff((), 1))))
            eq = _And((_Cmp(d), _Cmp(d.scale(-1))))
            return _T(dims, eq if name == "eq" else _neg(eq))
        if isinstance(xv, _Const) and isinstance(yv, _Const):
            fn = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt, "eq": operator.eq,
                  "ne": operator.ne}[name]
            return _T(dims, _Const(bool(fn(xv.value, yv.value))))
        # predicate == 0 / != 0 on a bool, or a comparison of data
        for p, c in ((xv, yv), (yv, xv)):
            if _is_pred(p) and not isinstance(p, _Const) and isinstance(c, _Const) and c.value in (0, 1, False, True):
                truthy = (name == "eq") == bool(c.value)
                if name in {"eq", "ne"}:
                    return _T(dims, p if truthy else _neg(p))
        if isinstance(xv, _Sel) and isinstance(yv, _Const) and name in {"eq", "ne"}:
            hit_a, hit_b = xv.a == yv.value, xv.b == yv.value
            if hit_a != hit_b:
                p = xv.pred if hit_a else _neg(xv.pred)
                return _T(dims, p if name == "eq" else _neg(p))
        vs = frozenset(d for d in dims if d is not None)
        for v in (xv, yv):
            if not isinstance(v, (_Data, _Const, _Aff, _Sel)) and not _is_pred(v):
                raise _Opaque("comparison")
        return _T(dims, _Data(n, vs))

    def _combine(self, name: str, x: Any, y: Any, n: fx.Node) -> Any:
        for v in (x, y):
            if not _is_pred(v):
                if isinstance(v, _Data):
                    continue
                raise _Opaque("logical op on numbers")
        if isinstance(x, _Const):
            return y if (x.value if name == "and" else not x.value) else x
        if isinstance(y, _Const):
            return x if (y.value if name == "and" else not y.value) else y
        cls = _And if name == "and" else _Or
        parts: list = []
        for v in (x, y):
            parts.extend(v.parts if isinstance(v, cls) else [v])
        return cls(tuple(parts))


# -------------------------------------------------------------------------------------------------- classification
@dataclass
class Allowed:
    """Where attention is allowed, per the proof: causal (j <= i), key padding atoms, and whether anything else
    (a general additive mask, or a structure not understood) remains."""

    causal: bool = False
    key_padding: list = None  # [(node, keep_when_true)]
    general: bool = False

    def __post_init__(self) -> None:
        if self.key_padding is None:
            self.key_padding = []

    @property
    def kind(self) -> str:
        if self.general:
            return "additive"
        if self.causal and self.key_padding:
            return "causal+key_padding"
        if self.causal:
            return "causal"
        if self.key_padding:
            return "key_padding"
        return "none"


def _is_causal_aff(a: _Aff, i: Optional[int], j: Optional[int]) -> bool:
    if i is None or j is None or i == j:
        return False
    coef = dict(a.coef)
    if set(coef) != {i, j} or coef[j] <= 0 or coef[i] != -coef[j]:
        return False
    g = coef[j]
    c = as_int(a.const)
    if c is not None:
        return 0 <= c < g  # g*(j - i) + c <= 0  <=>  j - i <= floor(-c / g) = 0
    return g == 1 and known_eq(a.const, 0)


def _nonpos(c: Any) -> bool:
    k = as_int(c)
    if k is not None:
        return k <= 0
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(c <= 0))
    except Exception:  # noqa: BLE001
        return False


def classify(an: MaskAnalyzer, allowed: Any, dims: tuple, out: Allowed) -> None:
    """Add the atoms of predicate ``allowed`` (a conjunction, over a tensor with index variables ``dims`` aligned
    to the scores (..., L, S)) to ``out``."""
    rd = list(dims)
    i = rd[-2] if len(rd) >= 2 else None
    j = rd[-1] if rd else None
    batch = {d for d in rd[:-2] if d is not None}
    parts = allowed.parts if isinstance(allowed, _And) else (allowed,)
    for p in parts:
        if isinstance(p, _And):
            classify(an, p, dims, out)
        elif isinstance(p, _Const) and p.value is True:
            continue
        elif isinstance(p, _Cmp) and _is_causal_aff(p.aff, i, j):
            out.causal = True
        elif isinstance(p, _Cmp) and all(c < 0 for _, c in p.aff.coef) and _nonpos(p.aff.const):
            continue  # -c*idx + k <= 0 with k <= 0 holds for every index >= 0
        elif isinstance(p, _Data) and p.vars <= batch | ({j} if j is not None else set()):
            out.key_padding.append((p.node, not p.negated))
        else:
            out.general = True
