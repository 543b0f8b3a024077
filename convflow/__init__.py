"""convflow: Prefect flows that take a CNN image classifier from a dataset to a served, reported model."""

__version__ = "0.1.0"
