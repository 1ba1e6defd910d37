"""Fixtures of the plugin's tests: an isolated fillmask cache, a small corpus, one tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from fillmask.testing import isolated_cache, small_corpus  # noqa: F401  (fillmask's fixtures)


@pytest.fixture(scope="session")
def tokenizer_file(small_corpus: Path) -> Path:  # noqa: F811  (the fixture, by name)
    """A 512-token WordPiece tokenizer trained once on the small corpus."""
    from fillmask.data.tokenize import TokenizerTraining, train_tokenizer

    texts = small_corpus.read_text(encoding="utf-8").split("\n\n")
    tok = train_tokenizer(texts, TokenizerTraining("wordpiece", vocab_size=512))
    path = small_corpus.parent / "tokenizer.json"
    tok.save(str(path))
    return path
