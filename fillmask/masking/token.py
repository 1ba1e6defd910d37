"""Token masking, the BERT recipe: select a fraction of tokens, then [MASK] / random / keep."""

from __future__ import annotations

from typing import Literal

import numpy as np

from fillmask.masking.base import MaskedTokens, Masking, VocabInfo
from fillmask.masking.random import SampleRandom

SELECT, DECIDE, REPLACE = 0, 1, 2  # random streams

Selection = Literal["uniform", "smoothed"]
Replacement = Literal["uniform", "unigram"]


class TokenMasking(Masking):
    """Select ordinary tokens at ``rate``; corrupt the selected ones 80/10/10 (configurable)."""

    def __init__(
        self,
        rate: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        eval_rate: float | None = None,
        selection: Selection = "uniform",
        smoothing: float = 0.7,
        replacement: Replacement = "uniform",
    ) -> None:
        """Configure the scheme.

        Args:
            rate: Fraction of ordinary (non-special, non-padding) tokens selected for prediction.
            mask_fraction: Of the selected tokens, the fraction replaced by the mask token.
            random_fraction: Of the selected tokens, the fraction replaced by a random ordinary
                token; the rest keep their original token.
            eval_rate: Selection rate during validation and testing (defaults to ``rate``);
                MosaicBERT and ModernBERT train at 0.3 and evaluate at 0.15.
            selection: ``uniform`` selects each token independently with probability ``rate``
                (BERT). ``smoothed`` selects exactly ``rate`` of each row's tokens, favouring
                rare ones: weight ``count ** -smoothing`` (DistilBERT, smoothing 0.7).
            smoothing: Exponent of frequency-smoothed selection.
            replacement: Where random replacements come from: ``uniform`` over the ordinary
                vocabulary, or ``unigram`` (the training corpus's token frequencies).
        """
        self._configure(rate, eval_rate, mask_fraction, random_fraction, replacement)
        if selection not in ("uniform", "smoothed"):
            raise ValueError(f"TokenMasking selection={selection!r}: choose uniform or smoothed")
        self.selection = selection
        self.smoothing = smoothing
        self.needs_counts |= selection == "smoothed"

    def __call__(
        self,
        input_ids: np.ndarray,
        rng: SampleRandom,
        vocab: VocabInfo,
        train: bool = True,
        word_ids: np.ndarray | None = None,
    ) -> MaskedTokens:
        T = input_ids.shape[1]
        rate = self.rate_for(train)
        ordinary = ~vocab.special_mask(input_ids)  # (B, T)
        if self.selection == "uniform":
            selected = (rng.uniform(T, SELECT) < rate) & ordinary
        else:
            selected = self._smoothed(input_ids, ordinary, rng, vocab, rate)
        return self.corruption.apply(input_ids, selected, rng.uniform(T, DECIDE), rng, REPLACE,
                                     vocab)

    def _smoothed(self, input_ids: np.ndarray, ordinary: np.ndarray, rng: SampleRandom,
                  vocab: VocabInfo, rate: float) -> np.ndarray:
        """Exactly round(rate x ordinary tokens) per row, drawn without replacement with
        weights count**-smoothing (Efraimidis-Spirakis keys log(u) / weight)."""
        weights = np.maximum(vocab.require_counts("smoothed selection"), 1.0) ** -self.smoothing
        keys = np.log(rng.uniform64(input_ids.shape[1], SELECT)) / weights[input_ids]  # (B, T)
        keys[~ordinary] = -np.inf
        budget = np.rint(rate * ordinary.sum(axis=1))  # (B,)
        ranks = np.argsort(np.argsort(-keys, axis=1, kind="stable"), axis=1)
        return (ranks < budget[:, None]) & ordinary
