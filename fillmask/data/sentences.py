"""Sentences for contrastive embedding training (SimCSE) and STS-style validation.

Training data, by ``mode``:

- ``unsupervised``: one sentence per line of a ``.txt`` file, or the ``text_column`` of a
  CSV/TSV/JSONL file (each sentence is its own positive);
- ``pairs``: ``anchor`` and ``positive`` columns of a CSV/TSV/JSONL file;
- ``triplets``: ``anchor``, ``positive`` and a hard ``negative``.

Validation and test files are STS-style: ``sentence1``, ``sentence2`` and a numeric ``score``.
Every text is encoded on its own as ``CLS ... SEP``.
"""

from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, processors
from torch.utils.data import DataLoader, Dataset

from fillmask.data.collate import pad_rows
from fillmask.data.labelled import LabelledDataError, LabelledDataModule
from fillmask.data.tokenize import resolve_special_tokens

Mode = Literal["unsupervised", "pairs", "triplets"]
MODES = ("unsupervised", "pairs", "triplets")


def sentence_tokenizer(tokenizer: Tokenizer, max_length: int | None = None) -> Tokenizer:
    """A copy of ``tokenizer`` that encodes one text as ``CLS ... SEP`` (the BERT template when
    it has no post-processor of its own), pads nothing and truncates to ``max_length`` (None:
    never)."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length)
    if tok.post_processor is None:
        special = resolve_special_tokens(tok)
        cls, sep = tok.id_to_token(special.cls_id), tok.id_to_token(special.sep_id)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, special.cls_id), (sep, special.sep_id)])
    return tok


class SentenceRows(Dataset):
    """Encoded examples: per role (``anchor``, ``positive``, ``sentence1``, ...) a list of
    token-id arrays, plus ``scores`` for STS pairs."""

    def __init__(self, rows: dict[str, list[Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(next(iter(self.rows.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: values[index] for key, values in self.rows.items()}


class SentenceCollator:
    """Pads each role of a list of examples to its longest text (rounded up to ``multiple``):
    ``{role: {input_ids, attention_mask, token_type_ids}}`` (B, T) each, ``scores`` (B,)."""

    def __init__(self, pad_id: int, multiple: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple = max(1, multiple)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in examples[0]:
            if key == "scores":
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
                continue
            ids, lengths = pad_rows([e[key] for e in examples], self.pad_id, self.multiple)
            mask = np.arange(ids.shape[1])[None, :] < lengths[:, None]  # (B, T)
            batch[key] = {"input_ids": torch.from_numpy(ids),
                          "attention_mask": torch.from_numpy(mask),
                          "token_type_ids": torch.zeros(ids.shape, dtype=torch.long)}
        return batch


class SentenceDataModule(LabelledDataModule):
    """Sentences, pairs or triplets for :class:`~fillmask.objectives.embedding.SentenceEmbedding`
    and STS-style pairs with gold scores for its validation (``val/spearman``).

    Nothing is read in ``__init__``. Without a validation file there is no validation loop.
    """

    def __init__(
        self,
        train_file: str,
        validation_file: str | None = None,
        test_file: str | None = None,
        mode: Mode = "unsupervised",
        text_column: str = "text",
        anchor_column: str = "anchor",
        positive_column: str = "positive",
        negative_column: str = "negative",
        sentence1_column: str = "sentence1",
        sentence2_column: str = "sentence2",
        score_column: str = "score",
        tokenizer: str | None = None,
        pretrained: str | None = None,
        max_length: int = 32,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        """Configure the sentence data.

        Args:
            train_file: ``unsupervised``: a ``.txt`` file (one sentence per line) or a
                ``.csv``/``.tsv``/``.jsonl`` file with ``text_column``; ``pairs`` and
                ``triplets``: a ``.csv``/``.tsv``/``.jsonl`` file with the anchor, positive
                (and negative) columns.
            validation_file: STS-style pairs (``.csv``, ``.tsv`` or ``.jsonl``): two sentences
                and a numeric similarity score per row; ``val/spearman`` is computed on them.
            test_file: STS-style pairs for ``fillmask finetune test``; defaults to the
                validation file.
            mode: ``unsupervised`` (SimCSE: each sentence is its own positive, two dropout
                views), ``pairs`` (anchor, positive) or ``triplets`` (anchor, positive, hard
                negative). Other rows of the batch are the in-batch negatives.
            text_column: Column of the sentences (``unsupervised``, non-``.txt`` files).
            anchor_column: Column of the anchors (``pairs``, ``triplets``).
            positive_column: Column of the positives (``pairs``, ``triplets``).
            negative_column: Column of the hard negatives (``triplets``).
            sentence1_column: First sentence of an evaluation pair.
            sentence2_column: Second sentence of an evaluation pair.
            score_column: Gold similarity of an evaluation pair (any numeric scale).
            tokenizer: A ``tokenizer.json`` file or a transformers folder; not needed when
                ``pretrained`` is given (the CLI links it from the model).
            pretrained: The pretrained model whose tokenizer to use.
            max_length: Most tokens per text, special tokens included (SimCSE: 32).
            batch_size: Anchors per training batch (per device): each has the other
                ``batch_size - 1`` rows as negatives (SimCSE: 64).
            eval_batch_size: Pairs per evaluation batch; defaults to ``batch_size``.
            pad_to_multiple_of: Texts are padded to the batch's longest, rounded up to this.
            num_workers: Loader worker processes.
            seed: Seed of the shuffling.
            cache_dir: Where `datasets` caches the parsed files.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown; use one of {', '.join(MODES)}")
        super().__init__(train_file, validation_file, test_file, tokenizer=tokenizer,
                         pretrained=pretrained, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, pad_to_multiple_of=pad_to_multiple_of,
                         num_workers=num_workers, seed=seed, cache_dir=cache_dir)
        self.mode = mode
        self.text_column = text_column
        self.role_columns = {"anchor": anchor_column, "positive": positive_column,
                             "negative": negative_column}
        self.pair_columns = {"sentence1": sentence1_column, "sentence2": sentence2_column}
        self.score_column = score_column

    @property
    def num_labels(self) -> int:
        """No classes: what the fine-tuning CLI's label link reads (the objective ignores it)."""
        return 0

    @property
    def label_names(self) -> list[str]:  # type: ignore[override]
        """No classes (the fine-tuning CLI links this too; the objective ignores it)."""
        return []

    def roles(self, split: str) -> dict[str, str]:
        """Role (``anchor``, ``sentence1``, ...) -> column of the texts a split holds."""
        if split != "train":
            return dict(self.pair_columns)
        if self.mode == "unsupervised":
            return {"anchor": self.text_column}
        count = 2 if self.mode == "pairs" else 3
        return dict(list(self.role_columns.items())[:count])

    # Files.

    @cached_property
    def raw(self) -> datasets.DatasetDict:
        """The examples of each given split, as read and checked."""
        return datasets.DatasetDict({name: self._read(name, file)
                                     for name, file in self.files.items() if file})

    def _read(self, split: str, file: str) -> datasets.Dataset:
        path = Path(file).expanduser()
        if path.suffix.lower() == ".txt" and path.is_file():
            if split != "train" or self.mode != "unsupervised":
                raise LabelledDataError(
                    f"{split} file {path}: a .txt file holds single sentences, which only "
                    "unsupervised training reads; give a .csv, .tsv or .jsonl file with the "
                    f"columns {', '.join(self.roles(split).values())}")
            return self._read_lines(path)
        data = super()._read(split, file)
        columns = [*self.roles(split).values(), *([self.score_column] if split != "train"
                                                    else [])]
        for column in columns:
            if column not in data.column_names:
                raise LabelledDataError(
                    f"{path} has no column {column!r} (columns: {', '.join(data.column_names)}); "
                    "set the data module's column options to the right names")
        self._check_values(data, split, path)
        return data

    def _check_columns(self, data: datasets.Dataset, path: Path) -> None:
        """Columns are checked per split in :meth:`_read`."""

    def _read_lines(self, path: Path) -> datasets.Dataset:
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and not lines[-1].strip():
            lines.pop()  # the final newline
        for number, line in enumerate(lines, 1):
            if not line.strip():
                raise LabelledDataError(f"{path} line {number} is empty; remove empty lines "
                                        "(one sentence per line)")
        if not lines:
            raise LabelledDataError(f"{path} holds no sentences; write one sentence per line")
        return datasets.Dataset.from_dict({self.text_column: [line.strip() for line in lines]})

    def _check_values(self, data: datasets.Dataset, split: str, path: Path) -> None:
        """Every text non-empty and every score a finite number, else one line naming the
        file's line."""
        header = 1 if path.suffix.lower() in (".csv", ".tsv") else 0
        if len(data) == 0:
            raise LabelledDataError(f"{path} holds no examples; add rows")
        for column in self.roles(split).values():
            for row, text in enumerate(data[column]):
                if text is None or not str(text).strip():
                    raise LabelledDataError(f"{path} line {row + 1 + header}: column {column!r} "
                                            "is empty; fill it or remove the row")
        if split == "train":
            return
        for row, score in enumerate(data[self.score_column]):
            if not _is_number(score):
                raise LabelledDataError(
                    f"{path} line {row + 1 + header}: score {score!r} in column "
                    f"{self.score_column!r} is not a number; give a numeric similarity score")

    # Encoding.

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenise the splits the stage needs (each once)."""
        needed = {"fit": ("train", "validation"), "validate": ("validation",),
                  "test": (self._test_split(),)}.get(stage or "fit", ("train", "validation"))
        for split in needed:
            if split not in self.encoded and self.files.get(split):
                self.encoded[split] = SentenceRows(self.encode_split(split))  # type: ignore

    def encode_split(self, split: str) -> dict[str, list[Any]]:
        """Tokenise one split: per role a list of token-id arrays (and ``scores``)."""
        data = self.raw[split]
        tokenizer = self._encoder_tokenizer
        rows: dict[str, list[Any]] = {}
        for role, column in self.roles(split).items():
            encodings = tokenizer.encode_batch([str(text).strip() for text in data[column]])
            rows[role] = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        if split != "train":
            rows["scores"] = [float(score) for score in data[self.score_column]]
        return rows

    @cached_property
    def _encoder_tokenizer(self) -> Tokenizer:
        return sentence_tokenizer(self.tokenizer, self.max_length)

    # Loaders.

    def collator(self) -> SentenceCollator:  # type: ignore[override]
        return SentenceCollator(self.special_tokens.pad_id, self.pad_to_multiple_of)

    def val_dataloader(self) -> DataLoader | list:
        """The STS pairs; no loader (no validation) without a validation file."""
        return self._loader("validation", train=False) if self.files["validation"] else []

    def test_dataloader(self) -> DataLoader | list:
        if not (self.files["test"] or self.files["validation"]):
            raise LabelledDataError("no test pairs: set data.test_file (or data.validation_file) "
                                    "to an STS-style file with sentence pairs and scores")
        return self._loader(self._test_split(), train=False)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
