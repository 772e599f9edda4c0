"""Fault-injection suite: helpers in faultkit.py; the data tests' datakit.py is reused."""
from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
for folder in (_TESTS / "data", _TESTS):  # datakit.py, wandb_offline.py
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
