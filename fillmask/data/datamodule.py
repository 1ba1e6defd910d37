"""The MLM DataModule: corpus -> tokenizer -> packed blocks -> stateful loader -> masked batches."""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from filelock import FileLock
from tokenizers import Tokenizer
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from fillmask.data.corpus import SampleBy, load_corpus
from fillmask.data.packing import pack_corpus
from fillmask.data.tokenize import (
    SpecialTokens,
    TokenizerTraining,
    batched,
    load_tokenizer,
    resolve_special_tokens,
    train_tokenizer,
)
from fillmask.masking.base import Masking, VocabInfo
from fillmask.masking.random import SampleRandom, mix64
from fillmask.masking.token import TokenMasking
from fillmask.paths import cache_root


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: a permutation that is a pure function of (seed, epoch).

    Carrying the epoch with each index lets loader workers seed masking by (seed, epoch, id).
    """

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        if not self.shuffle:
            return ((self.epoch, i) for i in range(self.size))
        key = mix64(torch.tensor([self.seed * 1_000_003 + self.epoch])).item()
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(key))
        return ((self.epoch, i) for i in order.tolist())


class BlockDataset(Dataset):
    """Packed token blocks, read from memory-mapped Arrow by ``(epoch, index)`` keys."""

    def __init__(self, blocks: datasets.Dataset) -> None:
        self.blocks = blocks.with_format("numpy")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, Any]:
        epochs, ids = zip(*keys, strict=True)
        rows = self.blocks[list(ids)]["input_ids"]
        return {"input_ids": np.stack(rows).astype(np.int64), "sample_id": np.asarray(ids),
                "epoch": np.asarray(epochs)}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])


class MaskingCollator:
    """Masks a fetched batch with randomness keyed by (seed, epoch, sample id)."""

    def __init__(self, masking: Masking, vocab: VocabInfo, seed: int, train: bool) -> None:
        self.masking = masking
        self.vocab = vocab
        self.seed = seed
        self.train = train

    def __call__(self, fetched: dict[str, Any]) -> dict[str, torch.Tensor]:
        input_ids = torch.from_numpy(fetched["input_ids"])  # (B, T)
        sample_ids = torch.from_numpy(fetched["sample_id"]).long()
        epoch = int(fetched["epoch"][0]) if self.train else 0
        rng = SampleRandom(self.seed, epoch, sample_ids)
        masked = self.masking(input_ids, rng, self.vocab, train=self.train)
        batch = {"input_ids": masked.input_ids, "labels": masked.labels, "sample_id": sample_ids}
        padding = input_ids == self.vocab.pad_id
        if padding.any():
            batch["attention_mask"] = ~padding
        return batch


class MaskedLMDataModule(L.LightningDataModule):
    """Masked-language-model data: any corpus, any tokenizer, any masking scheme."""

    def __init__(
        self,
        corpus: str | list[str] = "python-docs",
        text_column: str = "text",
        sample_by: SampleBy = "paragraph",
        tokenizer: str | None = None,
        tokenizer_training: TokenizerTraining | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        masking: Masking | None = None,
        num_workers: int = 0,
        seed: int = 0,
        validation_fraction: float = 0.05,
        vocab_multiple: int = 64,
        cache_dir: str | None = None,
    ) -> None:
        """Configure the data pipeline.

        Args:
            corpus: An embedded corpus name (``python-docs``), a saved `datasets` folder, or
                text/JSONL/Parquet files and globs.
            text_column: The column holding the text in JSONL, Parquet and saved datasets.
            sample_by: How plain-text files are split into documents: ``line``, ``paragraph``
                (blank-line separated) or ``document`` (one per file).
            tokenizer: A ``tokenizer.json`` file or a transformers folder. Empty: train one on
                the training split with ``tokenizer_training`` (cached by corpus and settings).
            tokenizer_training: Algorithm and vocabulary size when a tokenizer is trained.
            max_length: Tokens per packed block, CLS and SEP included.
            batch_size: Blocks per training batch (per device).
            eval_batch_size: Blocks per validation batch; defaults to ``batch_size``.
            masking: The masking scheme; defaults to BERT's token masking (15%, 80/10/10).
            num_workers: Loader worker processes (masking runs in them).
            seed: Seed of shuffling and masking (masks depend on seed, epoch and sample id).
            validation_fraction: Share of documents held out when a corpus has no validation split.
            vocab_multiple: Round the model's vocabulary up to a multiple of this (faster matmuls).
            cache_dir: Where corpora and trained tokenizers are cached (default
                ``$FILLMASK_CACHE`` or ``~/.cache/fillmask``).
        """
        super().__init__()
        self.corpus = corpus
        self.text_column = text_column
        self.sample_by = sample_by
        self.tokenizer_path = tokenizer
        self.tokenizer_training = tokenizer_training or TokenizerTraining()
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.masking = masking or TokenMasking()
        self.num_workers = num_workers
        self.seed = seed
        self.validation_fraction = validation_fraction
        self.vocab_multiple = max(1, vocab_multiple)
        self.cache_dir = cache_root(cache_dir)
        self.blocks: datasets.DatasetDict | None = None

    # Tokenizer: resolved on first use (the CLI needs the vocabulary size to build the model).

    def _load_text(self) -> datasets.DatasetDict:
        return load_corpus(self.corpus, self.text_column, self.sample_by,
                           self.validation_fraction, self.seed, self.cache_dir)

    @cached_property
    def _tokenizer_and_roles(self) -> tuple[Tokenizer, SpecialTokens]:
        if self.tokenizer_path:
            tok, declared = load_tokenizer(self.tokenizer_path)
            return tok, resolve_special_tokens(tok, declared, source=str(self.tokenizer_path))
        tok = self._trained_tokenizer()
        return tok, resolve_special_tokens(tok)

    def _trained_tokenizer(self) -> Tokenizer:
        text = self._load_text()
        key = hashlib.sha256(
            f"{text['train']._fingerprint}-{self.tokenizer_training.fingerprint()}".encode()
        ).hexdigest()[:16]
        file = self.cache_dir / "tokenizers" / f"{key}.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(file) + ".lock"):
            if not file.is_file():
                texts = (t for b in batched(text["train"]["text"]) for t in b)
                tok = train_tokenizer(texts, self.tokenizer_training)
                tmp = file.with_suffix(".tmp")
                tok.save(str(tmp))
                tmp.replace(file)
        return Tokenizer.from_file(str(file))

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer_and_roles[0]

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._tokenizer_and_roles[1]

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's, rounded up to ``vocab_multiple``."""
        n = self.tokenizer.get_vocab_size()
        return -(-n // self.vocab_multiple) * self.vocab_multiple

    @property
    def vocab_info(self) -> VocabInfo:
        return self.special_tokens.vocab_info(self.tokenizer.get_vocab_size())

    # Lightning hooks.

    def prepare_data(self) -> None:
        self._packed()

    def setup(self, stage: str | None = None) -> None:
        self.blocks = self._packed()

    def _packed(self) -> datasets.DatasetDict:
        return pack_corpus(self._load_text(), self.tokenizer, self.special_tokens, self.max_length)

    def _loader(self, split: str, train: bool) -> StatefulDataLoader:
        if self.blocks is None:
            self.setup()
        dataset = BlockDataset(self.blocks[split])
        if len(dataset) == 0:
            raise ValueError(f"the {split} split of corpus {self.corpus!r} gives no block of "
                             f"max_length={self.max_length} tokens; lower max_length or add text")
        return StatefulDataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSampler(len(dataset), self.seed, shuffle=train),
            collate_fn=MaskingCollator(self.masking, self.vocab_info, self.seed, train),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader("validation", train=False)
