"""Modules users can also use by hand: Hedgehog feature maps and FFTConv1d."""
from hhfft.nn.fftconv import FFTConv1d
from hhfft.nn.hedgehog import FeatureMapConfig, FeatureMapKind, HedgehogFeatureMap, feature_map

__all__ = ["FFTConv1d", "FeatureMapConfig", "FeatureMapKind", "HedgehogFeatureMap", "feature_map"]
