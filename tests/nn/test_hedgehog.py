"""hhfft.nn.HedgehogFeatureMap: shapes, identity init, positivity, and the maths of each kind."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hhfft.nn import FeatureMapConfig, FeatureMapKind, HedgehogFeatureMap, feature_map

KINDS = [k.value for k in FeatureMapKind]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,F", [(16, None), (16, 8), (12, 20)], ids=["D16", "D16-F8", "D12-F20"])
def test_shapes_and_identity_init(kind, D, F):
    fm = HedgehogFeatureMap(num_heads=3, head_dim=D, feature_dim=F, kind=kind)
    Fe = D if F is None else F
    assert fm.weight.shape == (3, D, Fe) and fm.bias.shape == (3, Fe)
    assert fm.out_features == (2 * Fe if kind in ("softmax_split", "exp", "joint_softmax") else Fe)
    n = min(D, Fe)
    eye = torch.zeros(D, Fe)
    eye[torch.arange(n), torch.arange(n)] = 1
    assert torch.equal(fm.weight, eye.expand(3, D, Fe)) and torch.count_nonzero(fm.bias) == 0
    x = torch.randn(2, 3, 7, D)
    y = fm.project(x)
    assert torch.equal(y[..., :n], x[..., :n]) and torch.count_nonzero(y[..., n:]) == 0
    assert fm(x).shape == (2, 3, 7, fm.out_features)


@pytest.mark.parametrize("kind", KINDS)
def test_positive_and_finite_for_large_inputs(kind):
    fm = HedgehogFeatureMap(num_heads=2, head_dim=8, kind=kind)
    x = torch.randn(1, 2, 50, 8, generator=torch.Generator().manual_seed(0)) * 200  # exp(200) overflows fp32
    phi = fm(x)
    assert torch.isfinite(phi).all() and (phi >= 0).all()
    if kind in ("softmax_split", "exp", "joint_softmax"):  # the stabilised exponentials keep a 1 (or 1/n) per row
        assert (phi > 0).any(-1).all()
    else:  # elu1 and t2r may underflow to / be exactly 0 on very negative rows
        assert (phi > 0).any()


@settings(max_examples=25)
@given(
    kind=st.sampled_from(KINDS),
    D=st.integers(1, 9),
    F=st.integers(1, 9),
    scale=st.floats(0.01, 30.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_its_formula(kind, D, F, scale, seed):
    """Each kind against its formula written from the definitions, in fp64, with trained (random) W and b."""
    g = torch.Generator().manual_seed(seed)
    fm = HedgehogFeatureMap(num_heads=2, head_dim=D, feature_dim=F, kind=kind).double()
    with torch.no_grad():
        fm.weight.copy_(torch.randn(fm.weight.shape, generator=g, dtype=torch.float64))
        fm.bias.copy_(torch.randn(fm.bias.shape, generator=g, dtype=torch.float64))
    x = torch.randn(1, 2, 3, D, generator=g, dtype=torch.float64) * scale
    y = torch.einsum("bhld,hdf->bhlf", x, fm.weight) + fm.bias[None, :, None, :]
    e, ei = y.exp(), (-y).exp()
    if kind == "softmax_split":
        want = torch.cat([e / e.sum(-1, keepdim=True), ei / ei.sum(-1, keepdim=True)], -1)
    elif kind == "exp":
        want = torch.cat([e, ei], -1) / torch.cat([e, ei], -1).amax(-1, keepdim=True)
    elif kind == "joint_softmax":
        want = torch.cat([e, ei], -1) / (e.sum(-1, keepdim=True) + ei.sum(-1, keepdim=True))
    elif kind == "elu1":
        want = torch.where(y > 0, 1 + y, y.exp())
    else:
        want = y.clamp_min(0)
    finite = torch.isfinite(want)  # the unstabilised formulas overflow where the module must not
    got = fm(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-9, atol=1e-12)


def test_exp_kernel_is_cosh_sum():
    """phi_exp(q) . phi_exp(k) is sum_f 2 cosh(y_q + y_k) up to the two per-row stabilisers: the paper's kernel."""
    fm = HedgehogFeatureMap(num_heads=1, head_dim=6, kind="exp").double()
    q, k = torch.randn(1, 1, 4, 6, dtype=torch.float64), torch.randn(1, 1, 5, 6, dtype=torch.float64)
    got = fm(q) @ fm(k).transpose(-1, -2)
    mq, mk = q.abs().amax(-1), k.abs().amax(-1)
    want = (2 * torch.cosh(q[..., :, None, :] + k[..., None, :, :])).sum(-1) * torch.exp(-mq[..., :, None] - mk[..., None, :])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_input_uses_fp32_maths(kind):
    fm = HedgehogFeatureMap(num_heads=2, head_dim=8, kind=kind)
    x = torch.randn(1, 2, 6, 8).to(torch.bfloat16)
    got = fm(x)
    assert got.dtype == torch.bfloat16
    want = feature_map(fm.project(x).float(), kind).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_trainable_and_gradients_reach_parameters():
    fm = HedgehogFeatureMap(num_heads=2, head_dim=4)
    fm(torch.randn(1, 2, 3, 4)).square().sum().backward()
    assert fm.weight.grad is not None and fm.weight.grad.abs().sum() > 0 and fm.bias.grad.abs().sum() > 0


def test_config_and_errors():
    fm = HedgehogFeatureMap.from_config(FeatureMapConfig(kind="t2r", feature_dim=5, bias=False), 2, 4)
    assert fm.kind is FeatureMapKind.T2R and fm.bias is None and fm.weight.shape == (2, 4, 5)
    assert set(dict(fm.named_parameters())) == {"weight"}
    with pytest.raises(ValueError, match="softmax_split"):
        HedgehogFeatureMap(2, 4, kind="softmax")
    with pytest.raises(ValueError, match="kind must be one of"):
        FeatureMapConfig(kind="relu")
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 2, L, 4\]"):
        HedgehogFeatureMap(2, 4)(torch.randn(1, 3, 5, 4))
