"""The subcommands of ``experiments/benchmarks.py``, one module each (common: paths, JSON, tables, plots)."""
