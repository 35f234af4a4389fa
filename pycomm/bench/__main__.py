"""``python -m pycomm.bench COMMAND ...``: the same as ``pycomm bench COMMAND ...`` (e.g. ``e2e``)."""

import sys

from pycomm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
