"""The Triton linear-attention kernels through the interpreter (CPU) at tiny shapes, against the fp64 reference.

fp32 and fp16 only: the interpreter's bf16 tl.dot is broken (bf16 runs in tests/gpu). Every buffer the kernels write,
the intermediate states included, starts as NaN.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from hhfft.kernels.linear_attention import chunk
from hhfft.kernels.linear_attention.naive import linear_attention_naive, linear_attention_weights_naive
from hhfft.kernels.linear_attention.naive import DEN_FLOOR
from utils import assert_within_baseline, nan_guarded_buffers, sharp_features

CASES = [  # (B, Hq, Hkv, L, F, D, masked)
    (1, 2, 2, 1, 8, 4, False),
    (1, 2, 1, 63, 16, 8, True),
    (2, 4, 1, 65, 12, 20, True),
    (1, 4, 2, 130, 8, 16, False),
    (2, 8, 2, 64, 64, 32, True),  # one full chunk, GQA 4, masked: failed in bf16 on the H200 (fp16 here)
]


def _id(c):
    B, Hq, Hkv, L, F, D, m = c
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-L{L}-F{F}-D{D}" + ("-mask" if m else "")


GUARD = 256  # NaN elements on each side of every buffer the kernels write; a write outside the buffer shows there


@pytest.fixture(autouse=True)
def _nan_buffers(monkeypatch):
    yield from nan_guarded_buffers(monkeypatch, chunk, GUARD)


def _inputs(B, Hq, Hkv, L, F, D, masked, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, Hq, L, F, generator=g).to(dtype)
    k = torch.rand(B, Hkv, L, F, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, L, generator=g) > 0.3
        mask[:, 1:2] = False  # a fully masked row before the first kept key exists where mask[:, 0] is False too
    return q, k, v, mask


def _reference(q, k, v, causal, mask):
    """(o, den) from the quadratic form, in the inputs' dtype (fp64 for the reference, the kernel's for the baseline)."""
    o = linear_attention_naive(q, k, v, causal=causal, key_mask=mask)
    den = linear_attention_weights_naive(q, k, causal=causal, key_mask=mask).sum(-1)
    return o, den


def _grads(q, k, v, causal, mask, do, dden):
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o, den = _reference(*x, causal, mask)
    torch.autograd.backward((o, den), (do.to(o.dtype), dden.to(den.dtype)))
    return [t.grad for t in x]


# fp32 on the first four cases, fp16 on the first three and the last (the interpreter is slow; the GPU tests cover
# the full grid)
PARAMS = [(c, torch.float32) for c in CASES[:4]] + [(c, torch.float16) for c in CASES[:3] + CASES[4:]]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case,dtype", PARAMS, ids=[f"{_id(c)}-{str(d)[6:]}" for c, d in PARAMS])
def test_forward_and_backward_vs_fp64(case, causal, dtype):
    q, k, v, mask = _inputs(*case, dtype=dtype)
    x64 = [t.double() for t in (q, k, v)]
    o, den = chunk.linear_attention_fwd(q, k, v, causal, mask)
    o64, den64 = _reference(*x64, causal, mask)
    o_dt, den_dt = _reference(q, k, v, causal, mask)
    assert o.dtype == dtype and den.dtype == torch.float32
    assert_within_baseline("o", o, o64, [o_dt])
    assert_within_baseline("den", den, den64, [den_dt], dtype=dtype)

    g = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=g).to(dtype)
    dden = torch.randn(den.shape, generator=g)
    grads = chunk.linear_attention_bwd(q, k, v, o, den, do, dden, causal, mask)
    want = _grads(*x64, causal, mask, do.double(), dden.double())
    base = _grads(q, k, v, causal, mask, do, dden)
    for name, got, ref, b in zip(("dq", "dk", "dv"), grads, want, base):
        assert got.dtype == dtype
        assert_within_baseline(name, got, ref, [b])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_near_empty_rows_have_finite_gradients(causal):
    """Rows whose denominator underflows (near one-hot features) give finite outputs and gradients, as naive.py's
    floor defines them; L = 130 crosses chunk boundaries, so the state path sees them too."""
    q64, k64, v64 = sharp_features(L=130)
    mask = torch.zeros(1, 130, dtype=torch.bool)
    mask[:, ::40] = True  # 4 visible keys: many queries meet none of their features
    den = linear_attention_weights_naive(q64, k64, causal=causal, key_mask=mask).sum(-1)
    assert (den < DEN_FLOOR).any() and (den >= DEN_FLOOR).any(), "the inputs must exercise both sides of the floor"
    q, k, v = (t.float() for t in (q64, k64, v64))
    o, den32 = chunk.linear_attention_fwd(q, k, v, causal, mask)
    assert_within_baseline("o", o, _reference(q64, k64, v64, causal, mask)[0], [_reference(q, k, v, causal, mask)[0]])
    g = torch.Generator().manual_seed(1)
    do, dden = torch.randn(o.shape, generator=g), torch.zeros(den32.shape)
    grads = chunk.linear_attention_bwd(q, k, v, o, den32, do, dden, causal, mask)
    want = _grads(q64, k64, v64, causal, mask, do.double(), dden.double())
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert torch.isfinite(got).all(), name
        # normwise at the problem's conditioning (rows just above the floor divide by ~DEN_FLOOR); a wrong floor
        # rule is off by orders of magnitude
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err <= torch.finfo(torch.float32).eps / DEN_FLOOR, f"{name}: {err:.2e}"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_near_empty_rows_fp16_dv(causal):
    """fp16: dv = sum_i (A_ij / den_i) dO_i stays in range however small den is (dq and dk of a near-empty row are
    ~1 / DEN_FLOOR times larger and genuinely exceed fp16's range, in the plain-torch path too)."""
    q64, k64, v64 = sharp_features(L=130)
    mask = torch.zeros(1, 130, dtype=torch.bool)
    mask[:, ::40] = True
    q, k, v = (t.half() for t in (q64, k64, v64))
    o, den = chunk.linear_attention_fwd(q, k, v, causal, mask)
    g = torch.Generator().manual_seed(1)
    do, dden = torch.randn(o.shape, generator=g).half(), torch.zeros(den.shape)
    dv = chunk.linear_attention_bwd(q, k, v, o, den, do, dden, causal, mask)[2]
    want = _grads(q64, k64, v64, causal, mask, do.double(), dden.double())[2]
    base = _grads(q, k, v, causal, mask, do, dden)[2]
    assert torch.isfinite(dv).all()
    assert_within_baseline("dv", dv, want, [base])


@pytest.mark.parametrize("seed", [1, 9])
def test_single_token_fp16_causal_dq(seed):
    """At L = 1, o = v and the exact dq is dden * phi_k (the do terms cancel). The causal forward multiplied v by the
    chunk's weights rounded to fp16 but divided by the sum of the unrounded ones, so o != v and dq lost the
    cancellation (errors up to 236x PyTorch's; these seeds failed)."""
    g = torch.Generator().manual_seed(seed)
    q64, k64 = (torch.softmax(torch.randn(1, 2, 1, 6, generator=g, dtype=torch.float64) * 2, -1) for _ in range(2))
    v64 = torch.randn(1, 2, 1, 4, generator=g, dtype=torch.float64)
    q, k, v = (t.half() for t in (q64, k64, v64))
    o, den = chunk.linear_attention_fwd(q, k, v, True, None)
    assert torch.equal(o, v)
    do, dden = torch.randn(o.shape, generator=g).half(), torch.randn(den.shape, generator=g)
    dq = chunk.linear_attention_bwd(q, k, v, o, den, do, dden, True, None)[0]
    want = _grads(q64, k64, v64, True, None, do.double(), dden.double())[0]
    base = _grads(q, k, v, True, None, do, dden)[0]
    assert_within_baseline("dq", dq, want, [base])


# ------------------------------------------------------------------------------- fused Hedgehog feature map kernels
FUSED_CASES = [  # (B, Hq, Hkv, L, DX, FH, D, masked)
    (1, 2, 1, 70, 8, 6, 5, True),
    (2, 2, 2, 33, 12, 16, 8, False),
]


def _hedgehog_reference(x, causal, mask, kind):
    from hhfft.nn import feature_map

    xq, xk, v, wq, bq, wk, bk = x
    pq = feature_map(torch.einsum("bhld,hdf->bhlf", xq, wq) + bq[None, :, None, :], kind)
    pk = feature_map(torch.einsum("bhld,hdf->bhlf", xk, wk) + bk[None, :, None, :], kind)
    return _reference(pq, pk, v, causal, mask)


@pytest.mark.parametrize("kind", ["softmax_split", "exp", "joint_softmax"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-L{c[3]}-DX{c[4]}-FH{c[5]}-D{c[6]}"
                                                  + ("-mask" if c[7] else "") for c in FUSED_CASES])
def test_fused_feature_map_forward_and_backward_vs_fp64(case, causal, kind):
    _check_fused(case, causal, kind, torch.float32)


def _check_fused(case, causal, kind, dtype):
    """The fused kernels on inputs of ``dtype`` (fp32 weights) against the feature maps then the quadratic form, in fp64
    and, as the baseline, in ``dtype`` (weights cast to it); o, den and every gradient, dW and db included."""
    B, Hq, Hkv, L, DX, FH, D, masked = case
    g = torch.Generator().manual_seed(L + FH)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = [r(B, Hq, L, DX).to(dtype), r(B, Hkv, L, DX).to(dtype), r(B, Hkv, L, D).to(dtype), r(Hq, DX, FH) * 0.5,
         r(Hq, FH) * 0.3, r(Hkv, DX, FH) * 0.5, r(Hkv, FH) * 0.3]
    mask = (torch.rand(B, L, generator=g) > 0.3) if masked else None
    o, den = chunk.hedgehog_attention_fwd(*x, kind, causal, mask)
    do, dden = r(*o.shape).to(dtype), r(*den.shape)
    got = chunk.hedgehog_attention_bwd(*x, o, den, do, dden, kind, causal, mask)

    def run(xs):
        xs = [t.clone().requires_grad_() for t in xs]
        low = xs[:3] + [t.to(xs[0].dtype) for t in xs[3:]]  # the weights in the inputs' dtype
        oo, dd = _hedgehog_reference(low, causal, mask, kind)
        return [oo.detach(), dd.detach()] + list(torch.autograd.grad((oo, dd), xs, (do.to(oo.dtype), dden.to(dd.dtype))))

    ref = run([t.double() for t in x])
    base = run(x)
    names = ["o", "den", "dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk"]
    for name, a, b, c in zip(names, [o, den] + list(got), ref, base):
        assert_within_baseline(name, a, b, [c], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_recurrent_step_kernel_matches_chunked_forward(dtype):
    """Decoding token by token with the step kernel gives the rows of the causal forward (GQA 2, a padding token)."""
    from hhfft.kernels.linear_attention.recurrent import linear_attention_step_triton
    from hhfft.lowering.linear_attention import linear_attention_state

    q, k, v, _ = _inputs(2, 4, 2, 7, 20, 12, False, dtype=dtype)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 2] = False
    ref = linear_attention_naive(q.double(), k.double(), v.double(), causal=True, key_mask=mask)
    base = linear_attention_naive(q, k, v, causal=True, key_mask=mask)
    S, z = linear_attention_state(k[:, :, :3], v[:, :, :3], mask[:, :3])  # prefill 3 tokens
    rows = []
    for t in range(3, 7):
        rows.append(linear_attention_step_triton(q[:, :, t], k[:, :, t], v[:, :, t], S, z, mask[:, t]))
    got = torch.stack(rows, 2)
    assert_within_baseline("o", got, ref[:, :, 3:], [base[:, :, 3:]])


@pytest.mark.parametrize("fused", [False, True], ids=["phi", "fused"])
def test_dk_dv_in_separate_launches(fused, monkeypatch):
    """HHFFT_LA_DKDV=apart (dk and dv by two launches of the dk/dv kernel): same results, dW and db included."""
    monkeypatch.setenv("HHFFT_LA_DKDV", "apart")
    if fused:
        test_fused_feature_map_forward_and_backward_vs_fp64(FUSED_CASES[0], True, "exp")
    else:
        test_forward_and_backward_vs_fp64(CASES[2], True, torch.float16)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("states", ["parallel", "sequential", "4"])
@pytest.mark.parametrize("fused", [False, True], ids=["phi", "fused"])
def test_state_segments(states, fused, causal, monkeypatch):
    """The state passes by segments of chunks (HHFFT_LA_STATES: one chunk each, one segment per head, or 4 chunks:
    at L = 330, 6 chunks, a full and a ragged segment), forward and backward against fp64."""
    monkeypatch.setenv("HHFFT_LA_STATES", states)
    p = chunk._Plan(*_inputs(1, 2, 1, 330, 8, 16, True, dtype=torch.float32)[:3], causal, None, None)
    assert (p.NT, p.NC, p.NG) == {"parallel": (6, 1, 6), "sequential": (6, 6, 1), "4": (6, 4, 2)}[states]
    if fused:
        test_fused_feature_map_forward_and_backward_vs_fp64((1, 2, 1, 330, 8, 6, 5, True), causal, "softmax_split")
    else:
        test_forward_and_backward_vs_fp64((1, 2, 1, 330, 8, 16, True), causal, torch.float32)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_empty_batch(causal):
    """B = 0: empty outputs and gradients (no program runs; the segment choice must not divide by zero programs)."""
    q, k, v, _ = _inputs(0, 2, 1, 70, 8, 4, False, dtype=torch.float32)
    o, den = chunk.linear_attention_fwd(q, k, v, causal)
    grads = chunk.linear_attention_bwd(q, k, v, o, den, torch.randn_like(o), torch.zeros_like(den), causal)
    assert o.shape == (0, 2, 70, 4) and den.shape == (0, 2, 70)
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (q, k, v)]


def test_state_segments_by_default_fill_the_gpu(monkeypatch):
    """Unset HHFFT_LA_STATES: few heads x tiles get many segments (a long chain per head left most of the H200
    idle), many get one."""
    monkeypatch.setattr(chunk, "_sm_count", lambda device: 132)  # an H100/H200
    few = chunk._Plan(*_inputs(1, 2, 1, 64 * 1000, 8, 16, False, dtype=torch.float32)[:3], True, None, None)
    assert (few.NT, few.NC, few.NG, few.seg) == (1000, 2, 500, True)  # 1 program: 4 x 132 segments, at most
    many = chunk._Plan(*_inputs(264, 2, 1, 64 * 3, 8, 16, False, dtype=torch.float32)[:3], True, None, None)
    assert many.NG == 1 and not many.seg  # 2 x 132 programs


@triton.jit
def _dot_c_kernel(a, b, c, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, PS: tl.constexpr):
    o_m, o_k, o_n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    b_a = tl.load(a + o_m[:, None] * K + o_k[None, :])  # [M, K]
    b_b = tl.load(b + o_k[:, None] * N + o_n[None, :])  # [K, N]
    tl.store(c + o_m[:, None] * N + o_n[None, :], chunk._dot_c(b_a, b_b, PS, True))


@pytest.mark.parametrize("K", [64, 128, 256])
def test_fp32_split_sums_are_the_product(K):
    """On fp32 inputs _dot_c sums over k in 4 or 8 dots over the classes of k mod 4 or 8 (their partials in fp64, README
    "Precision"): every class meets its own rows of b once, so the result is a @ b (a wrong pairing would be O(1) off)."""
    g = torch.Generator().manual_seed(K)
    a, b = torch.randn(64, K, generator=g), torch.randn(K, 64, generator=g)
    c = torch.full((64, 64), float("nan"), dtype=torch.float64)
    _dot_c_kernel[(1,)](a, b, c, M=64, K=K, N=64, PS="ieee")
    ref = a.double() @ b.double()
    assert (c - ref).norm() / ref.norm() < 1e-6


@pytest.mark.parametrize("fused", [False, True], ids=["phi", "fused"])
def test_every_dot_block_is_at_least_64(fused):
    """Triton's Hopper code for kernels with several tl.dot breaks when a dot dimension is 16 or 32 (illegal addresses,
    wrong results on the H200 at F or D = 32; the interpreter cannot show it), so small F, D, DX are padded to 64."""
    q, k, v, _ = _inputs(1, 2, 1, 5, 8, 4, False, dtype=torch.float32)
    fmap = (torch.zeros(2, 8, 6), None, torch.zeros(1, 8, 6), None, "softmax_split") if fused else None
    p = chunk._Plan(q, k, v, True, None, fmap)
    blocks = dict(BT=chunk.BT, BK=p.BK, BV=p.BV, BKS=p.BKS, BVS=p.BVS) | (dict(BDX=p.BDX, BFH=p.BFH) if fused else {})
    assert all(b >= 64 for b in blocks.values()), blocks


def test_precision_modes(monkeypatch):
    """bf16 defaults to the hi + lo split of fp32 operands; HHFFT_LA_PREC=tf32x3 opts out; fp16 always tf32x3."""
    monkeypatch.delenv("HHFFT_LA_PREC", raising=False)
    assert chunk._precisions(torch.bfloat16) == ("tf32", "split")
    assert chunk._precisions(torch.float16) == ("tf32", "tf32x3")  # fp16 halves could overflow
    assert chunk._precisions(torch.float32) == ("ieee", "ieee")
    monkeypatch.setenv("HHFFT_LA_PREC", "tf32x3")
    assert chunk._precisions(torch.bfloat16) == ("tf32", "tf32x3")
    monkeypatch.setenv("HHFFT_LA_PREC", "split")
    assert chunk._precisions(torch.bfloat16) == ("tf32", "split")
    assert chunk._precisions(torch.float16) == ("tf32", "tf32x3")


def _plan():
    return chunk._Plan(*_inputs(*CASES[0], dtype=torch.bfloat16)[:3], True, None, None)


@pytest.mark.parametrize("env,value,match,read", [
    ("HHFFT_LA_PREC", "bf16", "split .* or tf32x3", _plan),
    ("HHFFT_LA_DKDV", "both", "joint .* or apart", _plan),
    ("HHFFT_LA_STATES", "scan", "sequential, parallel or a number", _plan),
    ("HHFFT_LA_FUSED", "fused", "map .* or inkernel", lambda: chunk._fused_route()),
], ids=["PREC", "DKDV", "STATES", "FUSED"])
def test_switches_refuse_unknown_values(env, value, match, read, monkeypatch):
    """Every HHFFT_LA_* switch refuses a value it does not know, naming the valid ones."""
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=match):
        read()


@pytest.mark.parametrize("fused", [False, True], ids=["phi", "fused"])
def test_split_precision_within_tolerance(fused, monkeypatch):
    """The split products (fp32 operands as hi + lo 16-bit halves; bf16 on the GPU, where they are the default, fp16
    here because the interpreter's bf16 dot is broken) meet the same tolerance as the tf32x3 ones, forward and
    backward, dW and db included."""
    monkeypatch.setattr(chunk, "_precisions", lambda dtype: ("tf32", "split"))
    if not fused:
        test_forward_and_backward_vs_fp64(CASES[0], True, torch.float16)  # L = 1: dq, dk are all cancellation
        test_forward_and_backward_vs_fp64(CASES[1], True, torch.float16)
        return
    _check_fused(FUSED_CASES[0], True, "softmax_split", torch.float16)


@pytest.mark.parametrize("route", ["map", "inkernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_fused_routes(route, dtype, monkeypatch):
    """HHFFT_LA_FUSED: "map" (default; one feature-map kernel, then the unfused chunk kernels) or "inkernel" (the map
    inside the chunk kernels): both within the tolerance, and only "map" runs the feature-map kernels."""
    calls = []
    for name in ("hedgehog_feature_map_fwd", "hedgehog_feature_map_bwd"):
        fn = getattr(chunk, name)
        monkeypatch.setattr(chunk, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    monkeypatch.setenv("HHFFT_LA_FUSED", route)
    _check_fused(FUSED_CASES[0], True, "softmax_split", dtype)
    # forward: phi of q, k; backward: phi of q, k again, then dx, dW, db of q, k
    want = ["hedgehog_feature_map_fwd"] * 4 + ["hedgehog_feature_map_bwd"] * 2
    assert calls == ([] if route == "inkernel" else want), calls


@pytest.mark.parametrize("kind", ["softmax_split", "exp", "joint_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_feature_map_kernels_vs_fp64(kind, dtype, monkeypatch):
    """The feature-map kernels alone (phi, then dx, dW, db from dphi) against hhfft.nn.feature_map in fp64; odd sizes,
    several chunks per program in the backward (_MAP_PROGRAMS made small), no bias on one call."""
    from hhfft.nn import feature_map

    monkeypatch.setattr(chunk, "_MAP_PROGRAMS", 2)
    B, H, L, DX, FH = 2, 3, 200, 12, 6
    g = torch.Generator().manual_seed(7)
    x = torch.randn(B, H, L, DX, generator=g).to(dtype)
    w, b = 0.5 * torch.randn(H, DX, FH, generator=g), 0.3 * torch.randn(H, FH, generator=g)
    dphi = torch.randn(B, H, L, 2 * FH, generator=g).to(dtype)
    for bias in (b, None):
        phi = chunk.hedgehog_feature_map_fwd(x, w, bias, kind)
        dx, dw, db = chunk.hedgehog_feature_map_bwd(x, w, bias, dphi, kind)

        def run(xs, low):
            xs = [t.clone().requires_grad_() for t in xs]
            ww = [t.to(xs[0].dtype) for t in xs[1:]] if low else xs[1:]
            y = torch.einsum("bhld,hdf->bhlf", xs[0], ww[0])
            if bias is not None:
                y = y + ww[1][None, :, None, :]
            p = feature_map(y, kind)
            return [p.detach()] + list(torch.autograd.grad(p, xs, dphi.to(p.dtype), allow_unused=True))

        ref = run([t.double() for t in (x, w, b)], False)
        base = run([x, w, b], True)
        names = ["phi", "dx", "dW"] + (["db"] if bias is not None else [])
        for name, got, r, c in zip(names, [phi, dx, dw, db], ref, base):
            assert_within_baseline(name, got, r, [c], dtype=dtype)


def test_feature_map_kernels_refuse_mismatched_shapes():
    """x, W, b that do not describe one map per head of x are refused with the shapes and what to pass."""
    x, w, b = torch.randn(2, 3, 5, 4), torch.randn(3, 4, 6), torch.randn(3, 6)
    for args in ((x[0], w, b), (x, w[:2], b), (x, w, b[:, :5]), (x, w[0], None)):
        with pytest.raises(ValueError, match=r"expected x \[B, H, L, DX\].*stacked on dim 0"):
            chunk.hedgehog_feature_map_fwd(*args, "softmax_split")


@pytest.mark.parametrize("route", ["map", "inkernel"])
def test_fused_nan_in_padded_keys_stays_out(route, monkeypatch):
    """NaN in the padded keys' x (key_mask False) reaches no output or gradient, dW and db included: the same values,
    bit for bit, as with zeros there."""
    monkeypatch.setenv("HHFFT_LA_FUSED", route)
    B, Hq, Hkv, L, DX, FH, D, _ = FUSED_CASES[0]
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = [r(B, Hq, L, DX), r(B, Hkv, L, DX), r(B, Hkv, L, D), r(Hq, DX, FH), r(Hq, FH), r(Hkv, DX, FH), r(Hkv, FH)]
    mask = torch.rand(B, L, generator=g) > 0.3
    do = r(B, Hq, L, D)
    out = []
    for fill in (0.0, float("nan")):
        xs = list(x)
        xs[1] = torch.where(mask[:, None, :, None], x[1], fill)
        o, den = chunk.hedgehog_attention_fwd(*xs, "softmax_split", True, mask)
        out.append([o, den] + list(chunk.hedgehog_attention_bwd(*xs, o, den, do, torch.zeros_like(den),
                                                                "softmax_split", True, mask)))
    for name, a, b in zip(["o", "den", "dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk"], *out):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_transposed_key_mask(causal):
    """A key mask that is dense but not contiguous (a transpose) gives the same outputs as its contiguous copy: the
    kernels read the mask as [B, L] row-major bytes, and .to(uint8) alone would keep the transposed strides."""
    q, k, v, mask = _inputs(2, 2, 1, 70, 16, 8, True, torch.float32)
    mask_t = mask.t().contiguous().t()
    assert torch.equal(mask_t, mask) and not mask_t.is_contiguous()
    o, den = chunk.linear_attention_fwd(q, k, v, causal, mask)
    o_t, den_t = chunk.linear_attention_fwd(q, k, v, causal, mask_t)
    assert torch.equal(o_t, o) and torch.equal(den_t, den)


@pytest.mark.parametrize("route", ["map", "inkernel"])
def test_fused_empty_sequence(route, monkeypatch):
    """L = 0 through both routes: empty outputs and dx, zero dW and db (the map backward divided by its chunk count)."""
    monkeypatch.setenv("HHFFT_LA_FUSED", route)
    B, Hq, Hkv, L, DX, FH, D = 1, 2, 1, 0, 8, 4, 4
    x = [torch.randn(B, Hq, L, DX), torch.randn(B, Hkv, L, DX), torch.randn(B, Hkv, L, D), torch.randn(Hq, DX, FH),
         torch.randn(Hq, FH), torch.randn(Hkv, DX, FH), torch.randn(Hkv, FH)]
    o, den = chunk.hedgehog_attention_fwd(*x, "softmax_split", True, None)
    grads = chunk.hedgehog_attention_bwd(*x, o, den, torch.randn_like(o), torch.zeros_like(den), "softmax_split",
                                         True, None)
    assert o.shape == (B, Hq, L, D) and den.shape == (B, Hq, L)
    for name, g, t in zip(["dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk"], grads, x):
        assert g.shape == t.shape and not g.any(), name


@pytest.mark.parametrize("states", ["sequential", "1"], ids=["one-segment", "segments"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("route,keep", [("map", "phi"), ("map", "phi,states"), ("inkernel", "states")])
def test_fused_backward_from_kept_tensors(route, keep, causal, states, monkeypatch):
    """The backward from what the forward kept (HHFFT_LA_KEEP: phi and/or the chunk states, HHFFT_LA_STATES cutting
    the head into segments or not) gives bit for bit the gradients of the backward that recomputes them, and the
    kept tensors have the shapes the op's fake gives (saved_like)."""
    monkeypatch.setenv("HHFFT_LA_FUSED", route)
    monkeypatch.setenv("HHFFT_LA_STATES", states)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, Hq, Hkv, L, DX, FH, D = 2, 4, 2, 70, 8, 4, 8  # two chunks: two segments with HHFFT_LA_STATES=1
    x = [r(B, Hq, L, DX), r(B, Hkv, L, DX), r(B, Hkv, L, D), r(Hq, DX, FH), r(Hq, FH), r(Hkv, DX, FH), r(Hkv, FH)]
    mask = torch.rand(B, L, generator=g) > 0.3
    do, dden = r(B, Hq, L, D), r(B, Hq, L)
    monkeypatch.setenv("HHFFT_LA_KEEP", keep)
    o, den, saved = chunk.hedgehog_attention_fwd(*x, "softmax_split", causal, mask, keep=True)
    like = chunk.saved_like(*x, "softmax_split", causal, mask)
    assert [(t.shape, t.dtype) for t in saved] == [(t.shape, t.dtype) for t in like]
    assert saved[0].dim() == (4 if route == "map" and "phi" in keep else 0)
    assert saved[2].dim() == (5 if "states" in keep else 0)
    assert (saved[4].dim() == 5) == ("states" in keep and causal and states == "1")  # segments: the carry-in apart
    passes = []
    fn = chunk._states_fwd
    monkeypatch.setattr(chunk, "_states_fwd", lambda *a: passes.append(1) or fn(*a))
    got = chunk.hedgehog_attention_bwd(*x, o, den, do, dden, "softmax_split", causal, mask, saved)
    assert len(passes) == (0 if "states" in keep else 1)  # the kept states are used, not recomputed
    monkeypatch.setenv("HHFFT_LA_STATES", "sequential" if states == "1" else "1")  # planned otherwise: recomputed
    if causal:
        again = chunk.hedgehog_attention_bwd(*x, o, den, do, dden, "softmax_split", causal, mask, saved)
        assert len(passes) == (1 if "states" in keep else 2)
        torch.testing.assert_close(again, got, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("HHFFT_LA_STATES", states)
    monkeypatch.setenv("HHFFT_LA_KEEP", "none")
    o2, den2 = chunk.hedgehog_attention_fwd(*x, "softmax_split", causal, mask)
    want = chunk.hedgehog_attention_bwd(*x, o2, den2, do, dden, "softmax_split", causal, mask)
    assert torch.equal(o, o2) and torch.equal(den, den2)
    for name, a, b in zip(["dq", "dk", "dv", "dWq", "dbq", "dWk", "dbk"], got, want):
        assert torch.equal(a, b), name
