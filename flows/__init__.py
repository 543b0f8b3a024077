"""Prefect flows: wiring of the stages, no data logic."""
