"""Token masking: the BERT ratios, specials never selected, labels exact, randomness per sample."""

from __future__ import annotations

import pytest
import torch

from fillmask.masking.base import IGNORE_INDEX, VocabInfo
from fillmask.masking.random import SampleRandom
from fillmask.masking.token import TokenMasking

VOCAB = VocabInfo(vocab_size=1000, mask_id=4, pad_id=0, special_ids=(0, 1, 2, 3, 4))


def corpus_batch(rows: int = 1024, length: int = 128, padded: bool = True) -> torch.Tensor:
    """Rows of ordinary ids framed by CLS/SEP, with right padding of varying length."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB.vocab_size, (rows, length), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3
    if padded:
        for row in range(0, rows, 3):
            cut = 40 + row % 80
            ids[row, cut] = 3
            ids[row, cut + 1 :] = 0
    return ids


@pytest.mark.parametrize("rate,mask_fraction,random_fraction", [(0.15, 0.8, 0.1), (0.3, 0.9, 0.05)])
def test_selection_rate_and_split_within_one_percent(rate, mask_fraction, random_fraction):
    ids = corpus_batch()
    masking = TokenMasking(rate, mask_fraction, random_fraction)
    out = masking(ids, SampleRandom(7, 0, torch.arange(len(ids))), VOCAB)
    ordinary = ~VOCAB.special_mask(ids)
    selected = out.labels != IGNORE_INDEX
    assert ordinary.sum() > 100_000
    assert abs(selected.sum() / ordinary.sum() - rate) < 0.01
    n = selected.sum()
    as_mask = (out.input_ids == VOCAB.mask_id) & selected
    kept = (out.input_ids == ids) & selected
    random = selected & ~as_mask & ~kept
    assert abs(as_mask.sum() / n - mask_fraction) < 0.01
    # A random draw can land on the original token; such tokens count as kept.
    assert abs(random.sum() / n - random_fraction) < 0.01
    assert abs(kept.sum() / n - (1 - mask_fraction - random_fraction)) < 0.01


def test_specials_and_padding_never_selected_and_labels_exact():
    ids = corpus_batch()
    out = TokenMasking()(ids, SampleRandom(1, 0, torch.arange(len(ids))), VOCAB)
    special = VOCAB.special_mask(ids)
    selected = out.labels != IGNORE_INDEX
    assert not (selected & special).any()
    assert torch.equal(out.input_ids[special], ids[special])
    assert torch.equal(out.labels[selected], ids[selected])
    # Outside the selection nothing changes and labels are -100.
    assert torch.equal(out.input_ids[~selected], ids[~selected])
    assert (out.labels[~selected] == IGNORE_INDEX).all()


def test_random_replacements_are_ordinary_tokens():
    ids = corpus_batch()
    out = TokenMasking(rate=0.5, mask_fraction=0.0, random_fraction=1.0)(
        ids, SampleRandom(3, 0, torch.arange(len(ids))), VOCAB
    )
    replaced = out.input_ids[out.labels != IGNORE_INDEX]
    assert not VOCAB.special_mask(replaced).any()
    assert replaced.unique().numel() > 900  # drawn across the vocabulary


def test_mask_depends_on_seed_epoch_and_sample_only():
    ids = corpus_batch(rows=16, padded=False)
    masking = TokenMasking()
    whole = masking(ids, SampleRandom(5, 2, torch.arange(16)), VOCAB)
    # The same samples in another order and in other batches get the same masks.
    order = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    shuffled = masking(ids[order], SampleRandom(5, 2, order), VOCAB)
    assert torch.equal(shuffled.labels, whole.labels[order])
    single = masking(ids[3:4], SampleRandom(5, 2, torch.tensor([3])), VOCAB)
    assert torch.equal(single.input_ids[0], whole.input_ids[3])
    # Another epoch or seed masks differently.
    for seed, epoch in ((5, 3), (6, 2)):
        other = masking(ids, SampleRandom(seed, epoch, torch.arange(16)), VOCAB)
        assert not torch.equal(other.labels, whole.labels)


def test_eval_rate_applies_outside_training():
    ids = corpus_batch()
    masking = TokenMasking(rate=0.3, eval_rate=0.15)
    rng = SampleRandom(0, 0, torch.arange(len(ids)))
    ordinary = (~VOCAB.special_mask(ids)).sum()
    train = (masking(ids, rng, VOCAB, train=True).labels != IGNORE_INDEX).sum() / ordinary
    evaluation = (masking(ids, rng, VOCAB, train=False).labels != IGNORE_INDEX).sum() / ordinary
    assert abs(train - 0.3) < 0.01 and abs(evaluation - 0.15) < 0.01


def test_uniform_draws_are_uniform():
    u = SampleRandom(0, 0, torch.arange(256)).uniform(512, stream=0).flatten()
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (counts - 0.1).abs().max() < 0.005
    assert 0 <= u.min() and u.max() < 1


@pytest.mark.parametrize("kwargs", [dict(rate=1.5), dict(mask_fraction=0.9, random_fraction=0.2)])
def test_bad_settings_are_rejected_with_the_option_name(kwargs):
    with pytest.raises(ValueError, match="TokenMasking"):
        TokenMasking(**kwargs)
