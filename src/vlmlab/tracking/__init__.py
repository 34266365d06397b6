"""Experiment tracking (MLflow, local SQLite store by default)."""
