"""Hedgehog feature maps: trainable per-head maps phi with phi(q) . phi(k) ~ exp(q . k) (Zhang et al., 2024).

With y = x W + b (per head, W: [H, D, F], b: [H, F]):

| kind            | phi(x)                                        | out dim |
| --------------- | --------------------------------------------- | ------- |
| `softmax_split` | [softmax(y), softmax(-y)]  (each half sums to 1, the default) | 2F |
| `exp`           | [exp(y - m), exp(-y - m)],  m = max_f abs(y)  (the paper's listing, stabilised per row) | 2F |
| `joint_softmax` | softmax([y, -y])  (one softmax over the concatenation, as fla does) | 2F |
| `elu1`          | 1 + elu(y)  (baseline: Katharopoulos et al.)   | F |
| `t2r`           | relu(y)  (baseline: Kasai et al.)             | F |

W starts at the identity (F defaults to D) and b at zero, so an untrained map already keeps the ranking of q . k
within each row: a sane start for distillation. The softmax is taken in fp32 whatever the input dtype.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeatureMapKind", "FeatureMapConfig", "HedgehogFeatureMap", "feature_map"]

FeatureMapKindName = Literal["softmax_split", "exp", "joint_softmax", "elu1", "t2r"]


class FeatureMapKind(str, enum.Enum):
    SOFTMAX_SPLIT = "softmax_split"
    EXP = "exp"
    JOINT_SOFTMAX = "joint_softmax"
    ELU1 = "elu1"
    T2R = "t2r"

    @property
    def doubles(self) -> bool:
        """True when phi has 2F outputs ([f(y), f(-y)])."""
        return self in (FeatureMapKind.SOFTMAX_SPLIT, FeatureMapKind.EXP, FeatureMapKind.JOINT_SOFTMAX)

    @classmethod
    def parse(cls, kind: Union["FeatureMapKind", str]) -> "FeatureMapKind":
        try:
            return cls(kind)
        except ValueError:
            names = ", ".join(repr(k.value) for k in cls)
            raise ValueError(f"feature map kind must be one of {names}, got {kind!r}") from None


@dataclass(frozen=True)
class FeatureMapConfig:
    """How to build a feature map: its kind, its feature dim F (None = head_dim) and whether it has a bias."""

    kind: FeatureMapKindName = "softmax_split"
    feature_dim: Optional[int] = None
    bias: bool = True

    def __post_init__(self):
        FeatureMapKind.parse(self.kind)
        if self.feature_dim is not None and (not isinstance(self.feature_dim, int) or self.feature_dim < 1):
            raise ValueError(f"feature_dim must be a positive int or None, got {self.feature_dim!r}")


def feature_map(y: Tensor, kind: Union[FeatureMapKind, str]) -> Tensor:
    """Apply the nonlinearity of ``kind`` to the projected features y [..., F] (fp32 maths, y's dtype out)."""
    kind = FeatureMapKind.parse(kind)
    yf = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    if kind == FeatureMapKind.SOFTMAX_SPLIT:
        out = torch.cat([torch.softmax(yf, -1), torch.softmax(-yf, -1)], dim=-1)
    elif kind == FeatureMapKind.EXP:
        m = yf.abs().amax(-1, keepdim=True)
        out = torch.cat([torch.exp(yf - m), torch.exp(-yf - m)], dim=-1)
    elif kind == FeatureMapKind.JOINT_SOFTMAX:
        out = torch.softmax(torch.cat([yf, -yf], dim=-1), -1)
    elif kind == FeatureMapKind.ELU1:
        out = 1 + F.elu(yf)
    else:  # FeatureMapKind.T2R
        out = torch.relu(yf)
    return out.to(y.dtype)


class HedgehogFeatureMap(nn.Module):
    """Per-head trainable feature map, applied to q or k after rotary embeddings (the tensors SDPA receives).

    Args:
        num_heads: H
        head_dim: D, the input feature size
        feature_dim: F (default D); the output has 2F features for the kinds ``softmax_split``, ``exp``,
            ``joint_softmax`` and F for ``elu1``, ``t2r``
        kind: see the module docstring
        bias: learn b (initialised to 0)

    Shapes: x [B, H, L, D] -> phi [B, H, L, out_features]. Parameters: weight [H, D, F] (identity at init),
    bias [H, F] (zero at init).

    Example:
        >>> fm = HedgehogFeatureMap(num_heads=4, head_dim=16)
        >>> fm(torch.randn(2, 4, 10, 16)).shape
        torch.Size([2, 4, 10, 32])
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_dim: Optional[int] = None,
        kind: Union[FeatureMapKindName, FeatureMapKind] = "softmax_split",
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, val in (("num_heads", num_heads), ("head_dim", head_dim)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"HedgehogFeatureMap: {name} must be a positive int, got {val!r}")
        feature_dim = head_dim if feature_dim is None else feature_dim
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"HedgehogFeatureMap: feature_dim must be a positive int or None, got {feature_dim!r}")
        self.kind = FeatureMapKind.parse(kind)
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: FeatureMapConfig, num_heads: int, head_dim: int, **kw) -> "HedgehogFeatureMap":
        return cls(num_heads, head_dim, config.feature_dim, config.kind, config.bias, **kw)

    @property
    def out_features(self) -> int:
        return 2 * self.feature_dim if self.kind.doubles else self.feature_dim

    def reset_parameters(self) -> None:
        """W = identity (truncated or zero-padded when F != D), b = 0."""
        with torch.no_grad():
            self.weight.zero_()
            n = min(self.head_dim, self.feature_dim)
            self.weight[:, torch.arange(n), torch.arange(n)] = 1
            if self.bias is not None:
                self.bias.zero_()

    def project(self, x: Tensor) -> Tensor:
        """y = x W + b: [B, H, L, D] -> [B, H, L, F]."""
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"HedgehogFeatureMap: expected x of shape [B, {self.num_heads}, L, {self.head_dim}], "
                f"got {tuple(x.shape)}; transpose to [batch, heads, seq, head_dim] first"
            )
        y = torch.einsum("bhld,hdf->bhlf", x, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)[None, :, None, :]
        return y

    def forward(self, x: Tensor) -> Tensor:
        return feature_map(self.project(x), self.kind)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}, "
            f"kind={self.kind.value!r}, bias={self.bias is not None}"
        )
