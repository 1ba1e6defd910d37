"""Token masking: the BERT ratios, specials never selected, labels exact, randomness per sample,
frequency-smoothed selection and unigram replacements."""

from __future__ import annotations

import numpy as np
import pytest

from fillmask.masking.base import IGNORE_INDEX, VocabInfo
from fillmask.masking.random import SampleRandom
from fillmask.masking.span import SpanMasking
from fillmask.masking.token import TokenMasking
from fillmask.masking.whole_word import WholeWordMasking

VOCAB = VocabInfo(vocab_size=1000, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4))


def corpus_batch(rows: int = 1024, length: int = 128, padded: bool = True) -> np.ndarray:
    """Rows of ordinary ids framed by CLS/SEP, with right padding of varying length."""
    ids = np.random.default_rng(0).integers(5, VOCAB.vocab_size, (rows, length))
    ids[:, 0], ids[:, -1] = 2, 3
    if padded:
        for row in range(0, rows, 3):
            cut = 40 + row % 80
            ids[row, cut] = 3
            ids[row, cut + 1:] = 0
    return ids


def rng_for(rows: int, seed: int = 0, epoch: int = 0) -> SampleRandom:
    return SampleRandom(seed, epoch, np.arange(rows))


def split_of(ids: np.ndarray, out) -> tuple[float, float, float]:
    selected = out.labels != IGNORE_INDEX
    n = selected.sum()
    as_mask = (out.input_ids == VOCAB.mask_id) & selected
    kept = (out.input_ids == ids) & selected
    random = selected & ~as_mask & ~kept  # a random draw equal to the original counts as kept
    return as_mask.sum() / n, random.sum() / n, kept.sum() / n


@pytest.mark.parametrize("rate,mask_fraction,random_fraction", [(0.15, 0.8, 0.1), (0.3, 0.9, 0.05)])
def test_selection_rate_and_split_within_one_percent(rate, mask_fraction, random_fraction):
    ids = corpus_batch()
    out = TokenMasking(rate, mask_fraction, random_fraction)(ids, rng_for(len(ids), 7), VOCAB)
    ordinary = ~VOCAB.special_mask(ids)
    selected = out.labels != IGNORE_INDEX
    assert ordinary.sum() > 100_000
    assert abs(selected.sum() / ordinary.sum() - rate) < 0.01
    as_mask, random, kept = split_of(ids, out)
    assert abs(as_mask - mask_fraction) < 0.01
    assert abs(random - random_fraction) < 0.01
    assert abs(kept - (1 - mask_fraction - random_fraction)) < 0.01


def test_specials_and_padding_never_selected_and_labels_exact():
    ids = corpus_batch()
    out = TokenMasking()(ids, rng_for(len(ids), 1), VOCAB)
    special = VOCAB.special_mask(ids)
    selected = out.labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert np.array_equal(out.input_ids[special], ids[special])
    assert np.array_equal(out.labels[selected], ids[selected])
    assert np.array_equal(out.input_ids[~selected], ids[~selected])
    assert (out.labels[~selected] == IGNORE_INDEX).all()


def test_random_replacements_are_ordinary_tokens():
    ids = corpus_batch()
    out = TokenMasking(rate=0.5, mask_fraction=0.0, random_fraction=1.0)(
        ids, rng_for(len(ids), 3), VOCAB)
    replaced = out.input_ids[out.labels != IGNORE_INDEX]
    assert not VOCAB.special_mask(replaced).any()
    assert len(np.unique(replaced)) > 900  # drawn across the vocabulary


@pytest.mark.parametrize("masking", [TokenMasking(), TokenMasking(selection="smoothed")])
def test_mask_depends_on_seed_epoch_and_sample_only(masking):
    ids = corpus_batch(rows=16, padded=False)
    vocab = with_zipf_counts()
    whole = masking(ids, SampleRandom(5, 2, np.arange(16)), vocab)
    order = np.random.default_rng(1).permutation(16)
    shuffled = masking(ids[order], SampleRandom(5, 2, order), vocab)
    assert np.array_equal(shuffled.labels, whole.labels[order])
    single = masking(ids[3:4], SampleRandom(5, 2, [3]), vocab)
    assert np.array_equal(single.input_ids[0], whole.input_ids[3])
    for seed, epoch in ((5, 3), (6, 2)):
        other = masking(ids, SampleRandom(seed, epoch, np.arange(16)), vocab)
        assert not np.array_equal(other.labels, whole.labels)


def test_eval_rate_applies_outside_training():
    ids = corpus_batch()
    masking = TokenMasking(rate=0.3, eval_rate=0.15)
    rng = rng_for(len(ids))
    ordinary = (~VOCAB.special_mask(ids)).sum()
    train = (masking(ids, rng, VOCAB, train=True).labels != IGNORE_INDEX).sum() / ordinary
    evaluation = (masking(ids, rng, VOCAB, train=False).labels != IGNORE_INDEX).sum() / ordinary
    assert abs(train - 0.3) < 0.01 and abs(evaluation - 0.15) < 0.01


def test_uniform_draws_are_uniform_and_streams_independent():
    rng = rng_for(256)
    u = rng.uniform(512, stream=0).ravel()
    counts = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(counts - 0.1).max() < 0.005
    assert 0 <= u.min() and u.max() < 1
    other = rng.uniform(512, stream=1).ravel()
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01
    k = rng.integers(512, stream=2, high=7).ravel()
    assert set(np.unique(k)) == set(range(7))


def with_zipf_counts() -> VocabInfo:
    """VOCAB with Zipf-like corpus counts: id 5 most frequent, then falling as 1 / rank."""
    counts = np.zeros(VOCAB.vocab_size)
    counts[5:] = 1e6 / np.arange(1, VOCAB.vocab_size - 4)
    return VocabInfo(VOCAB.vocab_size, VOCAB.mask_id, VOCAB.pad_id, VOCAB.special_ids, counts)


def zipf_batch(rows: int = 1024, length: int = 128) -> np.ndarray:
    vocab = with_zipf_counts()
    p = vocab.counts / vocab.counts.sum()
    ids = np.random.default_rng(2).choice(vocab.vocab_size, size=(rows, length), p=p)
    ids[:, 0], ids[:, -1] = 2, 3
    return ids


def test_smoothed_selection_takes_exactly_the_rate_and_favours_rare_tokens():
    vocab = with_zipf_counts()
    ids = zipf_batch()
    out = TokenMasking(selection="smoothed")(ids, rng_for(len(ids), 4), vocab)
    selected = out.labels != IGNORE_INDEX
    ordinary = ~vocab.special_mask(ids)
    assert ordinary.sum() > 100_000
    per_row = selected.sum(axis=1) / ordinary.sum(axis=1)
    assert np.abs(per_row - 0.15).max() < 0.01  # exactly round(15%) in every row
    as_mask, random, kept = split_of(ids, out)
    assert abs(as_mask - 0.8) < 0.01 and abs(random - 0.1) < 0.01 and abs(kept - 0.1) < 0.01
    # Selection probability falls with frequency: the most frequent ids are picked far less
    # often than 15%, the rare ones more.
    frequent = np.isin(ids, [5, 6]) & ordinary
    rare = (ids > 300) & ordinary
    assert selected[frequent].mean() < 0.05 < 0.15 < selected[rare].mean()
    uniform = TokenMasking()(ids, rng_for(len(ids), 4), vocab).labels != IGNORE_INDEX
    assert abs(uniform[frequent].mean() - 0.15) < 0.02  # the default ignores frequency


def test_unigram_replacements_follow_corpus_frequencies():
    vocab = with_zipf_counts()
    ids = corpus_batch()
    out = TokenMasking(rate=0.5, mask_fraction=0.0, random_fraction=1.0,
                       replacement="unigram")(ids, rng_for(len(ids), 9), vocab)
    replaced = out.input_ids[out.labels != IGNORE_INDEX]
    assert not vocab.special_mask(replaced).any()
    p = vocab.counts / vocab.counts.sum()
    for token in (5, 6, 50):
        assert abs((replaced == token).mean() - p[token]) < 0.01


def test_schemes_that_need_counts_say_so():
    assert TokenMasking(selection="smoothed").needs_counts
    assert TokenMasking(replacement="unigram").needs_counts
    assert not TokenMasking().needs_counts
    with pytest.raises(ValueError, match="needs token counts"):
        TokenMasking(selection="smoothed")(corpus_batch(4), rng_for(4), VOCAB)


@pytest.mark.parametrize("scheme", [TokenMasking, WholeWordMasking, SpanMasking])
@pytest.mark.parametrize("kwargs", [dict(rate=1.5), dict(mask_fraction=0.9, random_fraction=0.2),
                                    dict(replacement="zipf")])
def test_bad_settings_are_rejected_with_the_scheme_and_option_name(scheme, kwargs):
    with pytest.raises(ValueError, match=scheme.__name__):
        scheme(**kwargs)
