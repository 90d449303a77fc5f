"""Models written in this project: the demo's Hyena-style language model (here), and the GPT of the
conversion experiment (``hhfft.models.gpt``, imported from there; ``hhfft.models.gpt_pipeline`` runs it)."""
from hhfft.models.hyena import HyenaConfig, HyenaLM

__all__ = ["HyenaConfig", "HyenaLM"]
