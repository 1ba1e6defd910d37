"""Token masking, the BERT recipe: select a fraction of tokens, then [MASK] / random / keep."""

from __future__ import annotations

import torch

from fillmask.masking.base import IGNORE_INDEX, MaskedTokens, Masking, VocabInfo
from fillmask.masking.random import SampleRandom

SELECT, DECIDE, REPLACE = 0, 1, 2  # random streams


class TokenMasking(Masking):
    """Select each ordinary token with probability ``rate``; corrupt the selected ones."""

    def __init__(
        self,
        rate: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        eval_rate: float | None = None,
    ) -> None:
        """Configure the scheme.

        Args:
            rate: Fraction of ordinary (non-special, non-padding) tokens selected for prediction.
            mask_fraction: Of the selected tokens, the fraction replaced by the mask token.
            random_fraction: Of the selected tokens, the fraction replaced by a random ordinary
                token; the rest keep their original token.
            eval_rate: Selection rate during validation and testing (defaults to ``rate``).
        """
        for name, value in (("rate", rate), ("mask_fraction", mask_fraction),
                            ("random_fraction", random_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TokenMasking {name}={value} must lie in [0, 1]")
        if mask_fraction + random_fraction > 1.0:
            raise ValueError(
                f"TokenMasking mask_fraction + random_fraction = {mask_fraction + random_fraction}"
                " exceeds 1; lower one of them"
            )
        self.rate = rate
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.eval_rate = rate if eval_rate is None else eval_rate

    def __call__(
        self, input_ids: torch.Tensor, rng: SampleRandom, vocab: VocabInfo, train: bool = True
    ) -> MaskedTokens:
        T = input_ids.shape[1]
        rate = self.rate if train else self.eval_rate
        selected = (rng.uniform(T, SELECT) < rate) & ~vocab.special_mask(input_ids)  # (B, T)
        decide = rng.uniform(T, DECIDE)
        to_mask = selected & (decide < self.mask_fraction)
        to_random = selected & (decide >= self.mask_fraction)
        to_random &= decide < self.mask_fraction + self.random_fraction
        pool = vocab.ordinary_ids
        random_ids = pool[rng.integers(T, REPLACE, len(pool))].to(input_ids.dtype)
        corrupted = torch.where(to_mask, torch.full_like(input_ids, vocab.mask_id), input_ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return MaskedTokens(corrupted, labels)
