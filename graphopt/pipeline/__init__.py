"""Passes, pipelines and the PassManager that runs them with verification."""
