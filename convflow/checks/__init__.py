"""Data checks: this run's images against the data that made the production model (class set and
balance, counts, label conflicts, leakage, image property drift), with every figure recorded."""
