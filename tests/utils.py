"""Test helpers shared by the suite: the STYLE.md tolerance rule.

A result computed at some dtype passes when its error against an fp64 reference is at most ``factor`` times the
error that PyTorch itself makes computing the same thing at that dtype (its ``baseline``), plus a floor of a few
units in the last place for the case where PyTorch happens to be exact.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

__all__ = ["rel_err", "assert_within_baseline", "ulp", "sharp_features", "linear_features", "nan_guarded_buffers",
           "masked_correlation"]


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (NaN anywhere gives inf, so it never passes)."""
    x64, r64 = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x64).all():
        return float("inf")
    den = r64.norm().item()
    num = (x64 - r64).norm().item()
    return num / den if den > 0 else num


def assert_within_baseline(
    name: str,
    out: torch.Tensor,
    ref64: torch.Tensor,
    baselines: Sequence[torch.Tensor],
    factor: float = 2.0,
    floor_ulps: float = 4.0,
    dtype: Optional[torch.dtype] = None,
    condition: float = 1.0,
) -> None:
    """Assert rel_err(out) <= factor * max(rel_err(b) for b in baselines) + floor_ulps * eps(dtype) * condition.

    condition: the magnitude of the terms the result sums over the result's, || |u| * |k| || / ||u * k|| for a
    convolution (at least 1). Rounding is relative to the terms: where they cancel (a few outputs summing terms of
    both signs), one baseline's relative error can be lucky, and the floor must scale with the cancellation."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    dtype = dtype or out.dtype
    err = rel_err(out, ref64)
    base = max(rel_err(b, ref64) for b in baselines)
    bound = factor * base + floor_ulps * ulp(dtype) * max(1.0, condition)
    assert err <= bound, (
        f"{name}: relative error {err:.3e} > {factor} x PyTorch's {base:.3e} + {floor_ulps} ulp ({dtype}) = {bound:.3e}"
    )


def sharp_features(seed: int = 0, B: int = 1, H: int = 2, L: int = 12, F: int = 16, D: int = 5) -> tuple:
    """fp64 (phi_q, phi_k, v) with near one-hot feature maps (a softmax over F of logits ~60, as a Hedgehog map
    trained from scratch reaches): some rows' linear-attention denominators underflow far below the floor
    (hhfft.kernels.linear_attention.naive.DEN_FLOOR), the others stay of order 1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(60 * torch.randn(B, H, L, F, generator=g, dtype=torch.float64), -1)
    k = torch.softmax(60 * torch.randn(B, H, L, F, generator=g, dtype=torch.float64), -1)
    v = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    return q, k, v


def linear_features(B: int, Hq: int, Hkv: int, L: int, F: int, D: int, masked: bool, seed: int = 0) -> tuple:
    """fp64 (phi_q [B, Hq, L, F], phi_k [B, Hkv, L, F], v [B, Hkv, L, D], keep [B, L] bool or None): non-negative
    features in [0, 1), keys kept with probability 0.7 (the first always, so no row is empty)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, Hq, L, F, generator=g, dtype=torch.float64)
    k = torch.rand(B, Hkv, L, F, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=torch.float64)
    keep = (torch.rand(B, L, generator=g) > 0.3) if masked else None
    if keep is not None:
        keep[:, 0] = True
    return q, k, v, keep


def nan_guarded_buffers(monkeypatch, module, guard: int) -> Iterator[None]:
    """Body of a fixture: ``module._new`` (the one allocator of every buffer its kernels write) is replaced by one that
    returns NaN-filled views into larger NaN allocations, ``guard`` elements on each side. An unwritten element stays
    NaN (so it fails the comparison); after the test, every guard region must still be NaN, or a kernel stored outside
    its buffer. Use as ``yield from nan_guarded_buffers(monkeypatch, chunk, 256)``.

    Under torch.compile the kernels' bodies are traced (``ref`` is a fake or functional tensor): there the buffer is a
    plain NaN-filled tensor, since a kernel writing into a view of a traced allocation is not what the op does (it
    allocates each buffer on its own) and the guard regions could not be read after the trace anyway."""
    allocated = []

    def new(ref, *shape, dtype=None):
        if type(ref) not in (torch.Tensor, torch.nn.Parameter):  # traced (fake / functional): a plain buffer
            return torch.full(shape, float("nan"), dtype=dtype or ref.dtype, device=ref.device)
        n = 1
        for s in shape:
            n *= s
        buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype or ref.dtype, device=ref.device)
        allocated.append((shape, buf, n))
        return buf[guard:guard + n].view(shape)

    monkeypatch.setattr(module, "_new", new)
    yield
    for shape, buf, n in allocated:
        outside = torch.cat([buf[:guard], buf[guard + n:]])
        assert torch.isnan(outside).all(), f"a kernel wrote outside its output buffer of shape {tuple(shape)}"


def masked_correlation(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor) -> float:
    """Pearson correlation of two attention maps over the allowed entries (what a converted site is judged by)."""
    x, y = a[allowed].double(), b[allowed].double()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))
