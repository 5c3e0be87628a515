"""Benchmarks (``make bench`` / ``python -m codetr.bench``): speed and memory, never part of ``make test``."""
