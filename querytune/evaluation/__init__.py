"""Evaluation: metrics, parse and retrieval evaluation, the relevance report and the diff between two models."""
