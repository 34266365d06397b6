"""Evaluation: greedy generation and held-out scoring."""
