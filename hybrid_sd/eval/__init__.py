"""Evaluation of drafters on held-out data."""
