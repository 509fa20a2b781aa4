"""Errors that end a command with one line for the user (no traceback)."""


class StartupError(Exception):
    """The service could not start; the message is one line for the user."""
