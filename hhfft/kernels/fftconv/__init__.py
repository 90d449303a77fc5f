from hhfft.kernels.fftconv.naive import fftconv_corr_naive, fftconv_naive

__all__ = ["fftconv_naive", "fftconv_corr_naive"]

try:  # the Triton kernels need triton (an optional dependency); the references do not
    from hhfft.kernels.fftconv.monarch import fftconv_corr_fwd, fftconv_fwd

    __all__ += ["fftconv_fwd", "fftconv_corr_fwd"]
except ImportError:  # pragma: no cover
    pass
