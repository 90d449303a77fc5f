"""passes.attention on whole models: HF transformers BERT / GPT-2 / Llama (tiny random configs), dynamic sequence
length, a 48-layer stack (the pass is linear in graph size), and full Inductor compiles."""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.nn as nn

from test_attention_spellings import (
    LeanStack,
    Spec,
    Stack,
    assert_close_rule,
    attention_sites,
    check_model,
    compile_eager,
    make_inputs,
)

transformers = pytest.importorskip("transformers")  # a test extra (pyproject: [test])


def _hf(which: str, impl: str, layers: int = 2):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if which == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=4, vocab_size=50, n_positions=64,
                                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_implementation=impl)
        model = transformers.GPT2Model(cfg)
    elif which == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=50,
                                       attn_implementation=impl)
        model = transformers.LlamaModel(cfg)
    else:
        cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=50, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, attn_implementation=impl)
        model = transformers.BertModel(cfg)
    return model.eval()


class _Hidden(nn.Module):
    """HF model -> last_hidden_state, fed with embeddings (so gradients reach an input too)."""

    def __init__(self, model: nn.Module, causal_lm: bool, pad: bool = True) -> None:
        super().__init__()
        self.model, self.causal_lm, self.pad = model, causal_lm, pad

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kw = {"use_cache": False} if self.causal_lm else {}
        mask = mask if self.pad else None  # no attention_mask at all: nothing to prove about padding
        return self.model(inputs_embeds=embeds, attention_mask=mask, **kw).last_hidden_state


EXPECT = {  # (model, padding) -> mask kind of every site
    ("bert", False): "none", ("bert", True): "key_padding",
    ("gpt2", False): "causal", ("gpt2", True): "causal+key_padding",
    ("llama", False): "causal", ("llama", True): "causal+key_padding",
}


def _mask(batch: int, length: int, pad: bool) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[1, length - 2:] = 0  # right padding: every query row keeps at least one key
    return mask


@pytest.mark.parametrize("pad", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("which", ["bert", "gpt2", "llama"])
def test_hf_eager_attention_found_and_equal(which, pad):
    model = _Hidden(_hf(which, "eager"), which != "bert", pad)
    embeds = torch.randn(2, 7, 32, requires_grad=True)
    sites = check_model(model, (embeds, _mask(2, 7, pad)))
    assert len(sites) == 2, [s.reason for s in sites]  # one per layer
    for layer, site in enumerate(sites):
        assert site.decision == "rewritten", site.reason
        assert site.record.mask_kind == EXPECT[(which, pad)], (layer, site.record.mask_kind)
        assert f".{layer}." in site.module_path + "."
        if which == "llama":
            assert site.record.heads == 4 and site.record.kv_heads == 2 and site.record.gqa == "expand_reshape"
        if EXPECT[(which, pad)] == "causal":
            assert site.record.sdpa.kwargs["is_causal"] is True and site.record.sdpa.kwargs["attn_mask"] is None
        if pad:
            assert site.record.key_padding, "the key-padding mask node is recorded for the linearize pass"


@pytest.mark.parametrize("pad", [False, True], ids=["no-padding", "padding"])
@pytest.mark.parametrize("which", ["bert", "gpt2", "llama"])
def test_hf_sdpa_attention_recorded(which, pad):
    model = _Hidden(_hf(which, "sdpa"), which != "bert", pad)
    embeds = torch.randn(2, 7, 32)
    mask = _mask(2, 7, pad)
    compiled, reports = compile_eager(model)
    torch.testing.assert_close(compiled(embeds, mask), model(embeds, mask))
    sites = attention_sites(reports)
    assert len(sites) == 2 and all(s.decision == "kept" and s.spelling == "sdpa" for s in sites)
    assert [s.record.mask_kind for s in sites] == [EXPECT[(which, pad)]] * 2


def test_dynamic_length_causal_proved_once_for_three_lengths():
    """GPT-2 builds its causal mask from aranges of the (symbolic) length: still proved causal, one compile."""
    model = _Hidden(_hf("gpt2", "eager"), True, pad=False)
    compiled, reports = compile_eager(model)
    for length in (5, 8, 11):
        embeds = torch.randn(2, length, 32)
        mask = _mask(2, length, False)
        torch._dynamo.mark_dynamic(embeds, 1)
        torch._dynamo.mark_dynamic(mask, 1)
        torch.testing.assert_close(compiled(embeds, mask), model(embeds, mask))
    assert len(reports) == 1, "one compile serves the three lengths"
    sites = attention_sites(reports)
    assert len(sites) == 2 and all(s.decision == "rewritten" for s in sites)
    assert all(s.record.mask_kind == "causal" and s.record.sdpa.kwargs["is_causal"] for s in sites)
    assert isinstance(sites[0].record.q_len, torch.SymInt)


def test_dynamic_length_grammar_masks():
    """Masks built from aranges/tril of a symbolic length in the spelling grammar: causal and causal+key padding."""
    torch.manual_seed(0)
    model = Stack([Spec(mask="causal_arange"), Spec(mask="causal_tril"), Spec(mask="causal_keypad")])
    compiled, reports = compile_eager(model)
    for length in (5, 6, 9):
        x, amask, kpad = make_inputs(length=length)
        for t, d in ((x, 1), (amask, 2), (amask, 3), (kpad, 1)):
            torch._dynamo.mark_dynamic(t, d)
        torch.testing.assert_close(compiled(x, amask, kpad), model(x, amask, kpad))
    assert len(reports) == 1
    kinds = [s.record.mask_kind for s in attention_sites(reports)]
    assert kinds == ["causal", "causal", "causal+key_padding"]


def test_pass_is_linear_in_graph_size():
    """48 stacked attention layers: the pass runs in well under a second per layer (and finds all 48)."""
    from hhfft.lowering.backend import Options
    from hhfft.passes import attention
    from hhfft.passes.report import Report

    torch.manual_seed(0)
    layers = 48
    model = LeanStack([Spec(mask="causal_keypad", heads=1, kv_heads=1, head_dim=4)] * layers)
    timing = {}

    def backend(gm, example_inputs):
        report = Report()
        t0 = time.perf_counter()
        attention.run(gm, Options(compiler="eager"), report)
        timing["s"] = time.perf_counter() - t0
        timing["n"] = report.count("attention", "rewritten")
        gm.recompile()
        return gm.forward

    x, amask, kpad = make_inputs(dim=LeanStack.width, length=5)
    out = torch.compile(model, backend=backend)(x, amask, kpad)
    ref = copy.deepcopy(model).double()(x.double(), amask.double(), kpad)
    assert_close_rule(out, model(x, amask, kpad), ref, "48-layer output")
    assert timing["n"] == layers
    per_layer = timing["s"] / layers
    assert per_layer < 0.1, f"{per_layer * 1e3:.1f} ms per layer"


def test_inductor_full_compile_gpt2_padding():
    """The default compiler (Inductor) on the rewritten graph, inference: equal to eager."""
    model = _Hidden(_hf("gpt2", "eager", layers=1), True)
    embeds = torch.randn(2, 7, 32)
    with torch.no_grad():
        (site,) = check_model(model, (embeds, _mask(2, 7, True)), grads=False, compiler="inductor")
    assert site.decision == "rewritten" and site.record.mask_kind == "causal+key_padding"


def test_inductor_full_compile_backward():
    """Inductor, forward and backward, on a grammar block with GQA and a built causal mask."""
    torch.manual_seed(0)
    model = Stack([Spec(product="einsum_bqhd", mask="causal_keypad", gqa="repeat_interleave", heads=4, kv_heads=2)])
    (site,) = check_model(model, make_inputs(), compiler="inductor")
    assert site.decision == "rewritten" and site.record.gqa == "repeat_interleave"
