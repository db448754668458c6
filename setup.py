"""Build hook: the wheel carries the top-level ``targets/``, ``schedules/`` and ``kernels/`` folders.

They stay at the repository's top level (the project's layout); ``build_py`` copies them
into the built package as ``tvmedge/_data/<name>/``, where :func:`tvmedge.core.resources.data_dir`
finds them in an installed wheel. Editable installs read them from the checkout instead.
All other metadata is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_DIRS = ("targets", "schedules", "kernels")


class BuildPyWithData(build_py):
    """``build_py`` that also copies the data folders into ``<build_lib>/tvmedge/_data/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in DATA_DIRS:
            dest = Path(self.build_lib) / "tvmedge" / "_data" / name
            if dest.exists():
                shutil.rmtree(dest)
            # Tuning databases' locks, staging copies and logs are never shipped.
            shutil.copytree(ROOT / name, dest, ignore=shutil.ignore_patterns(".*", "__pycache__", "logs"))


setup(cmdclass={"build_py": BuildPyWithData})
