"""Start from a trained model: a fillmask checkpoint or a transformers folder.

Distillation teachers, fine-tuning and continued pretraining all begin here. A checkpoint
gives back its objective; a transformers folder gives its encoder and MLM head
(:class:`~fillmask.heads.MaskedLMParts`, the same ``encoder.*`` / ``head.*`` names), read by
:mod:`fillmask.sources`: objectives never reach up to interop.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from fillmask.checkpoint_file import missing_tokenizer
from fillmask.heads import MaskedLMParts
from fillmask.objectives.base import CheckpointError, EncoderObjective, load_objective
from fillmask.sources import read_transformers


def load_pretrained(source: str | Path
                    ) -> tuple[EncoderObjective | MaskedLMParts, Tokenizer]:
    """The model (encoder + heads, trained weights) and tokenizer stored at ``source``: the
    objective of a ``.ckpt`` written by ``fillmask fit``, or the encoder and MLM head of a
    transformers folder (``config.json``, weights, ``tokenizer.json``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        model, tokenizer = read_transformers(path)
    elif path.is_file():
        model, tokenizer = load_objective(path)
    else:
        raise CheckpointError(f"pretrained model {path} does not exist; give a checkpoint "
                              "written by `fillmask fit` or a transformers model folder")
    if tokenizer is None:
        raise missing_tokenizer(path, "tokenizer.json" if path.is_dir() else "")
    return model, tokenizer


def transfer_weights(target: EncoderObjective, source: EncoderObjective | MaskedLMParts,
                     target_tokenizer: Tokenizer, source_tokenizer: Tokenizer) -> dict[str, int]:
    """Initialise ``target`` from ``source`` for continued pretraining (BioBERT, SciBERT).

    Every encoder and head parameter is copied, shapes must agree, except the vocabulary-sized
    ones: the token embedding rows (and the MLM output bias / untied decoder) are mapped by token
    string. A token of the new tokenizer that the old one lacks starts as the mean of the rows of
    the pieces the old tokenizer splits it into. Returns how many rows were copied / composed.
    """
    rows = _row_map(target_tokenizer, source_tokenizer)
    source_state = source.state_dict()
    vocab_sized = {name for name, value in target.state_dict().items()
                   if value.ndim >= 1 and value.shape[0] == target.encoder.vocab_size}
    with torch.no_grad():
        for name, value in target.state_dict().items():
            if name not in source_state:
                continue
            if name in vocab_sized:
                value.copy_(_remap_rows(source_state[name], rows, value))
            elif source_state[name].shape != value.shape:
                raise CheckpointError(
                    f"cannot initialise {name}: the pretrained model has shape "
                    f"{tuple(source_state[name].shape)}, this one {tuple(value.shape)}; give the "
                    "encoder the pretrained model's shape (hidden size, layers, positions)")
            else:
                value.copy_(source_state[name])
    composed = sum(len(r) != 1 for r in rows.values())
    return {"copied": len(rows) - composed, "composed": composed}


def _row_map(target: Tokenizer, source: Tokenizer) -> dict[int, list[int]]:
    """For each target id: the source ids whose rows initialise it (one when the token exists
    in both vocabularies, else the pieces the source tokenizer splits its text into)."""
    source_vocab = source.get_vocab()
    out: dict[int, list[int]] = {}
    for token, index in target.get_vocab().items():
        if token in source_vocab:
            out[index] = [source_vocab[token]]
            continue
        text = target.decode([index]) or token
        pieces = source.encode(text, add_special_tokens=False).ids
        out[index] = pieces or [source_vocab.get("[UNK]", 0)]
    return out


def _remap_rows(source: torch.Tensor, rows: dict[int, list[int]], target: torch.Tensor
                ) -> torch.Tensor:
    """``target`` with each mapped row replaced by the mean of its source rows."""
    out = target.clone()
    for index, sources in rows.items():
        if index < len(out):
            out[index] = source[sources].float().mean(dim=0).to(out.dtype)
    return out
