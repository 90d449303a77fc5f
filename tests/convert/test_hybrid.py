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


def test_bidirectional_site_with_key_padding_is_the_window_hybrid_eager_and_compiled():
    torch.manual_seed(0)
    enc = Encoder().double()
    x, keep = _inputs(80)
    report = convert(enc, (x, keep), HedgehogConfig(window=5))
    assert report.count("hedgehog", "rewritten") == 1, str(report)
    assert "softmax window 5" in report.sites[0].reason
    hh = enc.hedgehog
    with torch.no_grad():
        for p in hh.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for L in (80, 23, 150):  # other lengths: dynamic shapes
        x, keep = _inputs(L, seed=L)
        q, k, v = enc.qkv_heads(x)
        o = hedgehog_window_attention(q, k, v, hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias,
                                      hh.mix, window=5, causal=False, key_mask=keep, scale=0.4)
        want = enc.out(o.transpose(1, 2).flatten(2))
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


def test_the_mix_is_distilled_saved_and_loaded(tmp_path):
    model, x = _gpt()
    fresh, _ = _gpt()
    before = set(model.state_dict())
    convert(model, (x,), HedgehogConfig(window=8, feature_dim=8))
    assert sorted(set(model.state_dict()) - before) == sorted(
        f"blocks.{i}.attn.hedgehog.{k}" for i in range(2)
        for k in ("mix", "q_map.weight", "q_map.bias", "k_map.weight", "k_map.bias"))
    res = distill(model, [(x,)], steps=15, lr=2e-2, stream=None)
    assert all(res.after[s] < res.before[s] for s in res.before), str(res)
    assert all(hh.mix.abs().sum() > 0 for *_, hh in hedgehog_sites(model))  # the mixing weight learns too
    with torch.no_grad():
        out = model(x)
    manifest = save_converted(model, str(tmp_path))
    assert manifest["config"]["window"] == 8 and all(s["window"] == 8 for s in manifest["sites"])
    load_converted(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_decoding_with_a_constant_state_cache_refuses_a_window():
    transformers = pytest.importorskip("transformers")
    from hhfft.convert.decode import HedgehogCache

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    convert(model, {"input_ids": torch.randint(0, 64, (1, 9)), "use_cache": False}, HedgehogConfig(window=4))
    with pytest.raises(ValueError, match="sliding-window hybrid .*use_cache=False"):
        HedgehogCache(model)


@pytest.mark.parametrize("window", [-1, True, 2.0])
def test_a_bad_window_is_refused(window):
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        HedgehogConfig(window=window)


# ------------------------------------------------------------------------------------------------------ sinks
def test_bidirectional_site_with_key_padding_is_the_sink_hybrid_eager_and_compiled():
    torch.manual_seed(0)
    enc = Encoder().double()
    x, keep = _inputs(40)
    report = convert(enc, (x, keep), HedgehogConfig(sinks=2))
    assert report.count("hedgehog", "rewritten") == 1, str(report)
    assert "2 softmax sink(s)" in report.sites[0].reason
    hh = enc.hedgehog
    with torch.no_grad():
        for p in hh.parameters():
            p.add_(0.3 * torch.randn_like(p))
    for L in (40, 23, 90):  # other lengths: dynamic shapes
        x, keep = _inputs(L, seed=L)
        q, k, v = enc.qkv_heads(x)
        o = hedgehog_sink_attention(q, k, v, hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias,
                                    hh.lse, sinks=2, causal=False, key_mask=keep, scale=0.4)
        want = enc.out(o.transpose(1, 2).flatten(2))
        out = enc(x, keep)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        comp = torch.compile(enc, backend="hhfft", options={"compiler": "eager"})(x, keep)
        torch.testing.assert_close(comp, out, rtol=1e-12, atol=1e-12)


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


def test_the_log_normaliser_is_distilled_saved_and_loaded(tmp_path):
    model, x = _gpt()
    fresh, _ = _gpt()
    before = set(model.state_dict())
    convert(model, (x,), HedgehogConfig(sinks=1, feature_dim=8))
    assert sorted(set(model.state_dict()) - before) == sorted(
        f"blocks.{i}.attn.hedgehog.{k}" for i in range(2)
        for k in ("lse", "q_map.weight", "q_map.bias", "k_map.weight", "k_map.bias"))
    res = distill(model, [(x,)], steps=15, lr=2e-2, stream=None)
    assert all(res.after[s] < res.before[s] for s in res.before), str(res)
    assert all(hh.lse.abs().sum() > 0 for *_, hh in hedgehog_sites(model))  # the log-normaliser learns too
    with torch.no_grad():
        out = model(x)
    manifest = save_converted(model, str(tmp_path))
    assert manifest["config"]["sinks"] == 1 and all(s["sinks"] == 1 for s in manifest["sites"])
    load_converted(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_decoding_with_a_constant_state_cache_refuses_sinks():
    transformers = pytest.importorskip("transformers")
    from hhfft.convert.decode import HedgehogCache

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    convert(model, {"input_ids": torch.randint(0, 64, (1, 9)), "use_cache": False}, HedgehogConfig(sinks=1))
    with pytest.raises(ValueError, match="softmax sink.*use_cache=False"):
        HedgehogCache(model)


@pytest.mark.parametrize("kw, match", [
    (dict(sinks=-1), "sinks must be an int >= 0"),
    (dict(sinks=True), "sinks must be an int >= 0"),
    (dict(sinks=1, window=4), "a softmax window \\(4\\) and attention sinks \\(1\\) together are not supported"),
])
def test_bad_sinks_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        HedgehogConfig(**kw)
