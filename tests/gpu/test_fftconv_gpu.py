"""hhfft::fftconv on CUDA (the Monarch Triton kernels) against an fp64 reference: every FFT size 256 .. 4M.

Reference: naive.py in fp64 for N <= 4096, the torch.fft path in fp64 above (direct summation is O(L K)).
Tolerance (STYLE.md): error <= 2x that of the same computation by PyTorch at the input dtype (torch.fft in fp32 on
inputs of that dtype). Uninitialised memory is NaN-filled (deterministic mode), so unwritten outputs fail.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.fx

import hhfft  # noqa: F401  (registers the ops)
import hhfft.lowering.fftconv as op_mod
from hhfft.kernels.fftconv.monarch import plan
from hhfft.kernels.fftconv.naive import fftconv_naive
from hhfft.lowering.fftconv import fftconv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [pytest.param(d, id=str(d).split(".")[-1]) for d in (torch.float16, torch.bfloat16, torch.float32)]
SIZES = [pytest.param(n, id=f"N{n}") for n in [1 << e for e in range(8, 23)]]


@pytest.fixture
def nan_memory():
    """torch.empty returns NaN-filled memory while this is active."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill
    torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


def _run(u, k, extra, shift, T, dy):
    """y and all gradients through the public wrapper."""
    leaves = [u, k] + list(extra.values())
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    names = ["u", "k"] + list(extra)
    kw = dict(zip(names[2:], leaves[2:]))
    y = fftconv(leaves[0], leaves[1], shift=shift, out_len=T, **kw)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return y.detach(), dict(zip(names, grads))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", SIZES)
def test_fftconv_all_sizes(N, dtype, nan_memory, monkeypatch):
    B, H = (3, 2) if N <= (1 << 20) else (1, 2)
    L, K = N // 2 + 1, N // 2 - 1  # odd L, K < L, L + K - 1 = N - 1
    shift, T = K // 2, L  # "same"-style padding
    assert plan(L, K, T) == N
    g = torch.Generator(device="cuda").manual_seed(N)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64, generator=g)  # noqa: E731
    u, k = r(B, H, L), r(H, K) / K**0.5
    extra = dict(bias=r(H), skip=r(H), pregate=r(B, H, L), postgate=r(B, H, T))
    dy = r(B, H, T)

    if N <= 4096:
        leaves = [x.clone().requires_grad_() for x in [u, k, *extra.values()]]
        y_ref = fftconv_naive(leaves[0], leaves[1], shift, T, *leaves[2:])
        g_ref = dict(zip(["u", "k", *extra], torch.autograd.grad(y_ref, leaves, dy)))
        y_ref = y_ref.detach()
    else:
        y_ref, g_ref = _run(u, k, extra, shift, T, dy)  # fp64: the torch.fft path
    cast = {n: x.to(dtype) for n, x in extra.items()}
    y, grads = _run(u.to(dtype), k.float(), cast, shift, T, dy)
    with monkeypatch.context() as m:
        m.setattr(op_mod, "_monarch", None)  # the same computation by torch.fft at this dtype
        y_t, grads_t = _run(u.to(dtype), k.float(), cast, shift, T, dy)

    failures = []
    for name, a, a_t, ref in [("y", y, y_t, y_ref)] + [(n, grads[n], grads_t[n], g_ref[n]) for n in g_ref]:
        if torch.isnan(a).any():
            failures.append(f"{name}: NaN")
            continue
        e, e_t = _err(a, ref), _err(a_t, ref)
        if e > 2 * e_t:
            failures.append(f"{name}: err {e:.3e} > 2 x torch {e_t:.3e}")
    assert not failures, f"N={N} {dtype}: " + "; ".join(failures)


@pytest.mark.parametrize("programs", [3, None], ids=["3programs", "default-programs"])
@pytest.mark.parametrize("N,dtype", [  # bf16 up to the four-step limit (512K), fp16/fp32 (split tf32 dots) up to 64K
    pytest.param(n, d, id=f"N{n}-{str(d).split('.')[-1]}")
    for d in (torch.bfloat16, torch.float16, torch.float32)
    for n in ([8192, 32768, 131072, 524288, 1 << 21, 1 << 23] if d == torch.bfloat16 else [8192, 65536])
])
def test_four_step_persistent_kernel(N, dtype, programs, nan_memory):
    """The persistent four-step kernel (the CUDA default at N = 128K and 256K) against the fp64 reference: 5 x 7
    rows make 21 (channel, pair) items, so 3 programs reuse their scratch slots 7 times (a missing barrier between
    the passes shows up here); gates, bias, skip and an odd batch. Also the three-kernel path (programs=0). Above
    the four-step limit (bf16: N > 512K) fftconv_fwd takes the nested path (the persistent kernel on the rows of an
    outer column pass; programs=0 gives it 4 programs), which the op takes for bf16 up to N = 2M."""
    from hhfft.kernels.fftconv.monarch import fftconv_fwd
    from hhfft.lowering.fftconv import _fftconv_torch

    B, H, L, K = 5, 7, N // 2 - 3, N // 2 - 9
    g = torch.Generator(device="cuda").manual_seed(N)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64, generator=g)  # noqa: E731
    u, k, bias, skip, pre, post = r(B, H, L), r(H, K) / K**0.5, r(H), r(H), r(B, H, L), r(B, H, L)
    ref = _fftconv_torch(u, k, K // 2, L, bias, skip, pre, post)
    c = lambda x: x.to(dtype)  # noqa: E731
    y_t = _fftconv_torch(c(u), k.float(), K // 2, L, c(bias), c(skip), c(pre), c(post))
    for progs in (programs, 0):
        y = fftconv_fwd(c(u), k.float(), K // 2, L, c(bias), c(skip), c(pre), c(post), programs=progs)
        assert not torch.isnan(y).any(), f"programs={progs}: NaN (an element was not written)"
        assert _err(y, ref) <= 2 * _err(y_t, ref), f"programs={progs}: {_err(y, ref):.3e} > 2 x {_err(y_t, ref):.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N", [512, 2048, 4096, 16384])
def test_dv_dk_against_fp64(N, dtype, nan_memory):
    """fftconv_dv_dk, the backward's du and dk in one call when their FFT sizes agree (K = L), at fused sizes (one
    kernel) and a four-step size (one row kernel): against the fp64 torch.fft reference by the 2x rule; odd batch,
    NaN-poisoned buffers."""
    from hhfft.kernels.fftconv.monarch import fftconv_dv_dk
    from hhfft.lowering.fftconv import _fftconv_corr_torch, _fftconv_torch

    B, H, L = 5, 3, N // 2 - 5
    gen = torch.Generator(device="cuda").manual_seed(N)
    g, v = (torch.randn(B, H, L, device="cuda", dtype=torch.float64, generator=gen) for _ in range(2))
    kf = torch.randn(H, L, device="cuda", dtype=torch.float64, generator=gen) / L**0.5
    shift = 3
    dv_ref = _fftconv_torch(g, kf, L - 1 - shift, L, None, None, None, None)
    dk_ref = _fftconv_corr_torch(g, v, shift, L)
    c = lambda x: x.to(dtype)  # noqa: E731
    dv_t = _fftconv_torch(c(g), kf.float(), L - 1 - shift, L, None, None, None, None)
    dk_t = _fftconv_corr_torch(c(g), c(v), shift, L)
    dv, dk = fftconv_dv_dk(c(g), c(v), kf.float(), shift)
    for name, a, a_t, ref in (("dv", dv, dv_t, dv_ref), ("dk", dk, dk_t, dk_ref)):
        assert not torch.isnan(a).any(), name
        assert _err(a, ref) <= 2 * _err(a_t, ref), f"{name}: {_err(a, ref):.3e} > 2 x torch {_err(a_t, ref):.3e}"


# fused kernel's dot options: (gauss, half_tables)
DOTS = {"4dots": (False, False), "gauss": (True, False), "half16": (False, True), "gauss-half16": (True, True)}
FUSED = [("loop", 4, 512), ("loop", 1, 2048), ("stacked", 4, 512), ("stacked", 2, 2048), ("t", 4, 512), ("t", 2, 2048),
         ("t", 1, 4096)]
FUSED_DOTS = [(*c, "4dots") for c in FUSED] + [
    (*c, dots) for c in [("loop", 4, 512), ("stacked", 2, 2048), ("t", 2, 2048), ("stacked", 1, 4096)]
    for dots in ("gauss", "half16", "gauss-half16")
]


@pytest.mark.parametrize("variant,R,N,dots", [pytest.param(*c, id="-".join(map(str, c))) for c in FUSED_DOTS])
def test_fused_variants(variant, R, N, dots):
    """Each fused variant and dot option explicitly (the op picks the variant by timing): bf16, gates, bias, skip, a
    partly empty program."""
    from hhfft.kernels.fftconv.monarch import fftconv_fwd
    from hhfft.lowering.fftconv import _fftconv_torch

    B, H, L, K = 2 * R + 1, 3, N // 2 + 1, N // 2 - 1
    g = torch.Generator(device="cuda").manual_seed(N + R)
    r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float64, generator=g)  # noqa: E731
    u, k, bias, skip, pre, post = r(B, H, L), r(H, K) / K**0.5, r(H), r(H), r(B, H, L), r(B, H, L)
    ref = fftconv_naive(u, k, K // 2, L, bias, skip, pre, post)
    c = lambda x: x.to(torch.bfloat16)  # noqa: E731
    y = torch.full((B, H, L), float("nan"), device="cuda", dtype=torch.bfloat16)
    fftconv_fwd(
        c(u), k.float(), K // 2, L, c(bias), c(skip), c(pre), c(post), variant=variant, rows_per_program=R,
        gauss=DOTS[dots][0], half_tables=DOTS[dots][1], out=y,
    )
    y_t = _fftconv_torch(c(u), k.float(), K // 2, L, c(bias), c(skip), c(pre), c(post))
    assert not torch.isnan(y).any()
    assert _err(y, ref) <= 2 * _err(y_t, ref)


@pytest.mark.parametrize("L,kernel", [(1000, "fftconv_fwd_"), (40000, "fftconv_four_step_kernel")],
                         ids=["fused", "persistent-four-step"])
def test_kernel_in_compiled_code_and_cuda_graphs(L, kernel):
    from torch._inductor.utils import run_and_get_code

    u = torch.randn(4, 8, L, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, L, device="cuda")

    def f(u, k):
        return torch.ops.hhfft.fftconv(u, k, 0, L) * 2

    ref = f(u, k)
    out, codes = run_and_get_code(torch.compile(f, fullgraph=True), u, k)
    assert kernel in "\n".join(codes)  # fused: fftconv_fwd_kernel or a variant (fftconv_fwd_stacked_kernel, ...)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        out = g(u, k)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)



def _fftconv_leaf(u, k, pre, post):
    return fftconv(u, k, shift=3, out_len=u.shape[-1], pregate=pre, postgate=post)


torch.fx.wrap("_fftconv_leaf")


def _compile_fx_step(B, H, L, K, check):
    """What the hhfft backend does (FX graph with the fftconv wrapper -> compile_fx), forward and backward of a loss
    on bf16 u, pregate, postgate and an fp32 kernel of K taps; ``check(code)`` sees the generated code right after
    the compiled step, then the compiled loss and gradients are checked against eager (Inductor keeps the bf16
    elementwise work around the op in fp32, so they differ by bf16 rounding; the numerics themselves are checked by
    test_fftconv_all_sizes)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import run_and_get_code

    def f(u, k, pre, post):
        return _fftconv_leaf(u, k, pre, post).float().square().sum()

    u, pre, post = (torch.randn(B, H, L, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    k = torch.randn(H, K, device="cuda", requires_grad=True)
    compiled = compile_fx(torch.fx.symbolic_trace(f), [u, k, pre, post])

    def step():
        loss = compiled(u, k, pre, post)
        loss = loss[0] if isinstance(loss, (tuple, list)) else loss
        return loss, torch.autograd.grad(loss, (u, k, pre, post))

    (loss, grads), codes = run_and_get_code(step)
    check("\n".join(codes))
    ref_loss = f(u, k, pre, post)
    ref_grads = torch.autograd.grad(ref_loss, (u, k, pre, post))
    for name, a, b in [("loss", loss, ref_loss)] + list(zip(["u", "k", "pre", "post"], grads, ref_grads)):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel <= 2 ** -7, f"{name}: compiled vs eager relative error {rel:.2e}"


@pytest.mark.parametrize("L,K,shared", [(777, 100, False), (777, 300, False), (200, 200, True)],
                         ids=["du-N1024-dk-N2048", "N2048-apart", "N512-fftconv_dv_dk"])
def test_compile_fx_backward_calls_the_kernels(L, K, shared):
    """The compiled backward calls the Triton kernels at the fused sizes: du through the conv kernel and dk through
    the correlation kernel, or the correlation kernel for both (fftconv_dv_dk: it writes du too) where their FFT sizes
    agree, up to _DV_DK_MAX_FUSED (the postgate's gradient needs no conv here: it reads the conv that the forward
    graph computed, as in test_compile_fx_four_step_backward_calls_the_kernels)."""
    def check(code):
        assert "fftconv_corr_kernel" in code
        convs = re.findall(r"\bfftconv_fwd_\w*\.run\(", code)  # one line per launch: name_<i>.run(...)
        assert len(convs) == (0 if shared else 1), len(convs)

    _compile_fx_step(4, 16, L, K, check)


@pytest.mark.parametrize("L", [5000, 20000], ids=["N16384-P16-Q1024", "N65536-P32-Q2048"])
def test_four_step_backward_reuses_the_spectrum_and_runs_dk_in_the_kernels(L, nan_memory, monkeypatch):
    """Eager forward+backward at four-step sizes (bf16 u, fp32 k, K = L as in the benchmark): y's spectrum is built
    once and du reads it conjugated; du and dk come from fftconv_dv_dk (g's column pass and row transforms shared,
    dk by the four-step correlation kernels, not torch.fft). y, du, dk against fp64 by the 2x rule
    (test_fftconv_all_sizes, whose K < L gives dk twice du's N, covers the separate ops)."""
    from hhfft.kernels.fftconv import monarch

    B, H = 3, 4
    g = torch.Generator(device="cuda").manual_seed(L)
    u = torch.randn(B, H, L, device="cuda", dtype=torch.float64, generator=g)
    k = torch.randn(H, L, device="cuda", dtype=torch.float64, generator=g) / L**0.5
    dy = torch.randn(B, H, L, device="cuda", dtype=torch.float64, generator=g)
    y_ref, g_ref = _run(u, k, {}, 0, L, dy)  # fp64: the torch.fft path
    launched = []
    launch = monarch._launch
    monkeypatch.setattr(monarch, "_launch", lambda kern, *a, **kw: launched.append(kern) or launch(kern, *a, **kw))
    monarch.SPECTRUM_COUNTS.clear()
    y, grads = _run(u.to(torch.bfloat16), k.float(), {}, 0, L, dy)
    assert dict(monarch.SPECTRUM_COUNTS) == {"built": 1, "reused": 1}
    assert monarch.fftconv_corr_row_kernel in launched and monarch.fftconv_corr_col_kernel in launched
    assert launched.count(monarch.fftconv_col_fwd_kernel) == 3  # u, g (shared by du and dk: fftconv_dv_dk), v
    assert not monarch._KEPT and not monarch._FLIPS
    with monkeypatch.context() as m:
        m.setattr(op_mod, "_monarch", None)  # the same computation by torch.fft at this dtype
        y_t, grads_t = _run(u.to(torch.bfloat16), k.float(), {}, 0, L, dy)
    for name, a, a_t, ref in [("y", y, y_t, y_ref), *[(n, grads[n], grads_t[n], g_ref[n]) for n in ("u", "k")]]:
        assert not torch.isnan(a).any(), name
        e, e_t = _err(a, ref), _err(a_t, ref)
        assert e <= 2 * e_t, f"{name}: err {e:.3e} > 2 x torch {e_t:.3e}"


@pytest.mark.parametrize("K", [3000, 5000], ids=["K3000-du-N8192-dk-N16384-apart", "K5000-N16384-fftconv_dv_dk"])
def test_compile_fx_four_step_backward_calls_the_kernels(K):
    """The hhfft backend's path (compile_fx) at four-step sizes: the compiled backward (the code run_and_get_code sees:
    compile_fx compiles the forward before the step) holds the spectrum kernel, the four-step kernels for du and the
    four-step correlation kernels for dk, du and dk by separate ops (their FFT sizes differ) or by fftconv_dv_dk (one
    size), told apart by the column passes launched: g's for du and g's and v's for dk, where fftconv_dv_dk does g's
    once (2 instead of 3; the postgate's gradient reads the y that the forward saved); nothing is kept across calls.
    (Below N = 128K the four-step path is the three kernels; at 128K and 256K the forward's is the persistent one.)"""
    from hhfft.kernels.fftconv import monarch

    B, H, L = 3, 4, 5000  # dk: N = plan(L, L, 0) = 16384; y, du: plan(L, K, L) = 8192 (K = 3000) or 16384
    shared = monarch.dv_dk_shared(torch.empty(B, H, L, device="cuda", dtype=torch.bfloat16),
                                        torch.empty(B, H, L, device="cuda", dtype=torch.bfloat16), K)
    assert shared == (K == 5000)

    def check(code):
        for name in ("fftconv_spectrum_kernel", "fftconv_col_fwd_kernel", "fftconv_col_inv_kernel",
                     "fftconv_corr_row_kernel", "fftconv_corr_col_kernel"):
            assert name in code, name
        # apart: du's row pass and dk's correlation rows; shared: the correlation rows write du too (HAS_DV)
        assert ("fftconv_row_kernel" in code) != shared
        col_fwd = re.findall(r"\bfftconv_col_fwd_kernel\w*\.run\(", code)  # one line per launch: name_<i>.run(...)
        assert len(col_fwd) == (2 if shared else 3), len(col_fwd)
        assert not monarch._KEPT

    _compile_fx_step(B, H, L, K, check)
