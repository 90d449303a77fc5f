"""hhfft::linear_attention on the CPU (plain torch) against the quadratic reference, and its derivatives."""
from __future__ import annotations

import pytest
import torch

import hhfft.lowering.linear_attention as la
from hhfft.kernels.linear_attention.naive import DEN_FLOOR, linear_attention_naive, linear_attention_weights_naive
from hhfft.lowering.linear_attention import linear_attention, linear_attention_product
from utils import linear_features, sharp_features

CASES = [  # (B, Hq, Hkv, L, F, D, masked)
    (2, 2, 2, 1, 4, 3, False),
    (1, 4, 2, 63, 5, 6, True),
    (2, 4, 1, 65, 8, 4, False),
    (1, 2, 2, 130, 6, 7, True),
    (2, 4, 4, 129, 3, 5, True),
]


def _id(c):
    B, Hq, Hkv, L, F, D, m = c
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-L{L}-F{F}-D{D}" + ("-mask" if m else "")


def _inputs(B, Hq, Hkv, L, F, D, masked, dtype=torch.float64, seed=0):
    q, k, v, mask = linear_features(B, Hq, Hkv, L, F, D, masked, seed)
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def assert_within_torch_error(got, ref64, torch_at_dtype, factor=2.0):
    """STYLE.md rule: error vs the fp64 reference at most `factor` x PyTorch's own error at the same dtype (with a
    floor of a few ulps of the output's magnitude, for when PyTorch happens to be exact)."""
    assert not torch.isnan(got).any(), "NaN in output"
    floor = 4 * torch.finfo(got.dtype).eps * ref64.abs().max().item()
    bound = factor * max_err(torch_at_dtype, ref64) + floor
    err = max_err(got, ref64)
    assert err <= bound, f"error {err:.3e} > {factor} x torch's {max_err(torch_at_dtype, ref64):.3e} (+ floor {floor:.1e})"


@pytest.fixture(params=[64, 4], ids=["chunk64", "chunk4"])
def chunk(request, monkeypatch):
    """The CPU form at its real chunk size and at a tiny one, so short sequences cross many chunk boundaries."""
    monkeypatch.setattr(la, "_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward_fp64_matches_naive(case, causal, chunk):
    q, k, v, mask = _inputs(*case)
    got = linear_attention(q, k, v, causal=causal, key_mask=mask)
    want = linear_attention_naive(q, k, v, causal=causal, key_mask=mask)
    assert got.shape == want.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_forward_low_precision_within_torch_error(dtype, causal):
    case = (2, 4, 2, 200, 16, 8, True)
    q, k, v, mask = _inputs(*case, dtype=dtype)
    q64, k64, v64 = q.double(), k.double(), v.double()  # the same rounded inputs, exact maths
    ref = linear_attention_naive(q64, k64, v64, causal=causal, key_mask=mask)
    torch_dt = linear_attention_naive(q, k, v, causal=causal, key_mask=mask)
    got = linear_attention(q, k, v, causal=causal, key_mask=mask)
    assert got.dtype == dtype
    assert_within_torch_error(got, ref, torch_dt)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", CASES[1:4], ids=[_id(c) for c in CASES[1:4]])
def test_first_order_grads_match_naive(case, causal, chunk):
    q, k, v, mask = _inputs(*case)
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=torch.float64)
    grads = []
    for f in (linear_attention, linear_attention_naive):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        f(*x, causal=causal, key_mask=mask).backward(do)
        grads.append([t.grad for t in x])
    for name, got, want in zip("qkv", *grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck_and_gradgradcheck(causal, monkeypatch):
    monkeypatch.setattr(la, "_CHUNK", 2)  # L=7 crosses three chunk boundaries
    q, k, v, mask = _inputs(1, 2, 1, 7, 2, 2, True, seed=1)
    x = [t.requires_grad_() for t in (q, k, v)]

    def f(q, k, v):
        return linear_attention(q, k, v, causal=causal, key_mask=mask)

    assert torch.autograd.gradcheck(f, x)
    assert torch.autograd.gradgradcheck(f, x, fast_mode=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_jvp_and_forward_over_reverse_match_naive(causal, chunk):
    q, k, v, mask = _inputs(1, 4, 2, 11, 3, 2, True, seed=2)
    t = [torch.randn_like(x) for x in (q, k, v)]
    w = torch.randn(1, 4, 11, 2, dtype=torch.float64)

    def loss(f):
        return lambda q, k, v: (f(q, k, v, causal=causal, key_mask=mask) * w).sum()

    for fn in (lambda f: torch.func.jvp(lambda *a: f(*a, causal=causal, key_mask=mask), (q, k, v), tuple(t)),
               lambda f: torch.func.jvp(torch.func.grad(loss(f), argnums=(0, 1, 2)), (q, k, v), tuple(t))):
        got, want = fn(linear_attention), fn(linear_attention_naive)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_near_empty_rows_have_finite_gradients(causal, chunk):
    q, k, v = sharp_features()
    den = linear_attention_weights_naive(q, k, causal=causal).sum(-1)
    assert (den < DEN_FLOOR).any() and (den >= DEN_FLOOR).any(), "the inputs must exercise both sides of the floor"
    do = torch.randn(q.shape[:-1] + v.shape[-1:], generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(f, dtype):
        x = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        o = f(*x, causal=causal)
        o.backward(do.to(dtype))
        return [o] + [t.grad for t in x]

    want = run(linear_attention_naive, torch.float64)
    base32 = run(linear_attention_naive, torch.float32)
    for dtype in (torch.float64, torch.float32):  # fp32: the denominators underflow; without the floor, NaN
        got = run(linear_attention, dtype)
        assert all(torch.isfinite(t).all() for t in got)
        if dtype == torch.float32:
            assert_within_torch_error(got[0], want[0], base32[0])
        for name, g, ref in zip(("o", "dq", "dk", "dv"), got, want):
            # normwise, at the conditioning of the problem: rows just above the floor divide by den ~ DEN_FLOOR,
            # which scales rounding by up to 1 / DEN_FLOOR (the state form's g.v - g.o cancellation, fp32 chunks).
            # A wrong floor rule is off by orders of magnitude.
            err = ((g.double() - ref).norm() / ref.norm()).item()
            assert err <= torch.finfo(dtype).eps / DEN_FLOOR, f"{name} {dtype}: {err:.2e}"


@pytest.mark.parametrize("mode", ["causal", "anticausal", "full"])
@pytest.mark.parametrize("heads", [(4, 2), (2, 4), (3, 3)], ids=["Ha4-Hb2", "Ha2-Hb4", "Ha3-Hb3"])
def test_product_primitive(mode, heads, chunk):
    Ha, Hb = heads
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, Ha, 13, 3, generator=g, dtype=torch.float64)
    b = torch.randn(2, Hb, 13, 3, generator=g, dtype=torch.float64)
    c = torch.randn(2, Hb, 13, 4, generator=g, dtype=torch.float64)
    i, j = torch.arange(13)[:, None], torch.arange(13)[None, :]
    m = {"causal": j <= i, "anticausal": j >= i, "full": torch.ones(13, 13, dtype=torch.bool)}[mode].double()
    if Ha >= Hb:
        bb, cc = b.repeat_interleave(Ha // Hb, 1), c.repeat_interleave(Ha // Hb, 1)
        want = ((a @ bb.transpose(-1, -2)) * m) @ cc
    else:
        aa = a.repeat_interleave(Hb // Ha, 1)
        want = (((aa @ b.transpose(-1, -2)) * m) @ c).reshape(2, Ha, Hb // Ha, 13, 4).sum(2)
    torch.testing.assert_close(linear_attention_product(a, b, c, mode), want)
    x = [t.requires_grad_() for t in (a[:, :, :5, :2].contiguous(), b[:, :, :5, :2].contiguous(), c[:, :, :5, :2].contiguous())]
    assert torch.autograd.gradcheck(lambda *x: linear_attention_product(*x, mode), x, fast_mode=True)


def test_fully_masked_rows_are_zero_and_padding_nan_does_not_leak():
    q, k, v, _ = _inputs(1, 2, 2, 8, 4, 3, False)
    mask = torch.tensor([[False, False, True, True, False, True, True, True]])
    v = v.clone()
    v[:, :, ~mask[0]] = float("nan")
    k = k.clone()
    k[:, :, ~mask[0]] = float("inf")
    o = linear_attention(q, k, v, causal=True, key_mask=mask)
    assert torch.isfinite(o).all()
    assert torch.equal(o[:, :, :2], torch.zeros_like(o[:, :, :2]))
    ref = linear_attention_naive(q, torch.where(mask[:, None, :, None], k, 0), torch.where(mask[:, None, :, None], v, 0),
                                 causal=True, key_mask=mask)
    torch.testing.assert_close(o, ref)


def test_errors_say_what_was_expected():
    q, k, v = torch.rand(1, 3, 5, 4), torch.rand(1, 2, 5, 4), torch.randn(1, 2, 5, 2)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):  # was a ZeroDivisionError
        linear_attention(q, k[:, :0], v[:, :0], causal=True)
    from hhfft.lowering.decode import linear_attention_decode
    from hhfft.lowering.linear_attention import linear_attention_step

    S, z = torch.zeros(1, 0, 4, 2), torch.zeros(1, 0, 4)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        linear_attention_decode(q, k[:, :0], v[:, :0], S, z)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        linear_attention_step(q[:, :, 0], k[:, :0, 0], v[:, :0, 0], S, z)
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor \[B, L\]"):
        linear_attention(q[:, :2], k, v, causal=True, key_mask=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="expected phi_q"):
        linear_attention(q[:, :2], k[..., :3], v, causal=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        linear_attention_product(q, q, q, "tril")
    with pytest.raises(ValueError, match="key_mask is on meta but the inputs on cpu"):
        linear_attention(q[:, :2], k, v, causal=True, key_mask=torch.ones(1, 5, dtype=torch.bool, device="meta"))
    # one decoding step: a head count that does not fit the state broadcast silently (a corrupted state, o of the
    # wrong shape) where the Triton step and linear_attention_decode refuse it
    S, z = torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match=r"state must be \[B, Hkv, F, D\] = \[1, 1, 8, 4\]"):
        la.linear_attention_step(torch.rand(1, 2, 8), torch.rand(1, 1, 8), torch.randn(1, 1, 4), S, z)


def test_hedgehog_padded_keys_nan_stays_out_of_the_map_gradients():
    """The CPU backward of the fused Hedgehog op ran the feature map's backward on padded keys too: NaN there reached
    dWk and dbk through NaN * 0 (the Triton branch promises zero padding's bits)."""
    g = torch.Generator().manual_seed(0)
    xq, xk, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    wq, wk = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    bq, bk = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    keep = torch.tensor([[True, True, False, True, False, False]])
    grads = []
    for pad in (0.0, float("nan")):
        x = xk.clone()
        x[:, :, ~keep[0]] = pad
        args = [t.clone().requires_grad_() for t in (xq, x, v, wq, bq, wk, bk)]
        o = la.hedgehog_linear_attention(*args, causal=True, key_mask=keep)
        o.backward(torch.ones_like(o))
        grads.append([a.grad for a in args[3:]])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_triton_switch(monkeypatch):
    """By default the kernels serve fp16/bf16 and not fp32 (one fp32 GPU case misses the 2x rule);
    HHFFT_LINEAR_ATTENTION_TRITON=1 turns them on for every dtype, 0 off for all; other values are refused with the
    valid ones."""
    half, full = (torch.float16, torch.bfloat16), torch.float32
    monkeypatch.delenv("HHFFT_LINEAR_ATTENTION_TRITON", raising=False)
    assert all(la._triton_enabled(d) for d in half) and not la._triton_enabled(full)
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "1")
    assert all(la._triton_enabled(d) for d in (*half, full))
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "0")
    assert not any(la._triton_enabled(d) for d in (*half, full))
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "yes")
    with pytest.raises(ValueError, match="must be 0 .* or 1"):
        la._triton_enabled(full)


def test_opcheck_every_op():
    q, k, v, mask = _inputs(1, 4, 2, 6, 3, 2, True, dtype=torch.float32)
    o, den = torch.ops.hhfft.linear_attention_fwd(q, k, v, True, mask)
    do, dden = torch.randn_like(o), torch.zeros_like(den)
    for op, args in (
        (torch.ops.hhfft.linear_attention.default, (q, k, v, True, mask)),
        (torch.ops.hhfft.linear_attention_fwd.default, (q, k, v, False, None)),
        (torch.ops.hhfft.linear_attention_bwd.default, (q, k, v, o, den, do, dden, True, mask)),
        (torch.ops.hhfft.linear_attention_product.default, (q, k, v, "anticausal")),
    ):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_aot_autograd_forward_backward_matches_eager():
    """The way the hhfft backend compiles: the pass puts the wrapper into the FX graph and AOTAutograd traces it (Dynamo
    itself does not trace autograd.Functions with a custom jvp). The traced backward is the single fused op."""
    from functorch.compile import aot_function

    q, k, v, mask = _inputs(2, 4, 2, 70, 8, 4, True, dtype=torch.float32)
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    def f(q, k, v, mask):
        return linear_attention(q, k, v, causal=True, key_mask=mask)

    def run(fn):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*x, mask)
        o.square().sum().backward()
        return [o] + [t.grad for t in x]

    want = run(f)
    # By default AOTAutograd traces into a triton_op's body (on the CPU: the plain-torch branch); kept opaque, the
    # graphs show the ops themselves, with the fused first-order backward.
    for decompose in (True, False):
        graphs.clear()
        with torch._functorch.config.patch(decompose_custom_triton_ops=decompose):
            got = run(aot_function(f, fw_compiler=keep, bw_compiler=keep))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    fw, bw = (str(g.code) for g in graphs)
    assert "hhfft.linear_attention_fwd" in fw and "hhfft.linear_attention_bwd" in bw
    assert "linear_attention_product" not in bw


@pytest.mark.parametrize("kind", ["softmax_split", "exp", "joint_softmax"])
def test_hedgehog_attention_ops_cpu_match_composite(kind):
    """The fused op pair's plain-torch branch (what the CPU runs inside hhfft::hedgehog_attention_*) against autograd
    through feature_map + the quadratic reference, fp64."""
    from hhfft.lowering.linear_attention import _HedgehogAttention
    from hhfft.nn import feature_map

    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = [r(2, 4, 21, 6), r(2, 2, 21, 6), r(2, 2, 21, 3), r(4, 6, 5), r(4, 5), r(2, 6, 5), r(2, 5)]
    mask = torch.rand(2, 21, generator=g) > 0.3
    w = r(2, 4, 21, 3)
    xa = [t.clone().requires_grad_() for t in x]
    (_HedgehogAttention.apply(*xa, kind, True, mask)[0] * w).sum().backward()
    xb = [t.clone().requires_grad_() for t in x]
    pq = feature_map(torch.einsum("bhld,hdf->bhlf", xb[0], xb[3]) + xb[4][None, :, None], kind)
    pk = feature_map(torch.einsum("bhld,hdf->bhlf", xb[1], xb[5]) + xb[6][None, :, None], kind)
    (linear_attention_naive(pq, pk, xb[2], causal=True, key_mask=mask) * w).sum().backward()
    for i, (a, b) in enumerate(zip(xa, xb)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"input {i}: {m}")
    args = [t.float() for t in x]
    o, den, *saved = torch.ops.hhfft.hedgehog_attention_fwd(*args, kind, True, mask)
    assert all(t.dim() == 0 for t in saved)  # the CPU branch keeps nothing for its backward
    for op, a in ((torch.ops.hhfft.hedgehog_attention_fwd.default, (*args, kind, False, None)),
                  (torch.ops.hhfft.hedgehog_attention_bwd.default, (*args, o, den, torch.randn_like(o),
                                                                    torch.zeros_like(den), saved, kind, True, mask))):
        torch.library.opcheck(op, a, test_utils=("test_schema", "test_faketensor"))


def test_decoding_steps_equal_the_causal_forward():
    from hhfft.lowering.linear_attention import linear_attention_state, linear_attention_step

    q, k, v, mask = _inputs(2, 4, 2, 9, 5, 3, True)
    want = linear_attention_naive(q, k, v, causal=True, key_mask=mask)
    S, z = linear_attention_state(k[:, :, :4].float(), v[:, :, :4].float(), mask[:, :4])
    S, z = S.double(), z.double()
    with pytest.raises(TypeError, match="must be fp32"):
        linear_attention_step(q[:, :, 4], k[:, :, 4], v[:, :, 4], S, z, mask[:, 4])
    S, z = linear_attention_state(k[:, :, :4], v[:, :, :4], mask[:, :4])
    for t in range(4, 9):
        o = linear_attention_step(q[:, :, t].float(), k[:, :, t].float(), v[:, :, t].float(), S, z, mask[:, t])
        torch.testing.assert_close(o.double(), want[:, :, t], rtol=1e-5, atol=1e-6)
