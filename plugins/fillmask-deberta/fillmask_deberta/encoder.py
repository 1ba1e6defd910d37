"""DeBERTa-v2/v3 encoder: disentangled attention over log-bucketed relative positions.

An attention score adds three terms (He et al., 2021): content-to-content (q_i . k_j),
content-to-position (q_i . Pk_d) and position-to-content (Pq_d . k_j), where d is the bucketed
relative distance i - j and Pk, Pq project one relative-position table that every layer shares.
Blocks are post-LN, as BERT's. v3 drops absolute positions from the input; the optional enhanced
mask decoder brings them back just before the MLM head.

Read top to bottom: relative positions, embeddings, attention, one block, the encoder.
Shapes: B batch, T tokens, C hidden size, E embedding width, H heads, D head size (C = H * D),
R rows of the relative-position table (twice the attention span).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from fillmask.architectures.base import Encoder, normal_init, pairwise_mask
from fillmask.architectures.bert import ACTIVATIONS, FeedForward

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
    "xsmall": dict(hidden_size=384, num_layers=12, num_heads=6, intermediate_size=1536),
    "small": dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=3072),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}


POSITION_TERMS = ("c2p", "p2c")


# Relative positions.


def log_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket relative distances as DeBERTa-v2 does: exact while shorter than ``buckets // 2``,
    then logarithmic, reaching the last bucket at ``max_distance``."""
    mid = buckets // 2
    sign = torch.sign(relative)
    near = (relative < mid) & (relative > -mid)
    distance = torch.where(near, torch.full_like(relative, mid - 1), relative.abs())  # no log 0
    growth = torch.log(torch.tensor((max_distance - 1) / mid))
    far = torch.ceil(torch.log(distance / mid) / growth * (mid - 1)) + mid
    return torch.where(distance <= mid, relative, (far * sign).long())


def relative_index(length: int, span: int, buckets: int, max_distance: int,
                   device: torch.device) -> torch.Tensor:
    """(T, T): for query i and key j, the row of the relative-position table holding the
    (bucketed) distance i - j, shifted by ``span`` and clipped to the table's 2 x span rows."""
    index = torch.arange(length, device=device)
    relative = index[:, None] - index[None, :]  # (T, T)
    if buckets > 0:
        relative = log_bucket(relative, buckets, max_distance)
    return (relative + span).clamp(0, 2 * span - 1)  # (T, T)


# Embeddings.


class DebertaEmbeddings(nn.Module):
    """Token (+ absolute position) (+ token type) embeddings of width E, projected to C when
    factorised, then LayerNorm; padding positions are zeroed, as DeBERTa does.

    The absolute position table exists when the input uses it (``position_biased_input``, v2)
    or the enhanced mask decoder does (v3 keeps it out of the input).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        embedding_size: int,
        max_positions: int,
        type_vocab_size: int,
        position_table: bool,
        position_biased_input: bool,
        dropout: float,
        eps: float,
    ) -> None:
        super().__init__()
        width = embedding_size
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_positions, width) if position_table else None
        self.token_types = nn.Embedding(type_vocab_size, width) if type_vocab_size > 0 else None
        self.project = nn.Linear(width, hidden_size, bias=False) if width != hidden_size else None
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.position_biased_input = position_biased_input

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        """E -> C through the factorisation projection (the identity when E = C)."""
        return x if self.project is None else self.project(x)

    def absolute(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Absolute position embeddings at the hidden width: (B | 1, T, C)."""
        return self.widen(self.positions(position_ids))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        x = self.tokens(input_ids)  # (B, T, E)
        if self.position_biased_input:
            x = x + self.positions(position_ids)  # (B, T, E)
        if self.token_types is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_types(types)  # (B, T, E)
        x = self.norm(self.widen(x))  # (B, T, C)
        if real is not None:
            x = x * real[..., None].to(x.dtype)  # (B, T, C)
        return self.dropout(x)


# Attention.


class DisentangledAttention(nn.Module):
    """Multi-head attention whose scores add c2p and p2c terms to q . k, all divided by
    sqrt(D x number of terms), mixed through ``scaled_dot_product_attention``.

    ``share_att_key`` (v3) projects the relative table with the content query and key layers;
    otherwise it has projections of its own (``pos_key`` for c2p, ``pos_query`` for p2c).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        position_terms: tuple[str, ...],
        share_att_key: bool,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.c2p, self.p2c = "c2p" in position_terms, "p2c" in position_terms
        own = not share_att_key
        self.pos_key = nn.Linear(hidden_size, hidden_size) if self.c2p and own else None
        self.pos_query = nn.Linear(hidden_size, hidden_size) if self.p2c and own else None
        terms = 1 + self.c2p + self.p2c
        self.scale = 1.0 / math.sqrt(hidden_size // num_heads * terms)
        self.relative_dropout = nn.Dropout(dropout)
        self.attention_dropout = attention_dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N, C) -> (..., H, N, D)."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)

    def position_scores(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor,
                        table: torch.Tensor) -> torch.Tensor:
        """c2p + p2c, already scaled: (B, H, T, T) (zeros (1, 1, T, T) without them)."""
        B, H, T, _ = q.shape
        scores = q.new_zeros(1, 1, T, T)
        rows = index.expand(B, H, T, T)
        if self.c2p:
            project = self.key if self.pos_key is None else self.pos_key
            pos_key = self.split(project(table))  # (H, R, D)
            c2p = q @ pos_key.transpose(-1, -2)  # (B, H, T, R): q_i . Pk_r
            scores = scores + c2p.gather(-1, rows)  # (B, H, T, T): q_i . Pk_d(i,j)
        if self.p2c:
            project = self.query if self.pos_query is None else self.pos_query
            pos_query = self.split(project(table))  # (H, R, D)
            p2c = pos_query @ k.transpose(-1, -2)  # (B, H, R, T): Pq_r . k_j
            scores = scores + p2c.gather(-2, rows)  # (B, H, T, T): Pq_d(i,j) . k_j
        return scores * self.scale

    def forward(self, x: torch.Tensor, query_states: torch.Tensor, mask: torch.Tensor | None,
                index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Keys and values from ``x``, queries from ``query_states`` (both (B, T, C))."""
        B, T, C = query_states.shape
        q = self.split(self.query(query_states))  # (B, H, T, D)
        k, v = self.split(self.key(x)), self.split(self.value(x))  # (B, H, T, D)
        bias = self.position_scores(q, k, index, self.relative_dropout(table))  # (B, H, T, T)
        if mask is not None:
            bias = torch.where(mask, bias, torch.finfo(bias.dtype).min)  # (B, H, T, T)
        p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p,
                                           scale=self.scale)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


# One block.


class DebertaBlock(nn.Module):
    """A post-LN block: disentangled attention, then the feed-forward layer."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        position_terms: tuple[str, ...],
        share_att_key: bool,
        dropout: float,
        attention_dropout: float,
        activation: str,
        eps: float,
    ) -> None:
        super().__init__()
        self.attention = DisentangledAttention(hidden_size, num_heads, position_terms,
                                               share_att_key, dropout, attention_dropout)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, activation, bias=True)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor,
                table: torch.Tensor, query_states: torch.Tensor | None = None) -> torch.Tensor:
        """``query_states`` (the enhanced mask decoder's) replace ``x`` as the queries and the
        residual; keys and values always come from ``x``."""
        query = x if query_states is None else query_states  # (B, T, C)
        h = self.attention_norm(query + self.dropout(self.attention(x, query, mask, index, table)))
        return self.ffn_norm(h + self.dropout(self.ffn(h)))  # (B, T, C)


# The encoder.


class DebertaEncoder(Encoder):
    """The DeBERTa-v2/v3 encoder (He et al., 2021); defaults are DeBERTa-v3-base."""

    presets = PRESETS
    variants = {"deberta-v3": {}, "factorised-c2p": {"embedding_size": 16,
                                                     "pos_att_type": ("c2p",)}}
    transformers_mapping = "fillmask_deberta.hf"  # config and weights both ways
    transformers_model_types = ("deberta-v2",)

    def __init__(
        self,
        vocab_size: int = 128100,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        max_positions: int = 512,
        embedding_size: int | None = None,
        type_vocab_size: int = 0,
        position_biased_input: bool = False,
        position_buckets: int = 256,
        max_relative_positions: int = 512,
        pos_att_type: tuple[str, ...] = ("p2c", "c2p"),
        share_att_key: bool = True,
        relative_norm: bool = True,
        enhanced_mask_decoder: bool = False,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-7,
        initializer_range: float = 0.02,
    ) -> None:
        """Build the encoder.

        Args:
            vocab_size: Rows of the token embedding; linked from the tokenizer by the CLI.
            hidden_size: Width C of every token state.
            num_layers: Number of transformer blocks.
            num_heads: Attention heads per block; must divide ``hidden_size``.
            intermediate_size: Width of the feed-forward layer.
            max_positions: Rows of the absolute position table (when there is one); the
                longest input the CLI will feed.
            embedding_size: Factorised embeddings: token (and position, type) embeddings of
                this width, projected to ``hidden_size`` by a bias-free linear map
                (transformers' ``embed_proj``). Empty: the hidden size.
            type_vocab_size: Segment embeddings; 0 (v3) for none.
            position_biased_input: Add absolute position embeddings to the input (v2: True;
                v3: False, positions are relative only).
            position_buckets: Relative distances are bucketed logarithmically into this many
                buckets each way (v2/v3: 256); 0 or less: exact distances.
            max_relative_positions: Distance at which buckets saturate (v2/v3: 512); -1 means
                ``max_positions``.
            pos_att_type: Disentangled terms added to content-to-content attention: ``c2p``
                (content-to-position) and ``p2c`` (position-to-content).
            share_att_key: Project the relative table with the content query/key layers (v3)
                rather than with projections of its own.
            relative_norm: LayerNorm on the relative-position table (v2/v3's
                ``norm_rel_ebd: layer_norm``).
            enhanced_mask_decoder: DeBERTa's enhanced mask decoder: the last block runs twice
                with keys and values from the second-to-last hidden states and queries that
                start as those states plus absolute position embeddings; its result is the
                encoder's output. Needs ``position_biased_input`` off.
            dropout: Dropout on embeddings, block outputs and the relative table.
            attention_dropout: Dropout on attention probabilities.
            activation: ``gelu`` (exact), ``gelu_tanh`` or ``relu``.
            layer_norm_eps: LayerNorm epsilon (DeBERTa: 1e-7).
            initializer_range: Standard deviation of the normal weight initialisation.
        """
        super().__init__()
        max_relative = max_positions if max_relative_positions < 1 else max_relative_positions
        check_options(hidden_size, num_heads, num_layers, activation, tuple(pos_att_type),
                      position_buckets, max_relative, enhanced_mask_decoder,
                      position_biased_input, type_vocab_size, embedding_size)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size or hidden_size
        self.max_positions = max_positions
        self.num_layers = num_layers
        self.initializer_range = initializer_range
        self.position_buckets = position_buckets
        self.max_relative_positions = max_relative
        self.attention_span = position_buckets if position_buckets > 0 else max_relative
        self.position_terms = tuple(t for t in POSITION_TERMS if t in pos_att_type)
        self.enhanced_mask_decoder = enhanced_mask_decoder
        self.norm_eps = layer_norm_eps  # objectives build their heads' LayerNorms with it
        self.embeddings = DebertaEmbeddings(
            vocab_size, hidden_size, self.embedding_size, max_positions, type_vocab_size,
            position_biased_input or enhanced_mask_decoder, position_biased_input, dropout,
            layer_norm_eps,
        )
        self.blocks = nn.ModuleList(
            DebertaBlock(hidden_size, num_heads, intermediate_size, self.position_terms,
                         share_att_key, dropout, attention_dropout, activation, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.relative = nn.Embedding(2 * self.attention_span, hidden_size)
        self.relative_norm = (nn.LayerNorm(hidden_size, eps=layer_norm_eps) if relative_norm
                              else None)
        self.apply(functools.partial(normal_init, std=initializer_range))


    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs per token (forward + backward): weights plus attention.

        Per block pass and token, the forward does q . k and the mix with values (2 x T x C
        multiply-adds each) and, per disentangled term, scores against the R rows of the
        relative table (2 x R x C); backward costs twice forward. The enhanced mask decoder
        adds one block pass (the last block runs twice instead of once). Projecting the
        relative table happens once per batch, not per token, and is left out.
        """
        passes = self.num_layers + (1 if self.enhanced_mask_decoder else 0)
        per_block = sum(p.numel() for name, p in self.blocks[0].named_parameters()
                        if p.ndim >= 2 and not name.startswith("attention.pos_"))
        project = self.embeddings.project
        weights = per_block * passes + (0 if project is None else project.weight.numel())
        rows = 2 * self.attention_span
        attention = passes * (4 * seq_len + 2 * rows * len(self.position_terms)) * self.hidden_size
        return 6.0 * weights + 3.0 * attention

    def relative_table(self) -> torch.Tensor:
        """The shared relative-position table, normalised when ``relative_norm``: (R, C)."""
        table = self.relative.weight  # (R, C)
        return table if self.relative_norm is None else self.relative_norm(table)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.max_positions and self.embeddings.positions is not None:
            raise ValueError(f"a batch of {T} tokens exceeds max_positions={self.max_positions}"
                             " of the absolute position table; lower the data's max_length or "
                             "raise max_positions")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        real = attention_mask  # (B, T) True on real tokens
        if real is None and document_ids is not None:
            real = document_ids >= 0  # (B, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids, real)  # (B, T, C)
        mask = pairwise_mask(attention_mask, document_ids)  # (B, 1, 1 | T, T)
        index = relative_index(T, self.attention_span, self.position_buckets,
                               self.max_relative_positions, input_ids.device)  # (T, T)
        table = self.relative_table()  # (R, C)
        last = len(self.blocks) - 1 if self.enhanced_mask_decoder else len(self.blocks)
        for block in self.blocks[:last]:
            x = block(x, mask, index, table)  # (B, T, C)
        if self.enhanced_mask_decoder:
            x = self.decode(x, self.embeddings.absolute(position_ids), mask, index, table)
        return x  # (B, T, C)

    def decode(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
               index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The enhanced mask decoder on the second-to-last hidden states (B, T, C): the last
        block twice, keys and values from ``hidden``, queries from ``hidden + positions`` and
        then from the previous step's output (DeBERTa's two decoding steps)."""
        query = hidden + positions  # (B, T, C)
        for _ in range(2):
            query = self.blocks[-1](hidden, mask, index, table, query_states=query)  # (B, T, C)
        return query


def check_options(
    hidden_size: int,
    num_heads: int,
    num_layers: int,
    activation: str,
    pos_att_type: tuple[str, ...],
    position_buckets: int,
    max_relative_positions: int,
    enhanced_mask_decoder: bool,
    position_biased_input: bool,
    type_vocab_size: int,
    embedding_size: int | None,
) -> None:
    """Raise a ValueError naming the option for a configuration DebertaEncoder cannot build."""
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                         "choose num_heads that divides hidden_size")
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers}: an encoder needs at least one layer")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
    unknown = [t for t in pos_att_type if t not in POSITION_TERMS]
    if unknown:
        raise ValueError(f"pos_att_type={list(pos_att_type)} has unknown terms {unknown}; use "
                         f"any of {list(POSITION_TERMS)}")
    if position_buckets > 0 and (position_buckets < 2
                                 or max_relative_positions - 1 <= position_buckets // 2):
        raise ValueError(
            f"position_buckets={position_buckets} with max_relative_positions="
            f"{max_relative_positions}: buckets must be at least 2 and max_relative_positions "
            "more than position_buckets / 2 + 1 (DeBERTa-v3: 256 and 512), or position_buckets "
            "0 for exact distances")
    if enhanced_mask_decoder and position_biased_input:
        raise ValueError("enhanced_mask_decoder=True adds absolute positions before the head, "
                         "but position_biased_input=True already adds them to the input (where "
                         "DeBERTa's decoder does nothing); turn one of them off")
    if type_vocab_size < 0:
        raise ValueError(f"type_vocab_size={type_vocab_size} must be 0 (none) or more")
    if embedding_size is not None and embedding_size < 1:
        raise ValueError(f"embedding_size={embedding_size} must be positive (or empty)")
