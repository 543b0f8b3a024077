"""The ground every layer stands on: typed records, the run's place, errors, cache keys, retries, atomic storage."""
