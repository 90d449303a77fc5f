"""Every ``hhfft::*`` op, registered on import. One module per op; this one re-exports their public functions."""
from hhfft.lowering.fftconv import fftconv, fftconv_corr, fft_size

__all__ = ["fftconv", "fftconv_corr", "fft_size"]
