"""BERT-family encoder: learned absolute positions, token types, post-LN (BERT) or pre-LN blocks,
and MosaicBERT's options: ALiBi attention biases, a gated-linear-unit feed-forward, unpadding.

Read top to bottom: ALiBi and unpadding helpers, embeddings, one block (attention +
feed-forward), the encoder.
Shapes: B batch, T tokens, C hidden size, H heads, D head size (C = H * D), N real (non-padding)
tokens of a batch, S sequences (rows, or documents of packed rows).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fillmask.architectures.base import Encoder, normal_init, pairwise_mask, real_tokens

Norm = Literal["post", "pre"]
PositionInit = Literal["normal", "sinusoidal"]
Positions = Literal["learned", "alibi"]
FeedForwardKind = Literal["mlp", "glu"]
HALF = (torch.float16, torch.bfloat16)

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


# ALiBi (Press et al.): no position table; head h adds -slope_h * |i - j| to its scores.


def _geometric_slopes(heads: int) -> list[float]:
    """2^(-8/n), 2^(-16/n), ..., 2^-8 for a power of two n."""
    return [2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's head slopes, (H,).

    A power-of-two H gets the geometric sequence 2^(-8/H) ... 2^-8. Otherwise the largest power
    of two P below H gets its own sequence and the other H - P heads take every other slope of
    the 2P sequence (2^(-4/P), 2^(-12/P), ...), which interleave with the first P.
    """
    power = 2 ** math.floor(math.log2(num_heads))
    extra = _geometric_slopes(2 * power)[0::2][: num_heads - power]
    return torch.tensor(_geometric_slopes(power) + extra)


def alibi_bias(slopes: torch.Tensor, length: int) -> torch.Tensor:
    """The bidirectional ALiBi bias -slope_h * |i - j| of a row of ``length`` tokens: (H, T, T).

    Offsets are taken in the row; in document-packed rows the document mask keeps attention
    inside a document, whose tokens are contiguous, so there offsets are in-document distances.
    """
    position = torch.arange(length, device=slopes.device)  # (T,)
    distance = (position[None, :] - position[:, None]).abs()  # (T, T)
    return -slopes.float()[:, None, None] * distance  # (H, T, T)


def with_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One float mask for ``scaled_dot_product_attention``: ``bias`` (H, T, T) where the boolean
    ``mask`` (B, 1, 1 | T, T) allows attention, -inf where it does not: (B | 1, H, T, T)."""
    if mask is None:
        return bias[None]  # (1, H, T, T)
    return bias[None].masked_fill(~mask, float("-inf"))  # (B, H, T, T)


# Unpadding: run every per-token layer on the N real tokens only.


@functools.cache
def flash_varlen() -> Callable[..., torch.Tensor] | None:
    """``flash_attn_varlen_func`` of the optional ``flash_attn`` package, or None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@dataclass
class Unpadded:
    """Where the N real tokens of a (B, T) batch sit, to gather them into (N, ...) and back.

    Attributes:
        indices: Row-major flat positions (in B * T) of the real tokens: (N,).
        batch: B.
        length: T.
        cu_seqlens: Offsets of the S sequences (rows, or documents of packed rows) in the N
            tokens, int32 (S + 1,), when attention runs through ``flash_attn_varlen_func``;
            None: attention scatters back to (B, T) for ``scaled_dot_product_attention``.
        max_seqlen: The longest of those sequences.
        slopes: ALiBi slopes (H,) float32 for ``flash_attn_varlen_func``, or None.
    """

    indices: torch.Tensor
    batch: int
    length: int
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    slopes: torch.Tensor | None = None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...): the real tokens."""
        return x.flatten(0, 1).index_select(0, self.indices)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros on padding."""
        padded = x.new_zeros(self.batch * self.length, *x.shape[1:])  # (B * T, ...)
        return padded.index_copy(0, self.indices, x).view(self.batch, self.length, *x.shape[1:])


def unpadded_layout(real: torch.Tensor) -> Unpadded:
    """The layout of a batch whose real tokens are True in ``real`` (B, T)."""
    B, T = real.shape
    return Unpadded(real.flatten().nonzero().squeeze(1), B, T)


def with_sequences(layout: Unpadded, document_ids: torch.Tensor | None,
                   slopes: torch.Tensor | None) -> Unpadded:
    """``layout`` with ``cu_seqlens`` for ``flash_attn_varlen_func``: one sequence per row, or
    per run of equal document ids in a packed row."""
    rows = torch.arange(layout.batch, device=layout.indices.device)[:, None]  # (B, 1)
    documents = 0 if document_ids is None else document_ids + 1  # (B, T)
    key = (rows * (layout.length + 1) + documents).expand(-1, layout.length)  # (B, T)
    key = layout.gather(key)  # (N,)
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]  # (N,) True where a sequence begins
    total = torch.tensor([key.numel()], device=key.device)
    cu_seqlens = torch.cat([starts.nonzero().squeeze(1), total]).int()  # (S + 1,)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if key.numel() else 0
    return Unpadded(layout.indices, layout.batch, layout.length, cu_seqlens, longest, slopes)


class BertEmbeddings(nn.Module):
    """Token + learned position + token-type embeddings, then LayerNorm (optional) and dropout.

    With a factorised ``embedding_size`` E smaller than the hidden size C (ALBERT, ELECTRA-small)
    the embeddings live in E and a linear map projects them to C. Without a position table
    (``max_positions=None``, ALiBi) ``positions`` is None and ``position_ids`` are ignored.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_positions: int | None,
        type_vocab_size: int,
        dropout: float,
        eps: float,
        norm: bool = True,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        width = embedding_size or hidden_size
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_positions, width) if max_positions is not None else None
        self.token_types = nn.Embedding(max(type_vocab_size, 1), width)
        self.norm = nn.LayerNorm(width, eps=eps) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(width, hidden_size) if width != hidden_size else nn.Identity()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.tokens(input_ids)  # (B, T, C)
        if self.positions is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.positions(position_ids)  # (B, T, C)
        if token_type_ids is None:
            x = x + self.token_types.weight[0]
        else:
            x = x + self.token_types(token_type_ids)
        return self.project(self.dropout(self.norm(x)))  # (B, T, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    Unpadded input (N, C) is scattered back to (B, T) for attention and gathered again after
    it, so the projections see real tokens only; a layout with ``cu_seqlens`` runs
    ``flash_attn_varlen_func`` on (N, C) directly instead.
    """

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                unpadded: Unpadded | None = None, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Attend over ``x`` (B, T, C), or (N, C) with ``unpadded``; ``mask`` is boolean (True:
        may attend) or a float bias, broadcastable to (B, H, T, T). With ``keep`` (indices
        into the rows of ``x`` flattened to tokens) only those tokens' outputs are projected
        and returned: (K, C)."""
        qkv = self.qkv(x)  # (B, T, 3C) | (N, 3C)
        p = self.dropout if self.training else 0.0
        if unpadded is not None and unpadded.cu_seqlens is not None:
            return self.out(rows(self._flash(qkv, unpadded, p), keep))  # (N | K, C)
        if unpadded is not None:
            qkv = unpadded.scatter(qkv)  # (B, T, 3C)
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.num_heads, -1).unbind(2)  # (B, T, H, D) each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        y = y if unpadded is None else unpadded.gather(y)  # (B, T, C) | (N, C)
        return self.out(rows(y, keep))  # (B, T, C) | (N, C) | (K, C)

    def _flash(self, qkv: torch.Tensor, unpadded: Unpadded, p: float) -> torch.Tensor:
        """Varlen FlashAttention over the S sequences of ``qkv`` (N, 3C): (N, C)."""
        q, k, v = qkv.view(qkv.shape[0], 3, self.num_heads, -1).unbind(1)  # (N, H, D) each
        cu, longest = unpadded.cu_seqlens, unpadded.max_seqlen
        attend = flash_varlen()
        assert attend is not None, "cu_seqlens are only built when flash_attn imports"
        y = attend(q, k, v, cu, cu, longest, longest, dropout_p=p,
                   alibi_slopes=unpadded.slopes)  # (N, H, D)
        return y.reshape(qkv.shape[0], -1)  # (N, C)


class FeedForward(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))  # (..., C)


class GatedFeedForward(nn.Module):
    """MosaicBERT's gated linear unit: one Linear to 2 x intermediate, split into a gate ``a``
    (first half) and a value ``b``, then activation(a) * b -> Linear down. ``bias`` applies to
    both matrices, as in the MLP (MosaicBERT's first matrix has none, its second has one)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool):
        super().__init__()
        self.up = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)  # (..., I) each
        return self.down(self.act(gate) * value)  # (..., C)


FEED_FORWARDS: dict[str, type[FeedForward] | type[GatedFeedForward]] = {
    "mlp": FeedForward, "glu": GatedFeedForward,
}


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
        ffn: FeedForwardKind = "mlp",
    ) -> None:
        super().__init__()
        self.norm_position = norm
        self.attention = SelfAttention(hidden_size, num_heads, attention_dropout, bias)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.ffn = FEED_FORWARDS[ffn](hidden_size, intermediate_size, activation, bias)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                unpadded: Unpadded | None = None, keep: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or (N, C) -> (N, C) with ``unpadded``. With ``keep``
        (token indices into ``x``'s rows) only those tokens go on past attention: (K, C), and
        the output projection, feed-forward, norms and dropout skip every other token."""
        if self.norm_position == "pre":
            attended = self.attention(self.attention_norm(x), mask, unpadded, keep)
            x = rows(x, keep) + self.dropout(attended)
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attention_norm(rows(x, keep)
                                + self.dropout(self.attention(x, mask, unpadded, keep)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


def rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The tokens ``keep`` indexes of ``x`` (B, T, C) or (N, C), as (K, C); all of ``x``
    unchanged without ``keep``."""
    return x if keep is None else x.flatten(0, -2).index_select(0, keep)


class BertEncoder(Encoder):
    """The BERT encoder (Devlin et al.), with the knobs later BERT-family recipes turned.

    Sizes by name: :attr:`presets` (``tiny`` for tests up to ``large``).

    MosaicBERT (Portes et al.) is ``positions="alibi"``, ``ffn="glu"``, ``unpad=True`` (here
    with ``norm="pre"``); every option defaults to BERT's behaviour.
    """

    presets = PRESETS
    variants = {
        "bert": {},
        "pre-ln": {"norm": "pre"},
        "quickstart": {"norm": "pre", "embedding_norm": False},
        "mosaicbert": {"norm": "pre", "positions": "alibi", "ffn": "glu", "unpad": True,
                       "max_positions": 128},
        "albert": {"embedding_size": 16, "share_layers": True, "activation": "gelu_tanh"},
        "albert-gelu": {"embedding_size": 16, "share_layers": True},
        "shared-unfactorised": {"share_layers": True},
        "electra-small": {"embedding_size": 16},
        "gelu-tanh": {"activation": "gelu_tanh"},
        "no-bias-relu": {"bias": False, "activation": "relu", "norm": "pre"},
        "sinusoidal-unpad": {"position_init": "sinusoidal", "unpad": True},
    }

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
        positions: Positions = "learned",
        ffn: FeedForwardKind = "mlp",
        unpad: bool = False,
    ) -> None:
        """Build the encoder.

        Args:
            vocab_size: Rows of the token embedding; linked from the tokenizer by the CLI.
            hidden_size: Width C of every token state.
            num_layers: Number of transformer blocks.
            num_heads: Attention heads per block; must divide ``hidden_size``.
            intermediate_size: Width of the feed-forward layer (4 x hidden in BERT).
            max_positions: Longest sequence the learned position table covers; with ALiBi
                there is no table and it only bounds the input length.
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
                models a sense of token distance from step 0 (it stays trainable). It sets up
                the learned table only: with ALiBi ``normal`` is a no-op and ``sinusoidal`` an
                error.
            embedding_norm: LayerNorm on the summed embeddings (BERT). Pre-LN blocks normalise
                their input anyway; without it, small pre-LN models learn markedly faster.
            embedding_size: Factorised embeddings (ALBERT: 128; ELECTRA-small: 128): token,
                position and type embeddings of this width, projected to ``hidden_size``.
                Empty: the hidden size (BERT).
            share_layers: ALBERT's cross-layer sharing: one block's weights, applied
                ``num_layers`` times.
            positions: ``learned`` absolute position table (BERT) or ``alibi`` (MosaicBERT): no
                table; head h adds -slope_h * |i - j| to its attention scores, with the ALiBi
                paper's slopes (see :func:`alibi_slopes`). The embeddings then have no
                ``positions`` table, so ELECTRA shares tokens and token types only.
            ffn: ``mlp`` (Linear, activation, Linear) or ``glu``: a gated linear unit
                (MosaicBERT), whose first matrix maps to 2 x ``intermediate_size``.
            unpad: Unpadded execution: after the embeddings, gather the real tokens
                (``attention_mask``, else ``document_ids >= 0``) of the batch into (N, C), run
                every projection, norm and dropout on them only, and scatter back to (B, T, C)
                at the end (padding rows zero). Attention uses ``flash_attn_varlen_func`` on
                CUDA in half precision when ``flash_attn`` is installed, else scatters q, k, v
                to (B, T) for ``scaled_dot_product_attention``. The same weights and results as
                padded execution, faster on padded batches. The flash path expects each row's
                real tokens (and each document) to be contiguous, as fillmask's collation
                makes them.
        """
        super().__init__()
        if activation not in ACTIVATIONS:
            known = sorted(ACTIVATIONS)
            raise ValueError(f"activation={activation!r} is unknown; use one of {known}")
        if norm not in ("post", "pre"):
            raise ValueError(f"norm={norm!r} is unknown; use 'post' or 'pre'")
        check_mosaic_options(positions, ffn, position_init)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size or hidden_size
        self.max_positions = max_positions
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.initializer_range = initializer_range
        self.norm_eps = layer_norm_eps  # objectives build their heads' LayerNorms with it
        self.alibi = positions == "alibi"
        self.unpad = unpad
        self.embeddings = BertEmbeddings(
            vocab_size, hidden_size, None if self.alibi else max_positions, type_vocab_size,
            dropout, layer_norm_eps, embedding_norm, embedding_size,
        )
        self.blocks = nn.ModuleList(
            BertBlock(
                hidden_size, num_heads, intermediate_size, dropout, attention_dropout,
                activation, norm, layer_norm_eps, bias, ffn,
            )
            for _ in range(1 if share_layers else num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if norm == "pre" else None
        self.apply(functools.partial(normal_init, std=initializer_range))
        if position_init == "sinusoidal":
            width = self.embedding_size
            table = sinusoidal_table(max_positions, width) * initializer_range * math.sqrt(2)
            with torch.no_grad():
                self.embeddings.positions.weight.copy_(table)

    transformers_mapping = "fillmask.architectures.bert_transformers"
    transformers_model_types = ("bert", "electra", "albert", "fillmask-bert")

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs per token (forward + backward): weights plus attention scores and mix.

        Each layer's attention does Q K^T and A V, 2 * T * C multiply-adds each per token;
        backward costs twice forward, hence 3 * 2 * 2 * T * C per layer. A GLU's wider first
        matrix is counted with the weights; ALiBi adds no matmul (one add per score), and
        unpadding changes which tokens are computed, not the cost of one.
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
        selected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, C); with ``selected`` (B, T boolean) only the selected tokens'
        states, (K, C) in row-major order, computing the last block for them alone (see
        :meth:`~fillmask.architectures.base.Encoder.selected_states`)."""
        T = input_ids.shape[1]
        if T > self.max_positions:
            raise ValueError(f"a batch of {T} tokens exceeds max_positions="
                             f"{self.max_positions}; lower the data's max_length or raise "
                             "max_positions")
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        unpadded = None
        if self.unpad:
            unpadded = self._unpadded(input_ids, x, attention_mask, document_ids)
        mask = None
        if unpadded is None or unpadded.cu_seqlens is None:  # flash needs no mask
            mask = self._attention_mask(input_ids, attention_mask, document_ids)
        if unpadded is not None:
            x = unpadded.gather(x)  # (N, C)
        keep = None if selected is None else kept_tokens(selected, unpadded)  # (K,)
        for layer in range(self.num_layers):
            last = layer == self.num_layers - 1
            block = self.blocks[0 if len(self.blocks) == 1 else layer]
            x = block(x, mask, unpadded, keep if last else None)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if keep is not None:
            return x  # (K, C)
        return x if unpadded is None else unpadded.scatter(x)  # (B, T, C)

    def selected_states(self, input_ids: torch.Tensor, selected: torch.Tensor,
                        **inputs: torch.Tensor | None) -> torch.Tensor:
        return self(input_ids, selected=selected, **inputs)

    def _attention_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        document_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean padding/document mask (B, 1, 1 | T, T); with ALiBi one float mask holding
        the bias where attention is allowed and -inf elsewhere: (B | 1, H, T, T)."""
        mask = pairwise_mask(attention_mask, document_ids)  # (B, 1, 1 | T, T)
        if not self.alibi:
            return mask
        slopes = alibi_slopes(self.num_heads).to(input_ids.device)  # (H,)
        return with_bias(mask, alibi_bias(slopes, input_ids.shape[1]))  # (B | 1, H, T, T)

    def _unpadded(self, input_ids: torch.Tensor, x: torch.Tensor,
                  attention_mask: torch.Tensor | None,
                  document_ids: torch.Tensor | None) -> Unpadded:
        """The layout of the real tokens of ``x`` (B, T, C); with ``cu_seqlens`` when attention
        can run through ``flash_attn_varlen_func`` (CUDA, half precision, ``flash_attn``)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "document_ids": document_ids}
        layout = unpadded_layout(real_tokens(batch))  # type: ignore[arg-type]
        if not flash_applies(x):
            return layout
        slopes = alibi_slopes(self.num_heads).to(x.device) if self.alibi else None
        return with_sequences(layout, document_ids, slopes)


def kept_tokens(selected: torch.Tensor, unpadded: Unpadded | None) -> torch.Tensor:
    """Indices of the ``selected`` (B, T) tokens among the rows the blocks compute: the B * T
    positions, or with ``unpadded`` the N real tokens (selected tokens are real ones)."""
    flat = selected.flatten()  # (B * T,)
    if unpadded is None:
        return flat.nonzero().squeeze(1)  # (K,)
    return flat.index_select(0, unpadded.indices).nonzero().squeeze(1)  # (K,)


def flash_applies(x: torch.Tensor) -> bool:
    """Whether unpadded attention on states like ``x`` can use ``flash_attn_varlen_func``: on
    CUDA, in float16/bfloat16 (by dtype or autocast), with ``flash_attn`` installed."""
    kind = x.device.type
    autocast = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in HALF
    half = x.dtype in HALF or autocast
    return x.is_cuda and half and flash_varlen() is not None


def check_mosaic_options(positions: str, ffn: str, position_init: str) -> None:
    """Name the bad value of the MosaicBERT options (or of ``position_init``), if any."""
    if positions not in ("learned", "alibi"):
        raise ValueError(f"positions={positions!r} is unknown; use 'learned' or 'alibi'")
    if ffn not in FEED_FORWARDS:
        raise ValueError(f"ffn={ffn!r} is unknown; use one of {sorted(FEED_FORWARDS)}")
    if position_init not in ("normal", "sinusoidal"):
        raise ValueError(f"position_init={position_init!r} is unknown; use 'normal' or "
                         "'sinusoidal'")
    if positions == "alibi" and position_init == "sinusoidal":
        raise ValueError("position_init='sinusoidal' initialises the learned position table, "
                         "which positions='alibi' does not have; drop position_init (ALiBi "
                         "encodes distance from step 0)")
