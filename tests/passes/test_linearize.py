"""The linearize pass on its own: a marker pairs with its owner's SDPA site; unpaired markers, cross-attention and
non-linearizable masks stay softmax and are reported; maps of the wrong shape are refused; no marker survives."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hhfft.convert.modules import HedgehogAttention
from hhfft.lowering.backend import last_report

_OPTS = {"compiler": "eager"}


class Site(nn.Module):
    def __init__(self, heads=2, kv_heads=2, dim=4, index=0, mask=None):
        super().__init__()
        self.hh = HedgehogAttention(heads, kv_heads, dim)
        self.index, self.mask = index, mask
        with torch.no_grad():
            for p in self.hh.parameters():
                p.add_(0.2 * torch.randn_like(p))

    def forward(self, q, k, v):
        hh = self.hh
        torch.ops.hhfft.hedgehog_site(hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias, hh.kind,
                                      self.index)
        if self.mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _qkv(L=6, S=None, h=2, hk=2):
    torch.manual_seed(0)
    return torch.randn(2, h, L, 4), torch.randn(2, hk, S or L, 4), torch.randn(2, hk, S or L, 4)


def _counts():
    return dict(torch._dynamo.utils.counters["hhfft"])


def _hedgehog_rows():
    return [s for s in last_report() if s.kind == "hedgehog"]


def test_marker_pairs_with_sdpa_causal_gqa():
    m = Site(heads=4, kv_heads=2)
    q, k, v = _qkv(h=4, hk=2)
    out = torch.compile(m, backend="hhfft", options=_OPTS)(q, k, v)
    torch.testing.assert_close(out, m.hh(q, k, v, causal=True))
    assert _counts().get("hedgehog_linearized") == 1
    assert _hedgehog_rows()[-1].decision == "rewritten"


def test_key_padding_mask_becomes_key_mask():
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    m = Site(mask=keep[:, None, None, :])
    q, k, v = _qkv()
    out = torch.compile(m, backend="hhfft", options=_OPTS)(q, k, v)
    torch.testing.assert_close(out, m.hh(q, k, v, causal=False, key_mask=keep))


@pytest.mark.parametrize("case", ["unpaired-index", "cross-attention", "additive-mask"])
def test_declined_sites_stay_softmax(case):
    q, k, v = _qkv(S=9 if case == "cross-attention" else None)
    m = Site(index=1) if case == "unpaired-index" else Site(
        mask=torch.randn(1, 1, 6, 6) if case == "additive-mask" else None)
    if case == "cross-attention":
        m.mask = torch.zeros(1, 1, 6, 9)
    out = torch.compile(m, backend="hhfft", options=_OPTS)(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v, **({"is_causal": True} if m.mask is None else {"attn_mask": m.mask}))
    torch.testing.assert_close(out, ref)
    assert _counts().get("hedgehog_skipped") == 1 and "hedgehog_linearized" not in _counts()
    row = _hedgehog_rows()[-1]
    assert row.decision == "skipped" and row.reason


def test_maps_of_the_wrong_shape_are_refused():
    m = Site(heads=3, kv_heads=3)
    q, k, v = _qkv()
    with pytest.raises(Exception, match="feature maps of site 0"):
        torch.compile(m, backend="hhfft", options=_OPTS)(q, k, v)


def test_attention_keep_pairs_no_feature_maps_with_other_sites():
    """options={"attention": "keep"}: a matmul-spelled site gets no SDPA node, so numbering only the SDPA sites gave
    site 1 the feature maps of site 0. Under "keep" every converted site now stays softmax, with the reason."""

    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.hh0, self.hh1 = HedgehogAttention(2, 2, 4), HedgehogAttention(2, 2, 4)
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(0.5 * torch.randn_like(p))

        def forward(self, q, k, v):
            for i, hh in enumerate((self.hh0, self.hh1)):
                torch.ops.hhfft.hedgehog_site(hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias,
                                              hh.kind, i)
            return (q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v, F.scaled_dot_product_attention(q, k, v)

    torch.manual_seed(0)
    m = Owner()
    q, k, v = _qkv()
    a, b = torch.compile(m, backend="hhfft", options={"compiler": "eager"})(q, k, v)
    torch.testing.assert_close(a, m.hh0(q, k, v, causal=False))
    torch.testing.assert_close(b, m.hh1(q, k, v, causal=False))
    torch._dynamo.reset()
    a, b = torch.compile(m, backend="hhfft", options={"compiler": "eager", "attention": "keep"})(q, k, v)
    torch.testing.assert_close(a, (q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v)
    torch.testing.assert_close(b, F.scaled_dot_product_attention(q, k, v))
    reasons = [s.reason for s in last_report().select("hedgehog")][-2:]  # the report keeps both compiles
    assert all("attention='keep'" in r for r in reasons), reasons
