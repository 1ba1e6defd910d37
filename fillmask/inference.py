"""Use a trained model: load it from a checkpoint, fill masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from fillmask.data.tokenize import SpecialTokens, resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.heads import MLMHead
from fillmask.objectives.base import CheckpointError, load_objective
from fillmask.objectives.mlm import MaskedLM

__all__ = ["CheckpointError", "FillMaskModel"]


@dataclass
class FillMaskModel:
    """A masked LM ready for inference, with its tokenizer."""

    model: MaskedLM
    tokenizer: Tokenizer
    special: SpecialTokens

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> FillMaskModel:
        """Rebuild the model and tokenizer stored in a fillmask checkpoint."""
        model, tokenizer = load_objective(path)
        if tokenizer is None or not isinstance(getattr(model, "head", None), MLMHead):
            raise CheckpointError(f"{path} holds no masked-LM head and tokenizer to fill masks "
                                  "with (it was not written by an MLM objective under "
                                  "`fillmask fit`)")
        model.to(map_location).eval()
        return cls(model, tokenizer, resolve_special_tokens(tokenizer))

    def mask_token(self) -> str:
        return self.tokenizer.id_to_token(self.special.mask_id)

    @torch.no_grad()
    def fill(self, texts: list[str], top_k: int = 5) -> list[list[list[dict[str, Any]]]]:
        """For each text and each mask in it, the ``top_k`` candidates with probabilities.

        The literal mask token of the tokenizer (``[MASK]`` or ``<mask>``) marks the blanks.
        """
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        limit = self.model.encoder.max_positions
        if width > limit:
            raise FillmaskError(f"an input has {width} tokens, more than the model's {limit} "
                                "positions; shorten it")
        ids = torch.full((len(texts), width), self.special.pad_id)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
        hidden = self.model.encoder(ids, ids != self.special.pad_id)  # (B, T, C)
        results = []
        for row in range(len(texts)):
            positions = (ids[row] == self.special.mask_id).nonzero().squeeze(1)
            logits = self.model.head(hidden[row, positions])  # (M, V), V rounded up
            probs = logits[:, : self.tokenizer.get_vocab_size()].softmax(-1)
            results.append([self._candidates(p, top_k) for p in probs])
        return results

    def _candidates(self, probs: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        scores, ids = probs.topk(min(top_k, probs.numel()))
        return [{"token": self.tokenizer.id_to_token(i), "token_id": i, "score": s}
                for s, i in zip(scores.tolist(), ids.tolist(), strict=True)]
