"""Kernels, one folder per op: ``naive.py`` (pure-torch reference), Triton kernels, README.md (the maths)."""
