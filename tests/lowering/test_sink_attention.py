"""The sink hybrid (``HedgehogConfig(sinks=n)``): the linear-time form against the quadratic reference, its
derivatives, its limits (all softmax, all linear) and its use through torch.compile."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hhfft.kernels.linear_attention.naive import linear_attention_naive, sink_attention_naive
from hhfft.lowering.linear_attention import _project
from hhfft.lowering.sink_attention import hedgehog_sink_attention
from hhfft.nn.hedgehog import feature_map

KINDS = ("softmax_split", "exp", "joint_softmax", "elu1", "t2r")


def _inputs(B, Hq, Hkv, L, D, FH, masked, dtype=torch.float64, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = sharp * r(B, Hq, L, D), sharp * r(B, Hkv, L, D), r(B, Hkv, L, D + 1)
    maps = (0.5 * r(Hq, D, FH), 0.1 * r(Hq, FH), 0.5 * r(Hkv, D, FH), 0.1 * r(Hkv, FH))
    lse = r(Hq, D + 1)
    mask = None
    if masked:  # the first key masked in some rows too: a sink can be padding (left-padded batches)
        mask = torch.rand(B, L, generator=g) > 0.3
    return tuple(x.to(dtype) for x in (q, k, v, *maps, lse)), mask


def _naive(q, k, v, wq, bq, wk, bk, lse, kind, sinks, causal, mask, scale=None):
    kk = k if mask is None else torch.where(mask[:, None, :, None], k, 0)
    pq, pk = feature_map(_project(q, wq, bq), kind), feature_map(_project(kk, wk, bk), kind)
    return sink_attention_naive(q, k, v, pq, pk, lse, sinks=sinks, causal=causal, key_mask=mask, scale=scale)


@settings(max_examples=80, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), L=st.integers(1, 150),
       D=st.integers(1, 9), FH=st.integers(1, 6), sinks=st.integers(1, 6), causal=st.booleans(),
       masked=st.booleans(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 16))
def test_linear_time_form_equals_the_quadratic_reference(B, Hkv, group, L, D, FH, sinks, causal, masked, kind, seed):
    (q, k, v, wq, bq, wk, bk, lse), mask = _inputs(B, Hkv * group, Hkv, L, D, FH, masked, seed=seed)
    got = hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse, kind=kind, sinks=sinks, causal=causal,
                                  key_mask=mask, scale=0.3)
    want = _naive(q, k, v, wq, bq, wk, bk, lse, kind, sinks, causal, mask, scale=0.3)
    assert got.shape == (B, Hkv * group, L, D + 1) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_sinks_covering_the_sequence_are_softmax(causal):
    (q, k, v, wq, bq, wk, bk, lse), mask = _inputs(2, 4, 2, 37, 8, 4, True)
    mask[:, 0] = True  # SDPA gives NaN for a query that sees no key; the op gives 0
    got = hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse, sinks=40, causal=causal, key_mask=mask)
    allowed = mask[:, None, None, :] & (torch.ones(37, 37, dtype=torch.bool).tril() if causal else True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=allowed)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_the_log_normaliser_moves_the_weight_between_the_sinks_and_the_linear_terms(causal):
    (q, k, v, wq, bq, wk, bk, lse), _ = _inputs(1, 2, 2, 60, 6, 5, False)
    n = 3
    pq, pk = feature_map(_project(q, wq, bq), "softmax_split"), feature_map(_project(k, wk, bk), "softmax_split")
    far = torch.arange(60) >= n
    # a large bias: the linear terms outweigh the sinks by e^60; queries that see no linear key keep the sinks
    got = hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse.index_fill(1, torch.tensor([6]), 60.0), sinks=n,
                                  causal=causal)
    want = linear_attention_naive(pq, pk, v, causal=causal, key_mask=far[None].expand(1, 60))
    lo = n if causal else 0
    torch.testing.assert_close(got[:, :, lo:], want[:, :, lo:], rtol=1e-10, atol=1e-12)
    # a very negative one: softmax over the sinks alone
    got = hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse.index_fill(1, torch.tensor([6]), -60.0), sinks=n,
                                  causal=causal)
    allowed = ~far[None, :] & (torch.ones(60, 60, dtype=torch.bool).tril() if causal else True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradients_equal_the_references_and_pass_gradcheck():
    (q, k, v, wq, bq, wk, bk, lse), mask = _inputs(1, 2, 1, 23, 3, 2, True)
    args = [x.requires_grad_() for x in (q, k, v, wq, bq, wk, bk, lse)]
    for causal in (True, False):
        fn = lambda *a: hedgehog_sink_attention(*a, sinks=2, causal=causal, key_mask=mask)  # noqa: E731
        got = torch.autograd.grad(fn(*args).square().sum(), args)
        want = torch.autograd.grad(_naive(*args, "softmax_split", 2, causal, mask).square().sum(), args)
        for name, a, b in zip("q k v wq bq wk bk lse".split(), got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")
        assert torch.autograd.gradcheck(fn, args, atol=1e-7)
        assert torch.autograd.gradcheck(fn, args, atol=1e-7, check_forward_ad=True, check_backward_ad=False,
                                        check_undefined_grad=False, check_batched_grad=False)


def test_padding_holding_nan_reaches_neither_the_output_nor_the_gradients():
    (q, k, v, wq, bq, wk, bk, lse), mask = _inputs(2, 2, 2, 20, 4, 3, True, seed=3)
    mask[1, :2] = False  # both sinks of the second row are padding
    k, v = (torch.where(mask[:, None, :, None], x, float("nan")) for x in (k, v))
    args = [x.requires_grad_() for x in (q, k, v, wq, bq, wk, bk, lse)]
    o = hedgehog_sink_attention(*args, sinks=2, causal=False, key_mask=mask)
    grads = torch.autograd.grad(o.sum(), args)
    assert torch.isfinite(o).all()
    for name, gr in zip("q k v wq bq wk bk lse".split(), grads):
        assert torch.isfinite(gr).all(), name


def test_fp32_error_is_within_twice_torchs_own():
    (q, k, v, wq, bq, wk, bk, lse), mask = _inputs(2, 4, 2, 200, 16, 8, True, sharp=2.0)
    ref = _naive(q, k, v, wq, bq, wk, bk, lse, "softmax_split", 4, True, mask)
    f32 = [x.float() for x in (q, k, v, wq, bq, wk, bk, lse)]
    torch32 = _naive(*f32, "softmax_split", 4, True, mask)
    got = hedgehog_sink_attention(*f32, sinks=4, causal=True, key_mask=mask)
    assert got.dtype == torch.float32
    err, bound = (got.double() - ref).abs().max().item(), (torch32.double() - ref).abs().max().item()
    assert err <= 2 * bound + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (err, bound)


def test_compiled_with_changing_lengths_equals_eager():
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: hedgehog_sink_attention(*a, sinks=2, causal=True), backend="aot_eager",
                       fullgraph=True)
    for L in (20, 33, 130):
        (q, k, v, wq, bq, wk, bk, lse), _ = _inputs(1, 2, 2, L, 4, 3, False, dtype=torch.float32)
        eager = hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse, sinks=2, causal=True)
        torch.testing.assert_close(fn(q, k, v, wq, bq, wk, bk, lse), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(sinks=0), "sinks must be an int >= 1"),
    (dict(sinks=True), "sinks must be an int >= 1"),
    (dict(lse=torch.zeros(2, 4)), "lse \\[Hq, D \\+ 1\\]"),
])
def test_bad_arguments_say_what_was_expected(bad, match):
    (q, k, v, wq, bq, wk, bk, lse), _ = _inputs(1, 2, 1, 10, 4, 3, False)
    kw = dict(sinks=1, lse=lse)
    kw.update(bad)
    lse = kw.pop("lse")
    with pytest.raises(ValueError, match=match):
        hedgehog_sink_attention(q, k, v, wq, bq, wk, bk, lse, causal=True, **kw)
