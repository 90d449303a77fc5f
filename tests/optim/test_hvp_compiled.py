"""Hessian-vector products through the hhfft backend: forward-over-reverse (``hutchinson``) compiled with
backend="hhfft", on a model whose long depthwise Conv1d the backend rewrites to fftconv, equals the eager HVP."""
from __future__ import annotations

import torch
import torch.nn as nn

import hhfft  # noqa: F401  (registers the backend for checkouts without an install)
from hhfft.optim import hutchinson, rademacher


class LongConvNet(nn.Module):
    def __init__(self, channels=4, kernel=65):
        super().__init__()
        self.inp = nn.Linear(3, channels)
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel - 1, groups=channels)  # causal, long
        self.out = nn.Linear(channels, 1)

    def forward(self, x):  # x: [B, L, 3]
        h = self.inp(x).transpose(1, 2)
        h = self.conv(h)[..., : x.shape[1]]
        return self.out(torch.tanh(h).transpose(1, 2)).mean(dim=(1, 2))


def eager_hvp(loss_fn, params, z):
    grads = torch.autograd.grad(loss_fn(params), list(params.values()), create_graph=True)
    return torch.autograd.grad(grads, list(params.values()), grad_outputs=z)


def test_hvp_through_hhfft_backend_with_rewritten_long_conv_equals_eager():
    torch.manual_seed(0)
    model = LongConvNet().double()
    x = torch.randn(2, 80, 3, dtype=torch.float64)
    y = torch.randn(2, dtype=torch.float64)
    params = dict(model.named_parameters())

    def loss_fn(ps):
        return (torch.func.functional_call(model, ps, (x,)) - y).pow(2).mean()

    z = rademacher(list(params.values()), torch.Generator().manual_seed(1))
    res = hutchinson(loss_fn, params, probes=[dict(zip(params, z))], backend="hhfft", set_grad=False)
    assert torch._dynamo.utils.counters["hhfft"]["longconv_rewritten"] == 1, "the long conv was not rewritten"
    hz = eager_hvp(loss_fn, params, z)
    for (n, p), zi, h in zip(params.items(), z, hz):
        torch.testing.assert_close(res.hessian[n], zi * h, rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(res.grads[n], torch.autograd.grad(loss_fn(params), p)[0], rtol=1e-9, atol=1e-12)
