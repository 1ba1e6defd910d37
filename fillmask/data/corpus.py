"""Corpora as `datasets` DatasetDicts (memory-mapped Arrow): embedded, files, or a saved folder."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

import datasets

from fillmask.errors import FillmaskError

SampleBy = Literal["line", "paragraph", "document"]
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}


class CorpusError(FillmaskError):
    """A corpus that cannot be read, with the path and the fix."""


def expand_paths(spec: str | list[str]) -> list[Path]:
    """Expand file paths and globs; each pattern must match at least one file."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for pattern in patterns:
        matched = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matched:
            raise CorpusError(
                f"corpus path {pattern!r} matches no file; give an existing text/JSONL/Parquet "
                "file, a glob, a saved `datasets` folder, or an embedded corpus name "
                f"({', '.join(embedded_names())})"
            )
        paths.extend(Path(m) for m in matched)
    return paths


def embedded_names() -> list[str]:
    from fillmask.data.embedded import EMBEDDED_CORPORA

    return sorted(EMBEDDED_CORPORA)


def load_corpus(
    spec: str | list[str],
    text_column: str = "text",
    sample_by: SampleBy = "paragraph",
    validation_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: Path | None = None,
) -> datasets.DatasetDict:
    """Load a corpus with ``train`` and ``validation`` splits and a ``text`` column.

    ``spec`` is an embedded corpus name (``python-docs``), a saved `datasets` folder, or files
    and globs (``.txt``, ``.jsonl``/``.json``, ``.parquet``). Corpora without a validation split
    get one of ``validation_fraction`` of their rows, chosen by ``seed``.
    """
    from fillmask.data.embedded import EMBEDDED_CORPORA

    if isinstance(spec, str) and spec in EMBEDDED_CORPORA:
        build = EMBEDDED_CORPORA[spec]
        return build(cache_dir=cache_dir, validation_fraction=validation_fraction, seed=seed)
    if isinstance(spec, str) and Path(spec).expanduser().is_dir():
        corpus = _load_saved(Path(spec).expanduser())
    else:
        corpus = _load_files(expand_paths(spec), sample_by)
    corpus = _with_validation(corpus, validation_fraction, seed)
    return _select_text(corpus, text_column, spec)


def _load_saved(folder: Path) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise CorpusError(f"{folder} is a folder but not one saved by `datasets` "
                          "(Dataset.save_to_disk); give files or a glob instead") from error
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    return datasets.DatasetDict(train=loaded)


def _load_files(paths: list[Path], sample_by: SampleBy) -> datasets.DatasetDict:
    kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
    if None in kinds or len(kinds) != 1:
        bad = [str(p) for p in paths if p.suffix.lower() not in FILE_BUILDERS] or [str(paths[0])]
        raise CorpusError(f"corpus files must all be one of {sorted(FILE_BUILDERS)}; "
                          f"cannot read {bad[0]} together with the others")
    builder = kinds.pop()
    options = {"sample_by": sample_by} if builder == "text" else {}
    files = [str(p) for p in paths]
    try:
        return datasets.load_dataset(builder, data_files={"train": files}, **options)
    except Exception as error:  # datasets wraps parser errors in many types
        raise CorpusError(f"could not read corpus files {files}: {error}") from error


def _with_validation(corpus: datasets.DatasetDict, fraction: float, seed: int
                     ) -> datasets.DatasetDict:
    if "validation" in corpus:
        return corpus
    train = corpus["train"]
    if len(train) < 2:
        raise CorpusError(f"the corpus has {len(train)} sample(s); at least 2 are needed to hold "
                          "one out for validation")
    size = max(1, round(fraction * len(train)))
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    return datasets.DatasetDict(train=parts["train"], validation=parts["test"])


def _select_text(corpus: datasets.DatasetDict, column: str, spec: str | list[str]
                 ) -> datasets.DatasetDict:
    for name, split in corpus.items():
        if column not in split.column_names:
            raise CorpusError(f"corpus {spec!r} split {name!r} has no {column!r} column (columns: "
                              f"{split.column_names}); set `text_column` to the right one")
    renamed = corpus.select_columns([column])
    return renamed.rename_column(column, "text") if column != "text" else renamed
