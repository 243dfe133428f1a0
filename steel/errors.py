"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class SteelError(ValueError):
    """A user mistake (bad file, row or value); the message names what is wrong."""
