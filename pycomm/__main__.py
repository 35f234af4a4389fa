"""``python -m pycomm``: the same as the ``pycomm`` command (see :mod:`pycomm.bench.cli`)."""

import sys

from pycomm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
