"""transformers folders as fillmask objectives (the reading itself is :mod:`fillmask.sources`;
export is :mod:`fillmask.interop.export`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from fillmask.architectures.transformers_format import TransformersModel
from fillmask.objectives.mlm import MaskedLM
from fillmask.sources import (
    HFImportError,
    architecture_for,
    mapping_of,
    read_hf_weights,
    read_transformers,
)

__all__ = ["HFImportError", "TransformersModel", "architecture_for", "import_transformers",
           "mapping_of", "read_hf_weights", "read_transformers"]


def import_transformers(folder: str | Path) -> tuple[MaskedLM, Tokenizer | None]:
    """A transformers folder as a fillmask :class:`MaskedLM` (encoder and MLM head, see
    :func:`~fillmask.sources.read_transformers`) and its tokenizer, ready to train further or
    distil from."""
    parts, tokenizer = read_transformers(folder)
    return MaskedLM.from_parts(parts), tokenizer


import_bert = import_transformers  # the name earlier releases used
