"""``FFTConv1d``: a long depthwise convolution module computed by ``hhfft.fftconv``."""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn as nn

from hhfft.lowering.fftconv import fftconv

__all__ = ["FFTConv1d"]


class FFTConv1d(nn.Module):
    """Depthwise 1-D convolution with a long kernel, by FFT: the module the long-conv pass would make of a
    ``nn.Conv1d(channels, channels, kernel_size, groups=channels)``, for writing it by hand.

    Args:
        channels: H
        kernel_size: K (any length; the FFT size is chosen >= L + K - 1)
        padding: "causal" (y[t] sees u[<= t], output length L), "same" (centred, output length L) or an int p
            (as nn.Conv1d: output length L + 2p - K + 1)
        bias: add a learned bias per channel
        skip: add a learned ``D[h] * u`` term (Hyena's residual)
    Shapes:
        input [B, H, L] (fp16, bf16, fp32) -> output [B, H, L_out] in the input's dtype; the kernel is kept in fp32.

    Example:
        >>> conv = FFTConv1d(8, 257, padding="causal")
        >>> conv(torch.randn(2, 8, 1000)).shape
        torch.Size([2, 8, 1000])
    """

    def __init__(self, channels: int, kernel_size: int, padding: Union[Literal["causal", "same"], int] = "causal",
                 bias: bool = True, skip: bool = False) -> None:
        super().__init__()
        if channels < 1 or kernel_size < 1:
            raise ValueError(f"FFTConv1d: channels and kernel_size must be >= 1, got {channels} and {kernel_size}")
        if not (padding in ("causal", "same") or (isinstance(padding, int) and padding >= 0)):
            raise ValueError(f"FFTConv1d: padding must be 'causal', 'same' or an int >= 0, got {padding!r}")
        self.channels, self.kernel_size, self.padding = channels, kernel_size, padding
        # Stored like nn.Conv1d's weight reversed: k[h, j] multiplies u[t - j] (causal order).
        self.kernel = nn.Parameter(torch.randn(channels, kernel_size) / kernel_size**0.5)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.D = nn.Parameter(torch.randn(channels)) if skip else None

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if u.dim() != 3 or u.shape[1] != self.channels:
            raise ValueError(f"FFTConv1d: expected input [B, {self.channels}, L], got {tuple(u.shape)}")
        L, K = u.shape[-1], self.kernel_size
        if self.padding == "causal":
            shift, out_len = 0, L
        elif self.padding == "same":
            shift, out_len = K - 1 - (K - 1) // 2, L  # as nn.Conv1d: left pad (K-1)//2
        else:
            shift, out_len = K - 1 - self.padding, L + 2 * self.padding - K + 1
            if out_len < 1:
                raise ValueError(f"FFTConv1d: input length {L} is too short for kernel {K} with padding {self.padding}")
        return fftconv(u, self.kernel, shift=shift, out_len=out_len, bias=self.bias, skip=self.D)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, padding={self.padding!r}"
