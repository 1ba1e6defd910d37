"""The contract every encoder implements: token ids in, hidden states out."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of fillmask encoders.

    An encoder owns its token embedding (objectives tie their output layers to it) and maps
    ``input_ids`` of shape (B, T) to hidden states of shape (B, T, hidden_size).
    Subclasses expose ``vocab_size``, ``hidden_size`` and ``max_positions`` as attributes.

    The arguments a subclass was built with are recorded automatically, so a checkpoint can
    rebuild the encoder without the YAML that made it (see :meth:`spec`).
    """

    vocab_size: int
    hidden_size: int
    max_positions: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Encoder, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            recorded = {k: v for k, v in bound.arguments.items() if k != "self"}
            # The outermost subclass finishes last, so its arguments win.
            object.__setattr__(self, "_init_args", recorded)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def spec(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: enough to rebuild this encoder."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": dict(getattr(self, "_init_args", {})),
        }

    def token_embedding(self) -> nn.Embedding:
        """The input token embedding, to which MLM decoders tie their weights."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        The default counts 6 FLOPs per weight of every matrix outside the embeddings; encoders
        add their attention term (see :class:`~fillmask.architectures.bert.BertEncoder`).
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        matrices = (p for p in self.parameters() if p.ndim >= 2 and id(p) not in embeddings)
        weights = sum(p.numel() for p in matrices)
        return 6.0 * weights

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode ``input_ids`` (B, T).

        ``attention_mask`` (B, T) is True on real tokens. Document-packed batches add
        ``position_ids`` (B, T), restarting at 0 in each document, and ``document_ids`` (B, T)
        (-1 on padding): a token attends only to tokens of its own document.
        """
        raise NotImplementedError


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The fields of a collated batch that encoders take, by keyword."""
    keys = ("attention_mask", "token_type_ids", "position_ids", "document_ids")
    return {key: batch.get(key) for key in keys}


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) True on real tokens: the attention mask, else non-padding document ids."""
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    if batch.get("document_ids") is not None:
        return batch["document_ids"] >= 0
    return torch.ones_like(batch["input_ids"], dtype=torch.bool)


def pairwise_mask(
    attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """Boolean attention mask for ``scaled_dot_product_attention``: (B, 1, 1, T) from padding,
    or (B, 1, T, T) block-diagonal from document ids (padding forms its own block, so no row
    is empty)."""
    if document_ids is not None:
        return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    if attention_mask is not None:
        return attention_mask.bool()[:, None, None, :]
    return None
