"""SpanBERT: masked-language modelling plus the span-boundary objective (SBO).

Feed it span-masked batches (``data.masking: SpanMasking``): every masked token carries the
positions just outside its span (``span_left``, ``span_right``), and the SBO head predicts the
token from the encoder states at those two positions and its offset inside the span, never from
the masked positions' own states. Loss = MLM + ``sbo_weight`` x SBO.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fillmask.architectures.base import Encoder
from fillmask.heads import SpanBoundaryHead
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.mlm import MaskedLM


class SpanBoundaryLM(MaskedLM):
    """MLM + span-boundary objective (Joshi et al., 2020)."""

    def __init__(
        self,
        encoder: Encoder,
        sbo_weight: float = 1.0,
        position_size: int = 200,
        max_span_tokens: int = 64,
        **kwargs: Any,
    ) -> None:
        """Configure the objective.

        Args:
            encoder: Any fillmask encoder.
            sbo_weight: Weight of the span-boundary loss (SpanBERT: 1.0).
            position_size: Width of the relative-position embedding (SpanBERT: 200).
            max_span_tokens: Offsets inside a span beyond this share the last position row.
            **kwargs: Options of :class:`MaskedLM` and the optimiser.
        """
        super().__init__(encoder, **kwargs)
        self.sbo = SpanBoundaryHead(encoder.token_embedding(), encoder.hidden_size,
                                    position_size, max_span_tokens)

    def extra_losses(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor
                     ) -> dict[str, tuple[torch.Tensor, float]]:
        losses = super().extra_losses(batch, hidden)
        if "span_left" not in batch:
            raise ValueError("SpanBoundaryLM needs span-masked batches; set data.masking to "
                             "SpanMasking")
        losses["sbo_loss"] = (self.sbo_loss(hidden, batch), self.hparams.sbo_weight)
        return losses

    def sbo_loss(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the SBO head over every masked token that lies in a span."""
        left, right, labels = batch["span_left"], batch["span_right"], batch["labels"]
        rows, cols = torch.nonzero((left >= 0) & (labels != IGNORE_INDEX), as_tuple=True)
        if rows.numel() == 0:
            return hidden.sum() * 0.0
        lefts, rights = left[rows, cols], right[rows, cols]
        logits = self.sbo(hidden[rows, lefts], hidden[rows, rights], cols - lefts - 1)  # (N, V)
        return F.cross_entropy(logits.float(), labels[rows, cols])
