"""Corpora as `datasets` DatasetDicts (memory-mapped Arrow): embedded, files, or a saved folder.

Bad input either loads, with what was dropped or replaced counted and logged once per load, or
fails with a one-line :class:`CorpusError` naming the file, the line or byte offset where it
applies, and the fix:

- empty files are skipped (a warning names them); a corpus of only empty files is an error;
- empty and whitespace-only documents, and null or missing texts, are dropped and counted;
- bytes that are not UTF-8 are an error giving the byte offset and line, or, with
  ``encoding_errors="replace"``, become U+FFFD and are counted;
- CRLF (Windows) and CR line endings read as LF, and a UTF-8 byte-order mark is ignored;
- invalid JSON Lines, a missing text column, and a text column holding numbers, lists or
  objects are errors naming the file (and the line, for JSON Lines).
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fillmask.errors import FillmaskError
from fillmask.paths import cache_root

SampleBy = Literal["line", "paragraph", "document"]
EncodingErrors = Literal["strict", "replace"]
FILE_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}
STRING_TYPES = ("string", "large_string")
SCAN_CHUNK = 1 << 22  # bytes read at a time when scanning a file
TEXT_COLUMN_FIX = ("set `text_column` to the column that holds the text, or store the texts "
                   "as strings")
ENCODING_FIX = ("convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set "
                "encoding_errors='replace' to read undecodable bytes as U+FFFD")


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
    encoding_errors: EncodingErrors = "strict",
) -> datasets.DatasetDict:
    """Load a corpus with ``train`` and ``validation`` splits and a ``text`` column.

    ``spec`` is an embedded corpus name (``python-docs``), a saved `datasets` folder, or files
    and globs (``.txt``, ``.jsonl``/``.json``, ``.parquet``). Corpora without a validation split
    get one of ``validation_fraction`` of their rows, chosen by ``seed``. Files are parsed into
    ``<cache_dir>/datasets``. ``encoding_errors`` is what undecodable bytes in text and JSON
    Lines files do: ``strict`` (an error naming the file, byte offset and line) or ``replace``
    (each invalid sequence becomes U+FFFD; the count is logged). Empty documents and null texts
    are dropped, and counted in the log.
    """
    from fillmask.data.embedded import EMBEDDED_CORPORA

    if encoding_errors not in ("strict", "replace"):
        raise CorpusError(f"encoding_errors={encoding_errors!r}: choose 'strict' or 'replace'")
    if isinstance(spec, str) and spec in EMBEDDED_CORPORA:
        build = EMBEDDED_CORPORA[spec]
        return build(cache_dir=cache_dir, validation_fraction=validation_fraction, seed=seed)
    if isinstance(spec, str) and Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        origin = CorpusOrigin(f"saved corpus {folder}")
        corpus = _load_saved(folder)
    else:
        origin = _without_empty_files(CorpusOrigin.of_files(expand_paths(spec)))
        corpus = _load_files(origin, text_column, sample_by, encoding_errors,
                             cache_root(cache_dir))
    corpus = _select_text(corpus, text_column, origin)
    corpus = _drop_empty(corpus, text_column, origin)
    return _with_validation(corpus, validation_fraction, seed)


@dataclass(frozen=True)
class CorpusOrigin:
    """What a corpus was read from: a label for messages and, for files, their paths."""

    label: str
    paths: tuple[Path, ...] = ()
    builder: str | None = None

    @classmethod
    def of_files(cls, paths: list[Path]) -> CorpusOrigin:
        kinds = {FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
        if None in kinds or len(kinds) != 1:
            bad = [str(p) for p in paths if p.suffix.lower() not in FILE_BUILDERS]
            raise CorpusError(f"corpus files must all be one of {sorted(FILE_BUILDERS)}; "
                              f"cannot read {(bad or [str(paths[0])])[0]} together with the others")
        return cls(_describe(paths), tuple(paths), kinds.pop())

    def with_paths(self, paths: list[Path]) -> CorpusOrigin:
        return CorpusOrigin(_describe(paths), tuple(paths), self.builder)


def _describe(paths: list[Path]) -> str:
    """``corpus file a.txt`` or ``corpus files a.txt, b.txt, c.txt and 7 more``."""
    return f"corpus file {paths[0]}" if len(paths) == 1 else f"corpus files {_listing(paths)}"


def _listing(items: list[Any], most: int = 3) -> str:
    """``a, b, c and 7 more``: the first few items, and how many are left out."""
    named = ", ".join(str(item) for item in items[:most])
    return named + (f" and {len(items) - most} more" if len(items) > most else "")


# Reading.


def _load_saved(folder: Path) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise CorpusError(f"{folder} is a folder but not one saved by `datasets` "
                          "(Dataset.save_to_disk); give files or a glob instead") from error
    if isinstance(loaded, datasets.DatasetDict):
        return loaded
    return datasets.DatasetDict(train=loaded)


def _load_files(origin: CorpusOrigin, text_column: str, sample_by: SampleBy,
                encoding_errors: EncodingErrors, cache: Path) -> datasets.DatasetDict:
    """Parse the files with `datasets`' text, json or parquet builder into ``cache/datasets``."""
    if origin.builder == "parquet":
        _check_parquet_schemas(origin, text_column)
    replaced = _check_encoding(origin, encoding_errors)
    options = _builder_options(origin.builder, sample_by, encoding_errors)
    files = [str(p) for p in origin.paths]
    try:
        with _quiet_datasets():
            corpus = datasets.load_dataset(origin.builder, data_files={"train": files},
                                           cache_dir=str(cache / "datasets"), **options)
    except Exception as error:  # datasets wraps parser errors in many types
        raise _explain_failure(origin, error, encoding_errors) from error
    if replaced:
        counts = _listing([f"{path} ({n})" for path, n in replaced.items()])
        rank_zero_warn(f"replaced {sum(replaced.values())} undecodable byte sequence(s) with "
                       f"U+FFFD (encoding_errors='replace') in {counts}")
    return corpus


def _builder_options(builder: str, sample_by: SampleBy, encoding_errors: EncodingErrors
                     ) -> dict[str, Any]:
    if builder == "text":
        # utf-8-sig drops a leading byte-order mark; text mode reads CRLF and CR as LF.
        options: dict[str, Any] = {"sample_by": sample_by, "encoding": "utf-8-sig"}
        return options | ({"encoding_errors": "replace"} if encoding_errors == "replace" else {})
    if builder == "json" and encoding_errors == "replace":
        # The json builder hands UTF-8 bytes to pyarrow untouched (pyarrow does not check them);
        # under any other encoding name it decodes each batch of whole lines with
        # `encoding_errors` and re-encodes it. "utf_8" is that codec under another name.
        return {"encoding": "utf_8", "encoding_errors": "replace"}
    return {}


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets`' own error logs while loading: failures are re-raised, explained."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


# Empty files.


def _without_empty_files(origin: CorpusOrigin) -> CorpusOrigin:
    """Drop empty (or, for text and JSON Lines, whitespace-only) files, with a warning."""
    empty = [p for p in origin.paths if _is_empty(p, whitespace=origin.builder != "parquet")]
    if not empty:
        return origin
    if len(empty) == len(origin.paths):
        what = "is empty" if len(empty) == 1 else "are all empty"
        raise CorpusError(f"{origin.label} {what} (no bytes, or only whitespace); give a file "
                          "that holds text")
    rank_zero_warn(f"skipped {len(empty)} empty corpus file(s): {_listing(empty)}")
    return origin.with_paths([p for p in origin.paths if p not in empty])


def _is_empty(path: Path, whitespace: bool) -> bool:
    """Whether the file has no bytes or, with ``whitespace``, only ASCII whitespace."""
    try:
        if path.stat().st_size == 0 or not whitespace:
            return path.stat().st_size == 0
        with path.open("rb") as file:
            while chunk := file.read(SCAN_CHUNK):
                if chunk.strip():
                    return False
    except OSError as error:  # a folder, or no permission
        raise CorpusError(f"cannot read corpus file {path}: {error.strerror}; give a readable "
                          "file") from error
    return True


# Encoding.


@dataclass(frozen=True)
class Utf8Scan:
    """Invalid UTF-8 in a file: how many sequences (each one U+FFFD under ``replace``) and
    where the first one is (0-based byte offset, 1-based line)."""

    invalid: int = 0
    offset: int = -1
    line: int = -1
    bytes: bytes = b""

    def message(self, path: Path) -> str:
        shown = " ".join(f"0x{b:02x}" for b in self.bytes)
        return (f"corpus file {path} is not valid UTF-8: {shown} at byte offset {self.offset} "
                f"(line {self.line}) cannot be decoded; {ENCODING_FIX}")


def scan_utf8(path: Path, first_only: bool = False, chunk_size: int = SCAN_CHUNK) -> Utf8Scan:
    """Find invalid UTF-8 in a file, read in chunks (never whole) by an incremental decoder.

    Each chunk is decoded with ``replace``: the U+FFFD it makes, less the U+FFFD the file itself
    holds (bytes EF BF BD), are its invalid sequences, counted as the ``replace`` handler counts
    them. The first one is located by decoding its chunk once more, strictly.
    """
    invalid, first = 0, Utf8Scan()
    offset, line, pending = 0, 1, b""  # file offset and line of ``data[0]``, undecoded tail
    with path.open("rb") as file:
        while True:
            chunk = file.read(chunk_size)
            data, final = pending + chunk, not chunk
            text, used = codecs.utf_8_decode(data, "replace", final)
            bad = text.count("\ufffd") - data.count(b"\xef\xbf\xbd", 0, used)
            if bad and not invalid:
                try:
                    codecs.utf_8_decode(data, "strict", final)
                except UnicodeDecodeError as error:
                    first = Utf8Scan(1, offset + error.start,
                                     line + data.count(b"\n", 0, error.start),
                                     data[error.start:error.end])
                if first_only:
                    return first
            invalid += bad
            offset, line, pending = offset + used, line + data.count(b"\n", 0, used), data[used:]
            if final:
                return Utf8Scan(invalid, first.offset, first.line, first.bytes)


def _check_encoding(origin: CorpusOrigin, encoding_errors: EncodingErrors) -> dict[Path, int]:
    """Count the sequences ``replace`` will replace, per file. Strict JSON Lines files are
    checked here, as pyarrow would store invalid UTF-8 unchecked; text files fail on their own
    and are scanned only then (see :func:`_explain_failure`)."""
    if origin.builder == "parquet" or (encoding_errors == "strict" and origin.builder == "text"):
        return {}
    counts = {}
    for path in origin.paths:
        scan = scan_utf8(path, first_only=encoding_errors == "strict")
        if scan.invalid and encoding_errors == "strict":
            raise CorpusError(scan.message(path))
        if scan.invalid:
            counts[path] = scan.invalid
    return counts


# Explaining failures.


def _explain_failure(origin: CorpusOrigin, error: Exception, encoding_errors: EncodingErrors
                     ) -> CorpusError:
    """A one-line error for a failed load: the first invalid UTF-8 byte or JSON line found by
    scanning the files, else the innermost error `datasets` raised."""
    for path in origin.paths:
        if origin.builder == "text" and encoding_errors == "strict":
            scan = scan_utf8(path, first_only=True)
            if scan.invalid:
                return CorpusError(scan.message(path))
        if origin.builder == "json":
            problem = _first_bad_json_line(path)
            if problem:
                return CorpusError(problem)
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    detail = " ".join(f"{type(cause).__name__}: {cause}".split())
    return CorpusError(f"could not read {origin.label}: {detail[:500]}")


@dataclass(frozen=True)
class JsonProblem:
    """Why a line is not JSON."""

    reason: str


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file; a line that is not JSON
    gives a :class:`JsonProblem` in place of its value and ends the iteration."""
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield number, json.loads(line.decode("utf-8", "replace"))
            except json.JSONDecodeError as error:
                yield number, JsonProblem(f"{error.msg} at column {error.colno}")
                return


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file breaks: a line that is not JSON, or not a JSON object."""
    with path.open("rb") as file:
        if file.read(SCAN_CHUNK).lstrip()[:1] == b"[":
            return None  # one JSON array, not JSON Lines
    for number, value in _json_lines(path):
        if isinstance(value, JsonProblem):
            return (f"corpus file {path} line {number} is not valid JSON ({value.reason}); "
                    "each line of a JSON Lines file must hold one JSON object")
        if not isinstance(value, dict):
            return (f"corpus file {path} line {number} holds a JSON {_json_kind(value)}, not an "
                    "object; each line of a JSON Lines file must hold one JSON object")
    return None


def _json_kind(value: Any) -> str:
    kinds = {bool: "boolean", int: "number", float: "number", list: "list", dict: "object",
             str: "string"}
    return next((name for kind, name in kinds.items() if isinstance(value, kind)), "null")


# The text column.


def _check_parquet_schemas(origin: CorpusOrigin, column: str) -> None:
    """Every Parquet file must have the text column, as strings (read from the footers)."""
    for path in origin.paths:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as error:
            raise CorpusError(f"corpus file {path} is not a Parquet file ({error}); give a "
                              "valid Parquet file") from error
        if column not in schema.names:
            raise CorpusError(_missing_column(f"corpus file {path}", column, schema.names))
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_null(kind)):
            raise CorpusError(f"corpus file {path}: column {column!r} has type {kind}, not "
                              f"string; {TEXT_COLUMN_FIX}")


def _select_text(corpus: datasets.DatasetDict, column: str, origin: CorpusOrigin
                 ) -> datasets.DatasetDict:
    """Keep only the text column, named ``text``; it must hold strings (or nulls)."""
    for name, split in corpus.items():
        where = origin.label if origin.paths else f"{origin.label} split {name!r}"
        if column not in split.column_names:
            hint = "; text files have one column, 'text'" if origin.builder == "text" else ""
            raise CorpusError(_missing_column(where, column, split.column_names) + hint)
        feature = split.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype == "null":  # no value anywhere
            corpus[name] = split.cast_column(column, datasets.Value("string"))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in STRING_TYPES):
            raise CorpusError(_first_non_string(origin, column)
                              or f"{where}: column {column!r} holds {feature}, not strings; "
                                 f"{TEXT_COLUMN_FIX}")
    renamed = corpus.select_columns([column])
    return renamed.rename_column(column, "text") if column != "text" else renamed


def _missing_column(where: str, column: str, present: list[str]) -> str:
    return (f"{where} has no {column!r} column (columns: {present}); set `text_column` to the "
            "right one")


def _first_non_string(origin: CorpusOrigin, column: str) -> str | None:
    """The first JSON line whose text is neither a string nor null, as an error message.

    Numbers are not turned into text: a numeric text column is almost always the wrong column
    (an id or a label) or a broken export, and silently training on digit strings hides that.
    """
    if origin.builder != "json":
        return None
    for path in origin.paths:
        for number, row in _json_lines(path):
            value = row.get(column) if isinstance(row, dict) else None
            if value is not None and not isinstance(value, str):
                shown = json.dumps(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                return (f"corpus file {path} line {number}: {column!r} holds a "
                        f"{_json_kind(value)} ({shown}), not a string; {TEXT_COLUMN_FIX}")
    return None


def _drop_empty(corpus: datasets.DatasetDict, column: str, origin: CorpusOrigin
                ) -> datasets.DatasetDict:
    """Drop null, empty and whitespace-only documents; log how many, once per load."""
    empty = missing = total = 0
    kept = {}
    for name, split in corpus.items():
        flat = split.flatten_indices() if split._indices is not None else split  # a row view
        text = flat.data.column("text")
        # utf8_is_space is str.isspace: Unicode whitespace, false for ""
        blank = pc.or_(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text))
        drop = pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
        dropped = int(drop.sum())
        missing, empty, total = (missing + text.null_count, empty + dropped - text.null_count,
                                 total + len(split))
        kept[name] = split.select(np.flatnonzero(~drop)) if dropped else split
    if "train" in kept and len(kept["train"]) == 0:
        raise CorpusError(f"{origin.label} holds no text: its {len(corpus['train'])} document(s) "
                          f"are empty, whitespace, or have no {column!r} value")
    if empty:
        rank_zero_info(f"dropped {empty} empty or whitespace-only document(s) of {total} from "
                       f"{origin.label}")
    if missing:
        rank_zero_warn(f"dropped {missing} document(s) of {total} without a {column!r} value "
                       f"(null or missing) from {origin.label}")
    return datasets.DatasetDict(kept)


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
