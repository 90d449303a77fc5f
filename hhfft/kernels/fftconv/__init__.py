from hhfft.kernels.fftconv.naive import fftconv_corr_naive, fftconv_naive

__all__ = ["fftconv_naive", "fftconv_corr_naive"]
