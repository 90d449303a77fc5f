"""Conversion to the hybrids: a softmax window (``HedgehogConfig(window=w)``, LoLCATs) or attention sinks
(``HedgehogConfig(sinks=n)``). The converted site computes ``hedgehog_window_attention`` or
``hedgehog_sink_attention`` on the model's own q, k, v (eager and compiled, bidirectional with key padding and
causal); a window or sinks covering the sequence give the original model; the extra weights (the mixing logit, the
log-normaliser) are saved and distilled; decoding refuses both, and a config refuses them together."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hhfft.convert import HedgehogConfig, convert, distill, hedgehog_sites, load_converted, save_converted
from hhfft.lowering.sink_attention import hedgehog_sink_attention
from hhfft.lowering.window_attention import hedgehog_window_attention
from hhfft.models.gpt import GPT, GPTConfig


class Encoder(nn.Module):
    """Bidirectional attention with a key-padding mask, as BERT spells it through SDPA (scale given)."""

    def __init__(self, d=16, h=4):
        super().__init__()
        self.h, self.dh = h, d // h
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def qkv_heads(self, x):
        B, L, _ = x.shape
        return self.qkv(x).view(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)

    def forward(self, x, keep):
        q, k, v = self.qkv_heads(x)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=0.4)
        return self.out(o.transpose(1, 2).flatten(2))


def _inputs(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, L - 3:] = False
    return torch.randn(2, L, 16, generator=g, dtype=torch.float64), keep


# (config, report text, extra parameter, the hybrid's attention on the owner's q, k, v and key mask)
HYBRIDS = {
    "window": (dict(window=5), "softmax window 5", "mix",
               lambda hh, q, k, v, keep: hedgehog_window_attention(
                   q, k, v, hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias, hh.mix, window=5,
                   causal=False, key_mask=keep, scale=0.4)),
    "sinks": (dict(sinks=2), "2 softmax sink(s)", "lse",
              lambda hh, q, k, v, keep: hedgehog_sink_attention(
                  q, k, v, hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias, hh.lse, sinks=2,
                  causal=False, key_mask=keep, scale=0.4)),
}


@pytest.mark.parametrize("hybrid", HYBRIDS)
def test_bidirectional_site_with_key_padding_is_the_hybrid_eager_and_compiled(hybrid):
    config, reason, _, attention = HYBRIDS[hybrid]
    torch.manual_seed(0)
    enc = Encoder().double()
    x, keep = _inputs(80)
    report = convert(enc, (x, keep), HedgehogConfig(**config))
    assert report.count("hedgehog", "rewritten") == 1, str(report)
    assert reason in report.sites[0].reason
    hh = enc.hedgehog
    with torch.no_grad():
        for p in hh.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for L in (80, 23, 150):  # other lengths: dynamic shapes
        x, keep = _inputs(L, seed=L)
        want = enc.out(attention(hh, *enc.qkv_heads(x), keep).transpose(1, 2).flatten(2))
        out = enc(x, keep)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        comp = torch.compile(enc, backend="hhfft", options={"compiler": "eager"})(x, keep)
        torch.testing.assert_close(comp, out, rtol=1e-12, atol=1e-12)


def _gpt(L=40):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=L)).double(), torch.randint(0, 256, (2, L))


def test_a_window_as_long_as_the_sequence_is_the_original_model_and_a_shorter_one_is_not():
    model, x = _gpt()
    with torch.no_grad():
        softmax = model(x)
    convert(model, (x,), HedgehogConfig(window=x.shape[1]))
    with torch.no_grad():
        for mix in (0.0, -3.0):  # every key is in the window: no linear terms, so the share f cancels
            for *_, hh in hedgehog_sites(model):
                hh.mix.fill_(mix)
            torch.testing.assert_close(model(x), softmax, rtol=1e-12, atol=1e-12)
        short = x[:, :x.shape[1] // 2]  # a shorter sequence too (window > L)
        torch.testing.assert_close(model(short), softmax[:, :short.shape[1]], rtol=1e-12, atol=1e-12)
    other, _ = _gpt()
    convert(other, (x,), HedgehogConfig(window=x.shape[1] - 5))
    with torch.no_grad():
        out = other(x)
    # the first L - 5 positions see only keys within the window; the last 5 also see linear terms
    torch.testing.assert_close(out[:, :-5], softmax[:, :-5], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, -5:], softmax[:, -5:], atol=1e-4)


def test_sinks_covering_the_sequence_are_the_original_model_and_fewer_are_not():
    model, x = _gpt()
    with torch.no_grad():
        softmax = model(x)
    convert(model, (x,), HedgehogConfig(sinks=x.shape[1]))
    with torch.no_grad():
        for bias in (0.0, 5.0):  # no linear keys: the log-normaliser has nothing to weigh
            for *_, hh in hedgehog_sites(model):
                hh.lse.fill_(bias)
            torch.testing.assert_close(model(x), softmax, rtol=1e-12, atol=1e-12)
    other, _ = _gpt()
    convert(other, (x,), HedgehogConfig(sinks=x.shape[1] - 5))
    with torch.no_grad():
        out = other(x)
    # causal: the first L - 5 positions see only sinks; the last 5 also see linear terms
    torch.testing.assert_close(out[:, :-5], softmax[:, :-5], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, -5:], softmax[:, -5:], atol=1e-4)


@pytest.mark.parametrize("hybrid", HYBRIDS)
def test_the_extra_parameter_is_distilled_saved_and_loaded(hybrid, tmp_path):
    config, _, extra, _ = HYBRIDS[hybrid]
    model, x = _gpt()
    fresh, _ = _gpt()
    before = set(model.state_dict())
    convert(model, (x,), HedgehogConfig(**config, feature_dim=8))
    assert sorted(set(model.state_dict()) - before) == sorted(
        f"blocks.{i}.attn.hedgehog.{k}" for i in range(2)
        for k in (extra, "q_map.weight", "q_map.bias", "k_map.weight", "k_map.bias"))
    res = distill(model, [(x,)], steps=15, lr=2e-2, stream=None)
    assert all(res.after[s] < res.before[s] for s in res.before), str(res)
    assert all(getattr(hh, extra).abs().sum() > 0 for *_, hh in hedgehog_sites(model))  # it learns too
    with torch.no_grad():
        out = model(x)
    manifest = save_converted(model, str(tmp_path))
    (name, value), = config.items()
    assert manifest["config"][name] == value and all(s[name] == value for s in manifest["sites"])
    load_converted(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


@pytest.mark.parametrize("hybrid, match", [("window", "sliding-window hybrid .*use_cache=False"),
                                           ("sinks", "softmax sink.*use_cache=False")])
def test_decoding_with_a_constant_state_cache_refuses_the_hybrids(hybrid, match):
    transformers = pytest.importorskip("transformers")
    from hhfft.convert.decode import HedgehogCache

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    convert(model, {"input_ids": torch.randint(0, 64, (1, 9)), "use_cache": False},
            HedgehogConfig(**HYBRIDS[hybrid][0]))
    with pytest.raises(ValueError, match=match):
        HedgehogCache(model)


@pytest.mark.parametrize("kw, match", [
    (dict(window=-1), "window must be an int >= 0"),
    (dict(window=True), "window must be an int >= 0"),
    (dict(window=2.0), "window must be an int >= 0"),
    (dict(sinks=-1), "sinks must be an int >= 0"),
    (dict(sinks=True), "sinks must be an int >= 0"),
    (dict(sinks=1, window=4), "a softmax window \\(4\\) and attention sinks \\(1\\) together are not supported"),
])
def test_bad_windows_and_sinks_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        HedgehogConfig(**kw)
