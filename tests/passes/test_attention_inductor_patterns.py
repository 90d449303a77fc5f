"""Every spelling of Inductor's fuse_attention.py (torch 2.13: _sfdp_pattern_1 .. _sfdp_pattern_30) is found by hhfft.

Each case below writes the pattern's spelling (the ops Inductor's pattern traces, in the same order) as a small
module; the test compiles it with backend="hhfft" (compiler="eager"), checks compiled == eager (outputs and
gradients, STYLE.md tolerance), that exactly one attention site is found and rewritten, and its mask kind.
Dropout probabilities are 0.0 (with training=True), so the comparison is deterministic.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_attention_spellings import check_model

aten = torch.ops.aten
P = 0.0  # dropout_p: training-mode dropout ops stay in the graph, results stay deterministic
INV = 2.5  # inv_scale / scale factor


def _perm(t):
    return t.permute([0, 2, 1, 3])


def p1(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(INV).softmax(dim=-1).matmul(v)


def p2(q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(1 / INV).softmax(dim=-1).matmul(v)


def p3(q, k, v):
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).div(INV).softmax(dim=-1), p=P).matmul(v)


def p4(q, k, v):
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).mul(1 / INV).softmax(dim=-1), p=P).matmul(v)


def p5(q, k, v, m):
    return torch.softmax(q @ k.transpose(-2, -1) / INV + m, dim=-1) @ v


def p6(q, k, v, m):
    w = torch.softmax(q @ k.transpose(-2, -1) / INV + m, dim=-1)
    return torch.dropout(w, P, True) @ v


def _p7_10(q, k, v, *, drop, scale_q):
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    if scale_q:
        s = (q / INV) @ k.transpose(-2, -1)
    else:
        s = q @ k.transpose(-2, -1) / INV
    w = torch.softmax(s.to(torch.float32), dim=-1)
    if drop:
        w = torch.dropout(w, P, True)
    w = w.to(torch.float16)
    return w @ v.to(w.dtype)


def p7(q, k, v):
    return _p7_10(q, k, v, drop=True, scale_q=False)


def p8(q, k, v):
    return _p7_10(q, k, v, drop=False, scale_q=False)


def p9(q, k, v):
    return _p7_10(q, k, v, drop=True, scale_q=True)


def p10(q, k, v):
    return _p7_10(q, k, v, drop=False, scale_q=True)


def p11(q, k, v):
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    return torch.matmul(q, k.transpose(-2, -1)).div(INV).softmax(dim=-1).matmul(v)


def p12(q, k, v):
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    return F.dropout(torch.matmul(q, k.transpose(-2, -1)).div(INV).softmax(dim=-1), p=P).matmul(v)


def p13(q, k, v):  # 3-d bmm, no scale
    w = F.dropout(torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1), p=P)
    return torch.bmm(w, v)


def p14(q, k, v, m):
    q, k, v = _perm(q), _perm(k), _perm(v)
    return (torch.matmul(q, k.transpose(-2, -1)).div(INV) + m).softmax(dim=-1).matmul(v)


def _distilbert(q, k, v, m, *, drop, scale_q):
    q, k, v = _perm(q), _perm(k), _perm(v)
    bs, k_len = q.size(0), k.size(-2)
    if scale_q:
        s = q.div(INV) @ k.transpose(-2, -1)
    else:
        s = (q @ k.transpose(-2, -1)).div(INV)
    fill = torch.full((), -float("inf"), dtype=q.dtype, device=q.device)
    blocked = (m == 0).view((bs, 1, 1, k_len)).expand_as(s)
    w = torch.softmax(s.masked_fill(blocked, fill), dim=-1)
    if drop:
        w = F.dropout(w, P)
    return w @ v


def p15(q, k, v, m2):
    return _distilbert(q, k, v, m2, drop=False, scale_q=False)


def p16(q, k, v, m):
    q, k, v = _perm(q), _perm(k), _perm(v)
    w = F.dropout((torch.matmul(q, k.transpose(-2, -1)).div(INV) + m).softmax(dim=-1), P)
    return w.to(dtype=q.dtype).matmul(v)


def p17(q, k, v, m2):
    return _distilbert(q, k, v, m2, drop=True, scale_q=False)


def p18(q, k, v, causal):
    q, k, v = _perm(q), _perm(k), _perm(v)
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    s = s.div(torch.full([], INV, dtype=s.dtype, device=s.device))
    low = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
    s = torch.where(causal, s, low)
    return F.dropout(s.softmax(dim=-1), P).matmul(v), k, v


def p19(q, k, v, causal, m):
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    s = s.div(torch.full([], INV, dtype=s.dtype, device=s.device))
    low = torch.full((), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device)
    s = torch.where(causal, s, low) + m
    w = s.softmax(dim=-1).type(v.dtype)
    return F.dropout(w, P).matmul(v)


def p20(q, k, v, m2):
    return _distilbert(q, k, v, m2, drop=True, scale_q=True)


def _t5(q, k, v, m, *, drop, ret_kv, with_mask, double_cast):
    q, k, v = _perm(q), _perm(k), _perm(v)
    s = torch.matmul(q, k.permute(0, 1, 3, 2))
    if with_mask:
        s = s + m
    if double_cast:
        s = s.type_as(q) if with_mask else s.float().type_as(q)
    w = s.float().softmax(dim=-1).type_as(q)
    if drop:
        w = F.dropout(w, P)
    out = w.matmul(v)
    return (out, k, v) if ret_kv else out


def p21(q, k, v, m):
    return _t5(q, k, v, m, drop=False, ret_kv=False, with_mask=True, double_cast=True)


def p22(q, k, v, m):
    return _t5(q, k, v, m, drop=False, ret_kv=True, with_mask=True, double_cast=True)


def p23(q, k, v):
    return _t5(q, k, v, None, drop=False, ret_kv=True, with_mask=False, double_cast=True)


def p24(q, k, v, m):  # MBart: merged-head bmm, mask added in the 4-d view
    bs, h, length, d = q.shape
    q3 = q.view(bs * h, -1, d)
    k3 = k.reshape(bs * h, -1, d)
    v3 = v.reshape(bs * h, -1, d)
    w = torch.bmm(q3, k3.transpose(1, 2))
    w = w.view(bs, h, length, -1) + m
    w = F.softmax(w.view(bs * h, length, -1), dim=-1)
    return torch.bmm(w, v3).view(bs, h, length, d)


def p25(q, k, v, m):
    return _t5(q, k, v, m, drop=True, ret_kv=False, with_mask=True, double_cast=False)


def p26(q, k, v, m):
    return _t5(q, k, v, m, drop=True, ret_kv=True, with_mask=True, double_cast=False)


def p27(q, k, v):
    return _t5(q, k, v, None, drop=True, ret_kv=True, with_mask=False, double_cast=False)


def p28(q, k, v):  # pattern 4 on non-contiguous q, k, v (Visformer)
    return p4(q, k, v)


def _math_sdpa(q, k, v, m):  # the decomposition of SDPA's math path: sqrt scale on q and k, _safe_softmax
    q, k, v = _perm(q), _perm(k), _perm(v)
    r = (1 / INV) ** 0.5
    s = aten.mul.Scalar(q, r) @ aten.mul.Scalar(k.transpose(-2, -1), r)
    if m is not None:
        s = s + m
    return aten._safe_softmax(s, -1) @ v


def p29(q, k, v, m):
    return _math_sdpa(q, k, v, m)


def p30(q, k, v):
    return _math_sdpa(q, k, v, None)


# inputs: g = (B, H, L, D) generic; gp = (B, L, H, D) for patterns that permute; gn = non-contiguous; g3 = 3-d
CASES = {
    1: (p1, "g", [], "none"), 2: (p2, "g", [], "none"), 3: (p3, "g", [], "none"), 4: (p4, "g", [], "none"),
    5: (p5, "g", ["b"], "additive"), 6: (p6, "g", ["b"], "additive"), 7: (p7, "gp", [], "none"),
    8: (p8, "gp", [], "none"), 9: (p9, "gp", [], "none"), 10: (p10, "gp", [], "none"), 11: (p11, "gp", [], "none"),
    12: (p12, "gp", [], "none"), 13: (p13, "g3", [], "none"), 14: (p14, "gp", ["b"], "additive"),
    15: (p15, "gp", ["m2"], "key_padding"), 16: (p16, "gp", ["b"], "additive"),
    17: (p17, "gp", ["m2"], "key_padding"), 18: (p18, "gp", ["causal"], "additive"),
    19: (p19, "g", ["causal", "b"], "additive"), 20: (p20, "gp", ["m2"], "key_padding"),
    21: (p21, "gp", ["b"], "additive"), 22: (p22, "gp", ["b"], "additive"), 23: (p23, "gp", [], "none"),
    24: (p24, "g", ["b"], "additive"), 25: (p25, "gp", ["b"], "additive"), 26: (p26, "gp", ["b"], "additive"),
    27: (p27, "gp", [], "none"), 28: (p28, "gn", [], "none"), 29: (p29, "gp", ["b"], "additive"),
    30: (p30, "gp", [], "none"),
}


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        out = self.fn(*args)
        return out[0] + 0 * (out[1].sum() + out[2].sum()) if isinstance(out, tuple) else out


def _inputs(kind: str, extra: list, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    B, H, L, D = 2, 4, 8, 16
    if kind == "g":
        qkv = [torch.randn(B, H, L, D, generator=g) for _ in range(3)]
    elif kind == "gp":
        qkv = [torch.randn(B, L, H, D, generator=g) for _ in range(3)]
    elif kind == "gn":
        qkv = [torch.randn(B, H, D, L, generator=g).transpose(-2, -1) for _ in range(3)]
    else:
        qkv = [torch.randn(B * H, L, D, generator=g) for _ in range(3)]
    qkv = [t.to(dtype).requires_grad_() for t in qkv]
    masks = []
    for e in extra:
        if e == "b":
            masks.append(torch.randn(B, 1, L, L, generator=g))
        elif e == "m2":
            m = (torch.rand(B, L, generator=g) > 0.3).float()
            m[:, 0] = 1.0
            masks.append(m)
        elif e == "causal":
            masks.append(torch.ones(L, L, dtype=torch.bool).tril().view(1, 1, L, L))
    return (*qkv, *masks)


@pytest.mark.parametrize("number", sorted(CASES), ids=[f"sfdp_pattern_{i}" for i in sorted(CASES)])
def test_inductor_pattern_found(number):
    fn, kind, extra, mask_kind = CASES[number]
    # patterns 7-10 cast the weights to float16 themselves: they are the float16 models' spelling
    dtype = torch.float16 if number in (7, 8, 9, 10) else torch.float32
    sites = check_model(_Wrap(fn), _inputs(kind, extra, dtype))
    assert len(sites) == 1, [s.reason for s in sites]
    (site,) = sites
    assert site.decision == "rewritten", site.reason
    assert site.record.mask_kind == mask_kind
    assert torch._dynamo.utils.counters["hhfft"]["attention_rewritten"] == 1
