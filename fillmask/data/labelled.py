"""Labelled data for fine-tuning: sentence (pair) classification and token classification.

Reads local CSV, TSV or JSONL files with `datasets` (and, for token classification, CoNLL
column files), maps labels to ids (sorted, from the training file), tokenises with the
pretrained model's tokenizer and pads each batch.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning as L
import numpy as np
import torch
from tokenizers import Encoding, Tokenizer, processors
from torch.utils.data import DataLoader, Dataset

from fillmask.data.collate import pad_rows
from fillmask.data.tokenize import SpecialTokens, load_tokenizer, resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.masking.base import IGNORE_INDEX
from fillmask.paths import cache_root

Task = Literal["sequence", "token", "question_answering"]
"""``question_answering`` is named only to point at its own data module (SQuAD files)."""

# File suffix -> `datasets` builder and its reading options.
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
}

# Suffixes of CoNLL column files (token task): one word a line, blank lines between sentences.
COLUMN_SUFFIXES = (".conll", ".txt", ".iob")
DOCSTART = "-DOCSTART-"


class LabelledDataError(FillmaskError):
    """A labelled data file fillmask cannot use, with the file and the fix."""


class EncodedDataset(Dataset):
    """Tokenised examples: per row ``input_ids``, ``token_type_ids`` and ``labels`` arrays (a
    scalar label for sequences, one per token for token classification)."""

    def __init__(self, rows: dict[str, list[Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {key: values[index] for key, values in self.rows.items()}


class LabelledCollator:
    """Pads a list of encoded examples to the longest one (rounded up to ``multiple``)."""

    def __init__(self, pad_id: int, multiple: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple = max(1, multiple)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, lengths = pad_rows([e["input_ids"] for e in examples], self.pad_id,
                                      self.multiple)
        types, _ = pad_rows([e["token_type_ids"] for e in examples], 0, self.multiple)
        labels = [e["labels"] for e in examples]
        if np.ndim(labels[0]) == 0:
            label_array = np.asarray(labels, dtype=np.int64)  # (B,)
        else:
            label_array, _ = pad_rows(labels, IGNORE_INDEX, self.multiple)  # (B, T)
        width = input_ids.shape[1]
        return {"input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]),
                "token_type_ids": torch.from_numpy(types),
                "labels": torch.from_numpy(label_array)}


class LabelledDataModule(L.LightningDataModule):
    """Labelled files for fine-tuning: sequence classification (single sentences or pairs,
    GLUE-style) or token classification (a list of words and a list of tags, CoNLL-style).

    Nothing is read in ``__init__``: files are loaded on first use of ``num_labels``,
    ``tokenizer`` or the loaders.
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        task: Task = "sequence",
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        tokens_column: str = "tokens",
        tags_column: str = "tags",
        tags_column_index: int = -1,
        tokenizer: str | None = None,
        pretrained: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        validation_fraction: float = 0.1,
        cache_dir: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        validation_split: str | None = "validation",
        test_split: str | None = None,
    ) -> None:
        """Configure the labelled data.

        Args:
            train_file: Training examples: ``.csv``, ``.tsv``, ``.json`` or ``.jsonl``; token
                classification reads JSON lines (lists of words and tags) or CoNLL column
                files (``.conll``, ``.txt``, ``.iob``: one word a line, whitespace-separated
                columns, the word first; blank lines end sentences; ``-DOCSTART-`` lines are
                skipped).
            validation_file: Validation examples; when absent, ``validation_fraction`` of the
                training file is held out (chosen by ``seed``).
            test_file: Labelled test examples for ``fillmask finetune test``; defaults to the
                validation examples.
            task: ``sequence`` (one label per text or text pair) or ``token`` (one tag per word).
            text_column: Column of the text (sequence task).
            text_pair_column: Column of the second text of sentence pairs (encoded as
                ``CLS a SEP b SEP``, token types 0 then 1); empty for single sentences.
            label_column: Column of the label, string or integer (sequence task).
            tokens_column: Column holding each example's list of words (token task).
            tags_column: Column holding each example's list of tags, one per word (token task).
            tags_column_index: Which column of a CoNLL column file holds the tag, counted from 0
                (negative: from the end). The default -1 is the last column: the NER tag of
                CoNLL-2003's ``word POS chunk NER``.
            tokenizer: A ``tokenizer.json`` file or a transformers folder. Not needed when
                ``pretrained`` is given (the CLI links it from the model); when both are
                given, this one is used.
            pretrained: The pretrained model (fillmask checkpoint or transformers folder) whose
                tokenizer to use.
            max_length: Most tokens per example, special tokens included (longer ones are cut).
            batch_size: Examples per training batch (per device).
            eval_batch_size: Examples per evaluation batch; defaults to ``batch_size``.
            pad_to_multiple_of: Batches are padded to their longest example, rounded up to this.
            num_workers: Loader worker processes.
            seed: Seed of the held-out validation split and of shuffling.
            validation_fraction: Share of the training file held out when there is no
                validation file.
            cache_dir: Where `datasets` caches the parsed files (default
                ``$FILLMASK_CACHE/datasets`` or ``~/.cache/fillmask/datasets``).
            dataset: Instead of files, a ``datasets`` name (``load_dataset(dataset,
                dataset_config)``: from the Hugging Face cache, offline with
                ``HF_DATASETS_OFFLINE=1``) or a folder written by ``save_to_disk``. Class-label
                columns are read as their names.
            dataset_config: The dataset's configuration (e.g. ``sst2`` of ``glue``).
            train_split: The dataset's training split.
            validation_split: Its validation split; when the dataset has none,
                ``validation_fraction`` of the training split is held out.
            test_split: Its labelled test split for ``fillmask finetune test``.
        """
        super().__init__()
        if task == "question_answering":
            raise LabelledDataError(
                "data.task: question_answering reads SQuAD JSON with its own data module and "
                "options (doc_stride, max_query_length): write data: class_path: "
                "fillmask.data.squad.QuestionAnsweringDataModule and model: class_path: "
                "fillmask.objectives.qa.QuestionAnswering (see configs/finetune-squad.yaml)")
        if task not in ("sequence", "token"):
            raise ValueError(f"task={task!r} is unknown; use 'sequence' or 'token'")
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
        if (train_file is None) == (dataset is None):
            raise LabelledDataError("give the labelled data as data.train_file (a file) or as "
                                    "data.dataset (a datasets name or saved folder), not both "
                                    "or neither")
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.splits = {"train": train_split, "validation": validation_split, "test": test_split}
        # What messages name each split by: its file, or the dataset's split as name[split].
        self.files = ({"train": train_file, "validation": validation_file, "test": test_file}
                      if dataset is None else {name: split and f"{dataset}[{split}]"
                                               for name, split in self.splits.items()})
        self.task = task
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.tags_column_index = tags_column_index
        self.tokenizer_path = tokenizer
        self.pretrained = pretrained
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.pad_to_multiple_of = pad_to_multiple_of
        self.num_workers = num_workers
        self.seed = seed
        self.validation_fraction = validation_fraction
        self.cache_dir = cache_dir
        self._given_tokenizer: Tokenizer | None = None
        self.encoded: dict[str, EncodedDataset] = {}

    # The tokenizer: given directly, the pretrained model's, or a file.

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Encode with ``tokenizer`` (e.g. the one
        :func:`~fillmask.objectives.pretrained.load_pretrained` returns) instead of the
        ``tokenizer`` or ``pretrained`` argument."""
        self._given_tokenizer = tokenizer
        self.__dict__.pop("_tokenizer_and_roles", None)
        self.__dict__.pop("_encoder_tokenizer", None)
        self.encoded = {}

    @cached_property
    def _tokenizer_and_roles(self) -> tuple[Tokenizer, SpecialTokens]:
        if self._given_tokenizer is not None:
            tok = self._given_tokenizer
            return tok, resolve_special_tokens(tok)
        source = self.tokenizer_path or self.pretrained
        if not source:
            raise LabelledDataError("no tokenizer: set model.init_args.pretrained (its tokenizer "
                                    "is used) or data.tokenizer")
        if self.tokenizer_path or Path(source).expanduser().is_dir():
            tok, declared = load_tokenizer(source)
            return tok, resolve_special_tokens(tok, declared, source=str(source))
        from fillmask.data.source_tokenizer import pretrained_tokenizer

        tok = pretrained_tokenizer(source)
        return tok, resolve_special_tokens(tok, source=str(source))

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer examples are encoded with (saved into fine-tuned checkpoints)."""
        return self._tokenizer_and_roles[0]

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._tokenizer_and_roles[1]

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (what an encoder built from scratch needs)."""
        return self.tokenizer.get_vocab_size()

    @cached_property
    def _encoder_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer that truncates to ``max_length``, pads nothing, and adds
        ``CLS ... SEP`` (the BERT template) when it has no post-processor of its own."""
        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.no_padding()
        tok.enable_truncation(self.max_length)
        if tok.post_processor is None:
            special = self.special_tokens
            cls, sep = tok.id_to_token(special.cls_id), tok.id_to_token(special.sep_id)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                special_tokens=[(cls, special.cls_id), (sep, special.sep_id)])
        return tok

    # Files and labels.

    @cached_property
    def raw(self) -> datasets.DatasetDict:
        """The examples of each split, as read (validation held out of train if needed)."""
        if self.dataset is not None:
            splits = self._read_dataset()
        else:
            splits = {name: self._read(name, file) for name, file in self.files.items() if file}
        if "validation" not in splits:
            held = splits["train"].train_test_split(test_size=self.validation_fraction,
                                                    seed=self.seed, shuffle=True)
            splits["train"], splits["validation"] = held["train"], held["test"]
        return datasets.DatasetDict(splits)

    def _read(self, split: str, file: str) -> datasets.Dataset:
        path = Path(file).expanduser()
        if not path.is_file():
            raise LabelledDataError(f"{split} file {path} does not exist; set data.{split}_file "
                                    "to an existing .csv, .tsv or .jsonl file")
        if self.task == "token" and path.suffix.lower() in COLUMN_SUFFIXES:
            data = datasets.Dataset.from_dict(self._read_columns(path))
            self._check_columns(data, path)
            return data
        if path.suffix.lower() not in FILE_FORMATS:
            columns = f" (token task: also {', '.join(COLUMN_SUFFIXES)})" * (self.task == "token")
            raise LabelledDataError(f"{split} file {path}: unknown format {path.suffix!r}; use "
                                    f"one of {', '.join(FILE_FORMATS)}{columns}")
        builder, options = FILE_FORMATS[path.suffix.lower()]
        cache = str(cache_root(self.cache_dir) / "datasets")
        try:
            data = datasets.load_dataset(builder, data_files={"data": str(path)},
                                         cache_dir=cache, **options)["data"]
        except Exception as error:  # datasets wraps parser errors in many types
            raise LabelledDataError(f"could not read {split} file {path}: {error}") from error
        self._check_columns(data, path)
        return data

    def _read_dataset(self) -> dict[str, datasets.Dataset]:
        """The configured splits of ``dataset``, class labels as names; a split the dataset
        lacks is an error, except validation (then held out of train)."""
        loaded = self._load_dataset()
        available = ", ".join(loaded)
        splits = {}
        for name, split in self.splits.items():
            if split is None:
                continue
            if split not in loaded:
                if name == "validation":
                    self.files["validation"] = None
                    continue
                raise LabelledDataError(f"dataset {self.dataset} has no split {split!r} "
                                        f"(splits: {available}); set data.{name}_split")
            data = label_names_as_strings(loaded[split])
            self._check_columns(data, Path(f"{self.dataset}[{split}]"))
            splits[name] = data
        return splits

    def _load_dataset(self) -> datasets.DatasetDict:
        folder = Path(self.dataset).expanduser()
        try:
            if (folder / "dataset_dict.json").is_file():
                return datasets.load_from_disk(str(folder))
            if (folder / "dataset_info.json").is_file():  # one saved split: train
                return datasets.DatasetDict({"train": datasets.load_from_disk(str(folder))})
            return datasets.load_dataset(self.dataset, self.dataset_config)
        except Exception as error:  # datasets raises many types for a missing dataset
            raise LabelledDataError(
                f"could not load dataset {self.dataset!r}"
                f"{f' ({self.dataset_config})' if self.dataset_config else ''}: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__}; give a "
                "name in the local Hugging Face cache (download it once with internet), a "
                "folder written by save_to_disk, or data.train_file") from error

    def _read_columns(self, path: Path) -> dict[str, list[list[str]]]:
        """The sentences of a CoNLL column file: ``tokens_column`` (column 0) and
        ``tags_column`` (column ``tags_column_index``), one list of each per sentence."""
        sentences: list[list[str]] = []
        tags: list[list[str]] = []
        words: list[str] = []
        word_tags: list[str] = []
        width: tuple[int, int] | None = None  # (column count, line number it was first seen)
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                fields = line.split()
                if not fields or fields[0] == DOCSTART:
                    if words:
                        sentences.append(words)
                        tags.append(word_tags)
                    words, word_tags = [], []
                    continue
                if width is None:
                    width = (len(fields), number)
                    self._check_tag_index(path, number, len(fields))
                elif len(fields) != width[0]:
                    raise LabelledDataError(
                        f"{path} line {number} has {len(fields)} columns but line {width[1]} has "
                        f"{width[0]}; give every word line the same whitespace-separated columns "
                        "(word first, no spaces inside a word) and separate sentences by blank "
                        "lines")
                words.append(fields[0])
                word_tags.append(fields[self.tags_column_index])
        if words:
            sentences.append(words)
            tags.append(word_tags)
        return {self.tokens_column: sentences, self.tags_column: tags}

    def _check_tag_index(self, path: Path, number: int, width: int) -> None:
        index = self.tags_column_index
        if not -width <= index < width or index % width == 0:
            raise LabelledDataError(
                f"{path} line {number} has {width} columns, so data.tags_column_index={index} "
                "names no tag column (column 0 is the word); set it to the tag's column, e.g. "
                "-1 for the last")

    def _columns(self) -> list[str]:
        if self.task == "token":
            return [self.tokens_column, self.tags_column]
        pair = [self.text_pair_column] if self.text_pair_column else []
        return [self.text_column, *pair, self.label_column]

    def _check_columns(self, data: datasets.Dataset, path: Path) -> None:
        for column in self._columns():
            if column not in data.column_names:
                raise LabelledDataError(
                    f"{path} has no column {column!r} (columns: {', '.join(data.column_names)}); "
                    "set the data module's column options to the right names")
        if self.task == "token" and len(data) and not isinstance(data[0][self.tokens_column],
                                                                 list):
            raise LabelledDataError(f"{path}: column {self.tokens_column!r} must hold lists of "
                                    "words for token classification; write JSON lines such as "
                                    '{"tokens": ["Paris", "is"], "tags": ["LOC", "O"]} or a '
                                    f"CoNLL column file ({', '.join(COLUMN_SUFFIXES)})")

    def _labels_of(self, split: str) -> list[Any]:
        """Every label occurrence of a split (tags flattened for the token task)."""
        data = self.raw[split]
        if self.task == "sequence":
            return list(data[self.label_column])
        return [tag for tags in data[self.tags_column] for tag in tags]

    @cached_property
    def label_names(self) -> list[str]:
        """The label of each class id: the training labels, sorted (numerically for numbers)."""
        labels = set(self._labels_of("train"))
        if not self.files["validation"]:  # held out of the training file: its labels count
            labels |= set(self._labels_of("validation"))
        if None in labels:
            raise LabelledDataError(f"{self.files['train']} has examples without a label; fill "
                                    "or remove them")
        return [str(label) for label in sorted(labels)]

    @property
    def num_labels(self) -> int:
        """Number of classes (linked into the model by ``fillmask finetune``)."""
        return len(self.label_names)

    @cached_property
    def label_ids(self) -> dict[str, int]:
        """Class id of each label name."""
        return {name: index for index, name in enumerate(self.label_names)}

    def _label_id(self, label: Any, split: str) -> int:
        index = self.label_ids.get(str(label))
        if index is None:
            raise LabelledDataError(
                f"{split} label {label!r} (in {self.files[split]}) never occurs in the training "
                f"file {self.files['train']} (labels: {', '.join(self.label_names)}); add "
                "training examples of it or remove it from the evaluation data")
        return index

    # Encoding.

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenise the splits the stage needs (each once)."""
        needed = {"fit": ("train", "validation"), "validate": ("validation",),
                  "test": (self._test_split(),)}.get(stage or "fit", ("train", "validation"))
        for split in needed:
            if split not in self.encoded:
                self.encoded[split] = EncodedDataset(self.encode_split(split))

    def _test_split(self) -> str:
        return "test" if self.files["test"] else "validation"

    def encode_split(self, split: str) -> dict[str, list[Any]]:
        """Tokenise one split: lists of ``input_ids``, ``token_type_ids`` and ``labels``."""
        data = self.raw[split]
        if self.task == "token":
            return self._encode_words(data[self.tokens_column], data[self.tags_column], split)
        texts = [str(t) for t in data[self.text_column]]
        if self.text_pair_column:
            pairs = [str(t) for t in data[self.text_pair_column]]
            encodings = self._encoder_tokenizer.encode_batch(list(zip(texts, pairs, strict=True)))
        else:
            encodings = self._encoder_tokenizer.encode_batch(texts)
        labels = [self._label_id(label, split) for label in data[self.label_column]]
        return {**_ids_and_types(encodings), "labels": labels}

    def _encode_words(self, words: Sequence[list[str]], tags: Sequence[list[Any]], split: str
                      ) -> dict[str, list[Any]]:
        for row, (w, t) in enumerate(zip(words, tags, strict=True)):
            if len(w) != len(t):
                raise LabelledDataError(f"{self.files[split] or self.files['train']} example "
                                        f"{row} has {len(w)} words but {len(t)} tags; give one "
                                        "tag per word")
        encodings = self._encoder_tokenizer.encode_batch(
            [[str(word) for word in w] for w in words], is_pretokenized=True)
        labels = [first_subtoken_labels(e.word_ids, [self._label_id(tag, split) for tag in t])
                  for e, t in zip(encodings, tags, strict=True)]
        self._warn_cut_words(split, [len(w) for w in words], labels)
        return {**_ids_and_types(encodings), "labels": labels}

    def _warn_cut_words(self, split: str, word_counts: list[int], labels: list[np.ndarray]
                        ) -> None:
        """Warn when ``max_length`` cut words off: they are neither trained nor scored."""
        kept = [int((row != IGNORE_INDEX).sum()) for row in labels]
        cut = [(count, k) for count, k in zip(word_counts, kept, strict=True) if k < count]
        if cut:
            lost = sum(count - k for count, k in cut)
            warnings.warn(f"{split}: {len(cut)} of {len(labels)} sentences are longer than "
                          f"max_length={self.max_length} tokens; their last {lost} words are "
                          "neither trained nor scored (their entities count nowhere); raise "
                          "data.max_length to keep them", stacklevel=2)

    # Loaders.

    def collator(self) -> LabelledCollator:
        return LabelledCollator(self.special_tokens.pad_id, self.pad_to_multiple_of)

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup({"train": "fit", "validation": "validate", "test": "test"}[split])
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            self.encoded[split],
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            generator=generator,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test_split(), train=False)


def _ids_and_types(encodings: list[Encoding]) -> dict[str, list[np.ndarray]]:
    return {"input_ids": [np.asarray(e.ids, dtype=np.int64) for e in encodings],
            "token_type_ids": [np.asarray(e.type_ids, dtype=np.int64) for e in encodings]}


def first_subtoken_labels(word_ids: list[int | None], word_labels: list[int]) -> np.ndarray:
    """Per-token labels: each word's label on its first sub-token, ``IGNORE_INDEX`` on its other
    sub-tokens and on special tokens (``word_ids`` is None there)."""
    labels = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int64)
    previous = None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            labels[position] = word_labels[word]
        previous = word
    return labels


def label_names_as_strings(data: datasets.Dataset) -> datasets.Dataset:
    """``data`` with every class-label column (and list of class labels, as NER tags) holding
    the label names instead of their ids."""
    named = {}
    for column, feature in data.features.items():
        inner = getattr(feature, "feature", None)
        if isinstance(feature, datasets.ClassLabel):
            named[column] = (feature.names, False)
        elif isinstance(inner, datasets.ClassLabel):
            named[column] = (inner.names, True)
    if not named:
        return data

    def name(names: list[str], i: int) -> str | None:
        return names[i] if i >= 0 else None  # -1: unlabelled (GLUE's test splits)

    def rename(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {column: [[name(names, i) for i in row] if nested else name(names, row)
                         for row in batch[column]] for column, (names, nested) in named.items()}

    features = data.features.copy()
    for column, (_, nested) in named.items():
        features[column] = (datasets.Sequence(datasets.Value("string")) if nested
                            else datasets.Value("string"))
    return data.map(rename, batched=True, features=features, keep_in_memory=True)
