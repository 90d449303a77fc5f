"""hhfft::fftconv / hhfft::fftconv_corr on the CPU (their plain-torch implementation): values against naive.py in
fp64, first and second derivatives (gradcheck, gradgradcheck, forward-over-reverse, jvp), and torch.compile."""
from __future__ import annotations

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st

import hhfft  # noqa: F401  (registers the ops)
from hhfft.kernels.fftconv.naive import fftconv_corr_naive, fftconv_naive
from hhfft.lowering.fftconv import fftconv, fftconv_corr

F64 = dict(dtype=torch.float64)


def _args(B, H, L, K, T, gates, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, **F64)  # noqa: E731
    extra = dict(bias=r(H), skip=r(H), pregate=r(B, H, L), postgate=r(B, H, T)) if gates else {}
    return r(B, H, L), r(H, K), extra


# (B, H, L, K, shift, out_len): causal, Conv1d "same" (odd and even K), odd sizes, shift beyond K, negative shift,
# out_len longer than the full convolution, K longer than L
SHAPES = [
    pytest.param(2, 3, 37, 11, 0, 37, id="causal-B2-H3-L37-K11"),
    pytest.param(1, 2, 64, 9, 4, 64, id="same-oddK-L64-K9"),
    pytest.param(3, 1, 50, 8, 3, 50, id="same-evenK-B3-L50-K8"),
    pytest.param(2, 2, 33, 5, 9, 20, id="shift-beyond-K-T20"),
    pytest.param(1, 1, 40, 7, -3, 45, id="negative-shift-T45"),
    pytest.param(2, 1, 17, 5, 0, 30, id="T-longer-than-full-conv"),
    pytest.param(1, 2, 9, 25, 12, 9, id="K-longer-than-L"),
]


@pytest.mark.parametrize("gates", [False, True], ids=["plain", "gates"])
@pytest.mark.parametrize("B,H,L,K,shift,T", SHAPES)
def test_op_matches_naive_fp64(B, H, L, K, shift, T, gates):
    u, k, extra = _args(B, H, L, K, T, gates)
    y = torch.ops.hhfft.fftconv(u, k, shift, T, **extra)
    torch.testing.assert_close(y, fftconv_naive(u, k, shift, T, **extra), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,H,L,K,shift,T", SHAPES)
def test_corr_matches_naive_fp64(B, H, L, K, shift, T):
    g = torch.randn(B, H, T, **F64)
    v = torch.randn(B, H, L, **F64)
    torch.testing.assert_close(
        torch.ops.hhfft.fftconv_corr(g, v, shift, K), fftconv_corr_naive(g, v, shift, K), rtol=1e-10, atol=1e-10
    )


@settings(max_examples=25)
@given(
    B=st.integers(1, 3), H=st.integers(1, 3), L=st.integers(1, 40), K=st.integers(1, 40),
    shift=st.integers(-10, 50), T=st.integers(1, 60), gates=st.booleans(),
)
def test_op_matches_naive_property(B, H, L, K, shift, T, gates):
    u, k, extra = _args(B, H, L, K, T, gates, seed=B * 1000 + L)
    torch.testing.assert_close(
        fftconv(u, k, shift=shift, out_len=T, **extra), fftconv_naive(u, k, shift, T, **extra), rtol=1e-9, atol=1e-9
    )


def _leaves(B=1, H=2, L=7, K=3, T=7):
    u, k, extra = _args(B, H, L, K, T, True, seed=3)
    return [x.requires_grad_() for x in (u, k, *extra.values())]


def _f(shift, T):
    def f(u, k, bias, skip, pregate, postgate):
        return fftconv(u, k, shift=shift, out_len=T, bias=bias, skip=skip, pregate=pregate, postgate=postgate)

    return f


@pytest.mark.parametrize("shift,T", [(0, 7), (1, 7), (4, 5)], ids=["causal", "same", "shift4-T5"])
def test_gradcheck(shift, T):
    assert torch.autograd.gradcheck(_f(shift, T), _leaves(T=T))


def test_gradgradcheck():
    assert torch.autograd.gradgradcheck(_f(1, 7), _leaves())


def test_corr_gradcheck():
    g = torch.randn(1, 2, 6, **F64, requires_grad=True)
    v = torch.randn(1, 2, 7, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, v: fftconv_corr(g, v, shift=2, K=5), (g, v))
    assert torch.autograd.gradgradcheck(lambda g, v: fftconv_corr(g, v, shift=2, K=5), (g, v))


def test_jvp_matches_naive():
    primals = tuple(x.detach() for x in _leaves())
    tangents = tuple(torch.randn_like(x) for x in primals)
    _, t = torch.func.jvp(_f(1, 7), primals, tangents)
    _, t_ref = torch.func.jvp(lambda *a: fftconv_naive(a[0], a[1], 1, 7, *a[2:]), primals, tangents)
    torch.testing.assert_close(t, t_ref, rtol=1e-9, atol=1e-9)


def test_forward_over_reverse_hvp_matches_naive():
    """torch.func.jvp(torch.func.grad(f)): the Hessian-vector product AdaHessian compiles."""
    primals = tuple(x.detach() for x in _leaves())
    tangents = tuple(torch.randn_like(x) for x in primals)

    def loss(fn):
        return lambda *a: (fn(*a) ** 2).sum()

    argnums = tuple(range(len(primals)))
    naive = lambda *a: fftconv_naive(a[0], a[1], 1, 7, *a[2:])  # noqa: E731
    _, hvp = torch.func.jvp(torch.func.grad(loss(_f(1, 7)), argnums=argnums), primals, tangents)
    _, hvp_ref = torch.func.jvp(torch.func.grad(loss(naive), argnums=argnums), primals, tangents)
    for a, b in zip(hvp, hvp_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def _fftconv_leaf(u, k):
    return fftconv(u, k, shift=4, out_len=40)


torch.fx.wrap("_fftconv_leaf")


def test_compile_fx_cpu_forward_backward_without_config_patch():
    """What the hhfft backend does (an FX graph calling the fftconv wrapper -> Inductor's compile_fx) works on the CPU
    with default config: Inductor traces the triton_op bodies down their torch.fft branch, forward and backward."""
    from torch._inductor.compile_fx import compile_fx

    def f(u, k):
        return _fftconv_leaf(u, k).sin().sum()

    u, k = torch.randn(2, 3, 40, requires_grad=True), torch.randn(3, 9, requires_grad=True)
    compiled = compile_fx(torch.fx.symbolic_trace(f), [u, k])
    loss = compiled(u, k)
    loss = loss[0] if isinstance(loss, (tuple, list)) else loss
    grads = torch.autograd.grad(loss, (u, k))
    grads_ref = torch.autograd.grad(f(u, k), (u, k))
    torch.testing.assert_close(loss, f(u, k), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_partial_convolution_is_exact_for_the_truncated_kernel():
    u, k, extra = _args(2, 3, 30, 12, 30, True, seed=7)
    k = k.requires_grad_()
    y = fftconv(u, k, shift=2, out_len=30, taps=5, **extra)
    torch.testing.assert_close(y, fftconv_naive(u, k[:, :5].detach(), 2, 30, **extra), rtol=1e-10, atol=1e-10)
    (dk,) = torch.autograd.grad(y.sum(), k)
    assert dk[:, 5:].abs().max() == 0 and dk[:, :5].abs().max() > 0
    with pytest.raises(ValueError, match="taps must be"):
        fftconv(u, k, taps=13)


# ------------------------------------------------------------------- the op's kernel branch (Triton interpreter)
@pytest.fixture
def kernel_branch(monkeypatch):
    """(op module, monarch module, device) for the op's kernel branch at small sizes: under the Triton interpreter
    (tests/conftest.py sets it without a GPU) on CPU tensors, the branch's CUDA test patched out; on a CUDA host
    without the interpreter on the GPU. The fused limit is lowered to N = 512 so that larger sizes take the four-step
    path (y, du and dk), and the dots are "ieee" (the interpreter has no tf32; its bf16 dots are broken, so the inputs
    are fp16)."""
    import hhfft.lowering.fftconv as op_mod
    from hhfft.kernels.fftconv import monarch

    interpreted = bool(monarch._INTERPRET) and isinstance(monarch.fftconv_fwd_kernel, monarch._INTERPRET)
    if not interpreted and not torch.cuda.is_available():
        pytest.skip("the Monarch kernels need CUDA or the Triton interpreter (TRITON_INTERPRET=1)")
    device = "cpu" if interpreted else "cuda"
    if interpreted:
        monkeypatch.setattr(
            op_mod, "_use_kernels", lambda x, *o: op_mod._monarch is not None and x.dtype != torch.float64 and all(
                t is None or t.dtype != torch.float64 for t in o)
        )
    monkeypatch.setattr(monarch, "precision_for", lambda dtype: "ieee")
    monkeypatch.setitem(monarch._MAX_FUSED, "ieee", 512)
    monarch.SPECTRUM_COUNTS.clear()
    yield op_mod, monarch, device
    monarch._KEEP.clear()
    monarch._KEPT.clear()
    monarch._FLIPS.clear()


def _max_err(x, ref):
    return (x.double() - ref).abs().max().item()


# (B, H, L, K, shift, gates): y's and du's N = 256 and 512 (fused) and 4096 (four-step, P16 x Q256); dk's N =
# plan(L, L, 0): 512 (fused: apart from du, or one op and one kernel for both), 4096 (four-step: one op for du and dk,
# with and without gates) and 8192 (four-step, P16 x Q512, du and dk apart); odd batch (a half-empty pair). With
# T = 4000 > L du's N is 8192 (no spectrum to share) and dk's too (one op for both).
KERNEL_CASES = [
    pytest.param(3, 2, 129, 100, 0, 129, True, id="N256-fused-B3-H2-L129-K100-causal-gates"),
    pytest.param(3, 2, 200, 200, 5, 200, True, id="N512-fused-dv-dk-B3-H2-L200-K200-shift5-gates"),
    pytest.param(3, 2, 1500, 1001, 0, 1500, False, id="N4096-fourstep-B3-H2-L1500-K1001-causal"),
    pytest.param(3, 1, 2049, 1500, 7, 2049, True, id="N4096-fourstep-B3-H1-L2049-K1500-shift7-gates"),
    pytest.param(3, 1, 1500, 1001, 7, 1500, True, id="N4096-fourstep-B3-H1-L1500-K1001-shift7-gates"),
    pytest.param(3, 1, 1500, 1001, 3, 4000, False, id="N4096-fourstep-B3-H1-L1500-K1001-T4000-du-N8192"),
]


@pytest.mark.parametrize("B,H,L,K,shift,T,gates", KERNEL_CASES)
def test_kernel_branch_forward_and_all_gradients(B, H, L, K, shift, T, gates, kernel_branch, monkeypatch):
    """y and every gradient through the op's kernel branch (fp16 inputs, fp32 k) against naive.py in fp64, by the
    STYLE rule: error <= 2x that of the same computation by the op's torch.fft branch at fp16. The backward's du
    reuses the forward's spectrum of k (conjugated) instead of building one for flip(k) when both have one FFT size;
    dk comes from the correlation kernels (fused or four-step), not torch.fft."""
    op_mod, monarch, dev = kernel_branch
    u, k, extra = _args(B, H, L, K, T, gates, seed=11)
    dy = torch.randn(B, H, T, **F64, generator=torch.Generator().manual_seed(12))
    names = ["u", "k", *extra]
    leaves = [x.clone().requires_grad_() for x in (u, k, *extra.values())]
    y_ref = fftconv_naive(leaves[0], leaves[1], shift, T, *leaves[2:])
    refs = [y_ref.detach(), *torch.autograd.grad(y_ref, leaves, dy)]

    def run():
        xs = [u.half(), k.float(), *(x.half() for x in extra.values())]
        xs = [x.to(dev).requires_grad_() for x in xs]
        y = fftconv(xs[0], xs[1], shift=shift, out_len=T, **dict(zip(names[2:], xs[2:])))
        return [x.cpu() for x in (y.detach(), *torch.autograd.grad(y, xs, dy.to(dev, torch.float16)))]

    launched, with_dv = [], []
    launch = monarch._launch

    def spy(kernel, *a, **kw):
        launched.append(kernel)
        with_dv.append(kw.get("HAS_DV"))
        return launch(kernel, *a, **kw)

    monkeypatch.setattr(monarch, "_launch", spy)
    outs = run()
    counts = dict(monarch.SPECTRUM_COUNTS)
    shared = monarch.plan(T, K, L) == monarch.plan(T, L, 0)  # du and dk by one op (fftconv_dv_dk)
    four_step = monarch.plan(T, L, 0) > 512
    corr = monarch.fftconv_corr_col_kernel if four_step else monarch.fftconv_corr_kernel
    assert corr in launched, [getattr(x, "__name__", x) for x in launched]
    if not four_step:  # the fused-size dk kernel writes du too (HAS_DV) exactly when both have one N
        assert [d for x, d in zip(launched, with_dv) if x is corr] == [shared]
    if four_step:  # column passes: u, g, v (+ v again for the postgate gradient's y); g's is shared by dv and dk
        assert launched.count(monarch.fftconv_col_fwd_kernel) == (3 if shared else 4) + gates
    monkeypatch.setattr(op_mod, "_monarch", None)  # the same computation by torch.fft at fp16
    outs_t = run()
    for name, a, a_t, ref in zip(["y", *names], outs, outs_t, refs):
        assert not torch.isnan(a).any(), f"{name}: NaN"
        e, e_t = _max_err(a, ref), _max_err(a_t, ref)
        assert e <= 2 * e_t, f"{name}: error {e:.3e} > 2 x torch's {e_t:.3e}"
    # y's spectrum built once, du's taken from it (same N); the gated backward's postgate gradient recomputes y
    reuse = monarch.plan(L, K, T) == monarch.plan(T, K, L)
    expected = {"built": 1 + gates + (not reuse), "reused": int(reuse)}
    assert counts == {n: c for n, c in expected.items() if c}, counts
    assert not monarch._KEPT and not monarch._FLIPS


def test_no_spectrum_kept_where_the_backward_cannot_take_it(kernel_branch):
    """A grad-enabled forward marks k only when du can reuse its spectrum (README, "One spectrum per step"): not on
    the torch.fft path (fp32 inputs), not when du's FFT size differs (out_len > L), and the mark never outlives the
    call. A grad-enabled evaluation loop over varied lengths keeps at most one spectrum per k."""
    _, monarch, dev = kernel_branch
    k = torch.randn(2, 100, device=dev)
    for dtype, L, T in [(torch.float32, 129, 129), (torch.float16, 129, 420)]:  # torch.fft path; y's N 512, du's 1024
        u = torch.randn(1, 2, L, device=dev, dtype=dtype, requires_grad=True)
        fftconv(u, k, out_len=T)
        assert not monarch._KEEP and not monarch._KEPT, (dtype, L, T)
    assert dict(monarch.SPECTRUM_COUNTS) == {"built": 1}  # the fp16 call built its spectrum in the kernels
    for L in (129, 200, 129, 300):  # y's and du's N: 256, 512, 256, 512 (fused)
        fftconv(torch.randn(1, 2, L, device=dev, dtype=torch.float16, requires_grad=True), k)
        assert len(monarch._KEPT) == 1 and not monarch._KEEP, L


def test_make_fx_real_mode_keeps_and_serves_no_spectrum(kernel_branch):
    """make_fx in real mode (no fake mode, is_compiling() False) over the eager autograd path: nothing is kept or
    served, so the graph builds the spectrum for y and for du itself instead of baking in a kept one."""
    from torch.fx.experimental.proxy_tensor import make_fx

    _, monarch, dev = kernel_branch
    u = torch.randn(1, 2, 129, device=dev, dtype=torch.float16, requires_grad=True)
    k = torch.randn(2, 100, device=dev, requires_grad=True)

    def fwd(u, k):
        return fftconv(u, k)

    def fwd_bwd(u, k):
        return torch.autograd.grad(fftconv(u, k).float().square().sum(), (u, k))

    make_fx(fwd, tracing_mode="real")(u, k)
    assert not monarch._KEEP and not monarch._KEPT
    make_fx(fwd_bwd, tracing_mode="real")(u, k)
    assert not monarch._KEEP and not monarch._KEPT and not monarch._FLIPS
    assert "reused" not in monarch.SPECTRUM_COUNTS, dict(monarch.SPECTRUM_COUNTS)


def test_empty_batch_and_channels():
    """pocketfft/MKL refuse an empty transform: B = 0 (or H = 0) raised where F.conv1d returns an empty result."""
    for shape in ((0, 4, 50), (2, 0, 50)):
        u = torch.randn(*shape, requires_grad=True)
        k = torch.randn(shape[1], 9, requires_grad=True)
        y = fftconv(u, k)
        assert y.shape == shape
        y.sum().backward()
        assert u.grad.shape == u.shape and k.grad.shape == k.shape and not k.grad.any()
