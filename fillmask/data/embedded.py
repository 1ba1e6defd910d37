"""The embedded default corpus: English prose that ships with every CPython install.

The ``python-docs`` corpus is built from two sources, so the quickstart trains without a download:

* the help topics in :mod:`pydoc_data.topics` (one document per topic, ids like ``topic:assert``);
* the docstrings of the standard library, parsed with :mod:`ast` (one document per module, ids like
  ``stdlib:json.decoder``).

Both are cleaned into plain prose paragraphs by :func:`clean_text`: doctests, code blocks, tables,
signatures, reST directives and docstring section boilerplate are dropped, and reST markup is
stripped. The same extraction works on any source tree (:func:`docstring_documents`), which is how
evaluation scripts pull held-out prose from an installed third-party package.

Everything here is deterministic: the same interpreter always yields the same documents, in the
same order, with the same text, and the same train/validation split.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fillmask.paths import cache_root

if TYPE_CHECKING:
    from datasets import DatasetDict

CORPUS_VERSION = 1
"""Bump whenever extraction or cleaning changes, so stale caches are not reused."""

CORPUS_NAME = "python-docs"

MIN_WORDS = 6
"""Paragraphs with fewer words than this are dropped."""

MIN_LOWERCASE_WORDS = 4
MIN_LOWERCASE_FRACTION = 0.5
MIN_LETTER_FRACTION = 0.75
"""Share of letters among the non-space characters below which a paragraph counts as code."""

DEFAULT_SKIP: tuple[str, ...] = ("__pycache__", "test", "tests", "test_*.py", "conftest.py")
"""Glob patterns matched against every path component below a source root."""

STDLIB_SKIP: tuple[str, ...] = DEFAULT_SKIP + (
    "site-packages",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
)


@dataclass(frozen=True)
class Document:
    """One unit of the corpus: an id that is stable across builds and its cleaned text."""

    doc_id: str
    text: str


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_DOCTEST_LINE = re.compile(r"^\s*(>>>|\.\.\.)")
_DIRECTIVE_LINE = re.compile(r"^\s*\.\.\s+(\S+::|_[^:]*:|\[)")
_RULE_LINE = re.compile(r"^\s*[+|]?[=\-~*^#_+]{3,}[=\-~*^#_+| ]*$")
_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_CALL_LINE = re.compile(r"^\s*[\w.]+\(.*\)\s*$")
_ARROW_SIGNATURE = re.compile(r"^\s*[\w.\[\]]+\(.*\)\s*-->?")
_GRAMMAR_LINE = re.compile(r"::=")
_PARAM_LINE = re.compile(r"^\*{0,2}[A-Za-z_][\w, *]*\s+:(\s+\S.*)?$")
_FIELD_LINE = re.compile(r"^:[\w ]+:(?!`)")
_SECTION_HEADER = re.compile(
    r"^(Args|Arguments|Parameters|Params|Other Parameters|Keyword Arguments|Kwargs|Returns?"
    r"|Yields?|Raises|Warns|Attributes|Methods|Examples?|See Also|References|Notes?"
    r"|Warnings?|Todo)\s*:?\s*$"
)
_CODE_START = re.compile(
    r"^(def|class|import|from \S+ import|return|raise|yield|async|await)\b|^[@#]"
)
_CODE_END = re.compile(r"[({\[\\]\s*$")
_ASSIGNMENT = re.compile(r"^\s*[\w.\[\]'\"]+(\s*,\s*[\w.\[\]]+)*\s*[-+*/%|&]?=\s")
_WORD = re.compile(r"\S+")
_LOWER_WORD = re.compile(r"^[(\"'\u2018\u201c]?[a-z]+(-[a-z]+)*[)\"'\u2019\u201d]?[.,;:!?]?$")

_ROLE = re.compile(r":[\w:+.-]+:`([^`]+)`")
_DOUBLE_BACKTICK = re.compile(r"``(.+?)``")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{0,2}")
_SINGLE_BACKTICK = re.compile(r"`([^`]+)`_{0,2}")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}([A-Za-z0-9][^*\n]*?)(?<=[\w.)])\*{1,2}(?![\w*])")


def split_paragraphs(text: str) -> list[tuple[int, str]]:
    """Split ``text`` on blank lines into ``(indent, dedented paragraph)`` pairs.

    ``indent`` is the paragraph's indentation relative to the least indented paragraph, so a
    reST literal block or an indented code sample keeps a positive indent after dedenting.
    """
    raw = [p for p in _BLANK_LINE.split(text.expandtabs(8).strip("\n")) if p.strip()]
    indents = [_indent_of(p) for p in raw]
    base = min(indents, default=0)
    return [(i - base, textwrap.dedent(p).strip("\n")) for i, p in zip(indents, raw, strict=True)]


def _indent_of(paragraph: str) -> int:
    lines = [line for line in paragraph.splitlines() if line.strip()]
    return min(len(line) - len(line.lstrip(" ")) for line in lines)


def is_markup_block(paragraph: str) -> bool:
    """Whether a paragraph is doctest, a table, a heading, a directive, a signature or grammar."""
    lines = paragraph.splitlines()
    per_line = (_DOCTEST_LINE, _DIRECTIVE_LINE, _RULE_LINE, _TABLE_ROW, _GRAMMAR_LINE)
    if any(pattern.search(line) for line in lines for pattern in per_line):
        return True
    return bool(_CALL_LINE.match(lines[0])) or any(_ARROW_SIGNATURE.match(line) for line in lines)


def is_docstring_section(paragraph: str) -> bool:
    """Whether a paragraph is a docstring section or parameter list (numpydoc, Google, reST)."""
    first = paragraph.splitlines()[0].strip()
    return any(p.match(first) for p in (_SECTION_HEADER, _PARAM_LINE, _FIELD_LINE))


def is_code(paragraph: str, indent: int = 0) -> bool:
    """Whether a paragraph looks like source code rather than prose.

    A paragraph is code when too few of its non-space characters are letters, when it assigns
    (``x = ...``) or opens an indented block (a line ending in ``:`` followed by a deeper one),
    or, if it is indented (a literal block), when it starts with a statement keyword, ``@`` or
    ``#``, or has a line ending in an open bracket or a backslash.
    """
    visible = [c for c in paragraph if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if not visible or letters / len(visible) < MIN_LETTER_FRACTION:
        return True
    lines = paragraph.splitlines()
    if any(_ASSIGNMENT.search(line) for line in lines) or _opens_block(lines):
        return True
    if indent == 0:
        return False
    return bool(_CODE_START.match(lines[0])) or any(_CODE_END.search(line) for line in lines)


def _opens_block(lines: list[str]) -> bool:
    """Whether a line ending in ``:`` is followed by a more indented line."""
    depth = [len(line) - len(line.lstrip()) for line in lines]
    return any(
        line.rstrip().endswith(":") and depth[i + 1] > depth[i] for i, line in enumerate(lines[:-1])
    )


def is_prose(paragraph: str) -> bool:
    """Whether a (whitespace-normalised) paragraph has enough ordinary lowercase words."""
    words = _WORD.findall(paragraph)
    if len(words) < MIN_WORDS:
        return False
    lower = sum(bool(_LOWER_WORD.match(word)) for word in words)
    return lower >= MIN_LOWERCASE_WORDS and lower / len(words) >= MIN_LOWERCASE_FRACTION


def strip_markup(text: str) -> str:
    """Remove reST roles, literals, links and emphasis, keeping the text they mark up."""
    text = _ROLE.sub(lambda m: _role_text(m.group(1)), text)
    text = _DOUBLE_BACKTICK.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _SINGLE_BACKTICK.sub(r"\1", text)
    return _EMPHASIS.sub(r"\1", text)


def _role_text(target: str) -> str:
    """The text Sphinx shows for a role target: ``title <ref>`` -> title, ``~a.b`` -> b."""
    titled = re.match(r"^(.*?)\s*<[^<>]*>$", target)
    if titled and titled.group(1):
        return titled.group(1)
    target = target.lstrip("!")
    return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target


def clean_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of ``text``, cleaned, in order (see :func:`clean_text`)."""
    kept = []
    for indent, paragraph in split_paragraphs(text):
        if is_markup_block(paragraph) or is_docstring_section(paragraph):
            continue
        stripped = strip_markup(paragraph)
        if is_code(stripped, indent):
            continue
        cleaned = " ".join(stripped.split())
        if is_prose(cleaned):
            kept.append(cleaned)
    return kept


def clean_text(text: str) -> str:
    """Reduce reST/docstring text to prose paragraphs joined by blank lines.

    Paragraphs are split on blank lines and dedented. Doctests, code blocks (mostly non-letter
    or indented code), tables, headings, signatures, grammar rules, reST directives, docstring
    section headers and parameter lists are dropped, reST markup is stripped, whitespace is
    collapsed to single spaces, and paragraphs that are short or lack ordinary lowercase words
    are dropped. Returns ``""`` when nothing survives.
    """
    return "\n\n".join(clean_paragraphs(text))


def _join_unique(paragraphs: Iterable[str]) -> str:
    """Join paragraphs with blank lines, keeping only the first copy of a repeated one."""
    return "\n\n".join(dict.fromkeys(paragraphs))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def topic_documents() -> list[Document]:
    """One document per :mod:`pydoc_data.topics` help topic, sorted by id (``topic:<name>``)."""
    from pydoc_data.topics import topics

    docs = (Document(f"topic:{name}", clean_text(topics[name])) for name in sorted(topics))
    return [doc for doc in docs if doc.text]


def iter_source_files(root: Path, skip: Collection[str] = DEFAULT_SKIP) -> Iterator[Path]:
    """Yield the ``.py`` files below ``root`` in sorted order, pruning skipped components.

    ``skip`` holds glob patterns matched against each directory and file name.
    """

    def skipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)

    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not skipped(d))
        for name in sorted(files):
            if name.endswith(".py") and not skipped(name):
                yield Path(directory, name)


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` relative to ``root`` (``root``'s own name for its init)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or root.name


def module_docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of a source file in source order ([] if unparsable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
        return []
    return [doc for node in _documented_nodes(tree) if (doc := ast.get_docstring(node))]


_Documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _documented_nodes(node: ast.AST) -> Iterator[_Documented]:
    """Depth-first, source-ordered walk over the nodes that can carry a docstring."""
    if isinstance(node, _Documented):
        yield node
    for child in ast.iter_child_nodes(node):
        yield from _documented_nodes(child)


def docstring_documents(
    root: Path, prefix: str, skip: Collection[str] = DEFAULT_SKIP
) -> list[Document]:
    """One document per module below ``root`` holding the cleaned prose of its docstrings.

    Ids are ``<prefix>:<dotted module name relative to root>``; documents come in sorted path
    order, and modules without surviving prose are left out.
    """
    root = Path(root)
    docs = []
    for path in sorted(iter_source_files(root, skip)):
        paragraphs = (p for doc in module_docstrings(path) for p in clean_paragraphs(doc))
        text = _join_unique(paragraphs)
        if text:
            docs.append(Document(f"{prefix}:{module_name(path, root)}", text))
    return docs


def stdlib_root() -> Path:
    """The directory holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_docs_documents() -> list[Document]:
    """Every document of the ``python-docs`` corpus (topics + stdlib), sorted by id."""
    docs = topic_documents() + docstring_documents(stdlib_root(), "stdlib", STDLIB_SKIP)
    return sorted(docs, key=lambda doc: doc.doc_id)


def word_count(docs: Iterable[Document]) -> int:
    """Total number of whitespace-separated words in ``docs``."""
    return sum(len(doc.text.split()) for doc in docs)


# --------------------------------------------------------------------------------------------
# Splitting and caching
# --------------------------------------------------------------------------------------------


def _unit_hash(seed: int, doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``(seed, doc_id)``."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: Sequence[Document], validation_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into (train, validation) by document, keeping their order.

    A document goes to validation when the SHA-256 hash of ``(seed, doc_id)`` falls below
    ``validation_fraction``, so the split is stable across runs and interpreter processes.
    Neither side is ever empty: the lowest (or highest) hashing document is moved if needed.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least two documents to split, got {len(docs)}")
    scores = [_unit_hash(seed, doc.doc_id) for doc in docs]
    chosen = {i for i, score in enumerate(scores) if score < validation_fraction}
    if not chosen:
        chosen = {min(range(len(docs)), key=scores.__getitem__)}
    if len(chosen) == len(docs):
        chosen.discard(max(range(len(docs)), key=scores.__getitem__))
    train = [doc for i, doc in enumerate(docs) if i not in chosen]
    validation = [doc for i, doc in enumerate(docs) if i in chosen]
    return train, validation


def default_cache_dir() -> Path:
    """``$FILLMASK_CACHE`` if set, else ``~/.cache/fillmask``."""
    return cache_root()


def cache_key(validation_fraction: float, seed: int) -> str:
    """Identifies one build: Python version, corpus version, split fraction and seed."""
    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"py{python}-v{CORPUS_VERSION}-val{validation_fraction!r}-seed{seed}"


def python_docs_cache_path(
    cache_dir: Path | None = None, validation_fraction: float = 0.05, seed: int = 0
) -> Path:
    """Where :func:`load_python_docs` keeps the built corpus."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / "corpora" / f"{CORPUS_NAME}-{cache_key(validation_fraction, seed)}"


def _to_dataset_dict(train: list[Document], validation: list[Document]) -> DatasetDict:
    from datasets import Dataset, DatasetDict, Features, Value

    features = Features({"doc_id": Value("string"), "text": Value("string")})

    def to_dataset(docs: list[Document]) -> Dataset:
        columns = {"doc_id": [d.doc_id for d in docs], "text": [d.text for d in docs]}
        return Dataset.from_dict(columns, features=features)

    return DatasetDict({"train": to_dataset(train), "validation": to_dataset(validation)})


def _build_into(target: Path, validation_fraction: float, seed: int) -> None:
    """Build the corpus and move it into ``target`` atomically (via a temporary sibling)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    train, validation = split_documents(python_docs_documents(), validation_fraction, seed)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _to_dataset_dict(train, validation).save_to_disk(str(staging / "data"))
        try:
            os.replace(staging / "data", target)
        except OSError:
            if not target.is_dir():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_python_docs(
    cache_dir: Path | None = None, validation_fraction: float = 0.05, seed: int = 0
) -> DatasetDict:
    """The ``python-docs`` corpus as a ``DatasetDict`` with ``train`` and ``validation`` splits.

    Each row is one document with columns ``doc_id`` and ``text``. The first call builds the
    corpus and saves it under ``<cache_dir>/corpora/python-docs-<key>`` (``cache_dir`` defaults to
    ``$FILLMASK_CACHE`` or ``~/.cache/fillmask``); later calls memory-map the saved Arrow files.
    """
    from datasets import load_from_disk

    target = python_docs_cache_path(cache_dir, validation_fraction, seed)
    if not target.is_dir():
        _build_into(target, validation_fraction, seed)
    return load_from_disk(str(target))


EMBEDDED_CORPORA: dict[str, Callable[..., DatasetDict]] = {CORPUS_NAME: load_python_docs}
"""Corpora that need no download, by name."""
