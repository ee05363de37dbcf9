"""Errors of the core layer."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded or inspected; the message names the fix."""
