"""A small Hyena-style long-convolution language model (Poli et al. 2023), written the way such code is written in
the wild, so that hhfft has something real to find:

* the Hyena operator: projections, a short depthwise conv, an implicit long filter applied as an explicit FFT
  convolution (``rfft(u, n=2L) * rfft(k, n=2L) -> irfft -> [..., :L]`` plus ``u * D``) between two gates;
* a long causal ``nn.Conv1d`` mixer (padding K-1, then ``[..., :L]``);
* one causal softmax attention block written with matmuls and a masked_fill.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HyenaConfig", "HyenaLM"]


@dataclass(frozen=True)
class HyenaConfig:
    vocab_size: int = 256
    width: int = 128
    n_layers: int = 4  # alternating Hyena operator / long Conv1d mixer
    attention_layers: tuple = (3,)  # layers that use softmax attention instead
    n_heads: int = 4
    max_len: int = 2048
    conv_kernel: int = 257  # the long Conv1d mixer's kernel
    filter_order: int = 32  # width of the implicit filter MLP

    def __post_init__(self) -> None:
        for name in ("vocab_size", "width", "n_layers", "n_heads", "max_len", "conv_kernel", "filter_order"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"HyenaConfig: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.width % self.n_heads:
            raise ValueError(f"HyenaConfig: width ({self.width}) must be a multiple of n_heads ({self.n_heads})")
        bad = [i for i in self.attention_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"HyenaConfig: attention_layers {bad} out of range for n_layers={self.n_layers}")


class ImplicitFilter(nn.Module):
    """k[h, t] = MLP(positional features of t)[h] * exp(-decay_h * t): as long as the input, for any length."""

    def __init__(self, width: int, order: int, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.linspace(1.0, n_freq, n_freq), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freq + 1, order), nn.SiLU(), nn.Linear(order, order), nn.SiLU(),
                                 nn.Linear(order, width))
        self.decay = nn.Parameter(torch.linspace(0.5, 6.0, width))

    def forward(self, L: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.arange(L, dtype=dtype, device=self.decay.device)[:, None] / L  # [L, 1]
        feats = torch.cat([t, torch.sin(t * self.freqs * math.pi), torch.cos(t * self.freqs * math.pi)], dim=-1)
        k = self.mlp(feats).transpose(0, 1)  # [H, L]
        return k * torch.exp(-self.decay[:, None] * t.transpose(0, 1))


def fftconv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The FFT convolution as Hyena's reference code writes it."""
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]
    out = y + u * D.unsqueeze(-1)
    return out.to(dtype=u.dtype)


class HyenaOperator(nn.Module):
    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        w = cfg.width
        self.in_proj = nn.Linear(w, 3 * w)
        self.short_filter = nn.Conv1d(3 * w, 3 * w, 3, padding=2, groups=3 * w)
        self.filter = ImplicitFilter(w, cfg.filter_order)
        self.D = nn.Parameter(torch.randn(w))
        self.out_proj = nn.Linear(w, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, W]
        L = x.shape[1]
        u = self.in_proj(x).transpose(1, 2)  # [B, 3W, L]
        u = self.short_filter(u)[..., :L]
        x1, x2, v = u.chunk(3, dim=1)
        k = self.filter(L, torch.float32)
        y = fftconv_ref(v * x1, k, self.D) * x2
        return self.out_proj(y.transpose(1, 2))


class LongConvMixer(nn.Module):
    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        K = cfg.conv_kernel
        self.conv = nn.Conv1d(cfg.width, cfg.width, K, padding=K - 1, groups=cfg.width)
        self.gate = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        y = self.conv(x.transpose(1, 2))[..., :L].transpose(1, 2)
        return y * torch.sigmoid(self.gate(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: HyenaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.register_buffer("mask", torch.tril(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, W // self.n_heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~self.mask[:L, :L], float("-inf"))
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, L, W))


class Block(nn.Module):
    def __init__(self, cfg: HyenaConfig, layer: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        if layer in cfg.attention_layers:
            self.mixer = CausalSelfAttention(cfg)
        else:
            self.mixer = HyenaOperator(cfg) if layer % 2 == 0 else LongConvMixer(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HyenaLM(nn.Module):
    """Byte-level language model: tokens [B, L] (int64) -> logits [B, L, vocab]."""

    def __init__(self, cfg: HyenaConfig = HyenaConfig()):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"HyenaLM: sequence length {tokens.shape[1]} > max_len {self.cfg.max_len}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
