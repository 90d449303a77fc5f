"""AdaHessian on CUDA: the compiled multi-tensor step against the eager one, fp32 and bf16 parameters (fp32 state).
The optimizer against naive.py on CUDA is checked by benchmarks/adahessian.py before it times anything."""
from __future__ import annotations

import pytest
import torch

from hhfft.kernels.adahessian.step import adahessian_update, adahessian_update_fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_step_matches_eager_on_cuda(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 3, 3), (257,), (300, 129)]
    dshapes = [(64, 32, 1, 1), (257,), (300, 129)]

    def make():
        return dict(
            p=[torch.randn(s, generator=g).to("cuda", dtype) for s in shapes],
            g=[torch.randn(s, generator=g).to("cuda", dtype) for s in shapes],
            d=[torch.rand(s, generator=g).cuda() for s in dshapes],
            m=[torch.zeros(s, device="cuda") for s in shapes],
            v=[torch.zeros(s, device="cuda") for s in shapes],
            t=[torch.zeros((), device="cuda") for _ in shapes],
        )

    a = make()
    b = {k: [x.clone() for x in v] for k, v in a.items()}
    lr = torch.tensor(0.1, device="cuda")
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-4, weight_decay=0.01, hessian_power=0.7)
    for _ in range(3):
        adahessian_update(a["p"], a["g"], a["d"], a["m"], a["v"], a["t"], lr, **kw)
        adahessian_update_fused(b["p"], b["g"], b["d"], b["m"], b["v"], b["t"], lr, **kw)
    for x, y in zip(a["v"] + a["m"], b["v"] + b["m"]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)
    for x, y in zip(a["p"], b["p"]):  # bf16 parameters: one rounding of the same fp32 value
        torch.testing.assert_close(y.float(), x.float(), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)
