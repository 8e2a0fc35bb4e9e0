"""Runnable examples: ``python -m bnn_fast.examples.regression`` (needs matplotlib)."""
