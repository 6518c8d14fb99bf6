"""Benchmarking: ``measure`` (params, MACs, latency, memory), ``runner`` (the run: one process per network)
and ``report`` (the console table, CSV/JSON, plots, HTML)."""
