"""Whole-word masking: select words, not pieces, for any tokenizer.

Words come from the word ids the tokenizer's pre-tokenizer assigns (kept through packing), so
WordPiece, byte-level BPE and Unigram tokenizers all work, with no "##" convention assumed.
Each word is selected with probability ``rate`` (so ``rate`` of the tokens are selected in
expectation) and all its pieces share one [MASK] / random / keep decision.
"""

from __future__ import annotations

import numpy as np

from fillmask.masking.base import MaskedTokens, Masking, VocabInfo
from fillmask.masking.random import SampleRandom
from fillmask.masking.token import DECIDE, REPLACE, SELECT, Replacement


def gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[b, index[b, j]]`` for every row b: take_along_axis, as one flat ``take``
    (a third of its cost on batch-sized arrays)."""
    rows = np.arange(len(values))[:, None] * values.shape[1]
    return np.take(values, index + rows)


def per_word(values: np.ndarray, word_ids: np.ndarray) -> np.ndarray:
    """Spread one value per word (row-local word id w reads ``values[:, w]``) over its tokens."""
    return gather(values, np.maximum(word_ids, 0))


class WholeWordMasking(Masking):
    """Select whole words at ``rate``; one corruption decision per word."""

    needs_word_ids = True

    def __init__(
        self,
        rate: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        eval_rate: float | None = None,
        replacement: Replacement = "uniform",
    ) -> None:
        """Configure the scheme.

        Args:
            rate: Probability that a word is selected (the expected fraction of tokens too).
            mask_fraction: Of the selected words, the fraction whose pieces all become the mask
                token.
            random_fraction: Of the selected words, the fraction whose pieces are replaced by
                random ordinary tokens; the rest keep their original pieces.
            eval_rate: Selection rate during validation and testing (defaults to ``rate``).
            replacement: ``uniform`` over the ordinary vocabulary or the corpus ``unigram``.
        """
        self._configure(rate, eval_rate, mask_fraction, random_fraction, replacement)

    def __call__(
        self,
        input_ids: np.ndarray,
        rng: SampleRandom,
        vocab: VocabInfo,
        train: bool = True,
        word_ids: np.ndarray | None = None,
    ) -> MaskedTokens:
        if word_ids is None:
            raise ValueError("WholeWordMasking needs word ids; the data module provides them")
        T = input_ids.shape[1]
        in_word = word_ids >= 0  # (B, T): -1 at special tokens and padding
        selected = (per_word(rng.uniform(T, SELECT), word_ids) < self.rate_for(train)) & in_word
        decide = per_word(rng.uniform(T, DECIDE), word_ids)
        return self.corruption.apply(input_ids, selected, decide, rng, REPLACE, vocab)
