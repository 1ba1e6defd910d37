"""What every masking scheme receives and returns.

A scheme is a pure function of (token ids, word ids, randomness, vocabulary): it holds no state
and draws every random number from the :class:`SampleRandom` it is given, so a sample's mask
depends only on (seed, epoch, sample id). Arrays are numpy; the collator turns them into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from fillmask.masking.random import SampleRandom

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VocabInfo:
    """The token ids a masking scheme needs, resolved once from the tokenizer.

    ``counts`` (token frequencies in the training split) is filled in only for schemes that ask
    for it (``Masking.needs_counts``): frequency-smoothed selection and unigram replacements.
    """

    vocab_size: int
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]
    counts: np.ndarray | None = field(default=None, compare=False, repr=False)

    @cached_property
    def is_special(self) -> np.ndarray:
        """Lookup table: True at special ids (padding included), shape (vocab_size,)."""
        table = np.zeros(self.vocab_size, dtype=bool)
        table[list(set(self.special_ids) | {self.pad_id})] = True
        return table

    def special_mask(self, input_ids: np.ndarray) -> np.ndarray:
        """True where ``input_ids`` holds a special token (padding included)."""
        return self.is_special[input_ids]

    @cached_property
    def ordinary_ids(self) -> np.ndarray:
        """Every id that is not special: the pool uniform random replacements come from."""
        return np.flatnonzero(~self.is_special)

    @cached_property
    def unigram_cdf(self) -> np.ndarray:
        """Cumulative unigram distribution over ordinary tokens (specials get zero mass)."""
        counts = self.require_counts("unigram replacement").astype(np.float64).copy()
        counts[self.is_special[: len(counts)]] = 0.0
        if counts.sum() <= 0:
            raise ValueError("unigram replacement needs a corpus with at least one ordinary token")
        cdf = np.cumsum(counts) / counts.sum()
        cdf[-1] = 1.0
        return cdf

    def require_counts(self, scheme: str) -> np.ndarray:
        if self.counts is None:
            raise ValueError(f"{scheme} needs token counts; the data module computes them when "
                             "the masking scheme sets needs_counts")
        return self.counts


@dataclass
class MaskedTokens:
    """The result of masking: corrupted ids, labels (-100 where nothing was selected), extras.

    ``extras`` holds scheme-specific per-token arrays the objectives use, e.g. span masking's
    ``span_left``/``span_right`` (positions just outside each masked span, -1 elsewhere).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def check_rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must lie in [0, 1]")
    return value


class Masking:
    """Base class of masking schemes: a pure function of (ids, word ids, randomness, vocabulary).

    Subclasses set ``needs_word_ids`` when they select whole words (the collator then passes
    ``word_ids``: one id per word, counted from 0 in each row, -1 at special tokens and padding)
    and ``needs_counts`` when they use corpus token frequencies.
    """

    needs_word_ids: bool = False
    needs_counts: bool = False
    rate: float
    eval_rate: float
    corruption: Corruption

    def _configure(self, rate: float, eval_rate: float | None, mask_fraction: float,
                   random_fraction: float, replacement: str) -> None:
        """The options every scheme shares: selection rates and the corruption split."""
        name = type(self).__name__
        self.rate = check_rate(f"{name} rate", rate)
        self.eval_rate = check_rate(f"{name} eval_rate", rate if eval_rate is None else eval_rate)
        self.corruption = Corruption(name, mask_fraction, random_fraction, replacement)
        self.needs_counts = replacement == "unigram"

    def rate_for(self, train: bool) -> float:
        return self.rate if train else self.eval_rate

    def __call__(
        self,
        input_ids: np.ndarray,
        rng: SampleRandom,
        vocab: VocabInfo,
        train: bool = True,
        word_ids: np.ndarray | None = None,
    ) -> MaskedTokens:
        raise NotImplementedError


class Corruption:
    """BERT's corruption of selected tokens: [MASK] / a random token / unchanged.

    ``mask_fraction`` and ``random_fraction`` split the selected tokens; the rest keep their
    original id. ``replacement`` draws random tokens uniformly from the ordinary vocabulary
    (``uniform``) or from the training corpus's unigram distribution (``unigram``).
    """

    def __init__(self, scheme: str, mask_fraction: float, random_fraction: float,
                 replacement: str) -> None:
        for name, value in (("mask_fraction", mask_fraction), ("random_fraction", random_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{scheme} {name}={value} must lie in [0, 1]")
        if mask_fraction + random_fraction > 1.0 + 1e-9:
            raise ValueError(f"{scheme} mask_fraction + random_fraction = "
                             f"{mask_fraction + random_fraction} exceeds 1; lower one of them")
        if replacement not in ("uniform", "unigram"):
            raise ValueError(f"{scheme} replacement={replacement!r}: choose 'uniform' or 'unigram'")
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.replacement = replacement

    def apply(
        self,
        input_ids: np.ndarray,
        selected: np.ndarray,
        decide: np.ndarray,
        rng: SampleRandom,
        stream: int,
        vocab: VocabInfo,
    ) -> MaskedTokens:
        """Corrupt ``selected`` positions; ``decide`` (uniform, same shape) picks each one's fate.

        Schemes that corrupt whole words or spans pass one ``decide`` value per word or span,
        spread over its tokens, so all its pieces share the decision.
        """
        to_mask = selected & (decide < self.mask_fraction)
        to_random = selected & ~to_mask & (decide < self.mask_fraction + self.random_fraction)
        corrupted = np.where(to_mask, vocab.mask_id, input_ids)
        if to_random.any():
            rows, cols = np.nonzero(to_random)
            draws = rng.uniform64(input_ids.shape[1], stream)[rows, cols]
            corrupted[rows, cols] = self._random_ids(draws, vocab)
        labels = np.where(selected, input_ids, IGNORE_INDEX)
        return MaskedTokens(corrupted, labels)

    def _random_ids(self, draws: np.ndarray, vocab: VocabInfo) -> np.ndarray:
        if self.replacement == "uniform":
            pool = vocab.ordinary_ids
            return pool[np.minimum((draws * len(pool)).astype(np.int64), len(pool) - 1)]
        return np.searchsorted(vocab.unigram_cdf, draws, side="right")

