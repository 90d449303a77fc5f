"""AdaHessian on CUDA: the eager and the compiled multi-tensor step against naive.py in fp64 after every step, by the
STYLE rule (error <= 2x that of naive.py with fp32 maths), fp32 and bf16 parameters (fp32 state). The check itself
is tests/optim/test_adahessian.py's, which runs on the CPU too. The optimizer as a whole against naive.py on CUDA
is checked by benchmarks/adahessian.py before it times anything."""
from __future__ import annotations

import pytest
import torch

from hhfft.optim import AdaHessian
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


@pytest.mark.parametrize("update_each", [1, 2])
def test_hutchinson_step_under_cuda_graphs(update_each):
    """AdaHessian.hutchinson_step replayed from CUDA graphs (the mutated parameters and state declared static) steps
    as hutchinson() + step() does, fp64, same probes; no graph fell back from CUDA graphs, and the curvature kept for
    the steps between curvature steps survives the replays that follow."""
    from tests.optim.test_hutchinson_step import reference_step

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).cuda().double()
        opt = AdaHessian(model.parameters(), lr=0.05, update_each=update_each,
                         generator=torch.Generator(device="cuda").manual_seed(2))
        x = torch.randn(16, 32, device="cuda", dtype=torch.float64)
        named = dict(model.named_parameters())
        return model, opt, named, lambda ps: torch.func.functional_call(model, ps, (x,)).pow(2).mean()

    model, opt, named, loss_fn = setup()
    model_r, opt_r, named_r, loss_fn_r = setup()
    torch._dynamo.utils.counters.clear()
    losses = []
    for step in range(5):
        losses.append(opt.hutchinson_step(loss_fn, named, options={"triton.cudagraphs": True}))
        loss_r = reference_step(opt_r, named_r, loss_fn_r, None)
        torch.testing.assert_close(losses[-1], loss_r, rtol=1e-10, atol=0)
        for (n, p), q in zip(named.items(), named_r.values()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=lambda m, n=n: f"step {step}, {n}: {m}")
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 0
    assert len({x.data_ptr() for x in losses}) == len(losses)  # the returned losses are not the graph's buffer
