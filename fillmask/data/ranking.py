"""Reranking data: BEIR / MS MARCO corpora, queries, relevance judgements and first-stage runs,
turned into (query, passage) pairs for a cross-encoder.

Files, each detected by its suffix or its columns:

- corpus: BEIR ``corpus.jsonl`` (``{"_id", "title", "text"}``; a passage reads
  ``title + " " + text``) or MS MARCO ``collection.tsv`` (``id \\t text``, or
  ``id \\t title \\t text``);
- queries: ``queries.jsonl`` (``{"_id", "text"}``) or ``queries.tsv`` (``id \\t text``);
- qrels: BEIR TSV (``query-id \\t corpus-id \\t score``, with that header) or TREC
  (``qid 0 docid rel``, whitespace separated);
- runs: TREC runs (``qid Q0 docid rank score tag``), the candidates to rerank.

Training groups hold one relevant passage and ``group_size - 1`` non-relevant candidates of the
query's training run, drawn from a generator seeded by (seed, epoch, query id), so a run is
reproducible and a resumed one sees the same groups. Evaluation pairs are each query's top
``rerank_depth`` candidates. Only the passages the qrels and runs name are kept in memory.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler

from fillmask.data.collate import pad_rows
from fillmask.data.labelled import LabelledDataError, LabelledDataModule

__all__ = ["RankingFiles", "RerankingDataModule", "read_qrels", "read_run", "read_texts"]

Judgements = dict[str, dict[str, int]]
Candidates = dict[str, list[str]]
Where = dict[str, str]  # id -> "file line N" of its first mention


def _existing(path: str, option: str, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise LabelledDataError(f"{option} file {file} does not exist; set data.init_args."
                                f"{option} to an existing {what}")
    return file


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines of a UTF-8 file."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line.rstrip("\n").rstrip("\r")


def read_texts(path: Path, keep: set[str] | None = None, passages: bool = True
               ) -> dict[str, str]:
    """Id -> text of a corpus (``passages``: BEIR title + " " + text) or a query file, JSON
    lines or TSV by suffix; with ``keep``, only those ids."""
    json_lines = path.suffix.lower() in (".jsonl", ".json")
    texts: dict[str, str] = {}
    for number, line in _lines(path):
        key, text = (_json_text(path, number, line, passages) if json_lines
                     else _tsv_text(path, number, line))
        if keep is None or key in keep:
            texts[key] = text
    return texts


def _json_text(path: Path, number: int, line: str, passages: bool) -> tuple[str, str]:
    try:
        row = json.loads(line)
    except ValueError:
        row = None
    if not isinstance(row, dict) or "_id" not in row or "text" not in row:
        raise LabelledDataError(f"{path} line {number} is not a JSON object with \"_id\" and "
                                "\"text\"; write BEIR lines such as {\"_id\": \"d1\", "
                                "\"title\": \"\", \"text\": \"...\"}")
    title = str(row.get("title") or "").strip() if passages else ""
    text = str(row["text"])
    return str(row["_id"]), f"{title} {text}" if title else text


def _tsv_text(path: Path, number: int, line: str) -> tuple[str, str]:
    columns = line.split("\t")
    if len(columns) == 2:
        return columns[0].strip(), columns[1]
    if len(columns) == 3:  # id, title, text
        title = columns[1].strip()
        return columns[0].strip(), f"{title} {columns[2]}" if title else columns[2]
    raise LabelledDataError(f"{path} line {number} has {len(columns)} tab-separated columns; "
                            "write id<TAB>text (MS MARCO) or id<TAB>title<TAB>text")


def read_qrels(path: Path) -> tuple[Judgements, Where, Where]:
    """Query -> document -> grade of a BEIR qrels TSV (header ``query-id corpus-id score``)
    or a TREC qrels file (``qid 0 docid rel``), and where each query and document id first
    occurs (for errors)."""
    qrels: Judgements = {}
    queries: Where = {}
    docs: Where = {}
    for number, line in _lines(path):
        tabbed = line.split("\t")
        if len(tabbed) == 3 and tabbed[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # the BEIR header
        fields = [f.strip() for f in tabbed] if len(tabbed) == 3 else line.split()
        if len(fields) == 4:  # TREC: qid iteration docid rel
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3:
            raise LabelledDataError(
                f"{path} line {number} has {len(fields)} columns; write BEIR qrels "
                "(query-id<TAB>corpus-id<TAB>score, under that header) or TREC qrels "
                "(qid 0 docid rel)")
        query, doc, grade = fields
        try:
            qrels.setdefault(query, {})[doc] = int(float(grade))
        except ValueError:
            raise LabelledDataError(f"{path} line {number}: relevance {grade!r} is not a "
                                    "number; the last column holds the integer grade") from None
        queries.setdefault(query, f"{path} line {number}")
        docs.setdefault(doc, f"{path} line {number}")
    return qrels, queries, docs


def read_run(path: Path) -> tuple[Candidates, Where, Where]:
    """Query -> candidate documents, best first (by score, the file's order among ties), of a
    TREC run (``qid Q0 docid rank score tag``), and where each id first occurs."""
    scored: dict[str, list[tuple[float, int, str]]] = {}
    queries: Where = {}
    docs: Where = {}
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) != 6:
            raise LabelledDataError(f"{path} line {number} has {len(fields)} columns, a TREC "
                                    "run has 6; write qid Q0 docid rank score tag")
        query, _, doc, _, score, _ = fields
        try:
            value = float(score)
        except ValueError:
            raise LabelledDataError(f"{path} line {number}: score {score!r} is not a number; "
                                    "the fifth column holds the score") from None
        scored.setdefault(query, []).append((-value, number, doc))
        queries.setdefault(query, f"{path} line {number}")
        docs.setdefault(doc, f"{path} line {number}")
    return ({q: [doc for _, _, doc in sorted(items)] for q, items in scored.items()},
            queries, docs)


@dataclass
class RankingFiles:
    """What one split reads: judgements and the run of candidates."""

    qrels: Judgements = field(default_factory=dict)
    run: Candidates = field(default_factory=dict)
    queries: Where = field(default_factory=dict)
    docs: Where = field(default_factory=dict)


class GroupSampler(Sampler):
    """Shuffles training queries afresh each epoch (seeded by seed and epoch) and yields
    ``(query position, epoch)``, so negatives can be drawn per epoch even in worker
    processes. Lightning calls :meth:`set_epoch` before each epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for position in torch.randperm(self.size, generator=generator).tolist():
            yield position, self.epoch


class TrainGroups(Dataset):
    """Per training query: (query index, [positive, negative, ...] document indices)."""

    def __init__(self, queries: list[int], positives: list[list[int]],
                 negatives: list[list[int]], group_size: int, seed: int,
                 query_ids: list[str]) -> None:
        self.queries, self.positives, self.negatives = queries, positives, negatives
        self.group_size, self.seed, self.query_ids = group_size, seed, query_ids

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, epoch = key
        query = self.queries[position]
        rng = random.Random(f"{self.seed}:{epoch}:{self.query_ids[query]}")
        positive = rng.choice(self.positives[position])
        pool, wanted = self.negatives[position], self.group_size - 1
        negatives = rng.sample(pool, wanted) if len(pool) >= wanted else rng.choices(pool,
                                                                                      k=wanted)
        return {"query": query, "docs": [positive, *negatives]}


class EvaluationPairs(Dataset):
    """(query index, document index) pairs to score."""

    def __init__(self, pairs: list[tuple[int, int]]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        query, doc = self.pairs[index]
        return {"query": query, "docs": [doc]}


class PairCollator:
    """Encodes each (query, passage) as ``CLS query SEP passage SEP`` (token types 0 then 1),
    pads the batch, and keeps the indices: ``query_index`` and ``doc_index`` (N,), and
    ``labels``: (B, G) with the positive first for training groups, (N,) zeros otherwise."""

    def __init__(self, tokenizer: Tokenizer, query_texts: list[str], doc_texts: list[str],
                 pad_id: int, multiple: int, train: bool) -> None:
        self.tokenizer, self.query_texts, self.doc_texts = tokenizer, query_texts, doc_texts
        self.pad_id, self.multiple, self.train = pad_id, max(1, multiple), train

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        queries = [e["query"] for e in examples for _ in e["docs"]]
        docs = [d for e in examples for d in e["docs"]]
        encodings = self.tokenizer.encode_batch(
            [(self.query_texts[q], self.doc_texts[d]) for q, d in zip(queries, docs, strict=True)])
        ids, lengths = pad_rows([np.asarray(e.ids, np.int64) for e in encodings], self.pad_id,
                                self.multiple)  # (N, T)
        types, _ = pad_rows([np.asarray(e.type_ids, np.int64) for e in encodings], 0,
                            self.multiple)  # (N, T)
        if self.train:
            labels = torch.zeros(len(examples), len(examples[0]["docs"]))  # (B, G)
            labels[:, 0] = 1.0
        else:
            labels = torch.zeros(len(docs))  # (N,)
        width = ids.shape[1]
        return {"input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(np.arange(width)[None, :] < lengths[:, None]),
                "token_type_ids": torch.from_numpy(types),
                "labels": labels,
                "query_index": torch.tensor(queries, dtype=torch.long),
                "doc_index": torch.tensor(docs, dtype=torch.long)}


class RerankingDataModule(LabelledDataModule):
    """(Query, passage) pairs for a cross-encoder (:class:`~fillmask.objectives.rerank.
    CrossEncoder`) from BEIR or MS MARCO files and first-stage TREC runs.

    Training batches hold ``batch_size`` queries, each a group of ``group_size`` pairs (the
    positive first); evaluation batches hold ``eval_batch_size`` pairs. Nothing is read in
    ``__init__``.
    """

    def __init__(
        self,
        corpus_file: str,
        queries_file: str,
        train_qrels: str | None = None,
        train_run: str | None = None,
        validation_qrels: str | None = None,
        validation_run: str | None = None,
        test_qrels: str | None = None,
        test_run: str | None = None,
        group_size: int = 8,
        rerank_depth: int = 100,
        tokenizer: str | None = None,
        pretrained: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        pad_to_multiple_of: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """Configure the reranking data.

        Args:
            corpus_file: BEIR ``corpus.jsonl`` or MS MARCO ``collection.tsv``.
            queries_file: ``queries.jsonl`` or ``queries.tsv`` (every split's queries).
            train_qrels: Training judgements (BEIR TSV or TREC qrels); grade > 0 is relevant.
            train_run: TREC run whose non-relevant candidates are the training negatives.
            validation_qrels: Validation judgements.
            validation_run: TREC run whose top ``rerank_depth`` candidates are reranked.
            test_qrels: Judgements for ``fillmask finetune test``; default the validation ones.
            test_run: Run for ``fillmask finetune test``; default the validation one.
            group_size: Passages per training query: one relevant and ``group_size - 1``
                negatives (listwise loss: one softmax over them; pointwise: labelled 1 / 0).
            rerank_depth: Candidates per query reranked at evaluation (the run's best).
            tokenizer: A ``tokenizer.json`` file or transformers folder; by default the
                pretrained model's (the CLI links ``pretrained``).
            pretrained: The pretrained model whose tokenizer encodes the pairs.
            max_length: Most tokens per pair, special tokens included (the longer text is cut).
            batch_size: Training queries per batch (``batch_size x group_size`` pairs).
            eval_batch_size: Pairs per evaluation batch; default ``batch_size x group_size``.
            pad_to_multiple_of: Batches are padded to their longest pair, rounded up to this.
            num_workers: Loader worker processes.
            seed: Seed of the shuffling and of the negatives (with the epoch and query id).
        """
        super().__init__(train_file=train_qrels or "", tokenizer=tokenizer,
                         pretrained=pretrained, max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size or batch_size * group_size,
                         pad_to_multiple_of=pad_to_multiple_of, num_workers=num_workers,
                         seed=seed)
        if group_size < 2:
            raise ValueError(f"group_size={group_size} must be at least 2 (a positive and a "
                             "negative)")
        if rerank_depth < 1:
            raise ValueError(f"rerank_depth={rerank_depth} must be at least 1")
        self.corpus_file, self.queries_file = corpus_file, queries_file
        self.split_files = {"train": (train_qrels, train_run),
                            "validation": (validation_qrels, validation_run),
                            "test": (test_qrels or validation_qrels, test_run or validation_run)}
        self.options = {"train": "train", "validation": "validation",
                        "test": "test" if test_qrels or test_run else "validation"}
        """The option prefix naming each split's files (errors name the option to set)."""
        self.group_size, self.rerank_depth = group_size, rerank_depth
        self.query_ids: list[str] = []
        self.doc_ids: list[str] = []
        self.query_texts: list[str] = []
        self.doc_texts: list[str] = []
        self.splits: dict[str, RankingFiles] = {}
        self.datasets: dict[str, Dataset] = {}

    @property
    def num_labels(self) -> int:
        """One relevance score per pair (linked into the model by ``fillmask finetune``)."""
        return 1

    @property
    def label_names(self) -> list[str]:  # type: ignore[override]
        """No class names: relevance is a score (the CLI links this into every model)."""
        return []

    # Reading.

    def _split(self, split: str) -> RankingFiles:
        """Judgements and run of a split (read once); the split's files are required."""
        if split not in self.splits:
            qrels_file, run_file = self.split_files[split]
            name = self.options[split]
            if not qrels_file or not run_file:
                raise LabelledDataError(f"the {split} split needs data.init_args.{name}_qrels and "
                                        f"data.init_args.{name}_run; set both")
            qrels, q_where, d_where = read_qrels(_existing(qrels_file, f"{name}_qrels", "qrels"))
            run, rq_where, rd_where = read_run(_existing(run_file, f"{name}_run", "TREC run"))
            self.splits[split] = RankingFiles(qrels, run, {**rq_where, **q_where},
                                              {**rd_where, **d_where})
        return self.splits[split]

    def _load_texts(self, splits: tuple[str, ...]) -> None:
        """Read the queries and passages the splits mention; an id missing from the query or
        corpus file is an error naming the qrels or run line that mentions it."""
        files = [self._split(s) for s in splits]
        needed_q = {q: w for f in files for q, w in f.queries.items()}
        needed_d = {d: w for f in files for d, w in f.docs.items()}
        queries = read_texts(_existing(self.queries_file, "queries_file", "queries file"),
                             set(needed_q), passages=False)
        corpus = read_texts(_existing(self.corpus_file, "corpus_file", "corpus file"),
                            set(needed_d))
        for ids, found, kind, source in ((needed_q, queries, "query", self.queries_file),
                                         (needed_d, corpus, "document", self.corpus_file)):
            unknown = next((key for key in ids if key not in found), None)
            if unknown is not None:
                raise LabelledDataError(f"{ids[unknown]} names {kind} id {unknown!r}, which "
                                        f"{source} does not hold; use the {kind} file of the "
                                        "same collection or remove the line")
        self.query_ids, self.query_texts = list(queries), list(queries.values())
        self.doc_ids, self.doc_texts = list(corpus), list(corpus.values())

    # Datasets.

    def setup(self, stage: str | None = None) -> None:
        """Read the files the stage needs and build its datasets (each once)."""
        needed = {"fit": ("train", "validation"), "validate": ("validation",),
                  "test": ("test",)}.get(stage or "fit", ("train", "validation"))
        if stage in (None, "fit") and not all(self.split_files["validation"]):
            needed = ("train",)
        if all(split in self.datasets for split in needed):
            return
        self._load_texts(tuple(dict.fromkeys((*self.datasets, *needed))))
        self.datasets = {split: self._train_groups() if split == "train"
                         else self._evaluation_pairs(split)
                         for split in dict.fromkeys((*self.datasets, *needed))}

    def _train_groups(self) -> TrainGroups:
        files = self._split("train")
        q_index = {key: i for i, key in enumerate(self.query_ids)}
        d_index = {key: i for i, key in enumerate(self.doc_ids)}
        queries, positives, negatives = [], [], []
        for query, grades in files.qrels.items():
            relevant = [d for d, g in grades.items() if g > 0]
            others = [d for d in files.run.get(query, []) if grades.get(d, 0) <= 0]
            if relevant and others:
                queries.append(q_index[query])
                positives.append([d_index[d] for d in relevant])
                negatives.append([d_index[d] for d in others])
        if not queries:
            raise LabelledDataError(
                f"no query of {self.split_files['train'][0]} has both a relevant passage and a "
                f"non-relevant candidate in {self.split_files['train'][1]}; give the training "
                "run of the same queries")
        return TrainGroups(queries, positives, negatives, self.group_size, self.seed,
                           self.query_ids)

    def _evaluation_pairs(self, split: str) -> EvaluationPairs:
        files = self._split(split)
        q_index = {key: i for i, key in enumerate(self.query_ids)}
        d_index = {key: i for i, key in enumerate(self.doc_ids)}
        return EvaluationPairs([(q_index[q], d_index[d]) for q, docs in files.run.items()
                                for d in docs[: self.rerank_depth]])

    def qrels(self, split: str) -> Judgements:
        """The judgements a split's reranked run is scored against."""
        return self._split(split).qrels

    def first_stage(self, split: str) -> dict[str, dict[str, float]]:
        """The run as given, cut to ``rerank_depth``, with scores that keep its order (the
        baseline a reranker should beat)."""
        return {q: {d: float(-rank) for rank, d in enumerate(docs[: self.rerank_depth])}
                for q, docs in self._split(split).run.items()}

    # Loaders.

    def _collator(self, train: bool) -> PairCollator:
        return PairCollator(self._encoder_tokenizer, self.query_texts, self.doc_texts,
                            self.special_tokens.pad_id, self.pad_to_multiple_of, train)

    def _pair_loader(self, split: str, stage: str) -> DataLoader:
        self.setup(stage)
        train = split == "train"
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=GroupSampler(len(dataset), self.seed) if train else None,
            collate_fn=self._collator(train),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._pair_loader("train", "fit")

    def val_dataloader(self) -> DataLoader | list:
        if not all(self.split_files["validation"]):
            return []
        return self._pair_loader("validation", "validate")

    def test_dataloader(self) -> DataLoader:
        return self._pair_loader("test", "test")

    def split_of(self, stage: str) -> str:
        """The split an evaluation stage (``validate`` or ``test``) reranks."""
        return "test" if stage == "test" else "validation"
