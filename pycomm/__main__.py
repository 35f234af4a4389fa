"""``python -m pycomm``: the same as the ``pycomm`` command (see :mod:`pycomm.cli`)."""

import sys

from pycomm.cli import main

if __name__ == "__main__":
    sys.exit(main())
