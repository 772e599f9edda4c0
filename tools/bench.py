"""`python tools/bench.py CONFIG [key=value ...] [--steps N] [--json OUT]`: same as `mmdiff bench`."""
from __future__ import annotations

import sys

from mmdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
