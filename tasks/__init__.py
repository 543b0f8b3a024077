"""One module per pipeline stage, each a plain function plus a thin Prefect task."""
