"""Scoring methods against a reference: metrics, per-case and per-split evaluation, figures."""
