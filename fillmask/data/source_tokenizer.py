"""The tokenizer of a pretrained source, read without building its model."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from fillmask.checkpoint_file import missing_tokenizer, read_checkpoint
from fillmask.data.tokenize import load_tokenizer


def pretrained_tokenizer(source: str | Path) -> Tokenizer:
    """A checkpoint's stored tokenizer (its weights stay unread) or a transformers folder's
    tokenizer.json."""
    path = Path(source).expanduser()
    if path.is_dir():
        return load_tokenizer(str(path))[0]
    tokenizer = read_checkpoint(path)["fillmask"].get("tokenizer")
    if tokenizer is None:
        raise missing_tokenizer(path)
    return Tokenizer.from_str(tokenizer)
