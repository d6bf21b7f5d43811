"""``python -m rtqueue.sim``: run the simulator (see :mod:`rtqueue.sim.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m rtqueue.sim"))
