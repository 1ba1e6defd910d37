"""Start from a trained model: a fillmask checkpoint or a transformers BERT folder.

Distillation teachers, fine-tuning and continued pretraining all begin here.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from fillmask.objectives.base import CheckpointError, EncoderObjective, load_objective


def load_pretrained(source: str | Path) -> tuple[EncoderObjective, Tokenizer]:
    """The objective (encoder + heads, trained weights) and tokenizer stored at ``source``:
    a ``.ckpt`` written by ``fillmask fit``, or a transformers BERT folder (``config.json``,
    weights, ``tokenizer.json``)."""
    path = Path(source).expanduser()
    if path.is_dir():
        from fillmask.interop.hf import import_bert

        model, tokenizer = import_bert(path)
    elif path.is_file():
        model, tokenizer = load_objective(path)
    else:
        raise CheckpointError(f"pretrained model {path} does not exist; give a checkpoint "
                              "written by `fillmask fit` or a transformers model folder")
    if tokenizer is None:
        raise CheckpointError(f"{path} carries no tokenizer (tokenizer.json); fillmask needs the "
                              "tokenizer the model was trained with")
    return model, tokenizer
