"""Benchmarks and measurements behind the design choices."""
