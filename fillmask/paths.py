"""Where fillmask keeps what it builds once and reuses (corpora, tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$FILLMASK_CACHE``, else ``~/.cache/fillmask``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FILLMASK_CACHE", "~/.cache/fillmask")).expanduser()
