"""``python -m tvmedge`` is the ``tvmedge`` command."""

import sys

from .cli import main

sys.exit(main())
