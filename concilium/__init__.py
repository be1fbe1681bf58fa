"""Concilium: a society-of-models gateway."""

__version__ = "0.1.0"
