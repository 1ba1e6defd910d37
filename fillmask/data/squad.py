"""Extractive question answering data: SQuAD v1.1 / v2.0 JSON files as downloaded.

Each question is encoded with its paragraph as the pair ``CLS question SEP context SEP``
(the pretrained tokenizer's template). A context longer than a window is cut into
overlapping windows (``doc_stride`` tokens shared by neighbours), each a feature of its own
with the question repeated. Training features point at the answer's first and last token;
windows without the answer, and unanswerable questions, point at CLS (index 0). Evaluation
features keep their question and the character offsets of their context tokens, which
:class:`~fillmask.objectives.qa.QuestionAnswering` uses to cut answers out of the context.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer

from fillmask.data.collate import pad_rows
from fillmask.data.labelled import LabelledDataError, LabelledDataModule

__all__ = ["QAExample", "QAFeature", "QuestionAnsweringDataModule", "read_squad"]

Offsets = list[tuple[int, int] | None]


@dataclass
class QAExample:
    """One question of a SQuAD file with its paragraph and gold answers."""

    id: str
    question: str
    context: str
    answers: list[str]
    """Gold answer texts (several in the dev sets; none for an unanswerable question)."""
    starts: list[int]
    """Character offset of each answer in ``context``."""
    paragraph: int
    """Index of the paragraph in the file (questions of one paragraph share it)."""

    @property
    def is_impossible(self) -> bool:
        return not self.answers


@dataclass
class QAFeature:
    """One window of an evaluation example: which example, and each token's character span
    in the context (None for question and special tokens)."""

    example: int
    offsets: Offsets


def read_squad(path: Path, split: str) -> list[QAExample]:
    """The questions of a SQuAD JSON file; an answer whose text is not at its
    ``answer_start`` is an error naming the file, the question and the fix."""
    if not path.is_file():
        raise LabelledDataError(f"{split} file {path} does not exist; set "
                                f"data.init_args.{split}_file to a SQuAD JSON file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LabelledDataError(f"{path} is not JSON ({error}); give a SQuAD file as "
                                "downloaded (train-v1.1.json, dev-v2.0.json, ...)") from error
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise LabelledDataError(f"{path} has no \"data\" list of articles; give a SQuAD file "
                                'as downloaded: {"version": ..., "data": [{"title": ..., '
                                '"paragraphs": [{"context": ..., "qas": [...]}]}]}')
    examples: list[QAExample] = []
    paragraph_index = 0
    for article_number, article in enumerate(document["data"]):
        for paragraph in _field(article, "paragraphs", path, f"article {article_number}"):
            context = _field(paragraph, "context", path, f"a paragraph of article "
                                                         f"{article_number}")
            for qa in _field(paragraph, "qas", path, f"a paragraph of article {article_number}"):
                examples.append(_example(qa, context, paragraph_index, path))
            paragraph_index += 1
    return examples


def _field(record: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise LabelledDataError(f"{path}: {where} has no {key!r}; give a SQuAD file as "
                                "downloaded (articles of paragraphs with context and qas)")
    return record[key]


def _example(qa: dict[str, Any], context: str, paragraph: int, path: Path) -> QAExample:
    qid = str(_field(qa, "id", path, "a question"))
    question = _field(qa, "question", path, f"question {qid!r}")
    answers = [] if qa.get("is_impossible") else list(qa.get("answers", []))
    texts, starts = [], []
    for answer in answers:
        text, start = answer.get("text"), answer.get("answer_start")
        if not isinstance(text, str) or not isinstance(start, int):
            raise LabelledDataError(f"{path}: question {qid!r} has an answer without a text and "
                                    "an integer answer_start; give both")
        found = context[start:start + len(text)]
        if found != text:
            hint = context.find(text)
            fix = (f"set answer_start to {hint}" if hint >= 0 else
                   "the text does not occur in the context: correct the answer text")
            raise LabelledDataError(f"{path}: question {qid!r}: answer {text!r} is not at "
                                    f"answer_start {start} of its context (which reads "
                                    f"{found!r} there); {fix}")
        texts.append(text)
        starts.append(start)
    return QAExample(qid, str(question), context, texts, starts, paragraph)


def answer_positions(encoding: Encoding, start_char: int, end_char: int) -> tuple[int, int]:
    """First and last token of the character span [start_char, end_char) in the context of
    ``encoding`` (a question-context window); (0, 0), CLS, when the window does not hold the
    whole span."""
    context = [i for i, s in enumerate(encoding.sequence_ids) if s == 1]
    if not context:
        return 0, 0
    offsets = encoding.offsets
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return 0, 0
    first = next(i for i in context if offsets[i][1] > start_char)
    last = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return (first, last) if first <= last else (0, 0)


def context_offsets(encoding: Encoding) -> Offsets:
    """Each token's character span in the context; None for question and special tokens."""
    return [tuple(span) if sequence == 1 else None
            for span, sequence in zip(encoding.offsets, encoding.sequence_ids, strict=True)]


class QACollator:
    """Pads features to the longest one: ids, mask, types, start/end positions, feature index."""

    def __init__(self, pad_id: int, multiple: int = 8) -> None:
        self.pad_id = pad_id
        self.multiple = max(1, multiple)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, lengths = pad_rows([f["input_ids"] for f in features], self.pad_id, self.multiple)
        types, _ = pad_rows([f["token_type_ids"] for f in features], 0, self.multiple)
        width = ids.shape[1]
        scalars = {key: torch.tensor([f[key] for f in features], dtype=torch.long)  # (B,)
                   for key in ("start_positions", "end_positions", "feature_index")}
        return {"input_ids": torch.from_numpy(ids),  # (B, T)
                "attention_mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]),
                "token_type_ids": torch.from_numpy(types),  # (B, T)
                **scalars}


class QuestionAnsweringDataModule(LabelledDataModule):
    """SQuAD v1.1 / v2.0 files for :class:`~fillmask.objectives.qa.QuestionAnswering`.

    Batches hold windows (features): ``input_ids``, ``attention_mask``, ``token_type_ids``,
    ``start_positions`` and ``end_positions`` (the first gold answer's tokens, or 0 for CLS)
    and ``feature_index`` (the row of :meth:`features`). Nothing is read in ``__init__``.
    """

    def __init__(
        self,
        train_file: str,
        validation_file: str | None = None,
        test_file: str | None = None,
        tokenizer: str | None = None,
        pretrained: str | None = None,
        max_length: int = 384,
        doc_stride: int = 128,
        max_query_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        validation_fraction: float = 0.1,
    ) -> None:
        """Configure the question answering data.

        Args:
            train_file: A SQuAD JSON file as downloaded (``train-v1.1.json``,
                ``train-v2.0.json``): ``{"version", "data": [{"title", "paragraphs":
                [{"context", "qas": [{"id", "question", "answers": [{"text",
                "answer_start"}], "is_impossible"}]}]}]}``. Questions with ``is_impossible``
                or without answers are unanswerable (their target is CLS).
            validation_file: A SQuAD JSON file scored with the official metric (``dev-v1.1.json``
                ...); when absent, ``validation_fraction`` of the training paragraphs (with
                all their questions) is held out, chosen by ``seed``.
            test_file: A SQuAD JSON file for ``fillmask finetune test``; defaults to the
                validation file.
            tokenizer: A ``tokenizer.json`` file or a transformers folder; by default the
                pretrained model's (the CLI links ``pretrained``).
            pretrained: The pretrained model whose tokenizer encodes the data.
            max_length: Most tokens per window, question and special tokens included (BERT's
                SQuAD recipe: 384).
            doc_stride: Context tokens shared by neighbouring windows of a long context (the
                ``stride`` of transformers' ``run_qa.py``; BERT's own script stepped windows
                by this many tokens instead).
            max_query_length: Questions are cut to this many tokens.
            batch_size: Windows per training batch (per device).
            eval_batch_size: Windows per evaluation batch; defaults to ``batch_size``.
            pad_to_multiple_of: Batches are padded to their longest window, rounded up to this.
            num_workers: Loader worker processes.
            seed: Seed of the held-out paragraphs and of shuffling.
            validation_fraction: Share of the training paragraphs held out when there is no
                validation file.
        """
        super().__init__(train_file=train_file, validation_file=validation_file,
                         test_file=test_file, tokenizer=tokenizer, pretrained=pretrained,
                         max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, pad_to_multiple_of=pad_to_multiple_of,
                         num_workers=num_workers, seed=seed,
                         validation_fraction=validation_fraction)
        if doc_stride < 0 or max_query_length < 1:
            raise LabelledDataError(f"doc_stride={doc_stride} must be >= 0 and "
                                    f"max_query_length={max_query_length} >= 1")
        self.doc_stride = doc_stride
        self.max_query_length = max_query_length
        self._features: dict[str, list[QAFeature]] = {}

    @property
    def num_labels(self) -> int:
        """Two outputs per token, start and end (linked into the model by ``fillmask
        finetune``)."""
        return 2

    @property
    def label_names(self) -> None:  # type: ignore[override]
        """Spans have no class names."""
        return None

    # Reading.

    @cached_property
    def raw(self) -> dict[str, list[QAExample]]:  # type: ignore[override]
        """The questions of each split, as read (validation held out of train if needed)."""
        splits = {name: read_squad(Path(file).expanduser(), name)
                  for name, file in self.files.items() if file}
        if "validation" not in splits:
            splits["train"], splits["validation"] = self._hold_out(splits["train"])
        return splits

    def _hold_out(self, examples: list[QAExample]) -> tuple[list[QAExample], list[QAExample]]:
        """Split by paragraph: ``validation_fraction`` of them, with their questions."""
        paragraphs = sorted({e.paragraph for e in examples})
        random.Random(self.seed).shuffle(paragraphs)
        held = set(paragraphs[:max(1, round(len(paragraphs) * self.validation_fraction))])
        if len(held) == len(paragraphs):
            raise LabelledDataError(f"{self.files['train']} has {len(paragraphs)} paragraph(s), "
                                    "too few to hold some out; set data.init_args."
                                    "validation_file")
        return ([e for e in examples if e.paragraph not in held],
                [e for e in examples if e.paragraph in held])

    def examples(self, split: str) -> list[QAExample]:
        """The questions of a split (``train``, ``validation`` or ``test``)."""
        return self.raw[split]

    def references(self, split: str) -> dict[str, list[str]]:
        """Gold answer texts of each question id (what the official metric compares with)."""
        return {e.id: list(e.answers) for e in self.raw[split]}

    def features(self, split: str) -> list[QAFeature]:
        """The windows of an evaluation split, in the order of their ``feature_index``."""
        self.setup({"validation": "validate", "test": "test"}.get(split, "fit"))
        return self._features[split]

    def evaluation_split(self, stage: str) -> str:
        """The split an evaluation stage (``validate`` or ``test``) scores."""
        return self._test_split() if stage == "test" else "validation"

    # Encoding.

    @cached_property
    def _window_tokenizer(self) -> Tokenizer:
        """The encoder tokenizer, truncating only the context and returning the rest as
        overflowing windows that share ``doc_stride`` tokens."""
        tok = Tokenizer.from_str(self._encoder_tokenizer.to_str())
        room = self.max_length - self.max_query_length - tok.num_special_tokens_to_add(True)
        if room <= self.doc_stride:
            raise LabelledDataError(
                f"max_length={self.max_length} leaves {room} context tokens after a "
                f"{self.max_query_length}-token question, not more than doc_stride="
                f"{self.doc_stride}; raise data.init_args.max_length or lower doc_stride or "
                "max_query_length")
        tok.enable_truncation(self.max_length, stride=self.doc_stride, strategy="only_second")
        return tok

    def _cut_question(self, question: str) -> str:
        """``question`` cut after its ``max_query_length``-th token."""
        encoding = self._encoder_tokenizer.encode(question, add_special_tokens=False)
        if len(encoding.ids) <= self.max_query_length:
            return question
        return question[:encoding.offsets[self.max_query_length - 1][1]]

    def encode_split(self, split: str) -> dict[str, list[Any]]:
        """Tokenise a split into windows: ids, token types, answer positions, feature index
        (the windows' offsets are kept for :meth:`features`)."""
        rows: dict[str, list[Any]] = {key: [] for key in (
            "input_ids", "token_type_ids", "start_positions", "end_positions", "feature_index")}
        features: list[QAFeature] = []
        for index, example in enumerate(self.raw[split]):
            first = self._window_tokenizer.encode(self._cut_question(example.question),
                                                  example.context)
            for window in [first, *first.overflowing]:
                if example.answers:
                    start = example.starts[0]
                    begin, end = answer_positions(window, start, start + len(example.answers[0]))
                else:
                    begin, end = 0, 0
                rows["input_ids"].append(np.asarray(window.ids, dtype=np.int64))
                rows["token_type_ids"].append(np.asarray(window.type_ids, dtype=np.int64))
                rows["start_positions"].append(begin)
                rows["end_positions"].append(end)
                rows["feature_index"].append(len(features))
                features.append(QAFeature(index, context_offsets(window)))
        self._features[split] = features if split != "train" else []
        return rows

    # Loaders.

    def collator(self) -> QACollator:  # type: ignore[override]
        return QACollator(self.special_tokens.pad_id, self.pad_to_multiple_of)
