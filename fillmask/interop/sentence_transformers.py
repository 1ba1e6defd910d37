"""A trained encoder as a sentence-transformers folder: ``SentenceTransformer(folder)`` loads
it offline and encodes what ``fillmask embed`` computes.

The folder is the transformers base-model export (``config.json``, ``model.safetensors``,
tokenizer files at its root: ``AutoModel`` loads it) plus sentence-transformers' layout:

    modules.json                       Transformer (path "") -> Pooling [-> Normalize]
    sentence_bert_config.json          max_seq_length (the encoder's positions), do_lower_case
    config_sentence_transformers.json  similarity: cosine
    1_Pooling/config.json              the pooling mode flags (cls, mean or max)
    2_Normalize/config.json            only when the vectors are L2-normalised

Encoders no transformers class computes are exported as fillmask's remote code
(``FillmaskModel``); sentence-transformers refuses to let a folder's config turn on remote code,
so load those with ``SentenceTransformer(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from fillmask.architectures.transformers_format import TransformersModel
from fillmask.data.sentences import sentence_tokenizer
from fillmask.interop.export import ExportError, transformers_model, write_folder
from fillmask.objectives.base import Deliverable, EncoderObjective, load_objective
from fillmask.objectives.embedding import SentencePooling, sentence_transformers_files

__all__ = ["export_sentence_transformer"]


def export_sentence_transformer(source: str | Path | EncoderObjective, folder: str | Path,
                                tokenizer: Tokenizer | None = None, pooling: str | None = None,
                                normalize: bool | None = None, overwrite: bool = False
                                ) -> TransformersModel:
    """Write ``source`` (a checkpoint of any objective, or an objective in memory with its
    ``tokenizer``) as a sentence-transformers folder. ``pooling`` and ``normalize`` default to
    a :class:`~fillmask.objectives.embedding.SentenceEmbedding`'s own, else ``mean`` and no
    normalising. Returns the transformers model written at the folder's root."""
    output = Path(folder).expanduser()
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output} is a file; give a folder to write")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"{output} exists and is not empty; choose another folder or pass "
                          "overwrite=True to replace it")
    if isinstance(source, EncoderObjective):
        model, stored = source, tokenizer
    else:
        model, stored = load_objective(source)
        tokenizer = tokenizer or stored
    if tokenizer is None:
        raise ExportError("no tokenizer: pass the tokenizer the model was trained with")
    own = getattr(model, "pooler", None)
    head = SentencePooling(
        pooling or (own.pooling if isinstance(own, SentencePooling) else "mean"),
        normalize if normalize is not None else isinstance(own, SentencePooling) and own.normalize)
    encoder = model.encoder
    target = transformers_model(Deliverable(encoder, "base", head))  # type: ignore[arg-type]
    files = sentence_transformers_files(encoder.hidden_size, head.pooling, head.normalize,
                                        encoder.max_positions)
    write_folder(target, sentence_tokenizer(tokenizer), encoder, output, files)
    return target
