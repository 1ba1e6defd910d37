"""BERT-family encoder: learned absolute positions, token types, post-LN (BERT) or pre-LN blocks.

Read top to bottom: embeddings, one block (attention + feed-forward), the encoder.
Shapes: B batch, T tokens, C hidden size, H heads, D head size (C = H * D).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fillmask.architectures.base import Encoder, pairwise_mask

Norm = Literal["post", "pre"]
PositionInit = Literal["normal", "sinusoidal"]

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


def sinusoidal_table(positions: int, width: int) -> torch.Tensor:
    """The sine/cosine position table of Vaswani et al., amplitude 1: (positions, width)."""
    position = torch.arange(positions, dtype=torch.float32)[:, None]  # (P, 1)
    frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))  # (W/2,)
    table = torch.zeros(positions, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: width // 2])
    return table


class BertEmbeddings(nn.Module):
    """Token + learned position + token-type embeddings, then LayerNorm (optional) and dropout.

    With a factorised ``embedding_size`` E smaller than the hidden size C (ALBERT, ELECTRA-small)
    the embeddings live in E and a linear map projects them to C.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_positions: int,
        type_vocab_size: int,
        dropout: float,
        eps: float,
        norm: bool = True,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        width = embedding_size or hidden_size
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_positions, width)
        self.token_types = nn.Embedding(max(type_vocab_size, 1), width)
        self.norm = nn.LayerNorm(width, eps=eps) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(width, hidden_size) if width != hidden_size else nn.Identity()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(position_ids)  # (B, T, C)
        if token_type_ids is None:
            x = x + self.token_types.weight[0]
        else:
            x = x + self.token_types(token_type_ids)
        return self.project(self.dropout(self.norm(x)))  # (B, T, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                "choose num_heads that divides hidden_size"
            )
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)
        self.out = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class BertBlock(nn.Module):
    """One transformer block; ``norm="post"`` is BERT's layout, ``"pre"`` normalises first."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        dropout: float,
        attention_dropout: float,
        activation: str,
        norm: Norm,
        eps: float,
        bias: bool,
    ) -> None:
        super().__init__()
        self.norm_position = norm
        self.attention = SelfAttention(hidden_size, num_heads, attention_dropout, bias)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, activation, bias)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.norm_position == "pre":
            x = x + self.dropout(self.attention(self.attention_norm(x), mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class BertEncoder(Encoder):
    """The BERT encoder (Devlin et al.), with the knobs later BERT-family recipes turned."""

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation: str = "gelu",
        norm: Norm = "post",
        layer_norm_eps: float = 1e-12,
        bias: bool = True,
        initializer_range: float = 0.02,
        position_init: PositionInit = "normal",
        embedding_norm: bool = True,
        embedding_size: int | None = None,
        share_layers: bool = False,
    ) -> None:
        """Build the encoder.

        Args:
            vocab_size: Rows of the token embedding; linked from the tokenizer by the CLI.
            hidden_size: Width C of every token state.
            num_layers: Number of transformer blocks.
            num_heads: Attention heads per block; must divide ``hidden_size``.
            intermediate_size: Width of the feed-forward layer (4 x hidden in BERT).
            max_positions: Longest sequence the learned position table covers.
            type_vocab_size: Segment (token type) embeddings; 2 for sentence pairs.
            dropout: Dropout on embeddings and block outputs.
            attention_dropout: Dropout on attention probabilities.
            activation: ``gelu`` (exact, as BERT), ``gelu_tanh`` or ``relu``.
            norm: ``post`` (BERT) or ``pre`` (LayerNorm before each sub-layer, plus a final one).
            layer_norm_eps: LayerNorm epsilon.
            bias: Whether linear layers have biases.
            initializer_range: Standard deviation of the normal weight initialisation.
            position_init: ``normal`` (BERT) or ``sinusoidal``: start the learned position
                table from sines and cosines of the same standard deviation, which gives small
                models a sense of token distance from step 0 (it stays trainable).
            embedding_norm: LayerNorm on the summed embeddings (BERT). Pre-LN blocks normalise
                their input anyway; without it, small pre-LN models learn markedly faster.
            embedding_size: Factorised embeddings (ALBERT: 128; ELECTRA-small: 128): token,
                position and type embeddings of this width, projected to ``hidden_size``.
                Empty: the hidden size (BERT).
            share_layers: ALBERT's cross-layer sharing: one block's weights, applied
                ``num_layers`` times.
        """
        super().__init__()
        if activation not in ACTIVATIONS:
            known = sorted(ACTIVATIONS)
            raise ValueError(f"activation={activation!r} is unknown; use one of {known}")
        if norm not in ("post", "pre"):
            raise ValueError(f"norm={norm!r} is unknown; use 'post' or 'pre'")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size or hidden_size
        self.max_positions = max_positions
        self.num_layers = num_layers
        self.initializer_range = initializer_range
        self.embeddings = BertEmbeddings(
            vocab_size, hidden_size, max_positions, type_vocab_size, dropout, layer_norm_eps,
            embedding_norm, embedding_size,
        )
        self.blocks = nn.ModuleList(
            BertBlock(
                hidden_size, num_heads, intermediate_size, dropout, attention_dropout,
                activation, norm, layer_norm_eps, bias,
            )
            for _ in range(1 if share_layers else num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if norm == "pre" else None
        self.apply(self._init_weights)
        if position_init == "sinusoidal":
            width = self.embedding_size
            table = sinusoidal_table(max_positions, width) * initializer_range * math.sqrt(2)
            with torch.no_grad():
                self.embeddings.positions.weight.copy_(table)
        elif position_init != "normal":
            raise ValueError(f"position_init={position_init!r} is unknown; use 'normal' or "
                             "'sinusoidal'")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BertEncoder:
        """Build a named size (``tiny`` for tests up to ``large``), overriding any argument."""
        if name not in PRESETS:
            raise ValueError(f"preset {name!r} is unknown; use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def token_embedding(self) -> nn.Embedding:
        return self.embeddings.tokens

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs per token (forward + backward): weights plus attention scores and mix.

        Each layer's attention does Q K^T and A V, 2 * T * C multiply-adds each per token;
        backward costs twice forward, hence 3 * 2 * 2 * T * C per layer.
        """
        attention = 12.0 * self.num_layers * seq_len * self.hidden_size
        weights = super().flops_per_token(seq_len)
        if len(self.blocks) == 1 and self.num_layers > 1:  # shared layers run num_layers times
            block = sum(p.numel() for p in self.blocks[0].parameters() if p.ndim >= 2)
            weights += 6.0 * block * (self.num_layers - 1)
        return weights + attention

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"a batch of {input_ids.shape[1]} tokens exceeds max_positions="
                             f"{self.max_positions}; lower the data's max_length or raise "
                             "max_positions")
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        mask = pairwise_mask(attention_mask, document_ids)  # (B, 1, 1 | T, T)
        for layer in range(self.num_layers):
            x = self.blocks[0 if len(self.blocks) == 1 else layer](x, mask)
        return x if self.final_norm is None else self.final_norm(x)  # (B, T, C)
