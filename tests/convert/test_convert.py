"""hhfft.convert on nn.MultiheadAttention, a hand-written block and tiny random HF BERT / GPT-2 / Llama (eager and
sdpa attention): after conversion the eager forward equals the compiled one and is Hedgehog attention, state_dict
gains only ``...hedgehog...`` keys, save -> load into a fresh model gives identical outputs, and a model that does
not match is refused with a message naming the site."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from hhfft.convert import HedgehogConfig, convert, hedgehog_sites, load_converted, save_converted
from hhfft.lowering.linear_attention import hedgehog_linear_attention

_EAGER_BACKEND = {"compiler": "eager"}  # the outer hhfft backend's passes, without Inductor (fast)


def _compiled(model, options=None):
    return torch.compile(model, backend="hhfft", options=options)


def _new_keys(model, before):
    return sorted(set(model.state_dict()) - set(before))


class Block(nn.Module):
    """Hand-written causal attention with a key-padding mask, spelled with matmul/softmax (no SDPA)."""

    def __init__(self, d=16, h=2):
        super().__init__()
        self.h, self.dh = h, d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, keep):
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        s = s.masked_fill(~causal, float("-inf")).masked_fill(~keep[:, None, None, :], float("-inf"))
        o = torch.softmax(s, -1) @ v
        return self.out(o.transpose(1, 2).reshape(B, L, -1)), (q, k, v)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.block = Block()

    def forward(self, x, keep):
        return self.block(self.emb(x), keep)[0]


def _block_inputs(L=7):
    torch.manual_seed(1)
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, L - 2:] = False
    return torch.randn(2, L, 8), keep


def test_hand_written_block_is_hedgehog_attention_eager_and_compiled(tmp_path):
    torch.manual_seed(0)
    net = Net()
    x, keep = _block_inputs()
    before = net.state_dict()
    ref_softmax = net(x, keep)
    report = convert(net, (x, keep))
    assert report.count("hedgehog", "rewritten") == 1, str(report)
    assert _new_keys(net, before) == [f"block.hedgehog.{m}.{p}" for m in ("k_map", "q_map") for p in ("bias", "weight")]
    with torch.no_grad():  # the maps are not identity for this check: train-like values
        for p in net.block.hedgehog.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = net(x, keep)
    # what the site must compute: the model's own q, k, v through the maps and causal linear attention
    hh = net.block.hedgehog
    _, (q, k, v) = Block.forward(net.block, net.emb(x), keep)
    o = hedgehog_linear_attention(q, k, v, hh.q_map.weight, hh.q_map.bias, hh.k_map.weight, hh.k_map.bias,
                                  causal=True, key_mask=keep)
    want = net.block.out(o.transpose(1, 2).reshape(2, x.shape[1], -1))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, ref_softmax, atol=1e-3)
    torch.testing.assert_close(_compiled(net, _EAGER_BACKEND)(x, keep), out, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["hhfft"]["hedgehog_linearized"] >= 2
    # other lengths (dynamic shapes) keep working
    x2, keep2 = _block_inputs(L=11)
    torch.testing.assert_close(net(x2, keep2), _compiled(net, _EAGER_BACKEND)(x2, keep2), rtol=1e-5, atol=1e-6)
    save_converted(net, str(tmp_path))
    fresh = Net()
    fresh.load_state_dict(before)
    load_converted(fresh, str(tmp_path))
    assert torch.equal(fresh(x, keep), out)


def test_trains_end_to_end_under_inductor():
    torch.manual_seed(0)
    net = Net()
    x, keep = _block_inputs()
    convert(net, (x, keep))
    params = dict(net.named_parameters())
    compiled = _compiled(net)
    loss = compiled(x, keep).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["block.hedgehog.q_map.weight"].abs().sum() > 0 and grads["block.qkv.weight"].abs().sum() > 0
    net.zero_grad()
    net(x, keep).pow(2).mean().backward()  # eager gradients agree
    for n, p in params.items():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    w0 = net.block.hedgehog.k_map.weight.detach().clone()
    opt.step()
    assert not torch.equal(w0, net.block.hedgehog.k_map.weight)
    assert compiled(x, keep).pow(2).mean() < loss


def test_multihead_attention_and_mismatch(tmp_path):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    before = copy.deepcopy(mha.state_dict())
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, -2:] = True  # True = ignore
    report = convert(mha, (x, x, x, kpm, False))
    assert report.count("hedgehog", "rewritten") == 1, str(report)
    assert _new_keys(mha, before) == [f"hedgehog.{m}.{p}" for m in ("k_map", "q_map") for p in ("bias", "weight")]
    out = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    comp = _compiled(mha, _EAGER_BACKEND)(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    torch.testing.assert_close(comp, out, rtol=1e-5, atol=1e-6)
    save_converted(mha, str(tmp_path))
    fresh = nn.MultiheadAttention(16, 4, batch_first=True)
    fresh.load_state_dict(before)
    load_converted(fresh, str(tmp_path))
    assert torch.equal(fresh(x, x, x, key_padding_mask=kpm, need_weights=False)[0], out)
    other = nn.MultiheadAttention(24, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"site '' .*in_proj_weight"):
        load_converted(other, str(tmp_path))


def test_additive_mask_stays_softmax_and_is_reported():
    class Bias(nn.Module):
        def forward(self, q, k, v, bias):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.5 + bias, -1) @ v

    m = Bias()
    q = torch.randn(1, 2, 5, 4)
    bias = torch.randn(1, 2, 5, 5)
    report = convert(m, (q, q, q, bias))
    assert report.count("hedgehog", "skipped") == 1 and "additive" in report.select("hedgehog")[0].reason
    assert not hedgehog_sites(m)


def test_select_sites_by_layer_and_glob():
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 50, (1, 6))
    report = convert(m, (ids,), HedgehogConfig(layers=(-1,), exclude=("*.0.*",)))
    assert [s.decision for s in report.select("hedgehog")] == ["kept", "rewritten"], str(report)
    assert [p for p, *_ in hedgehog_sites(m)] == ["encoder.layer.1.attention.self"]


@pytest.mark.parametrize("config, match", [
    (HedgehogConfig(layers=(2,)), r"layers: \[2\] out of range for 2 .*1: encoder.layer.1.attention.self"),
    (HedgehogConfig(sites=("encoder.layers.*",)), r"'encoder.layers.\*' matches no site"),
])
def test_a_selection_that_selects_nothing_is_refused(config, match):
    """An out-of-range layer index or a glob that matches no site was dropped silently (a typo converted nothing)."""
    from transformers import BertConfig, BertModel

    m = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=32)).eval()
    with pytest.raises(ValueError, match=match):
        convert(m, (torch.randint(0, 50, (1, 6)),), config)
    assert not hedgehog_sites(m)


class BranchyNet(Net):
    def forward(self, x, keep):
        if x.abs().max().item() > 100:  # data-dependent Python control flow: a graph break
            x = x / 100
        return super().forward(x, keep)


def test_a_graph_break_undoes_the_conversion_and_says_why():
    """A converted model runs its forward as one graph; a graph break used to raise from the check at the end of
    convert() with Dynamo's guard message and leave the maps installed, so every later forward raised too."""
    torch.manual_seed(0)
    net = BranchyNet()
    x, keep = _block_inputs()
    want = net(x, keep)
    with pytest.raises(RuntimeError, match="conversion was undone.*graph break"):
        convert(net, (x, keep))
    assert type(net) is BranchyNet and not hedgehog_sites(net)
    assert torch.equal(net(x, keep), want)


def test_a_changed_mask_buffer_raises_in_the_converted_forward():
    """The converted model's own forward checks mask buffers proved from their value, as torch.compile(backend=
    "hhfft") does: a causal tril buffer changed after conversion kept computing causal Hedgehog attention."""
    class Causal(nn.Module):
        def __init__(self, d=16, h=2):
            super().__init__()
            self.h, self.qkv = h, nn.Linear(d, 3 * d)
            self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

        def forward(self, x):
            B, L, d = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            s = (q @ k.transpose(-1, -2)).masked_fill(self.bias[:, :, :L, :L] == 0, float("-inf"))
            return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)

    torch.manual_seed(0)
    m = Causal()
    x = torch.randn(2, 7, 16)
    assert convert(m, (x,)).count("hedgehog", "rewritten") == 1
    m(x)
    m.bias.fill_(1.0)
    with pytest.raises(RuntimeError, match="no longer holds the tril"):
        m(x)


def test_a_site_that_falls_back_to_softmax_warns():
    """An input that makes a converted site's mask unprovable (here an additive float mask instead of the bool key
    padding it was converted with) runs softmax there: no longer silently."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x, mask):
            B, L, _ = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.manual_seed(0)
    m, x = Masked(), torch.randn(2, 6, 16)
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keep[1, ..., -2:] = False
    assert convert(m, (x, keep)).count("hedgehog", "rewritten") == 1
    with pytest.warns(UserWarning, match="computes softmax attention on these inputs: mask is additive"):
        m(x, torch.randn(2, 1, 6, 6))


def test_saved_maps_refuse_a_model_with_other_heads(tmp_path):
    """Parameter shapes alone did not tell 4 heads of 8 from 2 of 16: the owner's int attributes are compared."""
    model, _, _ = _hf("gpt2", "eager")
    ids = torch.randint(0, 64, (1, 6))
    convert(model, (ids,))
    save_converted(model, str(tmp_path))
    import transformers

    other = transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                                           vocab_size=64)).eval()
    with pytest.raises(ValueError, match="site 'h.0.attn' .*num_heads is 2, the checkpoint's 4"):
        load_converted(other, str(tmp_path))
    mode = (tmp_path / "hedgehog.safetensors").stat().st_mode & 0o777
    umask = __import__("os").umask(0)
    __import__("os").umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


# ------------------------------------------------------------------------------------------------------------ HF
def _hf(family, impl, layers=1, hidden=32):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(vocab_size=64, max_position_embeddings=32, attn_implementation=impl)
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                      intermediate_size=48, initializer_range=0.2, **common)
        return transformers.BertModel(cfg).eval(), "encoder.layer.{}.attention.self", False
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=32, bos_token_id=0,
                                      eos_token_id=0, initializer_range=0.2, vocab_size=64, attn_implementation=impl)
        return transformers.GPT2Model(cfg).eval(), "h.{}.attn", True
    cfg = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, initializer_range=0.2, **common)
    return transformers.LlamaModel(cfg).eval(), "layers.{}.self_attn", True


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_hf_models(family, impl, tmp_path):
    model, owner, decoder = _hf(family, impl)
    fresh = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask} | ({"use_cache": False} if decoder else {})
    with torch.no_grad():
        softmax_out = model(**inputs).last_hidden_state
    report = convert(model, inputs)
    assert report.count("hedgehog", "rewritten") == 1, str(report)
    # Llama's 2 kv heads: the k map has 2 heads under sdpa too (HF repeats k, v before its SDPA call when a mask is
    # given; that gave 4 before), so maps made with either implementation load into the other
    (hh,) = [h for *_, h in hedgehog_sites(model)]
    assert hh.describe()["kv_heads"] == (2 if family == "llama" else 4)
    keys = _new_keys(model, before)
    assert keys == [f"{owner.format(0)}.hedgehog.{m}.{p}" for m in ("k_map", "q_map") for p in ("bias", "weight")]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
        comp = _compiled(model, _EAGER_BACKEND)(**inputs).last_hidden_state
    assert torch.isfinite(out).all()
    torch.testing.assert_close(comp, out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], softmax_out[0], atol=1e-4)  # it is not softmax attention any more
    save_converted(model, str(tmp_path))
    load_converted(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, out)
    # a model of another width is refused, naming the site and the first tensor that differs
    other, *_ = _hf(family, impl, hidden=48)
    with pytest.raises(ValueError, match=rf"site '{owner.format(0)}' .*has shape"):
        load_converted(other, str(tmp_path))


class _Outer(nn.Module):
    """An owner whose child owns a site too: the outer owner's state_dict holds the child's maps."""

    def __init__(self):
        super().__init__()
        self.emb, self.block, self.qkv = nn.Linear(8, 16), Block(), nn.Linear(16, 48)

    def forward(self, x, keep):
        h = self.block(self.emb(x), keep)[0]
        B, L, _ = h.shape
        q, k, v = self.qkv(h).view(B, L, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_nested_owners_save_and_load_and_a_failed_load_changes_nothing(tmp_path):
    """The outer owner's recorded state included the child's hedgehog keys, so load_converted refused the very
    model the checkpoint was made for. And a load that failed after the checks left the model half converted."""
    import json

    torch.manual_seed(0)
    model = _Outer()
    fresh = copy.deepcopy(model)
    x, keep = torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    convert(model, (x, keep))
    assert [(p, i) for p, i, *_ in hedgehog_sites(model)] == [("", 0), ("block", 0)]
    save_converted(model, str(tmp_path))
    load_converted(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(x, keep), model(x, keep))

    manifest = tmp_path / "hhfft_manifest.json"
    data = json.loads(manifest.read_text())
    data["sites"][-1]["kind"] = "a-kind-from-a-newer-version"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError):
        load_converted(model, str(tmp_path))
    assert [(p, i) for p, i, *_ in hedgehog_sites(model)] == [("", 0), ("block", 0)]
    with torch.no_grad():
        assert torch.equal(fresh(x, keep), model(x, keep))


def test_converting_a_converted_model_is_refused_until_uninstalled():
    """A second convert mixed two configs (a site of the first reported 'not selected' while converted) and reset
    distilled maps to identity without a word."""
    from hhfft.convert import uninstall

    torch.manual_seed(0)
    model = _Outer()
    x, keep = torch.randn(2, 7, 8), torch.ones(2, 7, dtype=torch.bool)
    convert(model, (x, keep))
    with pytest.raises(ValueError, match=r"already converted \(2 sites\).*uninstall"):
        convert(model, (x, keep), HedgehogConfig(sites=("block",)))
    uninstall(model)
    convert(model, (x, keep), HedgehogConfig(sites=("block",)))
    assert [(p, i) for p, i, *_ in hedgehog_sites(model)] == [("block", 0)]
