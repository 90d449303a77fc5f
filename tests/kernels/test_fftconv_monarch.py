"""Monarch FFT-convolution kernels against naive.py in fp64 (CPU: through the Triton interpreter, tiny grids).

Tolerance (STYLE.md): the kernel's max error against the fp64 reference is at most 2x the max error of the same
computation done by PyTorch at the kernel's dtype (torch.fft in fp32 on inputs of that dtype, output in that dtype).
Outputs start as NaN. The interpreter has no tf32, so fp32/fp16 run with "ieee" dots here; bf16 runs with its
default "fp16" dots (scaled fp16 operands), which the interpreter does emulate. The interpreter's fp32 -> bf16
conversion truncates (the GPU rounds to nearest), so bf16 cases write an fp32 buffer that torch rounds to bf16;
the GPU tests store bf16 from the kernel and cover the default precisions.
The fused kernel's dot options (3-dot Gauss products, fp16 DFT tables; the latter only with "fp16" dots) are covered
by the forward tests, which the du half of the backward shares.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hhfft.kernels.fftconv.monarch import fftconv_corr_fwd, fftconv_fwd, plan
from hhfft.kernels.fftconv.naive import fftconv_corr_naive, fftconv_naive
from hhfft.lowering.fftconv import _fftconv_corr_torch, _fftconv_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PREC = {torch.float32: "ieee", torch.float16: "ieee", torch.bfloat16: "fp16"}
# dtype the kernel stores; see the module docstring for bf16
STORE = {torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.float32}


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item()


def assert_within_torch_error(out, ref64, torch_out, what: str, factor: float = 2.0) -> None:
    """out's error vs the fp64 reference <= factor x torch's own error at the same dtype."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (an element was not written)"
    err, base = max_err(out, ref64), max_err(torch_out, ref64)
    scale = ref64.abs().max().item()
    assert err <= factor * base, f"{what}: error {err:.3e} > {factor} x torch's {base:.3e} (scale {scale:.3e})"


# (B, H, L, K, shift, out_len, max_fused_n, rows_per_program, gates):
# N = 256, 1024, 4096 fused (R = 2 with a half-empty last program in the first), 4096 by the four-step path
CASES = [
    pytest.param(5, 2, 129, 100, 0, 129, 4096, 2, True, id="N256-B5-H2-L129-K100-causal-gates-R2"),
    pytest.param(2, 1, 601, 301, 150, 601, 4096, 1, False, id="N1024-B2-H1-L601-K301-same"),
    pytest.param(1, 1, 2049, 1500, 7, 2000, 4096, 1, True, id="N4096-B1-H1-L2049-K1500-shift7-T2000-gates"),
    pytest.param(2, 1, 3001, 1001, 0, 3001, 256, 1, True, id="N4096-fourstep-P16-Q256-B2-H1-L3001-K1001-gates"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16-fp16dots"),
]
# fused kernel's dot options: (gauss, half_tables)
DOTS = {"4dots": (False, False), "gauss": (True, False), "half16": (False, True), "gauss-half16": (True, True)}


def _dots_for(dtype):
    return [d for d, (_, half) in DOTS.items() if not half or PREC[dtype] == "fp16"]


def _fused(case) -> bool:
    B, H, L, K, shift, T, max_fused_n, R, gates = case.values
    return plan(L, K, T) <= max_fused_n


# every case x dtype with the default dots; the fused cases with every dot option of the dtype
FWD_CASES = [
    pytest.param(*c.values, d.values[0], dots, id=f"{c.id}-{d.id}-{dots}")
    for c in CASES for d in DTYPES for dots in _dots_for(d.values[0]) if dots == "4dots" or _fused(c)
]


def _inputs(B, H, L, K, T, gates, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, k = r(B, H, L), r(H, K) / K**0.5
    extra = dict(bias=r(H), skip=r(H), pregate=r(B, H, L), postgate=r(B, H, T)) if gates else {}
    return u, k, extra


def _cast(d, dtype):
    return {n: x.to(DEVICE, dtype) for n, x in d.items()}


@pytest.mark.parametrize("B,H,L,K,shift,T,max_fused_n,R,gates,dtype,dots", FWD_CASES)
def test_forward(B, H, L, K, shift, T, max_fused_n, R, gates, dtype, dots):
    u, k, extra = _inputs(B, H, L, K, T, gates)
    ref = fftconv_naive(u, k, shift, T, **extra)
    u_d, k_d, extra_d = u.to(DEVICE, dtype), k.to(DEVICE, torch.float32), _cast(extra, dtype)
    y = torch.full((B, H, T), float("nan"), device=DEVICE, dtype=STORE[dtype])
    gauss, half = DOTS[dots]
    fftconv_fwd(u_d, k_d, shift, T, **extra_d, precision=PREC[dtype], max_fused_n=max_fused_n,
                rows_per_program=R, gauss=gauss, half_tables=half, out=y)
    y = y.to(dtype)
    y_torch = _fftconv_torch(u_d, k_d, shift, T, extra_d.get("bias"), extra_d.get("skip"),
                             extra_d.get("pregate"), extra_d.get("postgate"))
    assert_within_torch_error(y.cpu(), ref, y_torch.cpu(), f"forward N={plan(L, K, T)}")


@pytest.mark.parametrize("programs", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_four_step_persistent(dtype, programs):
    """The four-step passes in one persistent kernel (on CUDA the default from N = 128K): 5 x 2 rows make 6 items, so
    4 programs take 2, 2, 1 and 1 items, reusing their scratch slots; odd batch (a half-empty pair), gates."""
    B, H, L, K, shift, T = 5, 2, 3001, 1001, 7, 2990
    u, k, extra = _inputs(B, H, L, K, T, True, seed=3)
    ref = fftconv_naive(u, k, shift, T, **extra)
    u_d, k_d, extra_d = u.to(DEVICE, dtype), k.to(DEVICE, torch.float32), _cast(extra, dtype)
    y = torch.full((B, H, T), float("nan"), device=DEVICE, dtype=STORE[dtype])
    fftconv_fwd(u_d, k_d, shift, T, **extra_d, precision=PREC[dtype], max_fused_n=256, programs=programs, out=y)
    y_torch = _fftconv_torch(u_d, k_d, shift, T, extra_d.get("bias"), extra_d.get("skip"),
                             extra_d.get("pregate"), extra_d.get("postgate"))
    assert_within_torch_error(y.to(dtype).cpu(), ref, y_torch.cpu(), f"persistent four-step, {programs} programs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-fp16dots"])
def test_nested_four_step(dtype):
    """Above the four-step limit (max_fused_n * P_max = 8192 for the "ieee" dots, 32768 for "fp16"): N = 65536 as an
    outer column pass of P_o = 16, the persistent kernel on the 16 rows of 4096 of every (pair, channel) (P_i = 16 x
    Q_i = 256, each row with its own spectrum row) and the outer inverse column pass; odd batch, gates. Reference:
    the torch.fft path in fp64 (naive.py's direct sum is O(L K))."""
    B, H, L, K, shift, T = 3, 2, 40000, 25000, 11, 39990
    assert plan(L, K, T) == 65536
    u, k, extra = _inputs(B, H, L, K, T, True, seed=4)
    ref = _fftconv_torch(u, k, shift, T, extra["bias"], extra["skip"], extra["pregate"], extra["postgate"])
    u_d, k_d, extra_d = u.to(DEVICE, dtype), k.to(DEVICE, torch.float32), _cast(extra, dtype)
    y = torch.full((B, H, T), float("nan"), device=DEVICE, dtype=STORE[dtype])
    fftconv_fwd(u_d, k_d, shift, T, **extra_d, precision=PREC[dtype], max_fused_n=256, programs=5, out=y)
    y_torch = _fftconv_torch(u_d, k_d, shift, T, extra_d.get("bias"), extra_d.get("skip"),
                             extra_d.get("pregate"), extra_d.get("postgate"))
    assert_within_torch_error(y.to(dtype).cpu(), ref, y_torch.cpu(), "nested four-step")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,K,shift,T,max_fused_n,R,gates", CASES)
def test_backward(B, H, L, K, shift, T, max_fused_n, R, gates, dtype):
    """du = pregate * conv(dy * postgate, flip(k); K-1-shift) + skip * dy (the same kernel) and dk (the corr kernel)."""
    u, k, extra = _inputs(B, H, L, K, T, gates, seed=1)
    dy = torch.randn(B, H, T, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u_, k_ = u.clone().requires_grad_(), k.clone().requires_grad_()
    du_ref, dk_ref = torch.autograd.grad(fftconv_naive(u_, k_, shift, T, **extra), (u_, k_), dy)

    c = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    g = c(dy) if not gates else c(dy) * c(extra["postgate"])
    v = c(u) if not gates else c(u) * c(extra["pregate"])
    k32 = k.to(DEVICE, torch.float32)
    post_du = dict(postgate=c(extra["pregate"]), skip=None) if gates else {}
    dv = torch.full((B, H, L), float("nan"), device=DEVICE, dtype=STORE[dtype])
    fftconv_fwd(g, k32.flip(-1), K - 1 - shift, L, **post_du, precision=PREC[dtype], max_fused_n=max_fused_n,
                rows_per_program=R, out=dv)
    dv = dv.to(dtype)
    dv_torch = _fftconv_torch(g, k32.flip(-1), K - 1 - shift, L, None, None, None, post_du.get("postgate"))
    if gates:  # the skip path adds skip * dy, outside the convolution
        add = c(extra["skip"])[:, None] * c(dy)[..., :L] if T >= L else None
        add = torch.nn.functional.pad(c(extra["skip"])[:, None] * c(dy), (0, L - T)) if add is None else add
        dv, dv_torch = dv + add, dv_torch + add
    assert_within_torch_error(dv.cpu(), du_ref, dv_torch.cpu(), "du")

    # dk's FFT size is plan(T, L, 0): N = 8192 in the four-step case (P32 x Q256 with max_fused_n = 256)
    dk = fftconv_corr_fwd(g, v, shift, K, precision=PREC[dtype], max_fused_n=max_fused_n)
    dk_torch = _fftconv_corr_torch(g, v, shift, K)
    assert_within_torch_error(dk.cpu(), dk_ref, dk_torch.cpu(), f"dk N={plan(T, L, 0)}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,L,T,K,shift", [(3, 2, 600, 600, 600, 0), (4, 3, 200, 190, 70, 33)],
                         ids=["N2048-B3-K=L", "N512-B4-T190-K70-shift33"])
def test_dv_dk_fused_sizes_match_naive(B, H, L, T, K, shift, dtype):
    """fftconv_dv_dk up to the fused limit: one kernel transforms each pair of g once for dv and dk; both against
    the fp64 reference by the 2x rule (odd batch: a half-empty pair; more batch slices than one)."""
    from hhfft.kernels.fftconv.monarch import fftconv_dv_dk

    gen = torch.Generator().manual_seed(21)
    u = torch.randn(B, H, L, dtype=torch.float64, generator=gen)
    k = torch.randn(H, K, dtype=torch.float64, generator=gen) / K**0.5
    dy = torch.randn(B, H, T, dtype=torch.float64, generator=gen)
    assert plan(T, K, L) == plan(T, L, 0) <= 2048
    u_, k_ = u.clone().requires_grad_(), k.clone().requires_grad_()
    du_ref, dk_ref = torch.autograd.grad(fftconv_naive(u_, k_, shift, T), (u_, k_), dy)
    g, v = dy.to(DEVICE, dtype), u.to(DEVICE, dtype)
    kf = k.to(DEVICE, torch.float32).flip(-1)
    dv = torch.full((B, H, L), float("nan"), device=DEVICE, dtype=STORE[dtype])
    dv_, dk = fftconv_dv_dk(g, v, kf, shift, precision=PREC[dtype], out=dv)
    assert dv_ is dv and dk.dtype == torch.float32
    dv = dv.to(dtype)
    dv_torch = _fftconv_torch(g, kf, K - 1 - shift, L, None, None, None, None)
    assert_within_torch_error(dv.cpu(), du_ref, dv_torch.cpu(), "dv (fused sizes)")
    assert_within_torch_error(dk.cpu(), dk_ref, _fftconv_corr_torch(g, v, shift, K).cpu(), "dk (fused sizes)")


def test_corr_matches_naive_odd_batch():
    g = torch.randn(3, 2, 77, dtype=torch.float64)
    v = torch.randn(3, 2, 90, dtype=torch.float64)
    ref = fftconv_corr_naive(g, v, 5, 40)
    dk = fftconv_corr_fwd(g.float().to(DEVICE), v.float().to(DEVICE), 5, 40, precision="ieee")
    assert_within_torch_error(dk.cpu(), ref, _fftconv_corr_torch(g.float(), v.float(), 5, 40), "dk odd batch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "B,H,T,L,shift,K",
    [
        pytest.param(3, 2, 700, 900, 5, 600, id="N2048-P16-Q128-B3-H2-T700-L900-shift5-K600"),
        pytest.param(1, 1, 300, 1100, -40, 1500, id="N2048-B1-T300-L1100-shift-40-K1500-longer-than-the-lags"),
    ],
)
def test_corr_four_step(B, H, T, L, shift, K, dtype):
    """dk by the four-step kernels (max_fused_n = 256 forces them): odd batch (a half-empty pair), T != L, a negative
    shift and K beyond the correlation's lags (those stay 0)."""
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(B, H, T, dtype=torch.float64, generator=gen)
    v = torch.randn(B, H, L, dtype=torch.float64, generator=gen)
    ref = fftconv_corr_naive(g, v, shift, K)
    g_d, v_d = g.to(DEVICE, dtype), v.to(DEVICE, dtype)
    dk = fftconv_corr_fwd(g_d, v_d, shift, K, precision=PREC[dtype], max_fused_n=256)
    assert_within_torch_error(dk.cpu(), ref, _fftconv_corr_torch(g_d, v_d, shift, K).cpu(), "dk four-step")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16-fp16dots"])
def test_dv_dk_four_step_equals_the_separate_calls(dtype):
    """fftconv_dv_dk at a four-step size (g's column pass and row transforms done once) gives bit for bit what
    fftconv_fwd (dv with flip(k)) and fftconv_corr_fwd (dk) give separately: the same arithmetic on the same scratch
    values. N = 4096 for both products (P16 x Q256 with max_fused_n = 256), odd batch, shift 7."""
    from hhfft.kernels.fftconv.monarch import fftconv_dv_dk

    B, H, L, K, shift = 3, 2, 1500, 1001, 7
    gen = torch.Generator().manual_seed(13)
    g = torch.randn(B, H, L, dtype=torch.float64, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, H, L, dtype=torch.float64, generator=gen).to(DEVICE, dtype)
    kf = (torch.randn(H, K, dtype=torch.float64, generator=gen) / K**0.5).to(DEVICE, torch.float32)
    opts = dict(precision=PREC[dtype], max_fused_n=256)
    dv, dk = fftconv_dv_dk(g, v, kf, shift, **opts)
    dv_ref = fftconv_fwd(g, kf, K - 1 - shift, L, **opts)
    dk_ref = fftconv_corr_fwd(g, v, shift, K, **opts)
    assert dv.dtype == dtype and dk.dtype == torch.float32
    assert torch.equal(dv, dv_ref) and torch.equal(dk, dk_ref)
    with pytest.raises(ValueError, match="one FFT size for dv and dk"):
        fftconv_dv_dk(g, torch.cat([v, v], -1), kf, shift, **opts)  # dv's N = plan(1500, 1001, 3000) = 4096, dk's 8192
    with pytest.raises(ValueError, match="one FFT size for dv and dk"):
        fftconv_dv_dk(g, v, kf[:, :100], shift, **opts)  # dv's N = plan(1500, 100, 1500) = 2048, dk's 4096


@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 40), H=st.integers(1, 300), logn=st.integers(8, 22), budget=st.integers(1, 1 << 32))
def test_slices_cover_every_row_once_in_whole_pairs_within_the_scratch_budget(B, H, logn, budget):
    from hhfft.kernels.fftconv import monarch

    N = 1 << logn
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(monarch, "_SCRATCH_BYTES", budget)
        slices = monarch._slices(B, H, N)
    seen = torch.zeros(B, H, dtype=torch.int64)
    for sl in slices:
        assert sl.b0 % 2 == 0 and ((sl.b1 - sl.b0) % 2 == 0 or sl.b1 == B), sl  # whole pairs of rows
        seen[sl.b0:sl.b1, sl.h0:sl.h1] += 1
        scratch = (sl.b1 - sl.b0 + 1) // 2 * (sl.h1 - sl.h0) * 2 * N * 4
        assert scratch <= budget or (sl.b1 - sl.b0 <= 2 and sl.h1 - sl.h0 == 1), (sl, scratch)  # at least one row
    assert (seen == 1).all()


@pytest.mark.parametrize("budget, rows", [(2 * 2 * 4096 * 4, 2), (1, 1)], ids=["batch-slices", "channel-slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-fp16dots"])
def test_four_step_paths_take_the_rows_in_slices(dtype, budget, rows, monkeypatch):
    """With a scratch budget of one pair of rows over the H = 2 channels (batch slices), or of one row (one pair,
    one channel at a time), the three-kernel forward (gates, bias, skip), dv_dk and dk run slice after slice (B = 5:
    the last pair half-empty), each column pass on a scratch of that size: y and dv bit for bit what one slice gives
    (the same arithmetic per pair), dk within the 2x rule of the fp64 reference (its batch slices' lags are added).
    N = 4096 for all three (P16 x Q256 with max_fused_n = 256)."""
    from hhfft.kernels.fftconv import monarch
    from hhfft.kernels.fftconv.monarch import fftconv_dv_dk

    B, H, L, K, shift = 5, 2, 1500, 1001, 7
    u, k, extra = _inputs(B, H, L, K, L, True, seed=4)
    dy = torch.randn(B, H, L, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u_d, k_d, extra_d, g = u.to(DEVICE, dtype), k.to(DEVICE, torch.float32), _cast(extra, dtype), dy.to(DEVICE, dtype)
    opts = dict(precision=PREC[dtype], max_fused_n=256)
    whole = (fftconv_fwd(u_d, k_d, shift, L, **extra_d, **opts), *fftconv_dv_dk(g, u_d, k_d.flip(-1), shift, **opts))
    sizes, col_fwd = [], monarch._col_fwd

    def counted(*a, **kw):
        s = col_fwd(*a, **kw)
        sizes.append(s.shape[0])
        return s
    monkeypatch.setattr(monarch, "_col_fwd", counted)
    monkeypatch.setattr(monarch, "_SCRATCH_BYTES", budget)
    y = fftconv_fwd(u_d, k_d, shift, L, **extra_d, **opts)
    dv, dk = fftconv_dv_dk(g, u_d, k_d.flip(-1), shift, **opts)
    dk_corr = fftconv_corr_fwd(g, u_d, shift, K, **opts)
    slices = 3 * H // rows  # 3 pairs, over all channels or one channel at a time
    assert sizes == [rows] * slices * 5, sizes  # forward 1 column pass a slice, dv_dk and dk 2 each
    assert torch.equal(y, whole[0]) and torch.equal(dv, whole[1])
    u_, k_ = u.clone().requires_grad_(), k.clone().requires_grad_()
    dk_ref = torch.autograd.grad(fftconv_naive(u_, k_, shift, L), k_, dy)[0]
    for got in (dk, dk_corr):
        assert got.shape == (H, K)
        assert_within_torch_error(got.cpu(), dk_ref, _fftconv_corr_torch(g, u_d, shift, K).cpu(), "dk in slices")


def test_fwd_rejects_bad_out():
    u, k = torch.randn(1, 1, 10, device=DEVICE), torch.randn(1, 3, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        fftconv_fwd(u, k, 0, 10, out=torch.empty(1, 1, 9, device=DEVICE), precision="ieee")


STACKED_DTYPE_DOTS = [
    pytest.param(dt, dots, id=f"{name}-{dots}")
    for dt, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")] for dots in _dots_for(dt)
]


@pytest.mark.parametrize("variant", ["stacked", "t"])
@pytest.mark.parametrize("dtype,dots", STACKED_DTYPE_DOTS)
@pytest.mark.parametrize(
    "B,H,L,K,shift,T,R",
    [
        pytest.param(7, 2, 129, 128, 3, 200, 4, id="N512-B7-H2-L129-K128-shift3-T200-R4"),
        pytest.param(3, 1, 300, 301, 150, 300, 2, id="N1024-B3-H1-L300-K301-same-R2"),
    ],
)
def test_forward_stacked(B, H, L, K, shift, T, R, dtype, dots, variant):
    """The stacked variants (R pairs side by side in one tile), with a partly empty last program."""
    u, k, extra = _inputs(B, H, L, K, T, True, seed=4)
    ref = fftconv_naive(u, k, shift, T, **extra)
    u_d, k_d, extra_d = u.to(DEVICE, dtype), k.to(DEVICE, torch.float32), _cast(extra, dtype)
    y = torch.full((B, H, T), float("nan"), device=DEVICE, dtype=STORE[dtype])
    gauss, half = DOTS[dots]
    fftconv_fwd(u_d, k_d, shift, T, **extra_d, precision=PREC[dtype], variant=variant, rows_per_program=R,
                gauss=gauss, half_tables=half, out=y)
    y_torch = _fftconv_torch(
        u_d, k_d, shift, T, extra_d["bias"], extra_d["skip"], extra_d["pregate"], extra_d["postgate"]
    )
    assert_within_torch_error(y.to(dtype).cpu(), ref, y_torch.cpu(), f"stacked forward N={plan(L, K, T)}")


@pytest.mark.parametrize("L,max_fused_n", [(100, None), (1000, 256)], ids=["fused", "four-step"])
def test_half_tables_need_fp16_dots(L, max_fused_n):
    u, k = torch.randn(1, 1, L, device=DEVICE), torch.randn(1, 3, device=DEVICE)
    with pytest.raises(ValueError, match="half_tables=True needs precision 'fp16'.*got 'ieee'; leave half_tables"):
        fftconv_fwd(u, k, 0, L, precision="ieee", half_tables=True, max_fused_n=max_fused_n)


def test_static_dot_options_only_for_fp16_dots():
    """The static choice uses fp16 tables and Gauss products with the "fp16" dots only (where they were timed); every
    other precision keeps fp32 tables (they feed fp32 operands) and 4 dots, at every fused size."""
    from hhfft.kernels.fftconv.monarch import _fused_config

    for N in (256, 512, 1024, 2048, 4096):
        for prec in ("fp16", "tf32", "tf32x3", "ieee"):
            cfg = _fused_config(N, prec)
            assert cfg.half_tables == (prec == "fp16"), (N, prec, cfg)
            assert not cfg.gauss or prec == "fp16", (N, prec, cfg)
    assert _fused_config(2048, "fp16").gauss


@pytest.mark.parametrize("L,K,shift,max_fused_n", [(129, 100, 3, None), (1500, 1001, 7, 256)],
                         ids=["N256-fused", "N4096-fourstep"])
def test_kept_spectrum_served_only_to_the_same_k_at_the_same_version(L, K, shift, max_fused_n):
    """flip(k) at shift K-1-shift has the conjugate of k's spectrum at shift (README, "One spectrum per step"): the
    spectrum kept by a marked forward is served to the flipped call once, and never after k changed in place or
    died."""
    from hhfft.kernels.fftconv import monarch as m

    B, H = 3, 2
    u, k, _ = _inputs(B, H, L, K, L, False, seed=5)
    dy = torch.randn(B, H, L, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    u_d, g_d = u.to(DEVICE, torch.float16), dy.to(DEVICE, torch.float16)
    opts = dict(precision="ieee", max_fused_n=max_fused_n)

    def du(k32):  # the backward's du call: flip(k), declared as such
        kf = k32.flip(-1)
        m.note_flip(kf, k32)
        return fftconv_fwd(g_d, kf, K - 1 - shift, L, **opts)

    def check(dv, kk, what):
        ref = fftconv_naive(dy, kk.flip(-1), K - 1 - shift, L)
        assert_within_torch_error(dv.cpu(), ref, _fftconv_torch(g_d, kk.flip(-1).float(), K - 1 - shift, L, None,
                                                                None, None, None).cpu(), what)

    m.SPECTRUM_COUNTS.clear()
    k32 = k.to(DEVICE, torch.float32)
    m.keep_spectrum(k32)
    fftconv_fwd(u_d, k32, shift, L, **opts)
    assert len(m._KEPT) == 1 and not m._KEEP
    check(du(k32), k, "du from the kept spectrum")
    assert dict(m.SPECTRUM_COUNTS) == {"built": 1, "reused": 1} and not m._KEPT and not m._FLIPS

    m.keep_spectrum(k32)
    fftconv_fwd(u_d, k32, shift, L, **opts)
    k32.mul_(2)  # in place: k._version moves on, the kept spectrum is stale
    check(du(k32), 2 * k, "du after an in-place update of k")
    assert dict(m.SPECTRUM_COUNTS) == {"built": 3, "reused": 1} and not m._KEPT

    m.keep_spectrum(k32)
    fftconv_fwd(u_d, k32, shift, L, **opts)
    assert len(m._KEPT) == 1
    del k32  # the entry goes with its tensor
    assert not m._KEPT and not m._KEEP
