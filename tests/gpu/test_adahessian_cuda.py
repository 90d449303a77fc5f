"""AdaHessian on CUDA: the eager and the compiled multi-tensor step against naive.py in fp64 after every step, by the
STYLE rule (error <= 2x that of naive.py with fp32 maths), fp32 and bf16 parameters (fp32 state). The check itself
is tests/optim/test_adahessian.py's, which runs on the CPU too. The optimizer as a whole against naive.py on CUDA
is checked by benchmarks/adahessian.py before it times anything."""
from __future__ import annotations

import pytest
import torch

from tests.optim.test_adahessian import check_update_against_naive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_within_baseline_of_naive_on_cuda(dtype):
    check_update_against_naive("cuda", dtype)


def test_hutchinson_under_cuda_graphs_sees_parameter_updates():
    """hutchinson(options={"triton.cudagraphs": True}), the path for a host too slow to launch the HVP's kernels:
    a replay after an in-place parameter update must see the new values. Over three updates, loss, gradient and D
    (same seeded probes) against fp64 by the STYLE rule, the eager fp32 call being PyTorch's own error; no
    recompilation, and no call fell back from CUDA graphs."""
    import torch.nn as nn

    from hhfft.optim import hutchinson, rademacher
    from utils import assert_within_baseline

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).cuda()
    model64 = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)).cuda().double()
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 8, device="cuda")
    params, params64 = dict(model.named_parameters()), dict(model64.named_parameters())

    def loss_fn(m, inp, out):
        return lambda ps: (torch.func.functional_call(m, ps, (inp,)) - out).pow(2).mean()

    def flat(res):
        return [res.loss] + list(res.grads.values()) + list(res.hessian.values())

    torch._dynamo.utils.counters.clear()
    for step in range(3):
        with torch.no_grad():
            for p, p64 in zip(model.parameters(), model64.parameters()):
                p.mul_(0.8).add_(0.05)  # in place, as an optimizer updates them
                p64.copy_(p)
        gen = lambda: torch.Generator(device="cuda").manual_seed(step)  # noqa: E731
        graphed = hutchinson(loss_fn(model, x, y), params, generator=gen(), options={"triton.cudagraphs": True},
                             set_grad=False)
        eager = hutchinson(loss_fn(model, x, y), params, generator=gen(), backend=None, set_grad=False)
        z64 = [z.double() for z in rademacher(list(params.values()), gen())]
        ref = hutchinson(loss_fn(model64, x.double(), y.double()), params64, backend=None, set_grad=False,
                         probes=[dict(zip(params64, z64))])
        for i, (a, b, r) in enumerate(zip(flat(graphed), flat(eager), flat(ref))):
            assert_within_baseline(f"step {step}, output {i}", a, r, [b], dtype=torch.float32)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
