"""Evaluation: reports, tables and plots of `safesteer eval` runs."""
