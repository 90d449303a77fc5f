"""Calibration text that ships with Python (``hhfft.convert.hf.stdlib_docstrings``): the options the MiniLM example
uses, without the MiniLM weights."""
from __future__ import annotations

import warnings

import pytest

from hhfft.convert.hf import stdlib_docstrings


def test_stdlib_docstrings_all_modules_and_methods():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = stdlib_docstrings("all", methods=True, limit=300)
    # deprecated modules (aifc, asynchat, ... on Python 3.11/3.12) are imported quietly (when not imported before)
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w.message) for w in caught]
    assert len(text) == 300 and len(set(text)) == 300
    assert all(len(p.split()) >= 6 and ">>>" not in p and "\n" not in p for p in text)
    plain, with_methods = stdlib_docstrings(["json"]), stdlib_docstrings(["json"], methods=True)
    assert set(plain) < set(with_methods)  # methods add paragraphs (json.JSONDecoder.decode, ...)


def test_stdlib_docstrings_refuses_a_module_name_string():
    with pytest.raises(ValueError, match="a list of module names, None or 'all', got 'json'"):
        stdlib_docstrings("json")
