"""Which kernel backends are usable on this host, and why the others are not.

A backend is usable when its module imports and its ``available()`` says so (a device is
found, its kernel source builds, ...); anything that fails on the way becomes a reason string
rather than an exception, so a benchmark or test over all backends runs the usable ones and
reports the rest.
"""

from __future__ import annotations

from types import ModuleType

from . import get_backend


def backend_status(name: str) -> tuple[bool, str]:
    """``available()`` of a backend, with import failures turned into (False, reason)."""
    try:
        return get_backend(name).available()
    except Exception as e:  # a backend that cannot even import is simply unavailable
        return False, f"{type(e).__name__}: {e}"


def usable_backends(names: list[str]) -> tuple[list[tuple[str, ModuleType]], dict[str, str]]:
    """(usable ``(name, module)`` pairs in the order given, ``{name: reason}`` of the others)."""
    usable: list[tuple[str, ModuleType]] = []
    skipped: dict[str, str] = {}
    for name in names:
        ok, why = backend_status(name)
        if ok:
            usable.append((name, get_backend(name)))
        else:
            skipped[name] = why
    return usable, skipped
