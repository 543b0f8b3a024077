"""Keras models: custom layers, training recipes and callbacks, frozen-base features, the classifier,
the serving function, the export check."""
