"""Errors a person can act on, in a module light enough for the data stages' worker processes."""


class DataError(ValueError):
    """The data itself is unusable: the message names the file, folder or value."""
