"""Benchmarks of crl (``crl bench mining``; ``python benches/mining.py``)."""

__all__ = ["mining"]
