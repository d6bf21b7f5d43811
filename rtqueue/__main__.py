"""``python -m rtqueue``: the same as the ``rtqueue`` command."""

import sys

from .cli import main

sys.exit(main(prog="python -m rtqueue"))
