"""Bad corpus input: it loads, with what was dropped or replaced counted and logged, or it fails
with one line naming the file (and the line or byte offset) and the fix."""

from __future__ import annotations

import codecs
import json
import logging
import random
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fillmask.data.corpus import CorpusError, load_corpus, scan_utf8
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.packing import ChunkPacking, DocumentPacking, encode_with_word_starts
from fillmask.data.tokenize import TokenizerTraining, split_long_text, train_tokenizer

TOKENIZER = TokenizerTraining(vocab_size=400)


@pytest.fixture
def info_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Lightning's rank_zero_info messages (its logger does not propagate to the root)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def paragraphs(small_corpus: Path) -> list[str]:
    return [p for p in small_corpus.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def all_texts(corpus: datasets.DatasetDict) -> list[str]:
    return [t for split in ("train", "validation") for t in corpus[split]["text"]]


def one_batch(corpus: Path, **overrides) -> MaskedLMDataModule:
    """A data module on ``corpus`` through setup() and one training batch."""
    options = dict(corpus=str(corpus), tokenizer_training=TOKENIZER, max_length=32, batch_size=4)
    dm = MaskedLMDataModule(**{**options, **overrides})
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    return dm


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value)


# 1. Empty files.


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "empty.parquet"])
def test_an_empty_file_alone_is_an_error_naming_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(CorpusError, match=rf"corpus file .*{name} is empty") as error:
        load_corpus(str(tmp_path / name))
    assert_one_line(error)


def test_a_whitespace_only_jsonl_file_alone_is_empty(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(CorpusError, match=r"blank\.jsonl is empty"):
        load_corpus(str(tmp_path / "blank.jsonl"))


def test_empty_files_among_others_are_skipped_with_a_warning(tmp_path, paragraphs):
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 1 empty corpus file\(s\): .*b\.txt"):
        corpus = load_corpus(str(tmp_path / "*.txt"))
    assert sorted(all_texts(corpus)) == sorted(paragraphs)
    with pytest.warns(UserWarning, match=r"b\.txt"):
        one_batch(tmp_path / "*.txt")


def test_empty_and_whitespace_jsonl_files_among_others_are_skipped(tmp_path, paragraphs):
    rows = "\n".join(json.dumps({"text": p}) for p in paragraphs)
    (tmp_path / "a.jsonl").write_text(rows, encoding="utf-8")
    (tmp_path / "b.jsonl").write_bytes(b"")
    (tmp_path / "c.jsonl").write_text("\n \n")  # `datasets` alone fails on this one
    with pytest.warns(UserWarning, match=r"skipped 2 empty .*b\.jsonl, .*c\.jsonl"):
        corpus = load_corpus(str(tmp_path / "*.jsonl"))
    assert sorted(all_texts(corpus)) == sorted(paragraphs)


# 2. Empty lines and whitespace-only documents.


@pytest.mark.parametrize("sample_by", ["line", "paragraph"])
def test_blank_documents_are_dropped_and_counted(tmp_path, paragraphs, info_log, sample_by):
    blank = ["   ", "\t", "\u3000 \u00a0"]  # Unicode whitespace counts too
    docs = [d for p in paragraphs for d in (p, blank[len(p) % 3])]
    path = tmp_path / "blanks.txt"
    path.write_text("\n\n".join(docs) + "\n\n\n\n", encoding="utf-8")
    reference = load_corpus(str(path), sample_by=sample_by)
    texts = all_texts(reference)
    assert texts and all(t.strip() for t in texts)
    rows = datasets.load_dataset("text", data_files=str(path), sample_by=sample_by,
                                 cache_dir=str(tmp_path / "hf"))["train"]
    dropped = sum(not (t or "").strip() for t in rows["text"])
    assert dropped >= len(paragraphs) and len(texts) == len(rows) - dropped
    assert f"dropped {dropped} empty or whitespace-only document(s) of {len(rows)} from " \
           f"corpus file {path}" in info_log.text
    one_batch(path, sample_by=sample_by)


def test_a_file_of_only_blank_documents_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("   \n\n\t\n\n\u3000\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"blank\.txt holds no text"):
        load_corpus(str(tmp_path / "blank.txt"))


# 3. Invalid UTF-8.


def with_bytes(paragraphs: list[str], suffix: str, every: int, marks: str) -> bytes:
    """Paragraphs as a text or JSONL file, ``marks`` appended to every ``every``-th one, then
    each ``E`` mark made byte 0xe9 (Latin-1 é) and each ``T`` mark bytes 0xe2 0x82 (a
    truncated €): neither is UTF-8."""
    texts = [f"{p} caf{marks} end" if i % every == 0 else p for i, p in enumerate(paragraphs)]
    if suffix == ".txt":
        data = "\n\n".join(texts).encode()
    else:
        data = "\n".join(json.dumps({"text": t}) for t in texts).encode()
    return data.replace(b"E", b"\xe9").replace(b"T", b"\xe2\x82")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_file_offset_line_and_fix(tmp_path, paragraphs, suffix):
    paragraphs = [p.replace("E", "e").replace("T", "t") for p in paragraphs]
    data = with_bytes(paragraphs, suffix, every=3, marks="E")
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    line = data.count(b"\n", 0, offset) + 1
    with pytest.raises(CorpusError) as error:
        load_corpus(str(path))
    assert str(error.value) == (
        f"corpus file {path} is not valid UTF-8: 0xe9 at byte offset {offset} (line {line}) "
        "cannot be decoded; convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or set "
        "encoding_errors='replace' to read undecodable bytes as U+FFFD")
    with pytest.raises(CorpusError, match=rf"{path.name} is not valid UTF-8"):
        one_batch(path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_replaced_and_counted(tmp_path, paragraphs, suffix):
    paragraphs = [p.replace("E", "e").replace("T", "t") for p in paragraphs]
    data = with_bytes(paragraphs, suffix, every=4, marks="E T")
    path = tmp_path / f"mixed{suffix}"
    path.write_bytes(data)
    expected = 2 * len(range(0, len(paragraphs), 4))  # 0xe2 0x82 is one sequence, one U+FFFD
    assert data.decode("utf-8", "replace").count("\ufffd") == expected
    with pytest.warns(UserWarning, match=rf"replaced {expected} undecodable byte sequence\(s\) "
                                         rf"with U\+FFFD .* in {path} \({expected}\)"):
        corpus = load_corpus(str(path), encoding_errors="replace")
    loaded = all_texts(corpus)
    assert sum(t.count("\ufffd") for t in loaded) == expected
    assert sorted(loaded) == sorted(f"{p} caf\ufffd \ufffd end" if i % 4 == 0 else p
                                    for i, p in enumerate(paragraphs))


def test_encoding_errors_must_be_strict_or_replace(tmp_path):
    with pytest.raises(CorpusError, match="encoding_errors='ignore'"):
        load_corpus(str(tmp_path / "x.txt"), encoding_errors="ignore")


def test_utf8_scan_is_incremental_and_exact_across_chunk_boundaries(tmp_path):
    calls = []

    def counting(error: UnicodeDecodeError) -> tuple[str, int]:
        calls.append(error.start)
        return "\ufffd", error.end

    codecs.register_error("test-count-invalid", counting)
    rng = random.Random(0)
    pieces = ["a", "\n", "é", "€", "𝄞", "\ufffd",  # valid; then (as surrogate escapes) invalid:
              "\udcff", "\udce2\udc82", "\udcf0\udc9f\udc98", "\udced\udca0", "\udcbf"]
    for trial in range(60):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        data = text.encode("utf-8", "surrogateescape")
        (tmp_path / "f.bin").write_bytes(data)
        calls.clear()
        data.decode("utf-8", "test-count-invalid")  # the reference: one call per sequence
        for chunk_size in (1, 2, 3, 5, 64):
            scan = scan_utf8(tmp_path / "f.bin", chunk_size=chunk_size)
            assert scan.invalid == len(calls), (trial, text, chunk_size)
            if calls:
                assert scan.offset == calls[0]
                assert scan.line == data.count(b"\n", 0, calls[0]) + 1
                assert scan_utf8(tmp_path / "f.bin", True, chunk_size).offset == calls[0]


# 4. CRLF line endings.


@pytest.mark.parametrize("sample_by", ["paragraph", "line", "document"])
def test_crlf_cr_and_bom_read_like_lf(tmp_path, paragraphs, sample_by):
    text = "\n\n".join(paragraphs[:30]) + "\n\n\n\n" + "\n\n".join(paragraphs[30:]) + "\n"
    variants = {"lf.txt": text.encode(), "crlf.txt": text.replace("\n", "\r\n").encode(),
                "cr.txt": text.replace("\n", "\r").encode(),
                "bom.txt": b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()}
    loaded = {}
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        spec = [str(tmp_path / name), str(tmp_path / name)] if sample_by == "document" else \
            str(tmp_path / name)  # two documents, to hold one out
        loaded[name] = all_texts(load_corpus(spec, sample_by=sample_by))
    assert all(texts == loaded["lf.txt"] for texts in loaded.values())
    assert not any("\r" in t or "\ufeff" in t for texts in loaded.values() for t in texts)
    if sample_by == "paragraph":
        assert sorted(t.strip() for t in loaded["crlf.txt"]) == sorted(p.strip()
                                                                      for p in paragraphs)


# 5. One document of many megabytes.


def test_a_multi_megabyte_document_is_packed_without_losing_tokens(tmp_path, paragraphs):
    rng = random.Random(1)
    words = " ".join(paragraphs).split()
    big = " ".join(rng.choice(words) for _ in range(780_000))  # one ~5 MB paragraph
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(paragraphs[:20] + [big] + paragraphs[20:40]), encoding="utf-8")
    assert path.stat().st_size > 4_500_000
    start = time.perf_counter()
    chunks = one_batch(path, packing=ChunkPacking())
    tokens = encode_with_word_starts(chunks.tokenizer, [big])[0][0]
    assert len(chunks.samples["train"]) + len(chunks.samples["validation"]) > len(tokens) // 30
    documents = one_batch(path, packing=DocumentPacking())
    assert time.perf_counter() - start < 60

    packed, segments = [], 0
    for split in ("train", "validation"):
        rows = documents.samples[split].with_format("numpy")[:]
        packed += list(rows["input_ids"])
        segments += sum(len(lengths) for lengths in rows["doc_lengths"])
    packed_ids = np.concatenate(packed)
    special = documents.special_tokens
    tok = documents.tokenizer
    reference = np.concatenate([tok.encode(t, add_special_tokens=False).ids
                                for t in paragraphs[:40]] + [tokens])
    assert (packed_ids == special.cls_id).sum() == (packed_ids == special.sep_id).sum() == segments
    body = packed_ids[(packed_ids != special.cls_id) & (packed_ids != special.sep_id)]
    assert len(body) == len(reference)
    assert (np.bincount(body, minlength=tok.get_vocab_size())
            == np.bincount(reference, minlength=tok.get_vocab_size())).all()


@pytest.mark.parametrize("algorithm", ["wordpiece", "bpe", "unigram"])
def test_long_texts_encoded_in_pieces_give_the_tokens_of_the_whole(paragraphs, algorithm):
    tok = train_tokenizer(paragraphs, TokenizerTraining(algorithm, vocab_size=500))
    text = "  ".join(paragraphs[:40]).replace("the ", "the\t \n  Çà ")
    pieces = split_long_text(text, 200)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert all(p.startswith(" ") for p in pieces[1:])
    whole = encode_with_word_starts(tok, [text], piece_size=len(text) + 1)[0]
    cut = encode_with_word_starts(tok, [text, "short one", ""], piece_size=200)
    assert whole[0].tolist() == tok.encode(text, add_special_tokens=False).ids
    assert cut[0][0].tolist() == whole[0].tolist()
    assert cut[0][1].tolist() == whole[1].tolist()
    assert cut[1][0].tolist() == tok.encode("short one", add_special_tokens=False).ids
    assert len(cut[2][0]) == 0


def test_split_long_text_keeps_a_stretch_without_spaces_whole():
    assert split_long_text("x" * 50 + " tail", 10) == ["x" * 50, " tail"]
    assert split_long_text("ab cd ef gh", 4) == ["ab", " cd", " ef", " gh"]
    assert split_long_text("short", 10) == ["short"]


# 6. Columns and JSON Lines.


def test_missing_text_column_names_the_file_and_the_columns(tmp_path):
    rows = [{"body": f"document {i} about the cat", "id": i} for i in range(10)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    pq.write_table(pa.table({"text": ["a b", "c d"]}), tmp_path / "good.parquet")
    with pytest.raises(CorpusError) as error:
        load_corpus(str(tmp_path / "c.jsonl"))
    assert str(error.value) == (f"corpus file {tmp_path / 'c.jsonl'} has no 'text' column "
                                "(columns: ['body', 'id']); set `text_column` to the right one")
    with pytest.raises(CorpusError) as error:  # names the very file that lacks it
        load_corpus([str(tmp_path / "good.parquet"), str(tmp_path / "c.parquet")])
    assert str(error.value) == (f"corpus file {tmp_path / 'c.parquet'} has no 'text' column "
                                "(columns: ['body', 'id']); set `text_column` to the right one")
    for path in (tmp_path / "c.jsonl", tmp_path / "c.parquet"):
        assert len(all_texts(load_corpus(str(path), text_column="body"))) == 10


def test_invalid_json_line_names_file_and_line(tmp_path):
    lines = [json.dumps({"text": f"line {i}"}) for i in range(30)]
    lines[17] = '{"text": "unterminated}'
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:5]))
    (tmp_path / "b.jsonl").write_text("\n\n" + "\n".join(lines))
    with pytest.raises(CorpusError) as error:
        load_corpus(str(tmp_path / "*.jsonl"))
    assert_one_line(error)
    assert str(error.value).startswith(f"corpus file {tmp_path / 'b.jsonl'} line 20 is not "
                                       "valid JSON (Unterminated string")
    lines[17] = "[1, 2]"
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    with pytest.raises(CorpusError, match=r"b\.jsonl line 18 holds a JSON list, not an object"):
        load_corpus(str(tmp_path / "*.jsonl"))


def test_numbers_in_the_text_column_are_an_error_naming_the_line(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": "a b"}\n{"text": null}\n{"text": 12.5}\n')
    with pytest.raises(CorpusError) as error:
        load_corpus(str(tmp_path / "n.jsonl"))
    assert str(error.value).startswith(f"corpus file {tmp_path / 'n.jsonl'} line 3: 'text' "
                                       "holds a number (12.5), not a string; set `text_column`")
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(5)))
    with pytest.raises(CorpusError, match=r"ids\.jsonl line 1: 'text' holds a number \(0\)"):
        load_corpus(str(tmp_path / "ids.jsonl"))
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(CorpusError, match=r"n\.parquet: column 'text' has type int64, not string"):
        load_corpus(str(tmp_path / "n.parquet"))


def test_null_and_missing_texts_are_dropped_and_counted(tmp_path, paragraphs, info_log):
    rows = []
    for i, p in enumerate(paragraphs):
        rows.append({"text": p})
        rows.append({"text": None} if i % 2 else {"other": i})  # null, or no "text" at all
        if i % 5 == 0:
            rows.append({"text": "  "})
    path = tmp_path / "nulls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(UserWarning, match=rf"dropped {len(paragraphs)} document\(s\) of "
                                         rf"{len(rows)} without a 'text' value \(null or missing\)"
                                         rf" from corpus file {path}"):
        corpus = load_corpus(str(path))
    assert sorted(all_texts(corpus)) == sorted(paragraphs)
    assert f"dropped {len(range(0, len(paragraphs), 5))} empty" in info_log.text
    pq.write_table(pa.Table.from_pylist([{"text": r.get("text")} for r in rows]),
                   tmp_path / "nulls.parquet")
    with pytest.warns(UserWarning, match=r"nulls\.parquet"):
        assert sorted(all_texts(load_corpus(str(tmp_path / "nulls.parquet")))) == \
            sorted(paragraphs)
    with pytest.warns(UserWarning, match="without a 'text' value"):
        one_batch(path)


def test_a_corrupt_parquet_file_is_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match=r"bad\.parquet is not a Parquet file") as error:
        load_corpus(str(tmp_path / "bad.parquet"))
    assert_one_line(error)


# 7. Globs.


def test_globs_of_mixed_kinds_or_no_file_are_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\nthree four\n")
    (tmp_path / "b.jsonl").write_text('{"text": "five six"}\n{"text": "seven"}\n')
    with pytest.raises(CorpusError, match=r"cannot read .*a\.txt together with the others"):
        load_corpus(str(tmp_path / "*"))
    with pytest.raises(CorpusError, match=r"\*\.parquet' matches no file"):
        load_corpus(str(tmp_path / "*.parquet"))
    assert len(all_texts(load_corpus(str(tmp_path / "*.txt")))) == 2
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(CorpusError, match=r"cannot read corpus file .*folder\.txt: Is a direct"):
        load_corpus(str(tmp_path / "*.txt"))
