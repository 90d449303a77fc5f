"""Models written in this project: the demo's Hyena-style language model."""
from hhfft.models.hyena import HyenaConfig, HyenaLM

__all__ = ["HyenaConfig", "HyenaLM"]
