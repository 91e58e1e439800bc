"""Errors of the model package."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key or tensor at fault."""
