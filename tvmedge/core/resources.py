"""Where tvmedge's data folders are: ``targets/`` (device descriptions), ``schedules/``
(shipped tuning databases) and ``kernels/`` (hand-written kernel sources: .cu, .cl).

In the repository they sit at the top level, next to ``tvmedge/``. An installed wheel
carries copies of them inside the package, as ``tvmedge/_data/<name>/`` (``setup.py``'s
build step puts them there). :func:`data_dir` looks in the package first, then in the
checkout, so a source checkout, an editable install and a wheel all find them.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TvmedgeError

DATA_DIRS = ("targets", "schedules", "kernels")
_PACKAGE = Path(__file__).resolve().parents[1]  # the tvmedge package


def data_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`DATA_DIRS`): the wheel's copy, else the checkout's."""
    if name not in DATA_DIRS:
        raise ValueError(f"unknown data folder '{name}' (known: {', '.join(DATA_DIRS)})")
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise TvmedgeError(f"tvmedge's '{name}' folder is missing: neither {_PACKAGE / '_data' / name} "
                       f"(installed package) nor {_PACKAGE.parent / name} (source checkout) exists")
