"""Output heads shared by the objectives."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fillmask.errors import FillmaskError

Pooling = Literal["cls", "mean", "max"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "max")


def check_pooling(pooling: str) -> str:
    """``pooling`` when it is one of :data:`POOLINGS`, else a one-line error with the choices."""
    if pooling not in POOLINGS:
        raise FillmaskError(f"pooling {pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
    return pooling


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence vectors (B, C) from token states ``hidden`` (B, T, C) over the real tokens that
    ``mask`` (B, T) marks: ``cls`` the first token's state (the batch is padded on the right),
    ``mean`` the average of the real tokens' states, ``max`` their element-wise maximum.
    Padding never contributes, so a padded row gives what the row alone gives."""
    check_pooling(pooling)
    if pooling == "cls":
        return hidden[:, 0]  # (B, C)
    real = mask.bool().unsqueeze(-1)  # (B, T, 1)
    if pooling == "max":
        lowest = torch.finfo(hidden.dtype).min
        return hidden.masked_fill(~real, lowest).amax(dim=1)  # (B, C)
    total = (hidden * real).sum(dim=1)  # (B, C)
    count = real.sum(dim=1).clamp(min=1)  # (B, 1)
    return total / count  # (B, C)


def head_eps(encoder: nn.Module) -> float:
    """The LayerNorm epsilon of an encoder's heads: the encoder's own ``norm_eps`` (as
    transformers' BERT, DeBERTa and ModernBERT heads use their config's), else BERT's 1e-12."""
    return float(getattr(encoder, "norm_eps", 1e-12))


class MLMHead(nn.Module):
    """Transform (Linear -> GELU -> LayerNorm) then decode to the vocabulary, plus a bias.

    The decoder is the token embedding itself (``tied``, as BERT) or a matrix of its own. The
    layout is BERT's, so weights map one to one onto ``BertForMaskedLM``. With factorised
    embeddings (ALBERT, ELECTRA-small: embedding size E < hidden size C) the transform maps C to
    E. Call it on the hidden states of masked positions only (N, C): decoding every position
    would spend most of the step on a (B*T, V) matmul whose rows the loss ignores.
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        tied: bool = True,
        eps: float = 1e-12,
        init_std: float = 0.02,
        hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        vocab_size, embedding_size = embedding.weight.shape
        self.dense = nn.Linear(hidden_size or embedding_size, embedding_size)
        self.norm = nn.LayerNorm(embedding_size, eps=eps)
        self.embedding = embedding if tied else None
        own = None if tied else nn.Parameter(torch.randn(vocab_size, embedding_size) * init_std)
        self.decoder = own
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    @property
    def decoder_weight(self) -> torch.Tensor:
        """The (V, E) output matrix: the token embedding when tied."""
        return self.embedding.weight if self.decoder is None else self.decoder

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(hidden)))  # (N, E)
        return F.linear(x, self.decoder_weight, self.bias)  # (N, V)


def mlm_head(encoder: nn.Module, tied: bool = True) -> MLMHead:
    """The MLM head of ``encoder``: its token embedding as decoder (``tied``) or a matrix of its
    own, the encoder's width in, the encoder's LayerNorm epsilon."""
    return MLMHead(encoder.token_embedding(), tied=tied, hidden_size=encoder.hidden_size,
                   eps=head_eps(encoder))


class MaskedLMParts(nn.Module):
    """An encoder and its MLM head under the names a masked-LM objective gives them
    (``encoder.*``, ``head.*``): what filling masks and scoring need, built with torch alone
    (no Lightning), from a checkpoint's state dict or a transformers folder."""

    def __init__(self, encoder: nn.Module, tied: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = mlm_head(encoder, tied)


class PairHead(nn.Module):
    """Sentence-pair classifier on the CLS state: BERT's pooler (Linear -> tanh), then 2 logits.

    Used for next-sentence prediction (BERT) and sentence-order prediction (ALBERT).
    """

    def __init__(self, hidden_size: int, num_labels: int = 2) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_state)))  # (B, num_labels)


class SpanBoundaryHead(nn.Module):
    """SpanBERT's span-boundary objective: predict each masked token from the states just
    outside its span and its position inside the span.

    Input: [x_{s-1}; x_{e+1}; p_i] (C + C + P), then Linear -> GELU -> LayerNorm -> Linear ->
    GELU -> LayerNorm, decoded with the tied token embedding plus a bias of its own.
    """

    def __init__(self, embedding: nn.Embedding, hidden_size: int, position_size: int = 200,
                 max_positions: int = 64, eps: float = 1e-12) -> None:
        super().__init__()
        vocab_size, embedding_size = embedding.weight.shape
        self.positions = nn.Embedding(max_positions, position_size)
        self.first = nn.Linear(2 * hidden_size + position_size, hidden_size)
        self.first_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.second = nn.Linear(hidden_size, embedding_size)
        self.second_norm = nn.LayerNorm(embedding_size, eps=eps)
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, left: torch.Tensor, right: torch.Tensor, offset: torch.Tensor
                ) -> torch.Tensor:
        """Logits (N, V) from boundary states (N, C) and 0-based offsets inside the span (N,)."""
        offset = offset.clamp(max=self.positions.num_embeddings - 1)
        x = torch.cat([left, right, self.positions(offset)], dim=-1)  # (N, 2C + P)
        x = self.first_norm(F.gelu(self.first(x)))  # (N, C)
        x = self.second_norm(F.gelu(self.second(x)))  # (N, E)
        return F.linear(x, self.embedding.weight, self.bias)  # (N, V)
