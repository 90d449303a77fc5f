"""Optimizers: :class:`AdaHessian` and the Hutchinson curvature estimator it uses."""
from hhfft.optim.adahessian import AdaHessian
from hhfft.optim.hutchinson import HutchinsonResult, hutchinson, rademacher

__all__ = ["AdaHessian", "HutchinsonResult", "hutchinson", "rademacher"]
