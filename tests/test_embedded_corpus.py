"""Tests of the embedded ``python-docs`` corpus: cleaning, extraction, splitting and caching."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from fillmask.data import embedded
from fillmask.data.embedded import (
    CORPUS_VERSION,
    EMBEDDED_CORPORA,
    Document,
    clean_text,
    docstring_documents,
    load_python_docs,
    python_docs_cache_path,
    python_docs_documents,
    split_documents,
    word_count,
)

PROSE = "The parser reads the whole file and returns a list of the records it found."


@pytest.fixture(scope="module")
def python_docs() -> list[Document]:
    """The real corpus, built once for the whole module (a few seconds)."""
    return python_docs_documents()


def _clean(text: str) -> list[str]:
    cleaned = clean_text(textwrap.dedent(text))
    return cleaned.split("\n\n") if cleaned else []


# ------------------------------------------------------------------------------------------
# Cleaning
# ------------------------------------------------------------------------------------------


def test_clean_keeps_prose_and_normalises_whitespace() -> None:
    text = "The parser reads   the whole\n    file and returns a list\tof the records it found."
    assert clean_text(text) == PROSE


def test_clean_joins_surviving_paragraphs_with_blank_lines() -> None:
    second = "It never writes anything back to the disk, so it is safe to call often."
    assert clean_text(f"{PROSE}\n\n\n{second}\n") == f"{PROSE}\n\n{second}"


def test_clean_drops_doctest_paragraphs() -> None:
    text = f"""\
        {PROSE}

        >>> parse("a,b")
        ['a', 'b']
        ... and more output that has quite a lot of ordinary words in it
        """
    assert _clean(text) == [PROSE]


def test_clean_drops_indented_code_blocks() -> None:
    text = f"""\
        {PROSE}

            for record in parse(path):
                print(record)

            import parser; parser.run()

        Then call the function on every file in the directory you want to read.
        """
    assert _clean(text) == [
        PROSE,
        "Then call the function on every file in the directory you want to read.",
    ]


def test_clean_drops_unindented_code() -> None:
    text = """\
        records = parse(path, strict=True)

        if records:
            handle(records)

        x[0] + y[1] * {a: b} - (c // d) % e | f & g ^ h
        """
    assert _clean(text) == []


def test_clean_drops_short_and_non_prose_paragraphs() -> None:
    text = f"""\
        Parse a file.

        {PROSE}

        ABC DEF GHI JKL MNO PQR STU VWX YZ
        """
    assert _clean(text) == [PROSE]


def test_clean_drops_numpydoc_sections_and_parameter_lists() -> None:
    text = f"""\
        {PROSE}

        Parameters
        ----------
        path : str
            The name of the file that should be read by the parser.
        strict : bool, optional
            Whether to raise on the first malformed record in the file.

        encoding : str
            The text encoding that is used to decode the bytes of the file.

        Returns
        -------
        list of Record
            The records in the order in which they appear in the file.
        """
    assert _clean(text) == [PROSE]


def test_clean_drops_google_style_sections() -> None:
    text = f"""\
        {PROSE}

        Args:
            path: The name of the file that should be read by the parser today.
        """
    assert _clean(text) == [PROSE]


def test_clean_drops_rest_field_lists() -> None:
    text = """\
        :func:`parse` reads the whole file and returns a list of the records it found.

        :param path: The name of the file that should be read by the parser.
        :returns: The records in the order in which they appear in the file.
        """
    assert _clean(text) == [PROSE.replace("The parser", "parse")]


def test_clean_drops_directives_tables_headings_signatures_and_grammar() -> None:
    text = f"""\
        Reading records
        ===============

        parse(path, strict=False) -> list of records

        .. versionadded:: 3.2 which added a great many words to this directive line

        ======  ============================================
        name    what the column holds in the output table
        ======  ============================================

        +--------+--------------------------------+
        | name   | what the column holds in it    |
        +--------+--------------------------------+

        record_stmt ::= "record" identifier "with" the fields it has

        {PROSE}
        """
    assert _clean(text) == [PROSE]


def test_clean_strips_rest_markup() -> None:
    text = (
        "Use :func:`parse` or :meth:`~pkg.reader.Reader.read` to fill a ``list`` of "
        ":class:`records <pkg.Record>`, as *described* in `the manual <https://x.org>`_."
    )
    assert clean_text(text) == (
        "Use parse or read to fill a list of records, as described in the manual."
    )


def test_clean_returns_empty_string_when_nothing_survives() -> None:
    assert clean_text("") == ""
    assert clean_text(">>> 1 + 1\n2\n\nShort.") == ""


# ------------------------------------------------------------------------------------------
# Extraction from source trees
# ------------------------------------------------------------------------------------------


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture()
def tiny_package(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    _write(root / "__init__.py", f'"""{PROSE}"""\n')
    _write(
        root / "core.py",
        '''\
        """The core module holds the reader class and the helpers it relies on."""


        class Reader:
            """A reader walks through a file and yields one record after another.

            >>> Reader("x").read()
            []
            """

            def read(self):
                """Read every record of the file and return them in a new list."""

            async def close(self):
                """Read every record of the file and return them in a new list."""


        def helper():
            """Short."""
        ''',
    )
    _write(
        root / "sub" / "__init__.py", '"""The sub package is where the optional readers live."""\n'
    )
    _write(root / "empty.py", "X = 1\n")
    _write(
        root / "broken.py",
        '"""This module cannot be parsed because of the error below."""\ndef (\n',
    )
    _write(
        root / "tests" / "helpers.py", '"""Tests are skipped by default, so this never shows."""\n'
    )
    _write(root / "test_core.py", '"""Test modules are skipped by default, this never shows."""\n')
    return root


def test_docstring_documents_on_a_tiny_package(tiny_package: Path) -> None:
    docs = docstring_documents(tiny_package, prefix="pkg")
    assert [doc.doc_id for doc in docs] == ["pkg:pkg", "pkg:core", "pkg:sub"]
    assert docs[0].text == PROSE
    assert docs[1].text.split("\n\n") == [
        "The core module holds the reader class and the helpers it relies on.",
        "A reader walks through a file and yields one record after another.",
        "Read every record of the file and return them in a new list.",
    ]


def test_docstring_documents_skip_patterns(tiny_package: Path) -> None:
    docs = docstring_documents(tiny_package, prefix="pkg", skip=("sub", "core.py"))
    ids = {doc.doc_id for doc in docs}
    assert ids == {"pkg:pkg", "pkg:tests.helpers", "pkg:test_core"}


# ------------------------------------------------------------------------------------------
# The python-docs corpus
# ------------------------------------------------------------------------------------------


def test_python_docs_documents_are_deterministic(python_docs: list[Document]) -> None:
    assert python_docs_documents() == python_docs


def test_python_docs_documents_shape(python_docs: list[Document]) -> None:
    ids = [doc.doc_id for doc in python_docs]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(doc.text and doc.text == doc.text.strip() for doc in python_docs)
    assert any(i.startswith("topic:") for i in ids)
    assert "stdlib:json.decoder" in ids
    assert not any(part in i for i in ids for part in ("idlelib", "lib2to3", ".test"))
    assert 150_000 < word_count(python_docs) < 400_000


def test_python_docs_text_is_clean(python_docs: list[Document]) -> None:
    paragraphs = [p for doc in python_docs for p in doc.text.split("\n\n")]
    assert not any(p.startswith((">>>", "...", ".. ")) for p in paragraphs)
    markup = re.compile(r":\w+:`|``\w[^`]*``")
    assert not any(markup.search(p) or "\n" in p for p in paragraphs)
    assert all(len(p.split()) >= embedded.MIN_WORDS for p in paragraphs)


# ------------------------------------------------------------------------------------------
# Splitting
# ------------------------------------------------------------------------------------------


def test_split_is_by_document_and_stable(python_docs: list[Document]) -> None:
    train, validation = split_documents(python_docs, validation_fraction=0.05, seed=0)
    train_ids = {doc.doc_id for doc in train}
    validation_ids = {doc.doc_id for doc in validation}
    assert not train_ids & validation_ids
    assert train_ids | validation_ids == {doc.doc_id for doc in python_docs}
    assert 0.02 < len(validation) / len(python_docs) < 0.09
    assert split_documents(python_docs, 0.05, 0) == (train, validation)
    assert split_documents(list(reversed(python_docs)), 0.05, 0)[1] == validation[::-1]
    assert split_documents(python_docs, 0.05, 1)[1] != validation


def test_split_fraction_is_respected(python_docs: list[Document]) -> None:
    _, validation = split_documents(python_docs, validation_fraction=0.3, seed=0)
    assert 0.24 < len(validation) / len(python_docs) < 0.36


def test_split_never_leaves_a_side_empty() -> None:
    docs = [Document(f"d{i}", "text") for i in range(3)]
    for fraction in (1e-9, 1 - 1e-9):
        train, validation = split_documents(docs, validation_fraction=fraction)
        assert train and validation
        assert len(train) + len(validation) == 3


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError):
        split_documents([Document("a", "x"), Document("b", "y")], validation_fraction=fraction)


# ------------------------------------------------------------------------------------------
# Loading and caching
# ------------------------------------------------------------------------------------------


def test_cache_path_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FILLMASK_CACHE", str(tmp_path))
    path = python_docs_cache_path()
    assert path.parent == tmp_path / "corpora"
    python = ".".join(map(str, sys.version_info[:3]))
    assert path.name.startswith("python-docs-")
    assert python in path.name and f"v{CORPUS_VERSION}" in path.name
    assert python_docs_cache_path(validation_fraction=0.1) != path
    assert python_docs_cache_path(seed=1) != path
    monkeypatch.delenv("FILLMASK_CACHE")
    assert python_docs_cache_path().parent == Path.home() / ".cache" / "fillmask" / "corpora"


def test_load_python_docs_builds_then_reloads(
    python_docs: list[Document], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []

    def build() -> list[Document]:
        calls.append(1)
        return python_docs

    monkeypatch.setattr(embedded, "python_docs_documents", build)
    first = load_python_docs(cache_dir=tmp_path)
    assert calls == [1]
    target = python_docs_cache_path(tmp_path)
    assert target.is_dir()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left over

    def refuse() -> list[Document]:
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(embedded, "python_docs_documents", refuse)
    second = load_python_docs(cache_dir=tmp_path)

    train, validation = split_documents(python_docs)
    for loaded in (first, second):
        assert set(loaded) == {"train", "validation"}
        assert loaded["train"].column_names == ["doc_id", "text"]
        assert loaded["validation"]["doc_id"] == [doc.doc_id for doc in validation]
        assert loaded["train"].num_rows == len(train)
    assert second["train"][0] == {"doc_id": train[0].doc_id, "text": train[0].text}


def test_failed_build_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class HalfWritten:
        def save_to_disk(self, path: str) -> None:
            Path(path).mkdir()
            (Path(path) / "dataset_dict.json").write_text("{")
            raise RuntimeError("interrupted")

    docs = [Document("a", PROSE), Document("b", PROSE)]
    monkeypatch.setattr(embedded, "python_docs_documents", lambda: docs)
    monkeypatch.setattr(embedded, "_to_dataset_dict", lambda *splits: HalfWritten())
    with pytest.raises(RuntimeError):
        load_python_docs(cache_dir=tmp_path)
    corpora = tmp_path / "corpora"
    assert not corpora.exists() or not any(corpora.iterdir())


def test_embedded_corpora_registry() -> None:
    assert EMBEDDED_CORPORA["python-docs"] is load_python_docs
