"""What every masking scheme receives and returns."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from fillmask.masking.random import SampleRandom

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VocabInfo:
    """The token ids a masking scheme needs, resolved once from the tokenizer."""

    vocab_size: int
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]

    @cached_property
    def _specials(self) -> torch.Tensor:
        return torch.tensor(sorted(set(self.special_ids) | {self.pad_id}))

    def special_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where ``input_ids`` holds a special token (padding included)."""
        return torch.isin(input_ids, self._specials.to(input_ids.device, input_ids.dtype))

    @cached_property
    def ordinary_ids(self) -> torch.Tensor:
        """Every id that is not special: the pool random replacements are drawn from (cached)."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[self._specials] = False
        return keep.nonzero().squeeze(1)


@dataclass
class MaskedTokens:
    """The result of masking: corrupted ids, and labels (-100 where nothing was selected)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


class Masking:
    """Base class of masking schemes: a pure function of (ids, randomness, vocabulary)."""

    def __call__(
        self, input_ids: torch.Tensor, rng: SampleRandom, vocab: VocabInfo, train: bool = True
    ) -> MaskedTokens:
        raise NotImplementedError
