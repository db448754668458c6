"""The one exception type a user sees: its message is printed as a single line by the CLI."""


class TvmedgeError(Exception):
    """A user-facing error (bad input, unknown target, unreachable device, ...).

    The CLI prints ``error: <message>`` on stderr and exits non-zero, with no traceback
    unless ``--verbose`` is given.
    """
