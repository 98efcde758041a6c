"""Blueberry: correct, tracked, reproducible experiments for small Mixture-of-Experts LMs."""

__version__ = "0.1.0"
