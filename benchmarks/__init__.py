"""Performance benchmarks for safesteer (run each with ``python -m benchmarks.NAME``)."""
