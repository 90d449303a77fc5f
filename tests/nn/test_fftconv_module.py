"""hhfft.nn.FFTConv1d equals the nn.Conv1d it stands for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hhfft.nn import FFTConv1d


@pytest.mark.parametrize("padding", ["causal", "same", 0, 5])
@pytest.mark.parametrize("L,K", [(50, 17), (17, 50), (1, 1)], ids=["L50-K17", "L17-K50", "L1-K1"])
def test_matches_depthwise_conv1d(padding, L, K):
    torch.manual_seed(0)
    m = FFTConv1d(3, K, padding=padding, skip=True).double()
    torch.nn.init.normal_(m.bias)
    u = torch.randn(2, 3, L, dtype=torch.float64)
    w = m.kernel.flip(-1)[:, None, :]  # conv1d weight: cross-correlation order
    if padding == "causal":
        ref = F.conv1d(F.pad(u, (K - 1, 0)), w, m.bias, groups=3)
    elif padding == "same":
        ref = F.conv1d(u, w, m.bias, padding="same", groups=3)
    else:
        if L + 2 * padding - K + 1 < 1:
            with pytest.raises(ValueError, match="too short"):
                m(u)
            return
        ref = F.conv1d(u, w, m.bias, padding=padding, groups=3)
    ref = ref + m.D[:, None] * F.pad(u, (0, ref.shape[-1] - L))
    torch.testing.assert_close(m(u), ref, rtol=1e-10, atol=1e-10)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"expected input \[B, 4, L\]"):
        FFTConv1d(4, 9)(torch.randn(2, 3, 10))
