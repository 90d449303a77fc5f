"""naive.py, the ground truth of every fftconv kernel, checked against F.conv1d in fp64 for each shape family."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hhfft.kernels.fftconv.naive import fftconv_corr_naive, fftconv_naive

CASES = [  # B, H, L, K, padding (conv1d's), dilation-free
    (1, 1, 1, 1, 0),
    (2, 3, 17, 5, 4),  # causal: pad K-1 and keep the first L
    (2, 3, 17, 5, 2),  # "same"
    (1, 2, 64, 64, 0),  # valid, K = L
    (3, 2, 33, 40, 39),  # K > L
    (1, 4, 1023, 257, 128),  # odd long
    (2, 1, 10, 3, 7),  # padding > K - 1
]


@pytest.mark.parametrize("B,H,L,K,p", CASES, ids=[f"B{c[0]}-H{c[1]}-L{c[2]}-K{c[3]}-p{c[4]}" for c in CASES])
def test_naive_matches_conv1d(B, H, L, K, p):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    w = torch.randn(H, 1, K, generator=g, dtype=torch.float64)
    bias, skip = torch.randn(H, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
    ref = F.conv1d(u, w, bias, padding=p, groups=H)
    out_len = ref.shape[-1]
    pre = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    post = torch.randn(B, H, out_len, generator=g, dtype=torch.float64)
    ref_gated = F.conv1d(u * pre, w, None, padding=p, groups=H) * post + bias[:, None] + skip[:, None] * F.pad(u, (0, out_len - L))
    k = w[:, 0].flip(-1)
    y = fftconv_naive(u, k, shift=K - 1 - p, out_len=out_len, bias=bias)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    y = fftconv_naive(u, k, shift=K - 1 - p, out_len=out_len, bias=bias, skip=skip, pregate=pre, postgate=post)
    torch.testing.assert_close(y, ref_gated, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("B,H,L,K,p", CASES, ids=[f"B{c[0]}-H{c[1]}-L{c[2]}-K{c[3]}-p{c[4]}" for c in CASES])
def test_naive_corr_is_the_kernel_gradient_of_conv1d(B, H, L, K, p):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(B, H, L, generator=g, dtype=torch.float64)
    w = torch.randn(H, 1, K, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.conv1d(u, w, None, padding=p, groups=H)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (dw,) = torch.autograd.grad(y, w, dy)
    dk = fftconv_corr_naive(dy, u, shift=K - 1 - p, K=K)
    torch.testing.assert_close(dk, dw[:, 0].flip(-1), rtol=1e-12, atol=1e-12)
