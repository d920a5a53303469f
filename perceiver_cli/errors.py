"""Errors the library raises on purpose; the CLI turns each into one stderr line.

`InputError` is the user's input (exit 2); `PerceiverError` is a runtime failure such as
a model that cannot be loaded (exit 1).
"""


class PerceiverError(Exception):
    """A runtime failure the user can act on (the message says how)."""

    exit_code = 1

    def flag(self) -> str:
        """The message in the command line's words: its flags where the library names an
        option (`OptionError`, `OverBudget`); for other errors the message itself."""
        return str(self)


class InputError(PerceiverError, ValueError):
    """Bad input: a text without a marker, a malformed marker, a span that cannot fit."""

    exit_code = 2


class CheckpointError(PerceiverError):
    """A model that cannot be found, downloaded or loaded."""
