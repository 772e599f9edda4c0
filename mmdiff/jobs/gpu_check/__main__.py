"""``python -m mmdiff.jobs.gpu_check``: see :mod:`mmdiff.jobs.gpu_check`."""
import sys

from mmdiff.jobs.gpu_check.runner import main

sys.exit(main())
