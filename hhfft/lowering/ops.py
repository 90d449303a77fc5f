"""Every ``hhfft::*`` op, registered on import. One module per op; this one re-exports their public functions."""
from hhfft.lowering.fftconv import fftconv, fftconv_corr, fft_size
from hhfft.lowering.linear_attention import (  # noqa: F401
    hedgehog_linear_attention, linear_attention, linear_attention_product, linear_attention_state, linear_attention_step,
)

__all__ = ["fftconv", "fftconv_corr", "fft_size", "linear_attention", "linear_attention_product",
           "hedgehog_linear_attention", "linear_attention_state", "linear_attention_step"]
