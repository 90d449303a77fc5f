"""AdaHessian: ``naive.py`` (the official algorithm step by step) and ``step.py`` (eager and compiled updates)."""
from hhfft.kernels.adahessian.naive import adahessian_step_naive, average_curvature_naive, hutchinson_naive
from hhfft.kernels.adahessian.step import adahessian_update, adahessian_update_fused

__all__ = [
    "adahessian_step_naive",
    "average_curvature_naive",
    "hutchinson_naive",
    "adahessian_update",
    "adahessian_update_fused",
]
