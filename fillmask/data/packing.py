"""Tokenise a text corpus and pack it into fixed-length blocks (concatenate and chunk)."""

from __future__ import annotations

import hashlib
from typing import Any

import datasets
import numpy as np
from tokenizers import Tokenizer

from fillmask.data.tokenize import SpecialTokens

PACKING_VERSION = "1"


class BlockPacker:
    """Turn a batch of documents into ``CLS tokens... SEP`` blocks of exactly ``max_length``.

    Documents are joined with SEP into one token stream per map batch, then cut into blocks;
    the stream's tail that does not fill a block is dropped (less than one block per batch).
    """

    def __init__(self, tokenizer: Tokenizer, special: SpecialTokens, max_length: int) -> None:
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too short; use at least 8 tokens")
        self.tokenizer = tokenizer
        self.special = special
        self.max_length = max_length

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[np.ndarray]]:
        texts = [t for t in batch["text"] if t and not t.isspace()]
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        sep = np.array([self.special.sep_id], dtype=np.int32)
        pieces = [part for e in encodings if e.ids for part in (np.asarray(e.ids, np.int32), sep)]
        stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        body = self.max_length - 2
        n_blocks = len(stream) // body
        blocks = stream[: n_blocks * body].reshape(n_blocks, body)
        cls = np.full((n_blocks, 1), self.special.cls_id, np.int32)
        ends = np.full((n_blocks, 1), self.special.sep_id, np.int32)
        return {"input_ids": list(np.concatenate([cls, blocks, ends], axis=1))}


def pack_corpus(
    corpus: datasets.DatasetDict,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    max_length: int,
    map_batch_size: int = 1000,
) -> datasets.DatasetDict:
    """Tokenise and pack every split; results are cached by `datasets` under a fingerprint of
    (corpus, tokenizer, max_length), so a second run reuses them."""
    packer = BlockPacker(tokenizer, special, max_length)
    dtype = "uint16" if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max else "int32"
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(dtype))})
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    packed = {}
    for name, split in corpus.items():
        fingerprint = hashlib.sha256(
            f"{split._fingerprint}-{tok_hash}-{max_length}-{PACKING_VERSION}".encode()
        ).hexdigest()[:16]
        packed[name] = split.map(
            packer, batched=True, batch_size=map_batch_size, remove_columns=split.column_names,
            features=features, new_fingerprint=fingerprint, desc=f"packing {name}",
        )
    return datasets.DatasetDict(packed)
