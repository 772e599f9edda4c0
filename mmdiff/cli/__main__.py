"""``python -m mmdiff.cli``: the ``mmdiff`` command."""
import sys

from mmdiff.cli import main

sys.exit(main())
