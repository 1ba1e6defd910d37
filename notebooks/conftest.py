"""Notebooks run in CI (pytest --nbmake) in smoke mode and with a throwaway cache."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("FILLMASK_SMOKE", "1")
os.environ.setdefault("FILLMASK_CACHE", tempfile.mkdtemp(prefix="fillmask-notebook-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
