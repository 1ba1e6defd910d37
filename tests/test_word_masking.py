"""Whole-word and span masking on real tokenizers of the three families (WordPiece, byte-level
BPE, Unigram), trained here on the embedded corpus: selection rates, whole words, span lengths,
boundaries, and per-word / per-span corruption decisions."""

from __future__ import annotations

import numpy as np
import pytest

from fillmask.data.collate import word_ids_from_starts
from fillmask.data.embedded import python_docs_documents
from fillmask.data.packing import ChunkPacking
from fillmask.data.tokenize import TokenizerTraining, resolve_special_tokens, train_tokenizer
from fillmask.masking.base import IGNORE_INDEX
from fillmask.masking.random import SampleRandom
from fillmask.masking.span import SpanMasking, span_length_distribution
from fillmask.masking.whole_word import WholeWordMasking

FAMILIES = ["wordpiece", "bpe", "unigram"]


@pytest.fixture(scope="module", params=FAMILIES)
def blocks(request):
    """(ids, word ids, vocab, tokenizer) of >= 100k tokens packed in 128-token blocks."""
    texts = [d.text for d in python_docs_documents()[:260]]
    tok = train_tokenizer(texts, TokenizerTraining(request.param, vocab_size=2000))
    special = resolve_special_tokens(tok)
    packed = ChunkPacking().pack(texts, list(range(len(texts))), tok, special, 128, seed=0)
    ids = np.stack(packed["input_ids"]).astype(np.int64)
    vocab = special.vocab_info(tok.get_vocab_size())
    words = word_ids_from_starts(np.stack(packed["word_starts"]), ~vocab.special_mask(ids))
    return ids, words, vocab, tok


def words_are_whole(selected: np.ndarray, words: np.ndarray) -> bool:
    """Every word is either wholly selected or not at all."""
    rows = np.broadcast_to(np.arange(len(words))[:, None], words.shape)
    keys = (rows * words.shape[1] + words)[words >= 0]
    picked = selected[words >= 0].astype(np.int64)
    pieces = np.bincount(keys, minlength=words.size)
    hits = np.bincount(keys, weights=picked, minlength=words.size)
    return bool(((hits == 0) | (hits == pieces)).all())


def test_words_come_from_the_tokenizer_not_from_a_prefix(blocks):
    ids, words, vocab, tok = blocks
    ordinary = words >= 0
    assert ordinary.sum() > 100_000
    pieces_per_word = ordinary.sum() / (words.max(axis=1) + 1).sum()
    assert 1.05 < pieces_per_word < 3  # multi-piece words exist, most words are short
    # A word never spans a special token, and word ids count up from 0 in each row.
    assert (words[:, 0] == -1).all()
    assert (np.where(ordinary, words, 10**6).min(axis=1) == 0).all()
    steps = np.diff(np.where(ordinary, words, 0), axis=1)[ordinary[:, 1:] & ordinary[:, :-1]]
    assert set(np.unique(steps)) <= {0, 1}


@pytest.mark.parametrize("rate", [0.15, 0.3])
def test_whole_word_masking_rate_split_and_whole_words(blocks, rate):
    ids, words, vocab, _ = blocks
    out = WholeWordMasking(rate=rate)(ids, SampleRandom(0, 0, np.arange(len(ids))), vocab,
                                      word_ids=words)
    selected = out.labels != IGNORE_INDEX
    assert abs(selected.sum() / (words >= 0).sum() - rate) < 0.01
    assert words_are_whole(selected, words)
    first = selected & np.concatenate([np.ones((len(ids), 1), bool),
                                       words[:, 1:] != words[:, :-1]], axis=1)
    as_mask = out.input_ids[first] == vocab.mask_id
    kept = out.input_ids[first] == ids[first]
    assert abs(as_mask.mean() - 0.8) < 0.01 and abs(kept.mean() - 0.1) < 0.01
    # All pieces of a word share the decision: a word is all-[MASK] or has no [MASK].
    is_mask = out.input_ids == vocab.mask_id
    assert words_are_whole(is_mask & selected, np.where(selected, words, -1))


def span_table(out, words: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, first token, end token) of every masked span."""
    selected = out.labels != IGNORE_INDEX
    rows, cols = np.nonzero(selected)
    left, right = out.extras["span_left"][rows, cols], out.extras["span_right"][rows, cols]
    return sorted({(int(r), int(a) + 1, int(b)) for r, a, b in zip(rows, left, right,
                                                                   strict=True)})


def span_lengths(out, words: np.ndarray) -> np.ndarray:
    """Length in words of every masked span."""
    return np.array([len(np.unique(words[r, s:e])) for r, s, e in span_table(out, words)])


def test_span_masking_budget_lengths_and_boundaries(blocks):
    ids, words, vocab, _ = blocks
    masking = SpanMasking()
    out = masking(ids, SampleRandom(1, 0, np.arange(len(ids))), vocab, word_ids=words)
    selected = out.labels != IGNORE_INDEX
    ordinary = words >= 0
    assert abs(selected.sum() / ordinary.sum() - 0.15) < 0.01
    assert words_are_whole(selected, words)
    spans = span_table(out, words)
    lengths = np.concatenate([span_lengths(masking(ids, SampleRandom(1, epoch, np.arange(len(ids))),
                                                   vocab, word_ids=words), words)
                              for epoch in range(1, 8)] + [span_lengths(out, words)])
    expected = span_length_distribution(0.2, 1, 10)
    observed = np.bincount(lengths, minlength=11)[1:] / len(lengths)
    assert len(lengths) > 30_000
    assert np.abs(observed - expected).max() < 0.01
    assert abs(lengths.mean() - 3.8) < 0.1 and abs(expected @ np.arange(1, 11) - 3.8) < 0.01
    for r, s, e in spans[:500]:
        assert selected[r, s:e].all()  # a span is contiguous and wholly masked
        assert not selected[r, s - 1] or out.extras["span_right"][r, s - 1] != e
        decisions = out.input_ids[r, s:e] == vocab.mask_id
        assert decisions.all() or not decisions.any()  # one decision per span
    # The budget is met without overshooting by more than the last span.
    budget = np.rint(0.15 * ordinary.sum(axis=1))
    by_row: dict[int, list[int]] = {}
    for r, s, e in spans:
        by_row.setdefault(r, []).append(e - s)
    over = [sum(v) - budget[r] for r, v in by_row.items()]
    assert all(o < max(by_row[r]) for o, r in zip(over, by_row, strict=True))


def test_span_decisions_split_80_10_10(blocks):
    ids, words, vocab, _ = blocks
    shown, original = [], []
    for epoch in range(4):  # pooled, for enough spans (> 30k)
        out = SpanMasking(rate=0.3)(ids, SampleRandom(2, epoch, np.arange(len(ids))), vocab,
                                   word_ids=words)
        firsts = np.array([[r, s] for r, s, _ in span_table(out, words)])
        shown.append(out.input_ids[firsts[:, 0], firsts[:, 1]])
        original.append(ids[firsts[:, 0], firsts[:, 1]])
    shown, original = np.concatenate(shown), np.concatenate(original)
    assert len(shown) > 30_000
    assert abs((shown == vocab.mask_id).mean() - 0.8) < 0.01
    assert abs((shown == original).mean() - 0.1) < 0.01


@pytest.mark.parametrize("scheme", [WholeWordMasking(), SpanMasking()])
def test_word_schemes_are_pure_functions_of_seed_epoch_and_sample(blocks, scheme):
    ids, words, vocab, _ = blocks
    whole = scheme(ids[:64], SampleRandom(3, 1, np.arange(64)), vocab, word_ids=words[:64])
    order = np.random.default_rng(0).permutation(64)
    part = scheme(ids[order], SampleRandom(3, 1, order), vocab, word_ids=words[order])
    assert np.array_equal(part.labels, whole.labels[order])
    assert np.array_equal(part.input_ids, whole.input_ids[order])
    other = scheme(ids[:64], SampleRandom(3, 2, np.arange(64)), vocab, word_ids=words[:64])
    assert not np.array_equal(other.labels, whole.labels)
