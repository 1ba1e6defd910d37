"""Collation: pad the fetched samples, find their words, mask them, and build the batch.

The masking randomness of a sample is keyed by (seed, epoch, sample id): the collator gets the
epoch with every sample from the sampler, so loader workers need no shared state. With static
masking the epoch is replaced by ``epoch % duplication_factor`` (original BERT: each sample keeps
one of ``duplication_factor`` masks across all epochs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fillmask.masking.base import Masking, VocabInfo
from fillmask.masking.random import SampleRandom


def pad_rows(rows: Any, pad: int, multiple: int, dtype: Any = np.int64
             ) -> tuple[np.ndarray, np.ndarray]:
    """Stack rows (a 2-D array, or a sequence of 1-D arrays) padded to the longest, rounded up
    to ``multiple``. Returns (B, T) values and the (B,) lengths."""
    if isinstance(rows, np.ndarray) and rows.ndim == 2:
        return rows.astype(dtype), np.full(len(rows), rows.shape[1])
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(-(-lengths.max() // multiple) * multiple)
    out = np.full((len(rows), width), pad, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out, lengths


def word_ids_from_starts(starts: np.ndarray, ordinary: np.ndarray) -> np.ndarray:
    """Row-local word ids (0, 1, ... over ordinary tokens; -1 at specials and padding).

    A word begins where the tokenizer said so or right after a special token."""
    after_special = np.concatenate(
        [np.ones((len(starts), 1), bool), ~ordinary[:, :-1]], axis=1)
    begins = ordinary & ((starts > 0) | after_special)
    return np.where(ordinary, np.cumsum(begins, axis=1) - 1, -1)


def document_fields(doc_lengths: Any, width: int) -> dict[str, torch.Tensor]:
    """From each row's document lengths: document ids (-1 on padding), positions that restart
    per document, and the cumulative sequence lengths of all documents (varlen kernels)."""
    B = len(doc_lengths)
    document_ids = np.full((B, width), -1, dtype=np.int64)
    position_ids = np.zeros((B, width), dtype=np.int64)
    for row, lengths in enumerate(doc_lengths):
        total = int(np.sum(lengths))
        document_ids[row, :total] = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        position_ids[row, :total] = np.arange(total) - starts
    flat = np.concatenate([np.asarray(lengths) for lengths in doc_lengths])
    cu_seqlens = np.concatenate([[0], np.cumsum(flat)]).astype(np.int32)
    return {"document_ids": torch.from_numpy(document_ids),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": torch.tensor(int(flat.max()))}


class MaskingCollator:
    """Turns fetched samples into a masked batch of tensors."""

    def __init__(
        self,
        masking: Masking,
        vocab: VocabInfo,
        seed: int,
        train: bool,
        pad_to_multiple_of: int = 8,
        static: bool = False,
        duplication_factor: int = 1,
        keep_word_ids: bool = False,
    ) -> None:
        self.masking = masking
        self.vocab = vocab
        self.seed = seed
        self.train = train
        self.multiple = max(1, pad_to_multiple_of)
        self.static = static
        self.duplication_factor = max(1, duplication_factor)
        self.keep_word_ids = keep_word_ids

    def mask_epoch(self, epoch: int) -> int:
        """The epoch that keys the masks: 0 for evaluation, fixed copies for static masking."""
        if not self.train:
            return 0
        return epoch % self.duplication_factor if self.static else epoch

    def __call__(self, fetched: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids, lengths = pad_rows(fetched["input_ids"], self.vocab.pad_id, self.multiple)
        sample_ids = np.asarray(fetched["sample_id"], dtype=np.int64)
        rng = SampleRandom(self.seed, self.mask_epoch(int(fetched["epoch"][0])), sample_ids)
        word_ids = None
        if self.masking.needs_word_ids or self.keep_word_ids:
            starts, _ = pad_rows(fetched["word_starts"], 0, self.multiple, np.uint8)
            word_ids = word_ids_from_starts(starts, ~self.vocab.special_mask(input_ids))
        masked = self.masking(input_ids, rng, self.vocab, train=self.train, word_ids=word_ids)
        batch = {"input_ids": torch.from_numpy(masked.input_ids),
                 "labels": torch.from_numpy(masked.labels),
                 "sample_id": torch.from_numpy(sample_ids)}
        batch.update({k: torch.from_numpy(v) for k, v in masked.extras.items()})
        if (lengths < input_ids.shape[1]).any():
            batch["attention_mask"] = torch.from_numpy(
                np.arange(input_ids.shape[1])[None, :] < lengths[:, None])
        if "token_type_ids" in fetched:
            batch["token_type_ids"] = torch.from_numpy(
                pad_rows(fetched["token_type_ids"], 0, self.multiple)[0])
        if "pair_label" in fetched:
            batch["pair_label"] = torch.from_numpy(np.asarray(fetched["pair_label"], np.int64))
        if "doc_lengths" in fetched:
            batch.update(document_fields(fetched["doc_lengths"], input_ids.shape[1]))
        if word_ids is not None and self.keep_word_ids:
            batch["word_ids"] = torch.from_numpy(word_ids)
        return batch
