"""Linear attention kernels: ``naive.py`` (the quadratic reference) and the Triton kernels (CUDA)."""
from hhfft.kernels.linear_attention.naive import linear_attention_naive, linear_attention_weights_naive

__all__ = ["linear_attention_naive", "linear_attention_weights_naive"]
