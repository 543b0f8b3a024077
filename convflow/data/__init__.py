"""Reading sources: image folders, Parquet tables, IDX files, TFDS and the built-in digits; image checks; surveys."""
