"""Property tests for passes.attention: models drawn from the grammar of attention spellings.

Each drawn model stacks 1-3 attention blocks, each with its own layout (matmul, @, bmm on merged heads, two einsum
layouts), scale placement, mask kind and spelling, softmax spelling/dtype, dropout, GQA ratio and spelling, head
dim, in float32 or float64, at an odd or even sequence length. Compiled with backend="hhfft" (compiler="eager") it
must equal eager (outputs and all gradients, STYLE.md tolerance) and the number of sites found and rewritten must
equal the number of blocks drawn, each with the mask kind drawn. The near-miss grammar draws blocks that are not
exactly SDPA and checks that nothing is rewritten and every site says why.
"""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_attention_spellings import (
    NEAR_MISSES,
    NearMiss,
    Spec,
    attention_sites,
    check_specs,
    compile_eager,
)

PRODUCTS = ["matmul", "at", "bmm", "einsum_bhqd", "einsum_bqhd"]
SCALES = ["mul", "left_mul", "div", "div_sqrt", "q", "split", "none"]
MASKS = ["none", "add", "fill_inf", "fill_min", "where_min", "causal_tril", "causal_arange", "causal_buffer",
         "causal_where", "keypad", "causal_keypad", "keypad_add"]
SOFTMAXES = ["F", "torch", "method", "fp32"]
DROPOUTS = ["none", "eval", "train0"]


@st.composite
def specs(draw):
    gqa = draw(st.sampled_from(["none", "repeat_interleave", "expand"]))
    if gqa == "none":
        heads = kv_heads = draw(st.sampled_from([1, 2, 3]))
    else:
        kv_heads, ratio = draw(st.sampled_from([(1, 2), (1, 3), (2, 2)]))
        heads = kv_heads * ratio
    return Spec(
        product=draw(st.sampled_from(PRODUCTS)),
        scale=draw(st.sampled_from(SCALES)),
        mask=draw(st.sampled_from(MASKS)),
        softmax=draw(st.sampled_from(SOFTMAXES)),
        dropout=draw(st.sampled_from(DROPOUTS)),
        gqa=gqa,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 6, 8])),
    )


@settings(max_examples=300)
@given(
    blocks=st.lists(specs(), min_size=1, max_size=3),
    length=st.integers(1, 9),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_drawn_models_equal_eager_and_every_site_is_found(blocks, length, dtype, seed):
    torch._dynamo.reset()  # a fresh cache per drawn model (Dynamo's recompile limit would fall back to eager)
    torch._dynamo.utils.counters.clear()
    check_specs(blocks, length=length, dtype=dtype, seed=seed, lean=True)
    assert torch._dynamo.utils.counters["hhfft"]["attention_rewritten"] == len(blocks)


@settings(max_examples=40)
@given(kind=st.sampled_from(sorted(NEAR_MISSES)), length=st.integers(2, 9), heads=st.integers(1, 3))
def test_drawn_near_misses_are_not_rewritten(kind, length, heads):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(length * 7 + heads)
    # square (L == D) operands, so even the wrong contractions are valid programs
    q, k, v, other = (torch.randn(2, heads, length, length, generator=g) for _ in range(4))
    m = NearMiss(kind)
    compiled, reports = compile_eager(m)
    torch.testing.assert_close(compiled(q, k, v, other), m(q, k, v, other), equal_nan=True)
    sites = attention_sites(reports)
    assert torch._dynamo.utils.counters["hhfft"]["attention_rewritten"] == 0
    assert len(sites) == 1 and sites[0].decision == "skipped", [(s.decision, s.reason) for s in sites]
    assert NEAR_MISSES[kind] in sites[0].reason, sites[0].reason
