"""Errors the CLI reports as one clean line."""


class PrumergeError(Exception):
    """A user-facing error: bad input, a missing file, an unsupported model or option."""
