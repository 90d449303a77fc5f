"""passes.attention: every spelling of the issue, Inductor's 30 fuse_attention patterns, and the near misses.

Each test checks numerics against eager (STYLE.md tolerance: error against an fp64 run at most 2x eager's own), the
number of sites found/rewritten, and what the site record says (mask kind, causal, GQA, scale).
Models run through ``backend="hhfft"`` with ``compiler="eager"`` (the rewritten Dynamo graph without Inductor).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hhfft.lowering.backend import hhfft_backend

# ------------------------------------------------------------------------------------------------------------ helpers


def compile_eager(model: nn.Module, **options):
    """torch.compile(model, backend="hhfft", options={"compiler": "eager", ...}) and the reports it produced."""
    reports = []
    opts = {"compiler": "eager", **options}

    def backend(gm, example_inputs):
        return hhfft_backend(gm, example_inputs, opts, report_sink=reports.append)

    return torch.compile(model, backend=backend), reports


def attention_sites(reports):
    return [s for r in reports for s in r if s.kind == "attention"]


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def assert_close_rule(got: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, what: str,
                      scale: float = 0.0) -> None:
    """STYLE.md: error against the fp64 reference at most 2x eager PyTorch's error at the same dtype, plus 16 units
    of roundoff at the magnitude of the computation (max of 1, the reference and ``scale``): eager is sometimes
    exact (fp64 models, or a gradient that cancels to exactly 0 when every row has a single key)."""
    assert got.shape == ref64.shape, what
    assert torch.isfinite(got).all() == torch.isfinite(ref64).all(), what
    floor = 16 * torch.finfo(got.dtype).eps * max(1.0, ref64.abs().max().item(), scale)
    e, base = _err(got, ref64), _err(eager, ref64)
    assert e <= 2 * base + floor, f"{what}: error {e:.3e} > 2 x eager's {base:.3e} (+{floor:.1e})"


def check_model(model: nn.Module, inputs: tuple, *, grads: bool = True, **options):
    """Compiled == eager (outputs and gradients); returns the attention sites found."""
    torch.manual_seed(0)
    ref_model = copy.deepcopy(model).double()
    ref_in = tuple(x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x for x in inputs)
    eager_in = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
    comp_in = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
    compiled, reports = compile_eager(model, **options)
    out = compiled(*comp_in)
    eager = model(*eager_in)
    ref = ref_model(*ref_in)
    assert_close_rule(out, eager, ref, "output")
    if grads:
        g = torch.randn_like(ref)
        params = [p for p in model.parameters()]
        kw = {"allow_unused": True}
        dout = torch.autograd.grad(out, [*params, *[x for x in comp_in if x.requires_grad]], g.to(out.dtype), **kw)
        deag = torch.autograd.grad(eager, [*params, *[x for x in eager_in if x.requires_grad]], g.to(out.dtype), **kw)
        dref = torch.autograd.grad(ref, [*ref_model.parameters(), *[x for x in ref_in if x.requires_grad]], g, **kw)
        scale = max(c.abs().max().item() for c in dref if c is not None)  # the backward pass's magnitude
        for i, (a, b, c) in enumerate(zip(dout, deag, dref)):
            assert (a is None) == (b is None) == (c is None), f"gradient {i} is used in one run only"
            if c is not None:
                assert_close_rule(a, b, c, f"gradient {i}", scale)
    return attention_sites(reports)


# ------------------------------------------------------------------------------------------------------------ grammar
@dataclass(frozen=True)
class Spec:
    """One attention block's spelling (the grammar the property test draws from)."""

    product: str = "matmul"  # matmul | at | bmm | einsum_bhqd | einsum_bqhd
    scale: str = "mul"  # mul | div | div_sqrt | q | split | none | left_mul
    mask: str = "none"  # none | add | fill_inf | fill_min | where_min | causal_tril | causal_arange | causal_buffer
    #                     | causal_where | keypad | causal_keypad | keypad_add
    softmax: str = "F"  # F | torch | method | fp32 (softmax in at least float32, cast back)
    dropout: str = "none"  # none | eval | train0
    gqa: str = "none"  # none | repeat_interleave | expand
    heads: int = 2
    kv_heads: int = 2
    head_dim: int = 8


MASK_KIND = {
    "none": "none", "add": "additive", "fill_inf": "additive", "fill_min": "additive", "where_min": "additive",
    "causal_tril": "causal", "causal_arange": "causal", "causal_buffer": "causal", "causal_where": "causal",
    "keypad": "key_padding", "causal_keypad": "causal+key_padding", "keypad_add": "key_padding",
}


class Block(nn.Module):
    def __init__(self, spec: Spec, dim: int, max_len: int = 64) -> None:
        super().__init__()
        self.s = spec
        h, kvh, d = spec.heads, spec.kv_heads, spec.head_dim
        # plain parameters rather than nn.Linear submodules: Dynamo traces these models faster
        self.wq = nn.Parameter(torch.randn(dim, h * d) / math.sqrt(dim))
        self.wk = nn.Parameter(torch.randn(dim, kvh * d) / math.sqrt(dim))
        self.wv = nn.Parameter(torch.randn(dim, kvh * d) / math.sqrt(dim))
        self.wo = nn.Parameter(torch.randn(h * d, dim) / math.sqrt(h * d))
        if spec.mask == "causal_buffer":
            self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor, amask: torch.Tensor, kpad: torch.Tensor) -> torch.Tensor:
        s = self.s
        b, length, _ = x.shape
        q = (x @ self.wq).view(b, length, s.heads, s.head_dim)
        k = (x @ self.wk).view(b, length, s.kv_heads, s.head_dim)
        v = (x @ self.wv).view(b, length, s.kv_heads, s.head_dim)
        out = attend(s, q, k, v, amask, kpad, getattr(self, "bias", None), self.training)
        return x + out @ self.wo


def _repeat(s: Spec, t: torch.Tensor) -> torch.Tensor:  # (B, Hkv, L, D) -> (B, H, L, D)
    n = s.heads // s.kv_heads
    if n == 1 or s.gqa == "none":
        return t
    if s.gqa == "repeat_interleave":
        return t.repeat_interleave(n, dim=1)
    b, hk, length, d = t.shape
    return t[:, :, None, :, :].expand(b, hk, n, length, d).reshape(b, hk * n, length, d)


def attend(s: Spec, q, k, v, amask, kpad, bias=None, training: bool = True):  # noqa: C901
    """The attention of spec ``s`` on q (B, L, H, D), k/v (B, L, Hkv, D): returns (B, L, H*D)."""
    b, length = q.shape[:2]
    h, d = s.heads, s.head_dim
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = _repeat(s, k), _repeat(s, v)
    sc = 1.0 / math.sqrt(d)
    if s.scale == "q":
        q = q * sc
    elif s.scale == "split":
        q, k = q * math.sqrt(sc), k * math.sqrt(sc)
    # product
    if s.product == "matmul":
        scores = torch.matmul(q, k.transpose(-2, -1))
    elif s.product == "at":
        scores = q @ k.transpose(2, 3)
    elif s.product == "bmm":
        scores = torch.bmm(q.reshape(b * h, length, d), k.reshape(b * h, length, d).transpose(1, 2))
        scores = scores.view(b, h, length, length)
    elif s.product == "einsum_bhqd":
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
    else:
        scores = torch.einsum("bqhd,bkhd->bhqk", q.transpose(1, 2), k.transpose(1, 2))
    if s.scale == "mul":
        scores = scores * sc
    elif s.scale == "left_mul":
        scores = sc * scores
    elif s.scale == "div":
        scores = scores / (1.0 / sc)
    elif s.scale == "div_sqrt":
        scores = scores / math.sqrt(d)
    # mask
    neg = torch.finfo(scores.dtype).min
    i = torch.arange(length, device=q.device)
    if s.mask == "add":
        scores = scores + amask
    elif s.mask == "fill_inf":
        scores = scores.masked_fill(amask < -1.0, float("-inf"))
    elif s.mask == "fill_min":
        scores = scores.masked_fill(amask < -1.0, neg)
    elif s.mask == "where_min":
        scores = torch.where(amask >= -1.0, scores, neg)
    elif s.mask == "causal_tril":
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    elif s.mask == "causal_arange":
        scores = scores.masked_fill(i[None, :] > i[:, None], neg)
    elif s.mask == "causal_buffer":
        scores = scores.masked_fill(bias[:, :, :length, :length] == 0, float("-inf"))
    elif s.mask == "causal_where":
        causal = i[None, None, None, :] <= i[None, None, :, None]
        scores = torch.where(causal, scores, torch.full((), neg, dtype=scores.dtype))
    elif s.mask == "keypad":
        scores = scores.masked_fill(~kpad[:, None, None, :], neg)
    elif s.mask == "causal_keypad":
        allowed = (i[None, :] <= i[:, None])[None, None] & kpad[:, None, None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif s.mask == "keypad_add":
        zero, low = torch.zeros((), dtype=scores.dtype), torch.full((), neg, dtype=scores.dtype)
        scores = scores + torch.where(kpad, zero, low)[:, None, None, :]
    # softmax
    if s.product == "bmm":
        scores = scores.view(b * h, length, length)
    if s.softmax == "F":
        w = F.softmax(scores, dim=-1)
    elif s.softmax == "torch":
        w = torch.softmax(scores, -1)
    elif s.softmax == "method":
        w = scores.softmax(dim=-1)
    else:
        w = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if s.dropout == "eval":
        w = F.dropout(w, p=0.1, training=False)
    elif s.dropout == "train0":
        w = F.dropout(w, 0.0, training)
    # value product
    if s.product == "bmm":
        out = torch.bmm(w, v.reshape(b * h, length, d)).view(b, h, length, d)
    elif s.product == "einsum_bhqd":
        out = torch.einsum("bhqk,bhkd->bhqd", w, v)
    elif s.product == "einsum_bqhd":
        out = torch.einsum("bhqk,bkhd->bqhd", w, v.transpose(1, 2)).transpose(1, 2)
    else:
        out = w @ v
    return out.transpose(1, 2).reshape(b, length, h * d)


class Stack(nn.Module):
    def __init__(self, specs, dim: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(s, dim) for s in specs)

    def forward(self, x, amask, kpad):
        for blk in self.blocks:
            x = blk(x, amask, kpad)
        return x


class LeanStack(nn.Module):
    """Parameter-free blocks (q, k, v are slices of the residual stream): the cheapest models for Dynamo to trace,
    so the property test can afford hundreds of them. Gradients flow to the input through q, k and v."""

    width = 48

    def __init__(self, specs, max_len: int = 64) -> None:
        super().__init__()
        self.specs = tuple(specs)
        if any(s.mask == "causal_buffer" for s in specs):
            self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x, amask, kpad):
        b, length, _ = x.shape
        for s in self.specs:
            hd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
            q = x[..., :hd].view(b, length, s.heads, s.head_dim)
            k = x[..., 8:8 + kvd].view(b, length, s.kv_heads, s.head_dim)
            v = x[..., -kvd:].view(b, length, s.kv_heads, s.head_dim)
            out = attend(s, q, k, v, amask, kpad, getattr(self, "bias", None), self.training)
            x = x + F.pad(out, (0, self.width - hd))
        return x


def make_inputs(batch: int = 2, length: int = 7, dim: int = 16, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=g, dtype=dtype).requires_grad_()
    amask = torch.randn(batch, 1, length, length, generator=g, dtype=dtype)
    amask[..., 0] = 0.0  # every row keeps a key, so fill masks never blank a whole row
    kpad = torch.rand(batch, length, generator=g) > 0.4
    kpad[:, 0] = True
    return x, amask, kpad


def check_specs(specs, *, length: int = 7, dtype=torch.float32, seed: int = 0, lean: bool = False):
    torch.manual_seed(seed)
    model = (LeanStack(specs) if lean else Stack(specs)).to(dtype)
    dim = LeanStack.width if lean else 16
    sites = check_model(model, make_inputs(length=length, dim=dim, dtype=dtype, seed=seed))
    rewritten = [s for s in sites if s.decision == "rewritten"]
    assert len(sites) == len(specs), [s.reason for s in sites]
    assert len(rewritten) == len(specs), [s.reason for s in sites]
    for spec, site in zip(specs, rewritten):
        rec = site.record
        kind = MASK_KIND[spec.mask]
        if length == 1 and spec.mask in {"fill_inf", "fill_min", "where_min"}:
            kind = "key_padding"  # a (B, 1, 1, 1) data mask depends on the batch only: provably key padding
        assert rec.mask_kind == kind, (spec, rec.mask_kind)
        assert rec.causal == ("causal" in MASK_KIND[spec.mask]), spec
        assert rec.heads == spec.heads
        expect_kv = spec.kv_heads if spec.gqa != "none" else spec.heads
        assert rec.kv_heads == expect_kv, (spec, rec.kv_heads)
        assert rec.head_dim == spec.head_dim
        if spec.scale != "none":
            assert rec.scale == pytest.approx(1 / math.sqrt(spec.head_dim)), (spec, rec.scale)
        assert rec.sdpa is not None and (rec.q is rec.sdpa.args[0]) == (rec.attn_mask is None)
    return sites


# -------------------------------------------------------------------------------------------------- spelling tests
SPELLINGS = {
    "matmul-transpose": Spec(product="matmul"),
    "at-operator": Spec(product="at"),
    "bmm-merged-heads": Spec(product="bmm"),
    "einsum-bhqd": Spec(product="einsum_bhqd"),
    "einsum-bqhd": Spec(product="einsum_bqhd"),
    "scale-mul": Spec(scale="mul"),
    "scale-left-mul": Spec(scale="left_mul"),
    "scale-div": Spec(scale="div"),
    "scale-div-sqrt": Spec(scale="div_sqrt"),
    "scale-on-q": Spec(scale="q"),
    "scale-sqrt-split": Spec(scale="split"),
    "mask-add": Spec(mask="add"),
    "mask-masked-fill-inf": Spec(mask="fill_inf"),
    "mask-masked-fill-finfo-min": Spec(mask="fill_min"),
    "mask-where-finfo-min": Spec(mask="where_min"),
    "causal-tril-ones": Spec(mask="causal_tril"),
    "causal-arange": Spec(mask="causal_arange"),
    "causal-buffer": Spec(mask="causal_buffer"),
    "causal-where": Spec(mask="causal_where"),
    "key-padding": Spec(mask="keypad"),
    "key-padding-additive": Spec(mask="keypad_add"),
    "causal-and-key-padding": Spec(mask="causal_keypad"),
    "softmax-F": Spec(softmax="F"),
    "softmax-torch": Spec(softmax="torch"),
    "softmax-method": Spec(softmax="method"),
    "softmax-fp32-cast-back": Spec(softmax="fp32"),
    "dropout-eval": Spec(dropout="eval"),
    "dropout-train-p0": Spec(dropout="train0"),
    "gqa-repeat-interleave": Spec(gqa="repeat_interleave", heads=4, kv_heads=2),
    "gqa-expand-reshape": Spec(gqa="expand", heads=4, kv_heads=1),
    "bmm-gqa-causal-keypad": Spec(product="bmm", gqa="expand", heads=4, kv_heads=2, mask="causal_keypad"),
    "einsum-bqhd-where-fp32": Spec(product="einsum_bqhd", mask="causal_where", softmax="fp32", scale="q"),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_found_and_rewritten(name):
    check_specs([SPELLINGS[name]])


def test_three_stacked_blocks_float64():
    check_specs([Spec(mask="causal_keypad"), Spec(product="bmm"), Spec(product="einsum_bqhd", gqa="expand",
                                                                          heads=4, kv_heads=2)], dtype=torch.float64)


def test_dropout_train_becomes_sdpa_dropout():
    class M(nn.Module):
        def forward(self, q, k, v):
            return F.dropout((q @ k.transpose(-2, -1) * 0.5).softmax(-1), p=0.25, training=True) @ v

    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    compiled, reports = compile_eager(M())
    out = compiled(q, k, v)
    (site,) = attention_sites(reports)
    assert site.decision == "rewritten" and site.record.dropout == 0.25
    assert site.record.sdpa.kwargs["dropout_p"] == 0.25
    assert out.shape == (2, 2, 5, 4) and torch.isfinite(out).all()


def test_existing_sdpa_is_recorded_not_rewritten():
    class M(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    compiled, reports = compile_eager(M())
    torch.testing.assert_close(compiled(q, k, v), M()(q, k, v))
    (site,) = attention_sites(reports)
    assert site.decision == "kept" and site.spelling == "sdpa"
    assert site.record.mask_kind == "causal" and site.record.causal
    assert torch._dynamo.utils.counters["hhfft"]["attention_rewritten"] == 0


def test_keep_option_records_without_rewriting():
    torch.manual_seed(0)
    model = Stack([Spec(mask="causal_arange")])
    compiled, reports = compile_eager(model, attention="keep")
    x = make_inputs()
    torch.testing.assert_close(compiled(*x), model(*x))
    (site,) = attention_sites(reports)
    assert site.decision == "kept" and site.record.mask_kind == "causal"


def test_pass_is_idempotent():
    from hhfft.lowering.backend import Options, run_passes

    torch.manual_seed(0)
    model = Stack([Spec(mask="causal_keypad", gqa="expand", heads=4, kv_heads=2)])
    graphs = []

    def backend(gm, ex):
        r1 = run_passes(gm, Options.parse({"compiler": "eager"}))
        code1 = gm.code
        r2 = run_passes(gm, Options.parse({"compiler": "eager"}))
        graphs.append((r1, r2, code1, gm.code))
        return gm.forward

    torch.compile(model, backend=backend)(*make_inputs())
    (r1, r2, c1, c2) = graphs[0]
    assert r1.count("attention", "rewritten") == 1
    assert r2.count("attention", "rewritten") == 0 and r2.count("attention", "kept") == 1
    assert c1 == c2


# ------------------------------------------------------------------------------------------------------ near misses
class NearMiss(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, other):  # noqa: C901
        kind = self.kind
        s = q @ k.transpose(-2, -1) * 0.5
        if kind == "softmax-dim-2":
            return s.softmax(dim=-2) @ v
        if kind == "scores-returned":
            return s.softmax(-1) @ v, s
        if kind == "scores-reused":
            return s.softmax(-1) @ v + s.sum(-1, keepdim=True)
        if kind == "weights-returned":
            w = s.softmax(-1)
            return w @ v, w
        if kind == "scale-depends-on-data":
            return (q @ k.transpose(-2, -1) * other.mean()).softmax(-1) @ v
        if kind == "mask-depends-on-scores":
            return s.masked_fill(s < 0, float("-inf")).softmax(-1) @ v
        if kind == "weights-transposed":
            return s.softmax(-1).transpose(-2, -1) @ v
        if kind == "weights-right-operand":
            return v.transpose(-2, -1) @ s.softmax(-1)
        if kind == "fill-not-absorbing":
            return s.masked_fill(other > 0, -1e4).softmax(-1) @ v
        raise AssertionError(kind)


NEAR_MISSES = {
    "softmax-dim-2": "not over the keys",
    "scores-returned": "used 2 times",
    "scores-reused": "used 2 times",
    "weights-returned": "used 2 times",
    "scale-depends-on-data": "depends on data",
    "mask-depends-on-scores": "used 2 times",
    "weights-transposed": "not a product with the values",
    "weights-right-operand": "right operand",
    "fill-not-absorbing": "not an additive mask",
}


@pytest.mark.parametrize("kind", list(NEAR_MISSES))
def test_near_miss_is_not_rewritten(kind):
    q, k, v = (torch.randn(2, 2, 6, 6) for _ in range(3))
    other = torch.randn(2, 2, 6, 6)
    m = NearMiss(kind)
    compiled, reports = compile_eager(m)
    torch.testing.assert_close(compiled(q, k, v, other), m(q, k, v, other), equal_nan=True)
    sites = attention_sites(reports)
    assert torch._dynamo.utils.counters["hhfft"]["attention_rewritten"] == 0
    assert len(sites) == 1 and sites[0].decision == "skipped"
    assert NEAR_MISSES[kind] in sites[0].reason, sites[0].reason


@pytest.mark.parametrize("mask", ["fill_min", "where_min", "keypad", "causal_arange"])
def test_rows_with_every_key_masked_by_a_finite_fill(mask):
    """On a row whose keys are all masked, a finite fill (finfo.min) makes eager's softmax uniform and masked_fill
    stops the gradient to the scores. Without the blank-row guard the rewrite's SDPA passed that gradient on, and
    its fused backward (log-sum-exp next to finfo.min) gave S times the value gradient. These inputs blank row 2 of
    the data mask and every key of batch element 1."""
    x, amask, kpad = make_inputs(length=6)
    amask[:, :, 2, :] = -5.0
    kpad[1] = False
    torch.manual_seed(0)
    (site,) = check_model(Stack([Spec(mask=mask)]), (x, amask, kpad))
    assert site.decision == "rewritten", site.reason


class AddThenFill(nn.Module):
    def forward(self, q, k, v, bias, blocked):
        s = (q @ k.transpose(-2, -1) * 0.5 + bias).masked_fill(blocked, torch.finfo(q.dtype).min)
        return s.softmax(-1) @ v


def test_blank_row_of_an_additive_mask():
    """A row blanked by an additive finfo.min mask (HF's spelling): output and value gradient equal eager's; q and k
    get no gradient from that row, where eager passes one through the addition that absorbs the scores (the output
    does not depend on them). Every other row's gradients equal eager's."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    low = torch.finfo(torch.float64).min
    bias = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    bias[..., 1, :] = low  # row 1: every key masked by the addition
    blocked = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    blocked[..., 3, 1:] = True  # row 3: a fill, one key left
    m = AddThenFill()
    compiled, reports = compile_eager(m)
    out, ref = compiled(q, k, v, bias, blocked), m(q, k, v, bias, blocked)
    (site,) = attention_sites(reports)
    assert site.decision == "rewritten", site.reason
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    got, want = torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(got[2], want[2])
    keep = torch.ones(5, dtype=torch.bool)
    keep[1] = False
    torch.testing.assert_close(got[0][..., keep, :], want[0][..., keep, :])
    assert got[0][..., 1, :].abs().max() == 0 and want[0][..., 1, :].abs().max() > 0
    # k's gradient differs by exactly row 1's contribution through the addition: eager minus the same model with
    # row 1's scores detached
    sd = (q @ k.transpose(-2, -1) * 0.5)
    sd = torch.cat([sd[..., :1, :], sd[..., 1:2, :].detach(), sd[..., 2:, :]], -2)
    ref_detached = ((sd + bias).masked_fill(blocked, low).softmax(-1) @ v)
    torch.testing.assert_close(got[1], torch.autograd.grad(ref_detached, k, g)[0])


# -------------------------------------------------------------------------------------- nn.MultiheadAttention & co.
@pytest.mark.parametrize("mask", ["none", "causal", "key_padding", "causal+key_padding"])
def test_multihead_attention_decomposed(mask):
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x, kpm):
            L = x.shape[1]
            am = None
            if mask == "causal":  # float -inf above the diagonal
                am = nn.Transformer.generate_square_subsequent_mask(L)
            elif mask == "causal+key_padding":  # bool, True = blocked (same type as key_padding_mask)
                am = torch.ones(L, L, dtype=torch.bool).triu(1)
            return self.mha(x, x, x, need_weights=False, attn_mask=am,
                            key_padding_mask=kpm if "key_padding" in mask else None)[0]

    x = torch.randn(2, 7, 16, requires_grad=True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    sites = check_model(M(), (x, kpm))
    (site,) = sites
    assert site.decision == "rewritten" and site.spelling == "mha"
    assert site.record.mask_kind == mask
    assert site.record.heads == 4 and site.record.head_dim == 4


def test_multihead_attention_need_weights_is_skipped():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4)
    x = torch.randn(7, 2, 16)
    compiled, reports = compile_eager(mha)
    out, w = compiled(x, x, x, need_weights=True)
    ref, wr = mha(x, x, x, need_weights=True)
    torch.testing.assert_close(out, ref)
    (site,) = attention_sites(reports)
    assert site.decision == "skipped" and "need_weights=True" in site.reason


@pytest.mark.parametrize("layer", ["encoder", "decoder"])
def test_transformer_layers(layer):
    torch.manual_seed(0)
    if layer == "encoder":
        model = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        inputs = (torch.randn(2, 7, 16, requires_grad=True),)
        n_sites = 1
    else:
        model = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        inputs = (torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True))
        n_sites = 2
    sites = check_model(model, inputs)
    assert len(sites) == n_sites and all(s.decision == "rewritten" for s in sites), [s.reason for s in sites]


def test_expanded_mask_compared_before_the_fill_is_rewritten():
    """``masked_fill(keep.expand_as(s) == 0, -inf)``: the expanded mask flows into the attention through an
    elementwise op only, so the rewrite may feed the unexpanded mask to it (SDPA broadcasts)."""

    class M(nn.Module):
        def forward(self, q, k, v, keep):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            return s.masked_fill(keep.expand_as(s) == 0, float("-inf")).softmax(-1) @ v

    q, k, v = (torch.randn(2, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, 1, 1, 8, dtype=torch.long)
    keep[1, ..., 5:] = 0
    compiled, reports = compile_eager(M())
    torch.testing.assert_close(compiled(q, k, v, keep), M()(q, k, v, keep), rtol=1e-12, atol=1e-12)
    assert [s.decision for s in attention_sites(reports)] == ["rewritten"]


@pytest.mark.parametrize("mask_rank_mismatch", [False, True], ids=["same-frame", "frames-differ"])
def test_expanded_mask_used_outside_the_attention_is_left_alone(mask_rank_mismatch):
    """``blocked = mask.expand_as(scores)`` also returned by the model: the rewrite redirected every use of the
    expand_as to the unexpanded mask (the model's count of blocked pairs became 3 instead of 48), and did so before
    checks that then skipped the site, so a skipped site's graph was changed too. Now the site is skipped with the
    reason and every output equals eager's."""

    class M(nn.Module):
        def forward(self, q, k, v, keep, bias):
            B, H, L, D = q.shape
            s = q @ k.transpose(-2, -1) / math.sqrt(D)
            blocked = (~keep).expand_as(s)
            s = s.masked_fill(blocked, float("-inf"))
            if mask_rank_mismatch:  # a second mask piece in a frame of another rank
                w = (s.view(B * H, L, L) + bias).softmax(-1).view(B, H, L, L)
            else:
                w = s.softmax(-1)
            return w @ v, blocked.sum()

    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    keep = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    keep[1, ..., 5:] = False
    bias = torch.randn(1, 8, 8)
    model = M()
    ref = model(q, k, v, keep, bias)
    compiled, reports = compile_eager(model)
    out = compiled(q, k, v, keep, bias)
    assert out[1].item() == ref[1].item() == 1 * 2 * 8 * 3  # batch 1: 2 heads x 8 queries x 3 keys
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    sites = attention_sites(reports)
    assert [s.decision for s in sites] == ["skipped"]
    assert "outside the attention" in sites[0].reason
