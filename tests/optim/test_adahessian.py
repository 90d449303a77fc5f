"""AdaHessian against the transcription of the official algorithm (hhfft/kernels/adahessian/naive.py), and its API."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

from hhfft.kernels.adahessian.naive import adahessian_step_naive, average_curvature_naive, hutchinson_naive
from hhfft.kernels.adahessian.step import adahessian_update, adahessian_update_fused
from hhfft.optim import AdaHessian, rademacher
from tests.utils import assert_within_baseline


class AllConvs(nn.Module):
    """Linear, Conv1d, Conv2d, Conv3d, all with biases: every branch of the spatial averaging."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(1, 2, 3)
        self.c2 = nn.Conv2d(1, 2, 3)
        self.c3 = nn.Conv3d(1, 2, 3)
        self.fc1 = nn.Linear(10 + 18 + 16, 4)
        self.fc2 = nn.Linear(4, 1)

    def forward(self, x1, x2, x3):
        h = torch.cat([self.c1(x1).flatten(1), self.c2(x2).flatten(1), self.c3(x3).flatten(1)], dim=1)
        return self.fc2(torch.tanh(self.fc1(torch.tanh(h))))


def make_data(batch=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = (torch.randn(batch, 1, 7, generator=g), torch.randn(batch, 1, 5, 5, generator=g),
          torch.randn(batch, 1, 4, 4, 4, generator=g))
    y = torch.randn(batch, 1, generator=g)
    return tuple(x.to(dtype) for x in xs), y.to(dtype)


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return AllConvs().to(dtype)


def loss_of(model, xs, y):
    return (model(*xs) - y).pow(2).mean()


def groups_of(model, block_length):
    # fc2.weight has 4 entries: its own group without block averaging when blocks are asked for.
    if block_length is None:
        return list(model.parameters())
    first = [p for n, p in model.named_parameters() if not n.startswith("fc2")]
    return [{"params": first, "block_length": block_length}, {"params": list(model.fc2.parameters()), "block_length": None}]


CONFIGS = {
    "defaults": dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0, n_samples=1,
                     block_length=None),
    "wd-k0.5-S2-block2": dict(lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=1e-2, hessian_power=0.5,
                              n_samples=2, block_length=2),
}


def run_naive(model, data, steps, cfg, seed):
    """The official loop: backward(create_graph=True), Hutchinson, spatial average, per-parameter update."""
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    block_of = {n: (None if (cfg["block_length"] is None or n.startswith("fc2")) else cfg["block_length"])
                for n in named}
    state = {n: {} for n in named}
    history = []
    for t in range(steps):
        xs, y = data[t % len(data)]
        for p in named.values():
            p.grad = None
        loss_of(model, xs, y).backward(create_graph=True)
        params = list(named.values())
        grads = [p.grad for p in params]
        probes = [rademacher(params, gen) for _ in range(cfg["n_samples"])]
        D = hutchinson_naive(grads, params, probes)
        for (n, p), g, d in zip(named.items(), grads, D):
            dbar = average_curvature_naive(d.detach(), block_of[n])
            adahessian_step_naive(p, g.detach(), dbar, state[n], lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"],
                                  weight_decay=cfg["weight_decay"], hessian_power=cfg["hessian_power"])
        history.append({n: p.detach().clone() for n, p in named.items()})
    return history


_HISTORIES: dict = {}


def naive_history(cfg_name, steps, seed):
    """The naive trajectory, computed once per configuration and shared by the fused and eager tests."""
    key = (cfg_name, steps, seed)
    if key not in _HISTORIES:
        _HISTORIES[key] = run_naive(make_model(), DATA, steps, CONFIGS[cfg_name], seed)
    return _HISTORIES[key]


DATA = [make_data(seed=s) for s in range(5)]


# The fused step runs the general configuration (two groups, weight decay, k=0.5, two probes, blocks); the eager
# step runs both. (The fused and eager steps also agree on the defaults in test_changing_lr_does_not_recompile.)
@pytest.mark.parametrize(
    "cfg_name, fused",
    [("wd-k0.5-S2-block2", True), ("wd-k0.5-S2-block2", False), ("defaults", False)],
    ids=["wd-k0.5-S2-block2-fused", "wd-k0.5-S2-block2-eager", "defaults-eager"],
)
def test_follows_naive_50_steps(cfg_name, fused):
    cfg = CONFIGS[cfg_name]
    steps, seed, data = 50, 1234, DATA
    history = naive_history(cfg_name, steps, seed)
    model = make_model()

    opt_cfg = {k: v for k, v in cfg.items() if k != "block_length"}
    opt = AdaHessian(groups_of(model, cfg["block_length"]), generator=torch.Generator().manual_seed(seed),
                     fused=fused, **opt_cfg)
    for t in range(steps):
        xs, y = data[t % len(data)]
        opt.zero_grad()
        loss_of(model, xs, y).backward(create_graph=True)
        opt.step()
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                p.detach(), history[t][n], rtol=1e-6, atol=1e-6,
                msg=lambda m, n=n, t=t: f"step {t + 1}, parameter {n}: {m}",
            )


def check_update_against_naive(device: str, dtype: torch.dtype, steps: int = 3) -> None:
    """The eager and the fused update against naive.py in fp64, by the STYLE rule, after every step.

    A conv weight (Dbar [O, I, 1, 1], broadcast), a bias and a matrix, from zero state (the first steps are where
    the bias corrections 1 - b^t are small). PyTorch's own error is naive.py with fp32 maths, the parameter rounded
    to ``dtype`` after each step (what an optimizer with fp32 state does). The floor is in fp32 ulps (the maths'
    dtype), so a bf16 parameter is held to its rounding error, not to 4 bf16 ulps.
    """
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 3, 3), (257,), (300, 129)]
    dshapes = [(64, 32, 1, 1), (257,), (300, 129)]
    p0 = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    g0 = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    d0 = [torch.rand(s, generator=gen).to(device) for s in dshapes]
    lr, betas = 0.1, (0.9, 0.999)
    kw = dict(eps=1e-4, weight_decay=0.01, hessian_power=0.7)

    naive = {}  # maths dtype -> (params, states)
    for mdt in (torch.float64, torch.float32):
        naive[mdt] = ([p.to(mdt) for p in p0], [{} for _ in p0])
    ours = {}  # update -> (p, m, v, t)
    for update in (adahessian_update, adahessian_update_fused):
        ours[update] = ([p.clone() for p in p0], [torch.zeros(s, device=device) for s in shapes],
                        [torch.zeros(s, device=device) for s in shapes],
                        [torch.zeros((), device=device) for _ in shapes])
    lr_t = torch.tensor(lr, device=device)
    for t in range(1, steps + 1):
        for mdt, (ps, states) in naive.items():
            for p, g, d, st in zip(ps, g0, d0, states):
                adahessian_step_naive(p, g.to(mdt), d.to(mdt), st, lr=lr, betas=betas, **kw)
                if mdt != torch.float64:
                    p.data = p.data.to(dtype).to(mdt)
        for update, (p, m, v, steps_t) in ours.items():
            update(p, g0, d0, m, v, steps_t, lr_t, beta1=betas[0], beta2=betas[1], **kw)
        ref, base = naive[torch.float64], naive[torch.float32]
        for update, (p, m, v, _) in ours.items():
            for i, s in enumerate(shapes):
                for name, out, key in (("p", p[i], None), ("m", m[i], "exp_avg"), ("v", v[i], "exp_hessian_diag_sq")):
                    r = ref[0][i] if key is None else ref[1][i][key]
                    b = base[0][i] if key is None else base[1][i][key]
                    assert_within_baseline(f"{update.__name__} {name}{list(s)} {dtype} step {t}", out, r, [b],
                                           dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_update_within_baseline_of_naive(dtype):
    check_update_against_naive("cpu", dtype)


def train(model, opt, data, steps, *, start=0):
    for t in range(start, start + steps):
        xs, y = data[t % len(data)]
        opt.zero_grad()
        loss_of(model, xs, y).backward(create_graph=opt.hessian_due)
        opt.step()


def test_closure_form_equals_official_usage():
    a, b = make_model(), make_model()
    opt_a = AdaHessian(a.parameters(), generator=torch.Generator().manual_seed(3), fused=False)
    opt_b = AdaHessian(b.parameters(), generator=torch.Generator().manual_seed(3), fused=False)
    train(a, opt_a, DATA, 4)
    for t in range(4):
        xs, y = DATA[t]

        def closure():
            opt_b.zero_grad()
            loss = loss_of(b, xs, y)
            loss.backward(create_graph=True)
            return loss

        loss = opt_b.step(closure)
        assert loss.shape == ()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")


def test_state_dict_round_trip_resumes_identically():
    model = make_model()
    opt = AdaHessian(model.parameters(), update_each=2, generator=torch.Generator().manual_seed(5), fused=False)
    train(model, opt, DATA, 5)  # odd: the resumed run starts on a step that reuses the stored curvature
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, DATA, 6, start=5)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make_model(seed=99)
    resumed.load_state_dict(ckpt["model"])
    opt2 = AdaHessian(resumed.parameters(), update_each=2, generator=torch.Generator().manual_seed(77), fused=False)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, DATA, 6, start=5)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, n=n: f"{n} after resuming: {m}")


@pytest.mark.parametrize("update_each", [1, 3])
def test_update_each_counts_hvps(update_each):
    model = make_model()
    opt = AdaHessian(model.parameters(), update_each=update_each, fused=False)
    steps = 12
    train(model, opt, DATA, steps)
    assert torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] == steps // update_each


def test_stored_curvature_is_dropped_before_the_next_curvature_step():
    # update_each=3: kept for the two reuse steps, dropped after the last one, so that the next backward with a graph
    # and its HVP do not run while the old curvature is still held
    model = make_model()
    opt = AdaHessian(model.parameters(), update_each=3, fused=False)
    for t in range(7):
        train(model, opt, DATA, 1, start=t)
        held = [("hessian_diag" in opt.state[p]) for p in model.parameters()]
        assert all(held) if (t + 1) % 3 else not any(held), f"after step {t}: {held}"
        assert opt.hessian_due == ((t + 1) % 3 == 0), f"after step {t}"


def test_hessian_due_ignores_a_parameter_that_never_gets_a_gradient():
    """An unused head kept hessian_due True on every step, so backward(create_graph=opt.hessian_due) built the
    double-backward graph every time and update_each saved nothing. A group added mid-cycle makes it due."""
    model, head = make_model(), nn.Linear(4, 1).double()
    opt = AdaHessian(list(model.parameters()) + list(head.parameters()), update_each=3, fused=False)
    due = []
    for t in range(6):
        due.append(opt.hessian_due)
        train(model, opt, DATA, 1, start=t)
    assert due == [t % 3 == 0 for t in range(6)]
    assert torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] == 2
    train(model, opt, DATA, 1, start=6)  # step 6: due; 7 is not
    assert not opt.hessian_due
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert opt.hessian_due


def test_hessian_due_ignores_a_parameter_frozen_after_stepping():
    """A layer frozen mid-training keeps its state without curvature: hessian_due stayed True on every later step
    (update_each lost, a double-backward graph every time)."""
    model = make_model()
    opt = AdaHessian(model.parameters(), update_each=3, fused=False)
    train(model, opt, DATA, 3)
    model.c1.requires_grad_(False)
    torch._dynamo.utils.counters.clear()
    due = []
    for t in range(3, 9):
        due.append(opt.hessian_due)
        train(model, opt, DATA, 1, start=t)
    assert due == [t % 3 == 0 for t in range(3, 9)]
    assert torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] == 2


@pytest.mark.parametrize("group, match", [
    (dict(block_length=4), "does not divide"), (dict(block_length=0), "block_length"),
    (dict(hessian_power=3.0), "Hessian power"), (dict(lr=-1.0), "learning rate"),
    (dict(betas=(1.5, 0.9)), "betas"), (dict(eps=-1.0), "epsilon"),
])
def test_add_param_group_checks_before_adding(group, match):
    """A rejected group used to stay in param_groups (the next step failed in a reshape), and per-group values were
    not checked at all."""
    opt = AdaHessian(make_model().parameters(), fused=False)
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 5))], **group})
    assert len(opt.param_groups) == n


def test_fused_step_past_the_recompile_limit_runs_the_eager_update():
    """A weight-decay schedule recompiles the fused step once per value; past Dynamo's limit it raised from step()
    (fullgraph). Now those steps run the eager update: the trajectory equals fused=False's."""
    models = [make_model(), make_model()]
    opts = [AdaHessian(m.parameters(), fused=f, generator=torch.Generator().manual_seed(2))
            for m, f in zip(models, (True, False))]
    with pytest.warns(UserWarning, match="recompile limit"):
        for t in range(12):
            for model, opt in zip(models, opts):
                opt.param_groups[0]["weight_decay"] = 0.01 * t
                train(model, opt, DATA, 1, start=t)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_given_curvature_is_copied_when_kept_for_later_steps():
    """With update_each > 1, D given to step(hessian=...) is kept for the next steps: a copy, since the caller's
    tensor may be reused (a CUDA-graph output is overwritten by the graph's next replay)."""
    w = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = AdaHessian([w], update_each=2, fused=False)
    d = torch.rand(5, dtype=torch.float64)
    (w ** 2).sum().backward()
    opt.step(hessian={w: d})
    kept = opt.state[w]["hessian_diag"]
    assert kept.data_ptr() != d.data_ptr() and torch.equal(kept, d)


def test_reused_layout_equals_a_fresh_one_every_step():
    # step() keeps its buckets while the same parameters step; rebuilding them every step must give the same bits,
    # also when the stepping set changes (a parameter without .grad), the learning rate changes, a group is added
    # and the state is loaded
    models = [make_model(), make_model()]
    fc2 = [list(m.fc2.parameters()) for m in models]
    opts = [AdaHessian([p for n, p in m.named_parameters() if not n.startswith("fc2")], update_each=2,
                       generator=torch.Generator().manual_seed(6), fused=False) for m in models]
    for t in range(8):
        for k, (model, opt) in enumerate(zip(models, opts)):
            if t == 3:
                opt.add_param_group({"params": fc2[k], "lr": 0.05})
            if t == 5:
                opt.load_state_dict(opt.state_dict())
            if t == 6:
                opt.state.clear()  # a reset: fresh state on the next step
            opt.param_groups[0]["lr"] = 0.1 if t < 4 else 0.03
            xs, y = DATA[t % len(DATA)]
            opt.zero_grad()
            loss_of(model, xs, y).backward(create_graph=opt.hessian_due)
            if t % 3 == 1:
                model.c2.bias.grad = None  # does not step this time
            if k == 1:
                opt._layout = None
                opt._lr_tensors.clear()
            opt.step()
        for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=n, t=t: f"step {t}, {n}: {m}")


def test_state_changed_by_the_user_between_steps():
    # the buckets are reused while the same parameters step; a parameter's state cleared (a reset of its moments) or
    # its moments replaced by other tensors (moved to the CPU and back) must take effect, as in a rebuilt layout
    models = [make_model(), make_model()]
    opts = [AdaHessian(m.parameters(), generator=torch.Generator().manual_seed(3), fused=False) for m in models]
    for t in range(5):
        for k, (model, opt) in enumerate(zip(models, opts)):
            if t == 2:
                opt.state[model.c1.weight].clear()
            if t == 3:
                st = opt.state[model.fc1.weight]
                st["exp_avg"] = st["exp_avg"].clone()
            xs, y = DATA[t % len(DATA)]
            opt.zero_grad()
            loss_of(model, xs, y).backward(create_graph=True)
            if k == 1:
                opt._layout = None
            opt.step()
        for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=n, t=t: f"step {t}, {n}: {m}")
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        for key in ("exp_avg", "exp_hessian_diag_sq", "step"):
            torch.testing.assert_close(opts[0].state[p][key], opts[1].state[q][key], rtol=0, atol=0)


def test_step_without_graph_says_how_to_fix():
    model = make_model()
    opt = AdaHessian(model.parameters(), fused=False)
    xs, y = DATA[0]
    loss_of(model, xs, y).backward()
    with pytest.raises(ValueError, match="create_graph=True"):
        opt.step()


def test_changing_lr_does_not_recompile():
    model, ref = make_model(), make_model()
    opt = AdaHessian(model.parameters(), generator=torch.Generator().manual_seed(8), fused=True)
    opt_ref = AdaHessian(ref.parameters(), generator=torch.Generator().manual_seed(8), fused=False)
    counters = torch._dynamo.utils.counters
    for t, lr in enumerate([0.1, 0.02, 0.3, 0.05]):
        for o in (opt, opt_ref):
            for g in o.param_groups:
                g["lr"] = lr
        train(model, opt, DATA, 1, start=t)
        train(ref, opt_ref, DATA, 1, start=t)
        if t == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs, "a new learning rate recompiled the fused step"
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_low_precision_params_keep_fp32_state():
    model = make_model(dtype=torch.bfloat16)
    opt = AdaHessian(model.parameters(), fused=False)
    data = [make_data(dtype=torch.bfloat16)]
    train(model, opt, data, 2)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = AdaHessian(model.parameters(), fused=False)
    opt2.load_state_dict(sd)
    for o in (opt, opt2):
        for p in model.parameters():
            st = o.state[p]
            assert p.dtype == torch.bfloat16
            assert st["exp_avg"].dtype == st["exp_hessian_diag_sq"].dtype == torch.float32
    for p in model.parameters():
        torch.testing.assert_close(opt2.state[p]["exp_hessian_diag_sq"], opt.state[p]["exp_hessian_diag_sq"],
                                   rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "learning rate"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(hessian_power=1.5), "Hessian power"),
        (dict(update_each=0), "update_each"),
        (dict(n_samples=0), "n_samples"),
        (dict(block_length=7), "block_length=7 does not divide"),
    ],
    ids=["lr", "betas", "hessian_power", "update_each", "n_samples", "block_length"],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaHessian(make_model().parameters(), **kwargs)
