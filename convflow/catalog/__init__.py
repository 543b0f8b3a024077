"""What happened: Parquet schemas, the runs catalog, the model registry and its production pointer,
retraining policy."""
