"""hhfft::linear_attention on CUDA (the chunked Triton kernels) against an fp64 reference, forward and backward.

Grid: L in {1, 63, 64, 65, 1000, 4096, 32768} x dtype {fp16, bf16, fp32} x {causal, non-causal}; D, F in {32, 64, 128}
and GQA ratio 1/2/4 rotate through the cases, masks on every other case, so each value of each axis meets the
others. Reference: naive.py in fp64 for L <= 4096, the chunked plain-torch form in fp64 above (naive is O(L^2)
memory). Tolerance (STYLE.md): relative error <= 2x PyTorch's own at the input dtype (+ 4 ulp of it), PyTorch's own
being the larger of its two ways to compute the same thing: the chunked state form (the CPU implementation, fp32
maths) that the kernels also compute, and, for L <= 4096, the quadratic form in the input dtype. The first matters
for fp32: there dq/dk carry the cancellation g.v_j - g.o_i, which the state form (fp32 states K^T V) resolves to
~1e-4 relative at L = 1 while the quadratic form can be exact by luck (o = v bitwise); the kernels' error is that of
the state form. Above L = 4096 only the state form is a baseline: for 16-bit inputs that is stricter (fp32 maths).
Every buffer the kernels write starts as NaN and sits inside a larger NaN allocation whose guard regions are checked
after each test (out-of-bounds stores).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import hhfft  # noqa: F401  (registers the ops)
from hhfft.kernels.linear_attention import chunk
from hhfft.kernels.linear_attention.naive import linear_attention_naive, linear_attention_weights_naive
from hhfft.lowering.linear_attention import _bwd_composite, _fwd_torch, _product_torch, linear_attention
from utils import assert_within_baseline, nan_guarded_buffers


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    # By default the op sends only fp16/bf16 CUDA tensors to the kernels; =1 sends fp32 too, so every case tests them.
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "1")


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

LENGTHS = [1, 63, 64, 65, 1000, 4096, 32768]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DIMS = [32, 64, 128]


def _cases():
    """Every (L, dtype, causal); D, F, the GQA ratio and the mask vary with all three indices, so that no value of one
    axis is tied to a value of another (each dtype x causal pair meets every D, F and ratio across the lengths)."""
    out = []
    for (a, L), (b, dtype), (c, causal) in itertools.product(enumerate(LENGTHS), enumerate(DTYPES), enumerate((True, False))):
        D, F, G = DIMS[(a + b) % 3], DIMS[(a + 2 * b + c) % 3], (1, 2, 4)[(2 * a + b + c) % 3]
        masked = (a + b + c) % 2 == 1
        B, Hkv = (2, 2) if L <= 4096 else (1, 1)
        out.append(pytest.param(B, Hkv * G, Hkv, L, F, D, masked, dtype, causal,
                                id=f"B{B}-Hq{Hkv * G}-Hkv{Hkv}-L{L}-F{F}-D{D}{'-mask' if masked else ''}-"
                                   f"{str(dtype)[6:]}-{'causal' if causal else 'full'}"))
    return out


GUARD = 4096  # NaN elements on each side of every buffer the kernels write


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    yield from nan_guarded_buffers(monkeypatch, chunk, GUARD)


def _reference(q, k, v, causal, mask):
    if q.shape[2] <= 4096 or q.dtype != torch.float64:
        o = linear_attention_naive(q, k, v, causal=causal, key_mask=mask)
        den = linear_attention_weights_naive(q, k, causal=causal, key_mask=mask).sum(-1)
        return o, den
    return _fwd_torch(q, k, v, causal, mask)


@pytest.mark.parametrize("B,Hq,Hkv,L,F,D,masked,dtype,causal", _cases())
def test_forward_backward(B, Hq, Hkv, L, F, D, masked, dtype, causal):
    g = torch.Generator(device="cuda").manual_seed(L * 7 + F + D)
    # Hedgehog-like features: positive, rows summing to 2 (two softmax halves)
    feat = lambda H: torch.cat([torch.softmax(x, -1) for x in  # noqa: E731
                                torch.randn(2, B, H, L, F // 2, device="cuda", generator=g).unbind(0)], -1)
    q, k = feat(Hq).to(dtype), feat(Hkv).to(dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda", generator=g).to(dtype)
    mask = (torch.rand(B, L, device="cuda", generator=g) > 0.25) if masked else None
    do = torch.randn(B, Hq, L, D, device="cuda", generator=g).to(dtype)
    dden = torch.zeros(B, Hq, L, device="cuda")
    dden[:, :, ::3] = torch.randn(B, Hq, (L + 2) // 3, device="cuda", generator=g)

    o, den = chunk.linear_attention_fwd(q, k, v, causal, mask)
    dq, dk, dv = chunk.linear_attention_bwd(q, k, v, o, den, do, dden, causal, mask)

    def grads(*x):
        x = [t.detach().clone().requires_grad_() for t in x]
        oo, dd = _reference(*x, causal, mask)
        gr = torch.autograd.grad((oo, dd), x, (do.to(oo.dtype), dden.to(dd.dtype)))
        return (oo.detach(), dd.detach()) + gr

    ref = grads(q.double(), k.double(), v.double())
    o_c, den_c = _fwd_torch(q, k, v, causal, mask)  # the state form in PyTorch (fp32 maths)
    baselines = [(o_c, den_c) + _bwd_composite(q, k, v, o_c, den_c, do, dden, causal, mask, _product_torch)]
    if L <= 4096:  # the quadratic form in the input dtype (above, its L x L matrices cost more than the test is worth)
        baselines.append(grads(q, k, v))
    for i, (name, got) in enumerate(zip(("o", "den", "dq", "dk", "dv"), (o, den, dq, dk, dv))):
        assert_within_baseline(name, got, ref[i], [b[i] for b in baselines], dtype=dtype)


def test_op_dispatches_to_triton_and_matches(monkeypatch, device="cuda"):
    """With the kernels on, the public wrapper on CUDA goes through them (fwd and the fused first-order bwd) and its
    o and gradients are within the STYLE bound of the same op switched off (HHFFT_LINEAR_ATTENTION_TRITON=0: the
    plain-torch state form in fp32, which then must not call the kernels)."""
    calls = []
    for name in ("linear_attention_fwd", "linear_attention_bwd"):
        fn = getattr(chunk, name)
        monkeypatch.setattr(chunk, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    q, k = torch.rand(2, 4, 300, 32, device=device), torch.rand(2, 2, 300, 32, device=device)
    v = torch.randn(2, 2, 300, 64, device=device)
    do = torch.randn(2, 4, 300, 64, device=device)

    def run(f, dtype):
        x = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        o = f(*x, causal=True)
        o.backward(do.to(dtype))
        return [o.detach()] + [t.grad for t in x]

    got = run(linear_attention, torch.float32)
    assert calls == ["linear_attention_fwd", "linear_attention_bwd"]
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "0")
    base = run(linear_attention, torch.float32)
    assert calls == ["linear_attention_fwd", "linear_attention_bwd"], "the kernels ran although switched off"
    ref = run(linear_attention_naive, torch.float64)
    for name, a, r, b in zip(("o", "dq", "dk", "dv"), got, ref, base):
        assert_within_baseline(name, a, r, [b])


FUSED = [  # (B, Hq, Hkv, L, DX, FH, D, masked, dtype, causal, kind)
    (2, 4, 2, 1000, 64, 64, 64, True, torch.bfloat16, True, "softmax_split"),
    (1, 2, 2, 4096, 32, 64, 128, False, torch.float16, True, "exp"),
    (2, 4, 1, 65, 64, 32, 32, True, torch.float32, False, "joint_softmax"),
    (1, 2, 1, 32768, 64, 64, 64, False, torch.bfloat16, True, "softmax_split"),
]


@pytest.mark.parametrize("B,Hq,Hkv,L,DX,FH,D,masked,dtype,causal,kind", [
    pytest.param(*c, marks=[pytest.mark.xdist_group("long")] if c[3] > 4096 else [], id=f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-L{c[3]}-DX{c[4]}-FH{c[5]}-D{c[6]}{'-mask' if c[7] else ''}-"
                       f"{str(c[8])[6:]}-{'causal' if c[9] else 'full'}-{c[10]}") for c in FUSED])
@pytest.mark.parametrize("keep", ["none", "phi", "phi,states"])
def test_fused_feature_map(B, Hq, Hkv, L, DX, FH, D, masked, dtype, causal, kind, keep, monkeypatch):
    """The fused op's kernels against the module path (feature maps, then attention) in fp64, by the default route
    (HHFFT_LA_FUSED=map: feature-map kernels, then the chunk kernels; test_fused_inkernel_route runs the other), the
    backward from what the forward kept (HHFFT_LA_KEEP: nothing, phi, or phi and the chunk states, the default)."""
    from hhfft.nn import feature_map

    g = torch.Generator(device="cuda").manual_seed(L + DX)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    x = [r(B, Hq, L, DX).to(dtype), r(B, Hkv, L, DX).to(dtype), r(B, Hkv, L, D).to(dtype),
         torch.eye(DX, FH, device="cuda").expand(Hq, DX, FH) + 0.1 * r(Hq, DX, FH), 0.1 * r(Hq, FH),
         torch.eye(DX, FH, device="cuda").expand(Hkv, DX, FH) + 0.1 * r(Hkv, DX, FH), 0.1 * r(Hkv, FH)]
    mask = (torch.rand(B, L, device="cuda", generator=g) > 0.25) if masked else None
    monkeypatch.setenv("HHFFT_LA_KEEP", keep)
    o, den, saved = chunk.hedgehog_attention_fwd(*x, kind, causal, mask, keep=True)
    do, dden = r(*o.shape).to(dtype), torch.zeros_like(den)
    got = chunk.hedgehog_attention_bwd(*x, o, den, do, dden, kind, causal, mask, saved)

    def run(xs, low):
        xs = [t.detach().clone().requires_grad_() for t in xs]
        w = [t.to(xs[0].dtype) for t in xs[3:]] if low else xs[3:]
        pq = feature_map(torch.einsum("bhld,hdf->bhlf", xs[0], w[0]) + w[1][None, :, None, :], kind)
        pk = feature_map(torch.einsum("bhld,hdf->bhlf", xs[1], w[2]) + w[3][None, :, None, :], kind)
        oo, dd = _reference(pq, pk, xs[2], causal, mask)
        gr = torch.autograd.grad((oo, dd), xs, (do.to(oo.dtype), dden.to(dd.dtype)))
        return [oo.detach(), dd.detach()] + list(gr)

    ref = run([t.double() for t in x], False)
    base = run(x, True)
    names = ["o", "den", "dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk"]
    for name, a, b, c in zip(names, [o, den] + list(got), ref, base):
        assert_within_baseline(name, a, b, [c], dtype=dtype)


@pytest.mark.parametrize("case", [FUSED[0], FUSED[2]], ids=["bf16-causal-softmax_split", "fp32-full-joint_softmax"])
def test_fused_inkernel_route(case, monkeypatch):
    """HHFFT_LA_FUSED=inkernel (the map inside the chunk kernels; the default route is map + unfused kernels)."""
    monkeypatch.setenv("HHFFT_LA_FUSED", "inkernel")
    test_fused_feature_map(*case, "phi,states", monkeypatch)  # inkernel keeps no phi: the states


@pytest.mark.parametrize("compiled,states,causal", [(False, "", True), (True, "", True), (True, "1", True),
                                                    (True, "1", False)],
                         ids=["eager", "compiled", "compiled-segments", "compiled-segments-full"])
def test_hedgehog_op_takes_the_map_route(compiled, states, causal, monkeypatch):
    """hedgehog_linear_attention on CUDA (bf16, GQA, masked): by default the feature-map kernels then the unfused
    kernels, forward and backward (phi and the chunk states kept from the forward); o and every gradient within the
    STYLE bound of the module path (maps, then linear_attention: the same bf16 phi) against fp64. Compiled: the
    backend's path, where the kept tensors travel from the forward graph to the backward graph (HHFFT_LA_STATES=1:
    with segments, so the carry-in travels too)."""
    from hhfft.lowering.linear_attention import hedgehog_linear_attention

    if states:
        monkeypatch.setenv("HHFFT_LA_STATES", states)
    torch._dynamo.reset()  # the environment is read when tracing

    calls = []
    for name in ("hedgehog_feature_map_fwd", "hedgehog_feature_map_bwd"):
        fn = getattr(chunk, name)
        monkeypatch.setattr(chunk, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    g = torch.Generator(device="cuda").manual_seed(3)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    B, Hq, Hkv, L, DX, FH, D = 2, 4, 2, 700, 64, 64, 64
    x = [r(B, Hq, L, DX), r(B, Hkv, L, DX), r(B, Hkv, L, D), torch.eye(DX, FH, device="cuda").expand(Hq, DX, FH)
         + 0.1 * r(Hq, DX, FH), 0.1 * r(Hq, FH), torch.eye(DX, FH, device="cuda").expand(Hkv, DX, FH)
         + 0.1 * r(Hkv, DX, FH), 0.1 * r(Hkv, FH)]
    mask = torch.rand(B, L, device="cuda", generator=g) > 0.25
    do = r(B, Hq, L, D)

    def run(dtype, fused, compile_=False):
        xs = [t.to(dtype).clone().requires_grad_() if i < 3 else t.to(torch.float64 if dtype == torch.float64
              else torch.float32).clone().requires_grad_() for i, t in enumerate(x)]
        f = lambda *a: hedgehog_linear_attention(*a, kind="softmax_split", causal=causal, key_mask=mask,  # noqa: E731
                                                 fused=fused)
        o = (torch.compile(f) if compile_ else f)(*xs)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [t.grad for t in xs]

    got = run(torch.bfloat16, None, compiled)
    if not compiled:  # the backward takes phi from the forward (HHFFT_LA_KEEP's default): no map forward of its own
        assert calls == ["hedgehog_feature_map_fwd"] * 2 + ["hedgehog_feature_map_bwd"] * 2, calls
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "0")  # the baseline is PyTorch's own computation
    ref = run(torch.float64, False)
    base = run(torch.bfloat16, False)
    for name, a, b, c in zip(["o", "dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk"], got, ref, base):
        assert_within_baseline(name, a, b, [c], dtype=torch.bfloat16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_sink_hybrid_takes_the_fused_kernels(causal, monkeypatch):
    """hedgehog_sink_attention on CUDA (bf16, GQA, masked, 2 sinks): the linear part and its denominator from the
    fused kernels, the denominator's gradient entering their backward; o and every gradient (dlse included) within
    the STYLE bound of the same function with the kernels off, against fp64."""
    from hhfft.lowering.sink_attention import hedgehog_sink_attention

    calls = []
    fn = chunk.hedgehog_attention_bwd
    monkeypatch.setattr(chunk, "hedgehog_attention_bwd", lambda *a, **k: calls.append(1) or fn(*a, **k))
    g = torch.Generator(device="cuda").manual_seed(5)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    B, Hq, Hkv, L, DX, FH, D = 2, 4, 2, 700, 64, 64, 64
    x = [r(B, Hq, L, DX), r(B, Hkv, L, DX), r(B, Hkv, L, D), torch.eye(DX, FH, device="cuda").expand(Hq, DX, FH)
         + 0.1 * r(Hq, DX, FH), 0.1 * r(Hq, FH), torch.eye(DX, FH, device="cuda").expand(Hkv, DX, FH)
         + 0.1 * r(Hkv, DX, FH), 0.1 * r(Hkv, FH), 0.1 * r(Hq, DX + 1) + 4.0]  # lam ~ 4: sinks and linear share
    mask = torch.rand(B, L, device="cuda", generator=g) > 0.25
    mask[1, 0] = False  # one row's first sink is padding
    do = r(B, Hq, L, D)

    def run(dtype):
        xs = [t.to(dtype).clone().requires_grad_() if i < 3 else t.to(torch.float64 if dtype == torch.float64
              else torch.float32).clone().requires_grad_() for i, t in enumerate(x)]
        o = hedgehog_sink_attention(*xs, kind="softmax_split", sinks=2, causal=causal, key_mask=mask)
        o.backward(do.to(o.dtype))
        return [o.detach()] + [t.grad for t in xs]

    got = run(torch.bfloat16)
    assert calls, "the sink hybrid did not run the fused kernels"
    monkeypatch.setenv("HHFFT_LINEAR_ATTENTION_TRITON", "0")  # the baseline is PyTorch's own computation
    ref = run(torch.float64)
    base = run(torch.bfloat16)
    for name, a, b, c in zip(["o", "dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk", "dlse"], got, ref, base):
        assert_within_baseline(name, a, b, [c], dtype=torch.bfloat16)


TF32X3 = [c for c in _cases() if c.values[7] == torch.bfloat16 and c.values[3] in (1, 64, 1000, 32768)]


@pytest.mark.parametrize("B,Hq,Hkv,L,F,D,masked,dtype,causal", TF32X3)
def test_tf32x3_precision_bf16(B, Hq, Hkv, L, F, D, masked, dtype, causal, monkeypatch):
    """HHFFT_LA_PREC=tf32x3 (the opt-out from bf16's default hi + lo split of fp32 operands): same tolerance."""
    monkeypatch.setenv("HHFFT_LA_PREC", "tf32x3")
    test_forward_backward(B, Hq, Hkv, L, F, D, masked, dtype, causal)


def test_tf32x3_precision_fused_bf16(monkeypatch):
    monkeypatch.setenv("HHFFT_LA_PREC", "tf32x3")
    test_fused_feature_map(2, 4, 2, 1000, 64, 64, 64, True, torch.bfloat16, True, "softmax_split", "phi", monkeypatch)


@pytest.mark.parametrize("fused", [False, True], ids=["phi", "fused"])
def test_dk_dv_in_separate_launches(fused, monkeypatch):
    """HHFFT_LA_DKDV=apart: dk and dv by two launches (each with half the registers): same tolerance."""
    monkeypatch.setenv("HHFFT_LA_DKDV", "apart")
    if fused:
        test_fused_feature_map(2, 4, 2, 1000, 64, 64, 64, True, torch.bfloat16, True, "softmax_split", "phi",
                               monkeypatch)
    else:
        test_forward_backward(2, 8, 2, 1000, 128, 64, True, torch.float16, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decoding_step_matches_forward(dtype):
    from hhfft.lowering.linear_attention import linear_attention_state, linear_attention_step

    B, Hq, Hkv, L, F, D = 3, 8, 2, 300, 128, 64
    q, k = torch.rand(B, Hq, L, F, device="cuda").to(dtype), torch.rand(B, Hkv, L, F, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, L, D, device="cuda").to(dtype)
    ref = linear_attention_naive(q.double(), k.double(), v.double(), causal=True)
    base = linear_attention_naive(q, k, v, causal=True)
    S, z = linear_attention_state(k[:, :, :290], v[:, :, :290])
    got = torch.stack([linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], S, z) for t in range(290, 300)], 2)
    assert_within_baseline("o", got, ref[:, :, 290:], [base[:, :, 290:]], dtype=dtype)
