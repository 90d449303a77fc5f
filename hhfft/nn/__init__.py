"""Modules users can also use by hand: Hedgehog feature maps (and, from other work, FFTConv1d)."""
from hhfft.nn.hedgehog import FeatureMapConfig, FeatureMapKind, HedgehogFeatureMap, feature_map

__all__ = ["FeatureMapConfig", "FeatureMapKind", "HedgehogFeatureMap", "feature_map"]
