"""The sliding-window hybrid (``HedgehogConfig(window=w)``): the chunked form against the quadratic reference, its
derivatives, its limits (all softmax, all linear) and its use through torch.compile."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hhfft.lowering.window_attention as wa
from hhfft.kernels.linear_attention.naive import linear_attention_naive, window_attention_naive
from hhfft.lowering.linear_attention import _project
from hhfft.lowering.window_attention import hedgehog_window_attention
from hhfft.nn.hedgehog import feature_map

KINDS = ("softmax_split", "exp", "joint_softmax", "elu1", "t2r")


def _inputs(B, Hq, Hkv, L, D, FH, masked, dtype=torch.float64, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = sharp * r(B, Hq, L, D), sharp * r(B, Hkv, L, D), r(B, Hkv, L, D + 1)
    maps = (0.5 * r(Hq, D, FH), 0.1 * r(Hq, FH), 0.5 * r(Hkv, D, FH), 0.1 * r(Hkv, FH))
    mix = r(Hq)
    mask = None
    if masked:
        mask = torch.rand(B, L, generator=g) > 0.3
        mask[:, 0] = True
    return tuple(x.to(dtype) for x in (q, k, v, *maps, mix)), mask


def _naive(q, k, v, wq, bq, wk, bk, mix, kind, window, causal, mask, scale=None, factor=None):
    kk = k if mask is None else torch.where(mask[:, None, :, None], k, 0)
    pq, pk = feature_map(_project(q, wq, bq), kind), feature_map(_project(kk, wk, bk), kind)
    f = torch.sigmoid(mix) if factor is None else factor
    return window_attention_naive(q, k, v, pq, pk, f, window=window, causal=causal, key_mask=mask, scale=scale)


@pytest.fixture(params=[64, 1], ids=["chunk64", "chunk=window"])
def min_chunk(request, monkeypatch):
    """The real chunk floor, and chunks as short as the window (short sequences cross many chunk boundaries)."""
    monkeypatch.setattr(wa, "MIN_CHUNK", request.param)
    return request.param


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), L=st.integers(1, 150),
       D=st.integers(1, 9), FH=st.integers(1, 6), window=st.integers(1, 80), causal=st.booleans(),
       masked=st.booleans(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2 ** 16))
def test_chunked_equals_the_quadratic_reference(B, Hkv, group, L, D, FH, window, causal, masked, kind, seed):
    for floor in (64, 1):  # the real chunks, and chunks as short as the window
        wa.MIN_CHUNK = floor
        try:
            (q, k, v, wq, bq, wk, bk, mix), mask = _inputs(B, Hkv * group, Hkv, L, D, FH, masked, seed=seed)
            got = hedgehog_window_attention(q, k, v, wq, bq, wk, bk, mix, kind=kind, window=window, causal=causal,
                                            key_mask=mask, scale=0.3)
            want = _naive(q, k, v, wq, bq, wk, bk, mix, kind, window, causal, mask, scale=0.3)
            assert got.shape == (B, Hkv * group, L, D + 1) and got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        finally:
            wa.MIN_CHUNK = 64


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_a_window_over_the_whole_sequence_with_all_weight_on_it_is_softmax(causal):
    (q, k, v, wq, bq, wk, bk, mix), mask = _inputs(2, 4, 2, 37, 8, 4, True)
    mix = torch.full_like(mix, 60.0)  # sigmoid(60) == 1 in fp64
    got = hedgehog_window_attention(q, k, v, wq, bq, wk, bk, mix, window=37, causal=causal, key_mask=mask)
    allowed = mask[:, None, None, :] & (torch.ones(37, 37, dtype=torch.bool).tril() if causal else True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=allowed)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_with_no_weight_on_the_window_only_the_keys_outside_it_count(causal, min_chunk):
    (q, k, v, wq, bq, wk, bk, mix), mask = _inputs(1, 2, 2, 90, 6, 5, False)
    w = 7
    got = hedgehog_window_attention(q, k, v, wq, bq, wk, bk, torch.full_like(mix, -60.0), window=w, causal=causal)
    pq, pk = feature_map(_project(q, wq, bq), "softmax_split"), feature_map(_project(k, wk, bk), "softmax_split")
    far = ((torch.arange(90)[:, None] - torch.arange(90)[None, :]).abs() >= w)
    a = (pq @ pk.transpose(-1, -2)) * far * (torch.ones(90, 90).tril() if causal else 1)
    want = (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the near keys are really left out: plain Hedgehog attention over every key differs
    assert not torch.allclose(got, linear_attention_naive(pq, pk, v, causal=causal))


def test_gradients_equal_the_references_and_pass_gradcheck(min_chunk):
    (q, k, v, wq, bq, wk, bk, mix), mask = _inputs(1, 2, 1, 23, 3, 2, True)
    args = [x.requires_grad_() for x in (q, k, v, wq, bq, wk, bk, mix)]
    for causal in (True, False):
        fn = lambda *a: hedgehog_window_attention(*a, window=5, causal=causal, key_mask=mask)  # noqa: E731
        got = torch.autograd.grad(fn(*args).square().sum(), args)
        want = torch.autograd.grad(_naive(*args, "softmax_split", 5, causal, mask).square().sum(), args)
        for name, a, b in zip("q k v wq bq wk bk mix".split(), got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")
        assert torch.autograd.gradcheck(fn, args, atol=1e-7)
        assert torch.autograd.gradcheck(fn, args, atol=1e-7, check_forward_ad=True, check_backward_ad=False,
                                        check_undefined_grad=False, check_batched_grad=False)


def test_fp32_error_is_within_twice_torchs_own():
    (q, k, v, wq, bq, wk, bk, mix), mask = _inputs(2, 4, 2, 200, 16, 8, True, sharp=2.0)
    ref = _naive(q, k, v, wq, bq, wk, bk, mix, "softmax_split", 32, True, mask)
    f32 = [x.float() for x in (q, k, v, wq, bq, wk, bk, mix)]
    torch32 = _naive(*f32, "softmax_split", 32, True, mask)
    got = hedgehog_window_attention(*f32, window=32, causal=True, key_mask=mask)
    assert got.dtype == torch.float32
    err, bound = (got.double() - ref).abs().max().item(), (torch32.double() - ref).abs().max().item()
    assert err <= 2 * bound + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (err, bound)


def test_compiled_with_changing_lengths_equals_eager():
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: hedgehog_window_attention(*a, window=8, causal=True), backend="aot_eager",
                       fullgraph=True)
    for L in (20, 33, 130):
        (q, k, v, wq, bq, wk, bk, mix), _ = _inputs(1, 2, 2, L, 4, 3, False, dtype=torch.float32)
        eager = hedgehog_window_attention(q, k, v, wq, bq, wk, bk, mix, window=8, causal=True)
        torch.testing.assert_close(fn(q, k, v, wq, bq, wk, bk, mix), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(window=0), "window must be an int >= 1"),
    (dict(window=True), "window must be an int >= 1"),
    (dict(mix=torch.zeros(3)), "mix \\[Hq\\]"),
])
def test_bad_arguments_say_what_was_expected(bad, match):
    (q, k, v, wq, bq, wk, bk, mix), _ = _inputs(1, 2, 1, 10, 4, 3, False)
    kw = dict(window=4, mix=mix)
    kw.update(bad)
    mix = kw.pop("mix")
    with pytest.raises(ValueError, match=match):
        hedgehog_window_attention(q, k, v, wq, bq, wk, bk, mix, causal=True, **kw)
