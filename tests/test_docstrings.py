"""The examples in docstrings run and print what they say."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["hhfft.lowering.backend", "hhfft.lowering.fftconv", "hhfft.nn.fftconv", "hhfft.lowering.decode",
           pytest.param("hhfft.convert.decode", marks=pytest.mark.slow)]  # converts and generates: ~25 s on 2 cores


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"torch": importlib.import_module("torch")}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} docstring examples of {name} failed"
