"""Data sets that install offline (corpora for the examples)."""
