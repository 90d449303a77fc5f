"""Constant-state decoding against the quadratic reference (fp64, STYLE.md tolerance rule): the Triton step kernel
(through the interpreter on the CPU) and ``hhfft::linear_attention_decode`` (a prompt, a second prompt on top of the
state, then single steps), GQA, padding tokens, awkward sizes."""
from __future__ import annotations

import pytest
import torch

from hhfft.kernels.linear_attention.naive import linear_attention_naive
from hhfft.kernels.linear_attention.recurrent import linear_attention_step_triton
from hhfft.lowering.decode import _decode_torch, linear_attention_decode
from tests.conftest import nan_like
from tests.utils import assert_within_baseline, linear_features

STEP_CASES = [  # (B, Hq, Hkv, F, D, steps, masked, dtype)
    (2, 2, 2, 16, 8, 3, False, torch.float32),
    (1, 4, 2, 24, 12, 4, True, torch.float32),
    (2, 4, 1, 10, 5, 3, True, torch.float16),
    (1, 3, 3, 32, 20, 2, False, torch.float16),
]


def _sid(c):
    B, Hq, Hkv, F, D, n, m, dt = c
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-F{F}-D{D}-T{n}-{str(dt)[6:]}" + ("-mask" if m else "")


def _ref(q, k, v, keep):
    return linear_attention_naive(q, k, v, causal=True, key_mask=keep)


@pytest.mark.parametrize("case", STEP_CASES, ids=_sid)
def test_triton_step_matches_reference(case):
    B, Hq, Hkv, F, D, steps, masked, dt = case
    q, k, v, keep = linear_features(B, Hq, Hkv, steps, F, D, masked)
    ref = _ref(q, k, v, keep)
    S, z = torch.zeros(B, Hkv, F, D), torch.zeros(B, Hkv, F)
    S_t, z_t = S.clone(), z.clone()  # the same steps in PyTorch (fp32 state): the baseline
    base_S, base_z = torch.zeros(B, Hkv, F, D), torch.zeros(B, Hkv, F)
    for t in range(steps):
        kt = None if keep is None else keep[:, t].contiguous()
        qt, ktok, vt = (x[:, :, t].to(dt).contiguous() for x in (q, k, v))
        out = nan_like(torch.empty(B, Hq, D, dtype=dt))
        o = linear_attention_step_triton(qt, ktok, vt, S_t, z_t, kt, wrap=False, out=out)
        base = _decode_torch(qt[:, :, None], ktok[:, :, None], vt[:, :, None], base_S, base_z,
                             None if kt is None else kt[:, None])[:, :, 0]
        naive_dt = _ref(*(x[:, :, : t + 1].to(dt).float() for x in (q, k, v)),
                        None if keep is None else keep[:, : t + 1])[:, :, -1].to(dt)
        assert o is out
        assert_within_baseline(f"o step {t}", o, ref[:, :, t], [base, naive_dt])
    keep64 = torch.ones(B, steps, dtype=torch.bool) if keep is None else keep
    kk = torch.where(keep64[:, None, :, None], k, 0).to(dt).double()
    vv = torch.where(keep64[:, None, :, None], v, 0).to(dt).double()
    assert_within_baseline("state", S_t, kk.transpose(-1, -2) @ vv, [base_S], dtype=torch.float32)
    assert_within_baseline("normalizer", z_t, kk.sum(-2), [base_z], dtype=torch.float32)


def test_triton_step_leaves_padding_out_of_the_state():
    q, k, v, _ = linear_features(2, 2, 2, 1, 16, 8, False)
    S, z = torch.rand(2, 2, 16, 8), torch.rand(2, 2, 16)
    S0, z0 = S.clone(), z.clone()
    keep = torch.tensor([True, False])
    linear_attention_step_triton(q[:, :, 0].float(), k[:, :, 0].float(), v[:, :, 0].float(), S, z, keep, wrap=False)
    assert torch.equal(S[1], S0[1]) and torch.equal(z[1], z0[1])
    assert not torch.equal(S[0], S0[0])


DECODE_CASES = [  # (B, Hq, Hkv, prompt, second prompt, steps, F, D, masked)
    (2, 2, 2, 7, 0, 3, 4, 3, False),
    (1, 4, 2, 70, 5, 3, 6, 5, True),
    (2, 4, 1, 1, 65, 2, 8, 4, True),
]


def _did(c):
    B, Hq, Hkv, P, P2, n, F, D, m = c
    return f"B{B}-Hq{Hq}-Hkv{Hkv}-P{P}+{P2}-T{n}-F{F}-D{D}" + ("-mask" if m else "")


@pytest.mark.parametrize("case", DECODE_CASES, ids=_did)
def test_decode_prompt_then_steps_matches_reference(case):
    B, Hq, Hkv, P, P2, steps, F, D, masked = case
    L = P + P2 + steps
    q, k, v, keep = linear_features(B, Hq, Hkv, L, F, D, masked, seed=1)
    ref = _ref(q, k, v, keep)
    full32 = _ref(q.float(), k.float(), v.float(), keep)  # PyTorch at fp32: the baseline
    S, z = torch.zeros(B, Hkv, F, D), torch.zeros(B, Hkv, F)
    pieces = [(0, P), (P, P + P2)] + [(t, t + 1) for t in range(P + P2, L)]
    for a, b in pieces:
        if a == b:
            continue
        kp = None if keep is None else keep[:, a:b]
        o = linear_attention_decode(*(x[:, :, a:b].float() for x in (q, k, v)), S, z, kp)
        assert_within_baseline(f"o[{a}:{b}]", o, ref[:, :, a:b], [full32[:, :, a:b]])


def test_decode_rejects_bad_state():
    q, k, v, _ = linear_features(1, 2, 2, 3, 4, 3, False)
    with pytest.raises(ValueError, match=r"state must be \[B, Hkv, F, D\] = \[1, 2, 4, 3\]"):
        linear_attention_decode(q.float(), k.float(), v.float(), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="fp32"):
        linear_attention_decode(q.float(), k.float(), v.float(), torch.zeros(1, 2, 4, 3, dtype=torch.float16),
                                torch.zeros(1, 2, 4, dtype=torch.float16))


def test_triton_step_rejects_bad_input():
    q, k, v = torch.rand(1, 2, 4), torch.rand(1, 2, 4), torch.randn(1, 2, 3)
    S, z = torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 4)
    with pytest.raises(TypeError, match=r"float32 \(contiguous: False\)"):
        linear_attention_step_triton(q, k, v, torch.zeros(1, 2, 3, 4).transpose(-1, -2), z)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor \[B\] = \[1\], got torch.int64"):
        linear_attention_step_triton(q, k, v, S, z, torch.ones(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"phi_k \[B, Hkv, F\].*\(1, 2, 5\)"):
        linear_attention_step_triton(q, torch.rand(1, 2, 5), v, S, z)


@pytest.mark.parametrize(
    "F,D", [pytest.param(F, D, id=f"F{F}-D{D}") for F, D in [(8, 5), (32, 128), (100, 20), (256, 256)]]
)
def test_triton_step_blocks_are_at_least_64(F, D, monkeypatch):
    """The step kernel's tiles are at least 64 wide (chunk.py's rule): on the H200 the 32-wide tile of F = 32,
    D = 128, G = 4 gave wrong outputs from the second step on; the interpreter cannot show it."""
    from hhfft.kernels.linear_attention import recurrent

    seen = {}

    class Launch:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.update(meta)

    monkeypatch.setattr(recurrent, "linear_attention_step_kernel", Launch())
    q, k, v = torch.rand(1, 4, F), torch.rand(1, 1, F), torch.randn(1, 1, D)
    linear_attention_step_triton(q, k, v, torch.zeros(1, 1, F, D), torch.zeros(1, 1, F), wrap=False)
    assert seen["BK"] >= max(64, F) and seen["BV"] >= max(64, D), seen
