"""Find long depthwise convolutions in Dynamo graphs and rewrite them to ``hhfft::fftconv`` (exact).

Two spellings are recognised:

* ``conv1d``: ``torch.conv1d`` / ``F.conv1d`` / ``nn.Conv1d`` with groups == in_channels (any channel multiplier),
  stride 1, any dilation, int/"same"/"valid" padding, zero or circular padding mode, optional bias. A constant zero
  ``F.pad`` in front and a ``[..., :n]`` slice behind (the causal spellings) are folded into shift/out_len.
* ``fft``: ``irfft(rfft(u, n=N) * rfft(k, n=N), n=N)[..., :T]`` as Hyena/H3/S4 write it: any norm, scalar factors
  (``/ N``), casts, either operand order; proved linear (not circular) by N >= L + K - 1.

Around either, a ``+ u * D`` skip, an elementwise gate on the input (pregate) and on the output (postgate) fold into
the op. Everything else that looks similar stays untouched and is recorded with the reason.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F

from hhfft.lowering.fftconv import fftconv
from hhfft.passes._fx import arg, as_int, bump, insert_call, known_eq, known_true, val
from hhfft.passes.report import Report, Site, describe_shape, module_path

__all__ = ["LongConvSite", "run", "analyze", "conv1d_as_fftconv", "fft_as_fftconv"]

_CONV1D = {torch.conv1d, F.conv1d, torch.ops.aten.conv1d.default}
_CONV_ND = {torch.conv2d, torch.conv3d, F.conv2d, F.conv3d}
_PAD = {torch._C._nn.pad, F.pad}
_RFFT = {torch._C._fft.fft_rfft, torch.fft.rfft}
_IRFFT = {torch._C._fft.fft_irfft, torch.fft.irfft}
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
_ADD = {operator.add, torch.add, "add"}


@dataclass
class LongConvSite:
    """A proved long convolution: y = postgate * conv(pregate*u, k; shift) + bias + skip*u, out_len outputs."""

    spelling: str  # "conv1d", "conv1d-circular", "fft"
    channels: Any
    length: Any
    kernel_size: Any
    shift: Any = None
    dilation: int = 1
    multiplier: int = 1
    folded: list[str] = field(default_factory=list)  # "pad", "slice", "bias", "skip", "pregate", "postgate", "scale"
    node: Optional[fx.Node] = None  # the node that now computes the site


class _Decline(Exception):
    """A candidate that is not provably a long convolution; the message is the reason."""


# ------------------------------------------------------------------------------------ what the rewrite inserts
def _finish(u, k, shift, out_len, bias, skip, pregate, postgate, out_dtype):
    y = fftconv(
        u,
        k,
        shift=shift,
        out_len=out_len,
        bias=bias,
        skip=None if skip is None else skip.reshape(-1),
        pregate=pregate,
        postgate=postgate,
    )
    return y.to(out_dtype)


def conv1d_as_fftconv(x, weight, bias, pad_left: int, out_delta: int, dilation: int, skip=None, pregate=None,
                      postgate=None, out_dtype=None):
    """``conv1d(x, weight, bias, padding=..., dilation, groups=C)`` as fftconv; out_len = L + out_delta; the result
    in ``out_dtype`` (the conv's: under autocast not x's)."""
    if out_dtype in (torch.float16, torch.bfloat16) and x.dtype != out_dtype:
        # autocast: conv1d computes from its input and weight cast to out_dtype (an input gate is applied first)
        if pregate is not None:
            x, pregate = x * pregate, None
        x, weight = x.to(out_dtype), weight.to(out_dtype)
    C, L = x.shape[1], x.shape[-1]
    mult = weight.shape[0] // C
    if mult > 1:
        x = x.repeat_interleave(mult, dim=1)
    w = weight[:, 0, :]
    K = w.shape[-1]
    if dilation > 1:  # insert dilation-1 zeros between taps
        w = F.pad(w[:, :, None], (0, dilation - 1)).reshape(w.shape[0], K * dilation)[:, : dilation * (K - 1) + 1]
    k_eff = w.shape[-1]
    k = w.flip(-1).float() if w.dtype in (torch.float16, torch.bfloat16) else w.flip(-1)
    return _finish(x, k, k_eff - 1 - pad_left, L + out_delta, bias, skip, pregate, postgate, out_dtype or x.dtype)


def fft_as_fftconv(u, kernels, reverse, scales, out_len, skip=None, pregate=None, postgate=None, out_dtype=None):
    """``irfft(rfft(u, n=N) * sum_i c_i [conj] rfft(k_i, n=N), n=N)[..., :out_len]`` as one fftconv (N proved large
    enough). A conjugated spectrum is the time-reversed (anti-causal) kernel: the bidirectional spelling. The kernels
    combine into one, kc[R - 1 + j] += c k_fwd[j] and kc[R - 1 - j] += c k_rev[j], with shift R - 1."""
    H = u.shape[1]
    ks = [k.reshape(H, k.shape[-1]) * c if c != 1.0 else k.reshape(H, k.shape[-1]) for k, c in zip(kernels, scales)]
    if len(ks) == 1 and not reverse[0]:  # the common causal case: nothing to combine (and no guards on sizes)
        return _finish(u, ks[0], 0, out_len, None, skip, pregate, postgate, out_dtype or u.dtype)
    R = functools.reduce(torch.sym_max, [k.shape[-1] for k, r in zip(ks, reverse) if r], 1)
    F_ = functools.reduce(torch.sym_max, [k.shape[-1] for k, r in zip(ks, reverse) if not r], 1)
    total = R - 1 + F_
    kc = None
    for k, r in zip(ks, reverse):
        part = F.pad(k.flip(-1), (R - k.shape[-1], total - R)) if r else F.pad(k, (R - 1, total - R + 1 - k.shape[-1]))
        kc = part if kc is None else kc + part
    return _finish(u, kc, R - 1, out_len, None, skip, pregate, postgate, out_dtype or u.dtype)


# ------------------------------------------------------------------------------------------------ graph helpers
def _is_call(n: Any, targets) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and n.target in targets


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _shape(n: Any) -> Optional[tuple]:
    v = val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _scalar(x: Any) -> Optional[sympy.Expr]:
    """A python number or SymInt/SymFloat node as a sympy expression; None for tensors."""
    v = val(x)
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return sympy.sympify(v)
    if isinstance(v, (torch.SymInt, torch.SymFloat)):
        return v.node.expr
    return None


def _one(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _last_dim_slice(n: Optional[fx.Node]) -> Optional[tuple]:
    """If n is ``x[..., :stop]`` (or ``x[:, :, :stop]``) return ``(stop,)`` (stop: int, node or None), else None."""
    if n is None or not (n.op == "call_function" and n.target is operator.getitem):
        return None
    idx = n.args[1]
    if not isinstance(idx, tuple) or not idx:
        return None
    last, lead = idx[-1], idx[:-1]
    rank = len(_shape(n.args[0]) or ())
    lead_ok = lead == (Ellipsis,) or (len(lead) == rank - 1 and all(s == slice(None) for s in lead))
    if not (lead_ok and isinstance(last, slice) and last.step in (None, 1) and last.start in (None, 0)):
        return None
    return (last.stop,)


def _kept_length(stop: Any, length: Any) -> Optional[Any]:
    """How much of a dimension of size ``length`` ``[..., :stop]`` keeps (int or SymInt); None if not provable."""
    if stop is None:
        return length
    s = val(stop)
    if isinstance(s, int) and s < 0:
        return length + s if known_true(length + s >= 0) else None
    if not isinstance(s, int) and not known_true(s >= 0):  # a symbolic stop that may be negative counts from the end
        return None
    if known_true(s <= length):
        return s
    if known_true(s >= length):
        return length
    return None


# ---------------------------------------------------------------------------------------- gates and skip folding
def _fold_gates(u_node: fx.Node, out: fx.Node, allow_pregate: bool, allow_skip: bool,
                allow_postgate: bool) -> tuple:
    """Fold an input gate, an output gate and a ``+ u * D`` skip around a proved conv.

    u_node: the conv's signal; out: the node whose value is the conv result. allow_postgate: False when the conv has
    a bias (the op computes ``g * conv + bias``, the model ``g * (conv + bias)``).
    Returns (u, pregate, postgate, skip, final_node, folded).
    """
    folded: list[str] = []
    pregate = postgate = skip = None
    u = u_node
    # pregate: u = a * g, both full [B, H, L], and only the conv reads the product.
    if allow_pregate and _is_call(u_node, _MUL) and len(u_node.users) == 1 and len(u_node.args) == 2:
        a, g = u_node.args
        if all(isinstance(x, fx.Node) for x in (a, g)) and _shape(a) == _shape(g) == _shape(u_node) and \
                val(a).dtype == val(g).dtype == val(u_node).dtype:  # else the product is in the promoted dtype
            u, pregate = a, g
            folded.append("pregate")
    final = out
    # postgate: y * g with g the same shape as y.
    user = _single_user(final)
    if allow_postgate and user is not None and _is_call(user, _MUL) and len(user.args) == 2:
        other = user.args[1] if user.args[0] is final else user.args[0]
        if isinstance(other, fx.Node) and other is not final and _shape(other) == _shape(final) == _shape(user):
            if val(other).dtype == val(final).dtype:
                postgate, final = other, user
                folded.append("postgate")
    # skip: y + u * D with D of shape [H, 1] / [1, H, 1], u the raw signal (or the tensor it was cast from).
    user = _single_user(final)
    if allow_skip and user is not None and _is_call(user, _ADD) and len(user.args) == 2 and not user.kwargs:
        other = user.args[1] if user.args[0] is final else user.args[0]
        if _is_call(other, _MUL) and len(other.args) == 2 and len(other.users) == 1:
            for x, d in (other.args, other.args[::-1]):
                sources = {u}
                if _is_call(u, {"to", "float", "type", "type_as"}) or _is_call(u, {torch.Tensor.to}):
                    sources.add(u.args[0])
                dshape, ushape = _shape(d), _shape(u)
                if (
                    x in sources
                    and isinstance(d, fx.Node)
                    and dshape is not None
                    and ushape is not None
                    and len(dshape) in (2, 3)
                    and dshape[-1] == 1
                    and all(s == 1 for s in dshape[:-2])
                    and known_eq(dshape[-2], ushape[1])
                    and _shape(user) == _shape(final)
                    and val(user).dtype == val(final).dtype
                ):
                    skip, final = d, user
                    folded.append("skip")
                    break
    return u, pregate, postgate, skip, final, folded


# --------------------------------------------------------------------------------------------------- conv1d sites
def _padding(padding: Any, K_eff: int) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    if padding == "same":
        total = K_eff - 1
        return total // 2, total - total // 2
    p = _one(padding)
    if len(p) != 1 or not isinstance(p[0], int):
        raise _Decline(f"padding {padding!r} is not a single int")
    return p[0], p[0]


def _match_conv1d(node: fx.Node, opts) -> tuple[LongConvSite, dict]:
    x, w = arg(node, 0, "input"), arg(node, 1, "weight")
    bias = arg(node, 2, "bias")
    stride, padding = arg(node, 3, "stride", 1), arg(node, 4, "padding", 0)
    dilation, groups = arg(node, 5, "dilation", 1), arg(node, 6, "groups", 1)
    xs, ws = _shape(x), _shape(w)
    if xs is None or ws is None or len(ws) != 3:
        raise _Decline("input or weight has no known shape")
    if len(xs) != 3:
        raise _Decline(f"input must be batched [B, C, L], got rank {len(xs)}")
    C, K, C_out = as_int(xs[1]), as_int(ws[-1]), as_int(ws[0])
    if None in (C, K, C_out) or not isinstance(groups, int):
        raise _Decline("channels, kernel size or groups are symbolic")
    if not (groups == C and ws[1] == 1):
        raise _Decline(f"not depthwise: groups={groups}, in_channels={C}, weight {describe_shape(val(w))}")
    if C_out % C:
        raise _Decline(f"out_channels {C_out} is not a multiple of in_channels {C}")
    if _one(stride) != (1,):
        raise _Decline(f"stride {stride} != 1")
    d = _one(dilation)
    if len(d) != 1 or not isinstance(d[0], int) or d[0] < 1:
        raise _Decline(f"dilation {dilation!r} is not a positive int")
    d = d[0]
    if K < opts.min_kernel_size:
        raise _Decline(f"kernel size {K} < min_kernel_size {opts.min_kernel_size}")
    if not val(x).is_floating_point():
        raise _Decline(f"dtype {val(x).dtype} is not floating point")
    K_eff = d * (K - 1) + 1
    pl, pr = _padding(padding, K_eff)
    site = LongConvSite("conv1d", C_out, xs[-1], K, dilation=d, multiplier=C_out // C)
    folded = []
    # A pad in front: zeros fold into the padding; circular stays (the conv reads the padded data); others decline.
    src = x
    if _is_call(x, _PAD):
        mode = arg(x, 2, "mode", "constant")
        value = arg(x, 3, "value", None)
        amounts = _one(arg(x, 1, "pad"))
        if mode in ("reflect", "replicate"):
            raise _Decline(f"padding_mode {mode!r} is neither zeros nor circular")
        if mode == "constant" and value in (None, 0, 0.0):
            if len(amounts) == 2 and all(isinstance(a, int) and a >= 0 for a in amounts) and len(x.users) == 1:
                src, pl, pr = x.args[0], pl + amounts[0], pr + amounts[1]
                folded.append("pad")
        elif mode == "circular":
            site.spelling = "conv1d-circular"
        else:
            raise _Decline(f"pad mode {mode!r} with value {value!r} is not a zero padding")
    L = _shape(src)[-1]
    out_len = L + pl + pr - K_eff + 1
    final = node
    user = _single_user(node)
    sl = _last_dim_slice(user)
    if sl is not None:
        kept = _kept_length(sl[0], out_len)
        if kept is not None and as_int(kept - L) is not None:
            out_len, final = kept, user
            folded.append("slice")
    if bias is not None:
        folded.append("bias")
    site.shift = K_eff - 1 - pl
    site.folded = folded
    out_delta = as_int(out_len - L)
    if out_delta is None:
        raise _Decline("output length is not L + a constant")
    plan = dict(kind="conv1d", x=src, w=w, bias=bias, pad_left=pl, out_delta=out_delta, dilation=d, final=final)
    return site, plan


# ------------------------------------------------------------------------------------------------------ fft sites
_NORM_FWD = {None: 0, "backward": 0, "ortho": 1, "forward": 2}  # power of N^(-1/2) applied by rfft
_NORM_INV = {None: 2, "backward": 2, "ortho": 1, "forward": 0}  # ... and by irfft


def _peel_scalars(n: Any) -> tuple[Any, sympy.Expr]:
    """Strip ``* c`` and ``/ c`` with scalar c; return (inner node, product of the factors)."""
    factor = sympy.Integer(1)
    while isinstance(n, fx.Node) and len(n.args) == 2 and not n.kwargs:
        a, b = n.args
        if _is_call(n, _MUL):
            if _scalar(b) is not None and isinstance(a, fx.Node):
                n, factor = a, factor * _scalar(b)
                continue
            if _scalar(a) is not None and isinstance(b, fx.Node):
                n, factor = b, factor * _scalar(a)
                continue
        if _is_call(n, _DIV) and _scalar(b) is not None and isinstance(a, fx.Node):
            n, factor = a, factor / _scalar(b)
            continue
        break
    return n, factor


def _rfft_of(n: Any) -> tuple[fx.Node, Any, sympy.Expr]:
    """n = c * rfft(x, n=N) -> (x, N, c including the norm's factor)."""
    inner, factor = _peel_scalars(n)
    if not _is_call(inner, _RFFT):
        raise _Decline("a spectrum operand is not an rfft")
    x, N = arg(inner, 0, "input"), arg(inner, 1, "n")
    dim, norm = arg(inner, 2, "dim", -1), arg(inner, 3, "norm")
    xs = _shape(x)
    if N is None or xs is None or dim not in (-1, len(xs) - 1):
        raise _Decline("rfft without n= or not over the last dimension")
    if norm not in _NORM_FWD:
        raise _Decline(f"unknown rfft norm {norm!r}")
    Ne = _scalar(N)
    return x, N, factor * Ne ** sympy.Rational(-_NORM_FWD[norm], 2)


_CONJ = {torch.conj, torch.conj_physical, "conj", "conj_physical"}


def _spectrum_terms(n: Any) -> list[tuple[fx.Node, Any, sympy.Expr, bool]]:
    """A spectrum as a sum of ``c * [conj] rfft(x, n=N)`` terms: [(x, N, c, reversed)]."""
    inner, factor = _peel_scalars(n)
    if _is_call(inner, _ADD) and len(inner.args) == 2 and all(isinstance(a, fx.Node) for a in inner.args):
        terms = _spectrum_terms(inner.args[0]) + _spectrum_terms(inner.args[1])
        return [(x, N, c * factor, r) for x, N, c, r in terms]
    if _is_call(inner, _CONJ) and len(inner.args) == 1:
        return [(x, N, c * factor, not r) for x, N, c, r in _spectrum_terms(inner.args[0])]
    x, N, c = _rfft_of(inner)
    return [(x, N, c * factor, False)]


def _match_fft(node: fx.Node, opts) -> tuple[LongConvSite, dict]:
    spec, N = arg(node, 0, "input"), arg(node, 1, "n")
    dim, norm = arg(node, 2, "dim", -1), arg(node, 3, "norm")
    if N is None or dim not in (-1, len(_shape(node) or ()) - 1) or norm not in _NORM_INV:
        raise _Decline("irfft without n= or not over the last dimension")
    prod, c = _peel_scalars(spec)
    if not (_is_call(prod, _MUL) and len(prod.args) == 2 and all(isinstance(a, fx.Node) for a in prod.args)):
        raise _Decline("irfft input is not a product of two spectra")
    sides = [_spectrum_terms(prod.args[0]), _spectrum_terms(prod.args[1])]
    Ne = _scalar(N)
    if not all(known_eq(val(Nt), val(N)) for side in sides for _, Nt, _, _ in side):
        raise _Decline("the rfft sizes and the irfft size differ (not one FFT size)")
    outer = c * Ne ** sympy.Rational(-_NORM_INV[norm], 2) * Ne

    def kernel_like(x, ref):
        s, r = _shape(x), _shape(ref)
        return s is not None and r is not None and 2 <= len(s) <= len(r) and known_eq(s[-2], r[-2]) \
            and all(d == 1 for d in s[:-2])

    for sig_side, ker_side in ((0, 1), (1, 0)):
        sig, ker = sides[sig_side], sides[ker_side]
        if len(sig) == 1 and not sig[0][3] and len(_shape(sig[0][0]) or ()) == 3 \
                and all(kernel_like(x, sig[0][0]) for x, _, _, _ in ker):
            break
    else:
        shapes = [[_shape(x) for x, _, _, _ in side] for side in sides]
        raise _Decline(f"spectra of {shapes[0]} and {shapes[1]} are not one [B, H, L] signal and [H, K] kernels")
    u, _, cu, _ = sig[0]
    scales = []
    for _, _, ck, _ in ker:
        scale = sympy.simplify(outer * cu * ck)
        if not scale.is_number:
            raise _Decline(f"scale {scale} depends on the sizes")
        scales.append(float(scale))
    L = _shape(u)[-1]
    fwd = [_shape(x)[-1] for x, _, _, r in ker if not r]
    rev = [_shape(x)[-1] for x, _, _, r in ker if r]
    for K in fwd:  # causal part: u[t - j] must not wrap around from the end
        if not known_true(val(N) >= L + K - 1):
            raise _Decline(f"FFT size {val(N)} < L + K - 1 = {L + K - 1}: circular, not linear, convolution")
    for K in rev:  # anti-causal part: u[t + j] must not wrap around to the start (t < L)
        if not known_true(val(N) >= L + K - 1):
            raise _Decline(f"FFT size {val(N)} < L + K - 1 = {L + K - 1} for the reversed kernel: circular")
    if not known_eq(_shape(node)[:-1], tuple(_shape(u)[:-1])):
        raise _Decline("the output is broadcast beyond the signal's shape")
    K = max(fwd + [1]) + max(rev + [1]) - 1
    site = LongConvSite("fft-bidirectional" if rev else "fft", _shape(u)[1], L, K, shift=max(rev + [1]) - 1)
    if any(sc != 1.0 for sc in scales):
        site.folded.append("scale")
    final, out_len = node, N
    sl = _last_dim_slice(_single_user(node))
    if sl is not None and _kept_length(sl[0], val(N)) is not None:
        stop = sl[0]
        if not (isinstance(val(stop), int) and val(stop) < 0):
            out_len = N if stop is None or not known_true(val(stop) <= val(N)) else stop
            final = _single_user(node)
            site.folded.append("slice")
    kept = val(out_len) if isinstance(out_len, fx.Node) else out_len
    for K in rev:  # outputs t >= N - K + 1 read u[(t + j) mod N]: the wrap-around, which the op does not compute
        if not known_true(kept + K - 1 <= val(N)):
            raise _Decline(f"{kept} outputs kept of an FFT of size {val(N)} with a reversed kernel of {K} taps: "
                           "the last outputs wrap around (circular); keep at most N - K + 1")
    return site, dict(kind="fft", u=u, k=[x for x, _, _, _ in ker], reverse=[r for _, _, _, r in ker],
                      scales=scales, out_len=out_len, final=final, out_dtype=val(final).dtype)


# ------------------------------------------------------------------------------------------------------- driver
def _candidates(gm: fx.GraphModule):
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        if node.target in _CONV1D:
            yield node, _match_conv1d
        elif node.target in _IRFFT:
            yield node, _match_fft
        elif node.target in _CONV_ND:
            yield node, None


def _record(report: Report, node: fx.Node, spelling: str, decision: str, reason: str, record=None, operands=None) -> Site:
    ins = [val(a) for a in (operands or node.args[:2]) if isinstance(a, fx.Node)]
    dt = next((str(v.dtype).replace("torch.", "") for v in ins if isinstance(v, torch.Tensor)), "?")
    return report.add(Site("longconv", spelling, module_path(node), describe_shape(*ins), dt, decision, reason, record))


def _rewrite(gm: fx.GraphModule, site: LongConvSite, plan: dict) -> fx.Node:
    g = gm.graph
    # A channel multiplier repeats the input inside the op: gates and skip of the input's width do not fit it.
    plain = plan["kind"] == "fft" or site.multiplier == 1
    u, pregate, postgate, skip, final, folded = _fold_gates(
        plan["x"] if plan["kind"] == "conv1d" else plan["u"], plan["final"], allow_pregate=plain, allow_skip=plain,
        allow_postgate=plan.get("bias") is None,
    )
    # the op reads every operand where it is inserted (before the last folded node): an in-place op in between
    # would be read after the change, where the model read before it
    reads = [x for x in (u, pregate, plan.get("x"), plan.get("w"), plan.get("u"), *plan.get("k", ())) if x is not None]
    mutation = _mutation_between(g, reads, final)
    if mutation is not None:
        raise _Decline(f"{mutation.name} ({mutation.target}) changes a tensor in place between the convolution and "
                       "the ops around it: the rewrite would read it after the change")
    site.folded += folded
    with g.inserting_before(final):
        if plan["kind"] == "conv1d":
            new = insert_call(
                g, conv1d_as_fftconv,
                (u, plan["w"], plan["bias"], plan["pad_left"], plan["out_delta"], plan["dilation"]),
                dict(skip=skip, pregate=pregate, postgate=postgate, out_dtype=val(final).dtype), like=final,
            )
        else:
            new = insert_call(
                g, fft_as_fftconv, (u, plan["k"], plan["reverse"], plan["scales"], plan["out_len"]),
                dict(skip=skip, pregate=pregate, postgate=postgate, out_dtype=val(final).dtype), like=final,
            )
    old = val(final)
    if tuple(val(new).shape) != tuple(old.shape) and not known_eq(tuple(val(new).shape), tuple(old.shape)):
        g.erase_node(new)
        raise _Decline(f"internal: rewrite shape {tuple(val(new).shape)} != {tuple(old.shape)}")
    if val(new).dtype != old.dtype:
        g.erase_node(new)
        raise _Decline(f"internal: rewrite dtype {val(new).dtype} != {old.dtype}")
    final.replace_all_uses_with(new)
    _erase_dead(final)
    site.node = new
    return new


_INPLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


_VIEWS = {"view", "reshape", "transpose", "permute", "getitem", "unsqueeze", "squeeze", "expand", "narrow", "t",
          "flatten", "unflatten", "view_as", "expand_as", "select", "split", "chunk", "unbind", "movedim",
          "__getitem__"}


def _name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")


def _root(n: Any) -> Any:
    """The tensor ``n`` is a view of (through view-like ops), or n itself."""
    while isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and _name(n) in _VIEWS and n.args:
        n = n.args[0]
    return n


def _mutates(n: fx.Node) -> bool:
    name = _name(n)
    return n.op in ("call_function", "call_method") and bool(n.args) and (
        n.target in _INPLACE or (name.endswith("_") and not name.endswith("__")))


def _mutation_between(g: fx.Graph, reads: list, end: fx.Node) -> Optional[fx.Node]:
    """The first node from the first (non-mutating) reader of ``reads`` up to ``end`` (graph order) that changes in
    place a tensor sharing a base with one of ``reads``, else None. A change before every read is read by both."""
    nodes = [x for x in reads if isinstance(x, fx.Node)]
    roots = {_root(x) for x in nodes}
    readers = {u for x in nodes for u in x.users if not _mutates(u)}
    inside = False
    for n in g.nodes:
        inside = inside or n in readers
        if n is end:
            return None
        if inside and _mutates(n) and _root(n.args[0]) in roots:
            return n
    return None


def _erase_dead(node: fx.Node) -> None:
    """Erase ``node`` and then every input that only it used, stopping at impure nodes and placeholders.

    Only the nodes the rewrite made dead go, so calls kept for their side effects elsewhere in the graph (functorch's
    nesting calls in a graph captured from torch.func transforms, say) stay, unlike a graph-wide DCE."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op not in ("call_function", "call_method") or n.is_impure():
            continue
        inputs = [a for a in n.all_input_nodes]
        n.graph.erase_node(n)
        stack.extend(inputs)


def _run(gm: fx.GraphModule, opts, report: Report, rewrite: bool) -> None:
    for node, matcher in _candidates(gm):
        if getattr(node, "_erased", False):  # removed by an earlier rewrite
            continue
        if matcher is None:
            _record(report, node, str(node.target.__name__), "skipped", "not a 1-D convolution")
            continue
        spelling = "conv1d" if matcher is _match_conv1d else "fft"
        try:
            site, plan = matcher(node, opts)
        except _Decline as why:
            _record(report, node, spelling, "skipped", str(why))
            continue
        operands = (plan["x"], plan["w"]) if plan["kind"] == "conv1d" else (plan["u"], *plan["k"])
        if not rewrite:
            _record(report, node, site.spelling, "kept", "longconv pass is off", site, operands)
            continue
        try:
            _rewrite(gm, site, plan)
        except _Decline as why:
            _record(report, node, site.spelling, "skipped", str(why))
            continue
        bump("longconv_rewritten")
        bump(f"longconv_rewritten_{site.spelling}")
        reason = f"K={site.kernel_size}" + (f", folded {'+'.join(site.folded)}" if site.folded else "")
        _record(report, node, site.spelling, "rewritten", reason, site, operands)


def run(gm: fx.GraphModule, opts, report: Report) -> None:
    """Rewrite every proved long convolution in ``gm`` to fftconv; record every candidate in ``report``."""
    _run(gm, opts, report, rewrite=True)


def analyze(gm: fx.GraphModule, opts, report: Report) -> None:
    """Record the long convolutions without rewriting (option ``longconv=False``)."""
    _run(gm, opts, report, rewrite=False)
