"""Fixtures of the plugin's own suite: fillmask's isolated cache and small corpus."""

from fillmask.testing import isolated_cache, small_corpus  # noqa: F401
