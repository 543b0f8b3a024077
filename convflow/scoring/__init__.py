"""Predictions with a production SavedModel: `convflow predict` and scheduled scoring."""
