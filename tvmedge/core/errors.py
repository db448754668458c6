"""The one exception type a user sees: its message is printed as a single line by the CLI."""


class TvmedgeError(Exception):
    """A user-facing error (bad input, unknown target, unreachable device, ...).

    The CLI prints ``error: <message>`` on stderr and exits non-zero, with no traceback
    unless ``--verbose`` is given.
    """


def first_line(err: BaseException) -> str:
    """The line of an exception's text a user should read: the first non-empty one that is
    not part of a traceback (TVM puts its C++ stack in the message), else the type's name."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if not ln.startswith(("File ", "Traceback", "at ", "0:", "1:")) and "Traceback" not in ln:
            return ln
    return lines[0] if lines else type(err).__name__
