"""sevsim's benchmarks: each line measured beside its fair floor in the same run.

``python -m benchmarks.bench`` (or ``make bench``) prints the table; one module per
benchmark, each returning :class:`benchmarks.table.Row` values.
"""
