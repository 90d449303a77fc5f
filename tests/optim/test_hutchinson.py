"""Hutchinson's estimator: exact on diagonal quadratics, unbiased on dense ones, and the same through both HVP paths;
AdaHessian against an independent implementation (torch-optimizer's Adahessian) given the same probes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from hhfft.optim import AdaHessian, hutchinson, rademacher
from hhfft.optim.hutchinson import _own_buffer


def test_rademacher_is_exactly_plus_minus_one_and_seeded():
    ts = [torch.empty(3, 5), torch.empty(7, dtype=torch.bfloat16), torch.empty(2, 2, 2, dtype=torch.float64)]
    a = rademacher(ts, torch.Generator().manual_seed(1))
    b = rademacher(ts, torch.Generator().manual_seed(1))
    for t, x, y in zip(ts, a, b):
        assert x.shape == t.shape and x.dtype == t.dtype
        assert bool(((x == 1) | (x == -1)).all())
        assert torch.equal(x, y)
    big = rademacher([torch.empty(100_000)], torch.Generator().manual_seed(2))[0]
    assert abs(big.mean().item()) < 0.02  # 6 sigma for 1e5 fair signs


def _diag_quadratic(a):
    return lambda ps: 0.5 * (a * ps["x"] ** 2).sum()


@settings(max_examples=20)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), n_samples=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_diagonal_quadratic_is_exact_for_any_probe(n, seed, n_samples, dtype):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=dtype) * 3
    x = torch.randn(n, generator=g, dtype=dtype, requires_grad=True)
    res = hutchinson(_diag_quadratic(a), {"x": x}, generator=g, n_samples=n_samples, backend=None, set_grad=False)
    assert torch.equal(res.hessian["x"], a)
    assert torch.equal(res.grads["x"], a * x.detach())

    # the create_graph path inside AdaHessian
    opt = AdaHessian([x], generator=g, n_samples=n_samples, fused=False)
    x.grad = None
    (0.5 * (a * x**2).sum()).backward(create_graph=True)
    D = opt._hutchinson([x], [x.grad])[0]
    if n_samples == 1:
        assert torch.equal(D.abs(), a.abs())  # one probe: the optimizer keeps Hz = a * z (only |D| is used)
    else:
        assert torch.equal(D, a)


def test_dense_quadratic_mean_converges_to_diagonal():
    """D_i = H_ii + sum_{j != i} H_ij z_i z_j: the error is a sum of independent +-H_ij terms. Hoeffding over N probes
    and a union bound over the n coordinates: P(any |mean D_i - H_ii| > t_i) <= delta for
    t_i = sqrt(2 ln(2n/delta) sum_{j != i} H_ij^2 / N). With delta = 1e-6 a correct estimator fails once in 10^6 seeds;
    a biased one (e.g. forgetting z *) is off by O(1)."""
    n, N, delta = 8, 300, 1e-6
    g = torch.Generator().manual_seed(0)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = B + B.T
    x = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    res = hutchinson(lambda ps: 0.5 * ps[0] @ H @ ps[0], [x], generator=g, n_samples=N, backend=None, set_grad=False)
    off = (H**2).sum(1) - H.diag() ** 2
    bound = torch.sqrt(2 * math.log(2 * n / delta) * off / N)
    err = (res.hessian[0] - H.diag()).abs()
    assert bool((err <= bound).all()), f"errors {err.tolist()} above the Hoeffding bounds {bound.tolist()}"


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


def _cnn_data(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def test_same_trajectory_as_torch_optimizer(monkeypatch):
    torch_optimizer = pytest.importorskip("torch_optimizer")  # in the `test` extra; absent only outside it
    torch.manual_seed(0)
    ours_model = SmallCNN().double()
    ref_model = SmallCNN().double()
    ref_model.load_state_dict(ours_model.state_dict())
    hp = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-4, weight_decay=1e-3, hessian_power=1.0)
    # the fused step equals the eager one (test_adahessian.py); the eager one keeps this test free of compiles
    ours = AdaHessian(ours_model.parameters(), generator=torch.Generator().manual_seed(4), fused=False, **hp)
    ref = torch_optimizer.Adahessian(ref_model.parameters(), **hp)
    probe_gen = torch.Generator().manual_seed(4)  # replays our probes for torch-optimizer's randint_like
    queue = []
    real_randint_like = torch.randint_like

    def injected(p, *args, **kwargs):
        z = queue.pop(0)
        assert z.shape == p.shape
        return (z + 1) / 2  # its probe is 2 * randint_like(p, high=2) - 1

    for t in range(20):
        x, y = _cnn_data(t)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
        queue[:] = rademacher(list(ref_model.parameters()), probe_gen)
        monkeypatch.setattr(torch, "randint_like", injected)
        ref.step()
        monkeypatch.setattr(torch, "randint_like", real_randint_like)
        assert not queue
        ours.step()
        for (n, p), q in zip(ref_model.named_parameters(), ours_model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-9, msg=lambda m, n=n, t=t: f"step {t + 1}, {n}: {m}")


def test_functional_path_equals_create_graph_path():
    torch.manual_seed(1)
    model = SmallCNN().double()
    x, y = _cnn_data(0)
    params = dict(model.named_parameters())

    def loss_fn(ps):
        return nn.functional.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

    res = hutchinson(loss_fn, params, generator=torch.Generator().manual_seed(9), n_samples=2, backend=None,
                     set_grad=False)
    nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
    opt = AdaHessian(model.parameters(), generator=torch.Generator().manual_seed(9), n_samples=2, fused=False)
    D = opt._hutchinson(list(params.values()), [p.grad for p in params.values()])
    for (n, p), d in zip(params.items(), D):
        torch.testing.assert_close(res.hessian[n].abs(), d.abs(), rtol=1e-10, atol=1e-12,
                                   msg=lambda m, n=n: f"{n}: {m}")
        torch.testing.assert_close(res.grads[n], p.grad.detach(), rtol=1e-10, atol=1e-12)


def test_frozen_parameters_are_constants_as_for_backward():
    """dict(model.named_parameters()) with a frozen layer: the functional path steps exactly as backward() does (the
    frozen layer draws no probe, gets no .grad and does not move); it moved under weight decay before."""
    def setup():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        m[0].requires_grad_(False)
        return m, AdaHessian(m.parameters(), lr=0.1, weight_decay=0.1, fused=False,
                             generator=torch.Generator().manual_seed(0))

    x = torch.randn(16, 4, dtype=torch.float64)
    ref, opt = setup()
    ref(x).pow(2).mean().backward(create_graph=True)
    opt.step()
    model, opt = setup()
    frozen = model[0].weight.clone()
    res = hutchinson(lambda ps: torch.func.functional_call(model, ps, (x,)).pow(2).mean(),
                     dict(model.named_parameters()), generator=opt.generator, backend=None)
    opt.step(hessian=res)
    assert model[0].weight.grad is None and torch.equal(model[0].weight, frozen)
    assert model[0].weight not in res.hessian_by_param
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kwargs, error, match", [
    ({"probes": []}, ValueError, "at least one probe"),
    ({"options": {"a": [1]}, "backend": "inductor"}, TypeError, "hashable"),
], ids=["no-probes", "unhashable-options"])
def test_bad_arguments_say_what_to_give(kwargs, error, match):
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(error, match=match):
        hutchinson(lambda ps: (ps["w"] ** 4).sum(), {"w": w}, **{"backend": None, **kwargs})


@pytest.mark.parametrize("backend", [None, "inductor"], ids=["eager", "inductor"])
def test_set_grad_takes_a_fresh_gradient_without_copying(backend):
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    x = torch.randn(5, 4)
    res = hutchinson(lambda ps: ((x @ ps["w"] + ps["b"]) ** 2).sum(), {"w": w, "b": b}, backend=backend)
    assert w.grad is res.grads["w"] and b.grad is res.grads["b"]
    torch.testing.assert_close(w.grad, 2 * x.t() @ (x @ w.detach() + b.detach()))


def test_set_grad_copies_gradients_of_cuda_graphs():
    """Under CUDA graphs (Inductor's option or global config) the outputs live in the graph's pool, which the next
    replay overwrites: .grad gets a copy (on the CPU Inductor skips the graphs, so only the decision is tested)."""
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    res = hutchinson(lambda ps: ((x @ ps["w"]) ** 2).sum(), {"w": w}, backend="inductor",
                     options={"triton.cudagraphs": True})
    assert w.grad is not res.grads["w"]
    torch.testing.assert_close(w.grad, res.grads["w"], rtol=0, atol=0)


def test_set_grad_copies_a_gradient_whose_memory_is_shared():
    p = torch.empty(4, 3)
    assert _own_buffer(torch.randn(4, 3), p)
    bucket = torch.randn(24)  # the distributed path's gradients are views of one all-reduced bucket
    assert not _own_buffer(bucket[:12].view(4, 3), p) and not _own_buffer(bucket[12:].view(4, 3), p)
    t = torch.randn(4, 3)
    alias = t.detach()  # e.g. a function that returns one of its inputs as a gradient
    assert not _own_buffer(alias, p)
    assert not _own_buffer(torch.randn(3, 4).t(), p)  # not laid out like the parameter
    assert not _own_buffer(torch.randn(()).expand(4, 3), p)
