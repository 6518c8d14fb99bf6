"""Benchmarking: ``measure`` (params, MACs, latency, memory) and ``report`` (tables, plots, HTML)."""
