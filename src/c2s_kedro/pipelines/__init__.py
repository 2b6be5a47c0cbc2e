"""Pipelines of the project: one package each."""
