"""AdaHessian.hutchinson_step: gradient, curvature and update as one function. It must step exactly as
hutchinson() + step(hessian=...) does with the same probes, through every branch of the update (spatial and block
averaging, groups, a frozen parameter, update_each), eagerly and compiled, and run the unfused pair where one graph
cannot hold the iteration (fused=False, n_samples > 1)."""
from __future__ import annotations

import copy

import pytest
import torch

from hhfft.optim import AdaHessian, hutchinson
from tests.optim.test_adahessian import make_data, make_model

DATA = make_data()


def setup(update_each, n_samples=1, fused=True, block_length=2):
    model = make_model()
    model.fc1.bias.requires_grad_(False)  # a constant: no probe, never moves
    first = [p for n, p in model.named_parameters() if not n.startswith(("fc2", "fc1.bias"))]
    groups = [{"params": first, "block_length": block_length},
              {"params": list(model.fc2.parameters()), "block_length": None, "lr": 0.05, "weight_decay": 0.1}]
    opt = AdaHessian(groups, lr=0.1, update_each=update_each, n_samples=n_samples, fused=fused,
                     generator=torch.Generator().manual_seed(5))
    named = dict(model.named_parameters())

    def loss_fn(ps):
        return (torch.func.functional_call(model, ps, DATA[0]) - DATA[1]).pow(2).mean()

    return model, opt, named, loss_fn


def reference_step(opt, named, loss_fn, backend):
    """What hutchinson_step stands for: fresh .grad, hutchinson() on the steps that need the curvature."""
    for p in named.values():
        p.grad = None
    if opt.hessian_due:
        res = hutchinson(loss_fn, named, generator=opt.generator, n_samples=opt.n_samples, backend=backend)
        opt.step(hessian=res)
        return res.loss
    loss = loss_fn(named)
    loss.backward()
    opt.step()
    return loss.detach()


def assert_same_trajectory(update_each, backend, steps=5, **kw):
    model, opt, named, loss_fn = setup(update_each, **kw)
    model_r, opt_r, named_r, loss_fn_r = setup(update_each, **kw)
    frozen = model.fc1.bias.detach().clone()
    for step in range(steps):
        loss = opt.hutchinson_step(loss_fn, named, backend=backend)
        loss_r = reference_step(opt_r, named_r, loss_fn_r, backend)
        torch.testing.assert_close(loss, loss_r, rtol=1e-12, atol=0, msg=lambda m: f"step {step}, loss: {m}")
        for (n, p), q in zip(named.items(), named_r.values()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15, msg=lambda m, n=n: f"step {step}, {n}: {m}")
            if p.requires_grad:
                st, st_r = opt.state[p], opt_r.state[q]
                for k in ("exp_avg", "exp_hessian_diag_sq", "step"):
                    torch.testing.assert_close(st[k], st_r[k], rtol=1e-12, atol=1e-15,
                                               msg=lambda m, n=n, k=k: f"step {step}, {n} {k}: {m}")
        assert all(p.grad is None for p in named.values()), "hutchinson_step wrote .grad"
    assert torch.equal(model.fc1.bias, frozen), "a parameter with requires_grad=False moved"
    assert opt._hessian_step == opt_r._hessian_step == steps
    assert not any(p.equal(q) for p, q in zip(model.parameters(), make_model().parameters()) if p.requires_grad)


@pytest.mark.parametrize("update_each", [1, 3])
@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_equals_hutchinson_then_step(update_each, backend):
    assert_same_trajectory(update_each, backend)


@pytest.mark.parametrize("kw", [dict(fused=False), dict(n_samples=2)], ids=["unfused", "two-probes"])
def test_runs_the_pair_where_one_graph_cannot_hold_it(kw):
    assert_same_trajectory(2, "aot_eager", steps=4, **kw)


def test_inductor_one_graph_per_kind_of_step_and_lr_changes_do_not_recompile():
    """Through Inductor (one compile for curvature steps, one for the steps between): the same trajectory, the HVPs
    counted, and a new learning rate recompiles nothing."""
    model, opt, named, loss_fn = setup(update_each=2)
    model_r, opt_r, named_r, loss_fn_r = setup(update_each=2, fused=False)  # eager: compiles nothing
    torch._dynamo.utils.counters.clear()
    for step in range(6):
        if step == 4:
            for o in (opt, opt_r):
                for g in o.param_groups:
                    g["lr"] *= 0.5
        opt.hutchinson_step(loss_fn, named, backend="inductor")
        reference_step(opt_r, named_r, loss_fn_r, None)
        for (n, p), q in zip(named.items(), named_r.values()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=lambda m, n=n: f"step {step}, {n}: {m}")
    assert torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] == 3 + 3  # 3 each: fused and reference
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 2, dict(stats)


def test_parameters_outside_the_optimizer_are_refused():
    model, _, named, loss_fn = setup(update_each=1)
    opt = AdaHessian(model.fc2.parameters())
    with pytest.raises(ValueError, match="not parameters of this optimizer.*requires_grad=False"):
        opt.hutchinson_step(loss_fn, named, backend=None)


def test_resumes_from_a_state_dict_and_takes_a_new_group():
    """A state_dict saved mid-training (between curvature steps) resumes the same trajectory through
    hutchinson_step; a group added later makes the next step a curvature step, as for step()."""
    model, opt, named, loss_fn = setup(update_each=3)
    for _ in range(4):
        opt.hutchinson_step(loss_fn, named, backend=None)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.hutchinson_step(loss_fn, named, backend=None)

    resumed, ropt, rnamed, rloss_fn = setup(update_each=3)
    resumed.load_state_dict(saved_model)
    ropt.load_state_dict(saved_opt)
    for _ in range(3):
        ropt.hutchinson_step(rloss_fn, rnamed, backend=None)
    for (n, p), q in zip(named.items(), rnamed.values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m, n=n: f"{n} after resuming: {m}")

    model.fc1.bias.requires_grad_(True)
    opt.add_param_group({"params": [model.fc1.bias]})
    assert opt.hessian_due
    before = torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"]
    opt.hutchinson_step(loss_fn, named, backend=None)
    assert torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] == before + 1
    assert "hessian_diag" in opt.state[model.fc1.bias]


def test_low_precision_parameters_keep_fp32_state():
    """bf16 parameters: fp32 state, the update computed in fp32 and rounded once, as the pair does."""
    models = [make_model(torch.float32).to(torch.bfloat16) for _ in range(2)]
    x, y = make_data(dtype=torch.bfloat16)
    opts = [AdaHessian(m.parameters(), lr=0.05, generator=torch.Generator().manual_seed(1)) for m in models]
    named = [dict(m.named_parameters()) for m in models]
    loss_fns = [lambda ps, m=m: (torch.func.functional_call(m, ps, x) - y).pow(2).mean() for m in models]
    for step in range(3):
        opts[0].hutchinson_step(loss_fns[0], named[0], backend=None)
        reference_step(opts[1], named[1], loss_fns[1], None)
        for (n, p), q in zip(named[0].items(), named[1].values()):
            assert p.dtype == torch.bfloat16 and opts[0].state[p]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=n: f"step {step}, {n}: {m}")


def test_update_each_holds_when_a_parameter_stops_stepping():
    """A backbone frozen after some steps keeps its state without curvature: neither hessian_due nor hutchinson_step
    may then ask for the curvature on every step (update_each was silently lost)."""
    model, opt, named, loss_fn = setup(update_each=3, block_length=None)
    for _ in range(3):
        opt.hutchinson_step(loss_fn, named, backend=None)
    for p in model.c1.parameters():
        p.requires_grad_(False)
    torch._dynamo.utils.counters.clear()
    due = []
    for _ in range(6):
        due.append(opt.hessian_due)
        opt.hutchinson_step(loss_fn, named, backend=None)
    assert due == [True, False, False, True, False, False]
    assert torch._dynamo.utils.counters["hhfft"]["adahessian_hvp"] == 2


@pytest.mark.parametrize("bad, error, match", [
    (lambda named: dict(named, again=named["fc1.weight"]), ValueError, "more than once"),
])
def test_bad_params_say_what_to_give(bad, error, match):
    model, opt, named, loss_fn = setup(update_each=1)
    with pytest.raises(error, match=match):
        opt.hutchinson_step(loss_fn, bad(named), backend=None)
    with pytest.raises(error, match=match):
        hutchinson(loss_fn, bad(named), backend=None)


def test_options_must_be_a_dict_and_nothing_is_drawn_before_the_backend_is_known():
    model, opt, named, loss_fn = setup(update_each=1)
    with pytest.raises(TypeError, match="options must be a dict"):
        opt.hutchinson_step(loss_fn, named, options=[("a", 1)])
    state = opt.generator.get_state()
    with pytest.raises(Exception, match="no-such-backend"):
        opt.hutchinson_step(loss_fn, named, backend="no-such-backend")
    assert torch.equal(opt.generator.get_state(), state)


def test_changing_a_constant_of_the_compiled_iteration_warns():
    model, opt, named, loss_fn = setup(update_each=1)
    opt.hutchinson_step(loss_fn, named, backend="aot_eager")
    opt.param_groups[1]["weight_decay"] = 0.2
    with pytest.warns(UserWarning, match="compiles again"):
        opt.hutchinson_step(loss_fn, named, backend="aot_eager")
