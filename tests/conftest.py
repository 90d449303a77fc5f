"""Shared test set-up.

- Triton kernels run through the interpreter when there is no GPU: TRITON_INTERPRET is read when ``@triton.jit``
  decorates, so it is set here, before any hhfft kernel module is imported.
- Hypothesis profiles: ``ci`` (default; derandomized, so a red CI is reproducible), ``dev`` (random seeds) and
  ``thorough`` (many more examples): ``HYPOTHESIS_PROFILE=thorough make test``.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", print_blob=True, **_common)
settings.register_profile("thorough", max_examples=2000, print_blob=True, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    # Everything under tests/gpu/ needs CUDA: mark it so `-m gpu` selects it and the CPU run deselects it.
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """Each test starts from a clean Dynamo cache and hhfft counters, so recompilation counts are per test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer poisoned with NaN, so an element a kernel forgets to write fails the comparison."""
    return torch.full_like(x, float("nan"))
