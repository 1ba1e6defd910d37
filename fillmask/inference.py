"""Use a trained model: load it from a checkpoint, fill masks."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from fillmask.architectures.base import Encoder
from fillmask.data.tokenize import SpecialTokens, resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.objectives.mlm import MaskedLM


class CheckpointError(FillmaskError):
    """A checkpoint fillmask cannot use, with its path and the reason."""


def import_class(path: str) -> type:
    """Import ``package.module.Class``."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"cannot import {path}: {error}; install the package that "
                              "provides it") from error


@dataclass
class FillMaskModel:
    """A masked LM ready for inference, with its tokenizer."""

    model: MaskedLM
    tokenizer: Tokenizer
    special: SpecialTokens

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> FillMaskModel:
        """Rebuild the model and tokenizer stored in a fillmask checkpoint."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as error:
            raise CheckpointError(f"checkpoint {path} cannot be read ({error}); it may be "
                                  "truncated: use an earlier checkpoint") from error
        info = ckpt.get("fillmask") if isinstance(ckpt, dict) else None
        if not info or "tokenizer" not in info:
            raise CheckpointError(f"{path} is not a fillmask MLM checkpoint with a tokenizer "
                                  "(it was not written by `fillmask fit`)")
        encoder_cls = import_class(info["encoder"]["class_path"])
        encoder: Encoder = encoder_cls(**info["encoder"]["init_args"])
        model_cls = import_class(info.get("objective", "fillmask.objectives.mlm.MaskedLM"))
        accepted = inspect.signature(model_cls).parameters
        hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in accepted}
        model = model_cls(encoder=encoder, **hparams)
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
        tokenizer = Tokenizer.from_str(info["tokenizer"])
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
