"""Output heads shared by the objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLMHead(nn.Module):
    """Transform (Linear -> GELU -> LayerNorm) then decode with the tied token embedding + bias.

    The layout is BERT's, so weights map one to one onto ``BertForMaskedLM``. Call it on the
    hidden states of masked positions only (N, C): decoding every position would spend most of
    the step on a (B*T, V) matmul whose rows the loss ignores.
    """

    def __init__(self, embedding: nn.Embedding, eps: float = 1e-12) -> None:
        super().__init__()
        vocab_size, hidden_size = embedding.weight.shape
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.embedding = embedding  # tied: the decoder weight is the input embedding
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(hidden)))  # (N, C)
        return F.linear(x, self.embedding.weight, self.bias)  # (N, V)
