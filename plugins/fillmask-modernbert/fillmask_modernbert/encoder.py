"""ModernBERT encoder (Warner et al., 2024): pre-norm, bias-free, GeGLU, rotary positions,
global attention every few layers and sliding-window attention in the others, unpadded execution.

Read top to bottom: rotary positions, the token layout (which slots of the batch are computed and
what may attend to what), attention, feed-forward, one block, the encoder.
Shapes: B batch, T tokens, N real tokens of the batch, S sequences (documents), C hidden size,
E embedding size, H heads, D head size (C = H * D), I intermediate size.
Tensors written ``(..., C)`` are (N, C) when unpadded and (B, T, C) when padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fillmask.architectures.base import Encoder
from fillmask.architectures.bert import ACTIVATIONS as BERT_ACTIVATIONS

try:  # optional: the varlen kernel runs unpadded attention without re-padding
    from flash_attn import flash_attn_varlen_func
except (ImportError, OSError):  # not installed, or built for another torch/CUDA
    flash_attn_varlen_func = None

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48,
                 local_window=16),
    "mini": dict(hidden_size=256, num_layers=6, num_heads=4, intermediate_size=384),
    "base": dict(hidden_size=768, num_layers=22, num_heads=12, intermediate_size=1152),
    "large": dict(hidden_size=1024, num_layers=28, num_heads=16, intermediate_size=2624),
}

ACTIVATIONS = {**BERT_ACTIVATIONS, "silu": F.silu}

Rope = tuple[torch.Tensor, torch.Tensor]


# Rotary position embedding (Su et al.): each pair of channels (i, i + D/2) of queries and keys
# is rotated by position x frequency_i, so scores depend on relative positions only.


def rotary(positions: torch.Tensor, head_size: int, theta: float) -> Rope:
    """Cosines and sines of the rotation angles at ``positions`` (...,): two (..., 1, D)."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device)
    frequencies = 1.0 / (theta ** (exponents / head_size))  # (D/2,)
    angles = positions[..., None].float() * frequencies  # (..., D/2)
    angles = torch.cat((angles, angles), dim=-1)[..., None, :]  # (..., 1, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate queries or keys ``x`` (..., H, D), in float32, back in ``x``'s dtype."""
    cos, sin = rope
    first, second = x.float().chunk(2, dim=-1)  # (..., H, D/2) each
    turned = torch.cat((-second, first), dim=-1)  # (..., H, D)
    return (x.float() * cos + turned * sin).to(x.dtype)


# The token layout: which slots of the (B, T) batch the blocks compute, and the attention pattern.


def sequence_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None
) -> torch.Tensor:
    """(B, T) id of the sequence each token belongs to within its row, -1 on padding: the
    document id in packed batches, else 0 on every real token."""
    if attention_mask is not None:
        real = attention_mask.bool()
    elif document_ids is not None:
        real = document_ids >= 0
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    ids = document_ids if document_ids is not None else torch.zeros_like(input_ids)
    return torch.where(real, ids, -1)  # (B, T)


def restarting_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where each sequence of ``segments`` begins."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    begins = torch.ones_like(segments, dtype=torch.bool)
    begins[:, 1:] = segments[:, 1:] != segments[:, :-1]
    start = torch.where(begins, index, 0).cummax(dim=1).values  # (B, T)
    return index - start


@dataclass
class TokenLayout:
    """Where the rows the blocks compute sit in the (B, T) batch, and what attends to what.

    Unpadded, the rows are the N real tokens, ``indices`` into the flattened batch, and
    ``cu_seqlens`` delimits their sequences (a row, or a document of a packed row). Padded,
    the rows are all B x T slots and ``indices`` is None. A token attends to the tokens of its
    own sequence; in local layers only to those at most ``half_window`` slots away.
    """

    segments: torch.Tensor  # (B, T) sequence ids, -1 on padding
    documents: bool  # sequences are documents of packed rows
    half_window: int
    indices: torch.Tensor | None = None  # (N,)
    cu_seqlens: torch.Tensor | None = None  # (S + 1,) int32
    max_seqlen: int = 0
    _masks: dict[bool, torch.Tensor | None] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, segments: torch.Tensor, documents: bool, half_window: int,
              unpad: bool) -> TokenLayout:
        """The padded layout, or (``unpad``) the real tokens and their sequence lengths."""
        layout = cls(segments, documents, half_window)
        if not unpad:
            return layout
        B, T = segments.shape
        flat = segments.flatten()  # (B*T,)
        layout.indices = (flat >= 0).nonzero().squeeze(1)  # (N,)
        key = layout.indices // T * (T + 1) + flat[layout.indices]  # (N,) one per sequence
        begins = torch.ones_like(key, dtype=torch.bool)
        begins[1:] = key[1:] != key[:-1]
        end = torch.tensor([key.numel()], device=key.device)
        layout.cu_seqlens = torch.cat((begins.nonzero().squeeze(1), end)).int()  # (S + 1,)
        lengths = layout.cu_seqlens.diff()  # (S,)
        layout.max_seqlen = int(lengths.max()) if lengths.numel() else 0
        return layout

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> the computed rows: (N, ...) unpadded, unchanged padded."""
        return x if self.indices is None else x.flatten(0, 1)[self.indices]

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """The computed rows -> (B, T, ...), zeros on padding."""
        if self.indices is None:
            return x
        B, T = self.segments.shape
        full = x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.indices, x)  # (B*T, ...)
        return full.view(B, T, *x.shape[1:])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: bool,
               dropout: float) -> torch.Tensor:
        """Attention of queries ``q`` over keys ``k`` and values ``v`` (..., H, D)."""
        if self.indices is not None and _flash_ready(q):
            side = self.half_window if local else -1
            return flash_attn_varlen_func(
                q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                dropout_p=dropout, window_size=(side, side),
            )  # (N, H, D)
        q, k, v = (self.scatter(t).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(local),
                                           dropout_p=dropout)  # (B, H, T, D)
        return self.gather(y.transpose(1, 2))  # (..., H, D)

    def mask(self, local: bool) -> torch.Tensor | None:
        """Boolean mask for ``scaled_dot_product_attention``, built once per kind of layer:
        (B, 1, 1, T) over keys, (B, 1, T, T) with documents or a window, None if all attend.
        Padding attends to padding, so no row is empty (an empty row would give NaN)."""
        if local not in self._masks:
            self._masks[local] = self._build_mask(local)
        return self._masks[local]

    def _build_mask(self, local: bool) -> torch.Tensor | None:
        segments = self.segments
        if not local and not self.documents:
            real = segments >= 0  # (B, T)
            if bool(real.all()):
                return None
            return (real | ~real.any(dim=1, keepdim=True))[:, None, None, :]  # (B, 1, 1, T)
        allowed = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        if local:
            index = torch.arange(segments.shape[1], device=segments.device)
            allowed = allowed & ((index[:, None] - index[None, :]).abs() <= self.half_window)
        return allowed[:, None]  # (B, 1, T, T)


def _flash_ready(x: torch.Tensor) -> bool:
    return (flash_attn_varlen_func is not None and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16))


# The layers.


class Embeddings(nn.Module):
    """Token embedding (optionally factorised: width E, projected to C), LayerNorm, dropout.

    ModernBERT has no position or token-type tables: positions enter through rotary attention.
    """

    def __init__(self, vocab_size: int, hidden_size: int, embedding_size: int, eps: float,
                 dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, embedding_size)
        self.project = (nn.Linear(embedding_size, hidden_size, bias=False)
                        if embedding_size != hidden_size else nn.Identity())
        self.norm = nn.LayerNorm(hidden_size, eps=eps, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.project(self.tokens(input_ids))  # (..., C)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV matrix, rotary positions, no biases."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, local: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.local = local
        self.dropout = dropout
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: Rope, layout: TokenLayout) -> torch.Tensor:
        head_size = x.shape[-1] // self.num_heads
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, head_size))  # (..., 3, H, D)
        q, k, v = qkv.unbind(-3)  # (..., H, D)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        p = self.dropout if self.training else 0.0
        y = layout.attend(q, k, v, self.local, p)  # (..., H, D)
        return self.out_dropout(self.out(y.flatten(-2)))  # (..., C)


class GeGLU(nn.Module):
    """Gated feed-forward: one matrix gives value and gate, act(value) * gate, then down."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 dropout: float) -> None:
        super().__init__()
        self.wi = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.wo = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.wi(x).chunk(2, dim=-1)  # (..., I) each
        return self.wo(self.dropout(self.act(value) * gate))  # (..., C)


class ModernBertBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + GeGLU(norm(x)).

    The first block skips the attention norm: the embedding norm just ran.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 activation: str, eps: float, attention_dropout: float, mlp_dropout: float,
                 first: bool, local: bool) -> None:
        super().__init__()
        self.local = local
        self.attention_norm = (nn.Identity() if first
                               else nn.LayerNorm(hidden_size, eps=eps, bias=False))
        self.attention = Attention(hidden_size, num_heads, attention_dropout, local)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps, bias=False)
        self.mlp = GeGLU(hidden_size, intermediate_size, activation, mlp_dropout)

    def forward(self, x: torch.Tensor, rope: Rope, layout: TokenLayout) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, layout)  # (..., C)
        return x + self.mlp(self.mlp_norm(x))  # (..., C)


class ModernBertEncoder(Encoder):
    """The ModernBERT encoder; its defaults are ModernBERT-base."""

    presets = PRESETS
    variants = {"modernbert": {}, "all-global": {"global_every": 1}}
    transformers_mapping = "fillmask_modernbert.hf"  # config and weights both ways
    transformers_model_types = ("modernbert",)
    # Read by every forward, so a phase may change them (the context extension's RoPE bases).
    phase_options = ("global_rope_theta", "local_rope_theta", "local_window")

    def __init__(
        self,
        vocab_size: int = 50368,
        hidden_size: int = 768,
        num_layers: int = 22,
        num_heads: int = 12,
        intermediate_size: int = 1152,
        max_positions: int = 8192,
        embedding_size: int | None = None,
        global_rope_theta: float = 160_000.0,
        local_rope_theta: float = 10_000.0,
        global_every: int = 3,
        local_window: int = 128,
        norm_eps: float = 1e-5,
        embedding_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        mlp_dropout: float = 0.0,
        activation: str = "gelu",
        initializer_range: float = 0.02,
        initializer_cutoff_factor: float = 2.0,
        unpad: bool = True,
    ) -> None:
        """Build the encoder.

        Args:
            vocab_size: Rows of the token embedding; linked from the tokenizer by the CLI
                (ModernBERT: 50,368, a multiple of 64).
            hidden_size: Width C of every token state.
            num_layers: Number of transformer blocks.
            num_heads: Attention heads per block; must divide ``hidden_size`` into an even
                head size (rotary positions rotate channel pairs).
            intermediate_size: Width of the GeGLU (its input matrix is twice as wide).
            max_positions: Longest sequence accepted (ModernBERT: 8,192). Rotary positions
                have no table, so this is a limit, not a parameter count.
            embedding_size: Factorised token embedding of this width, projected to
                ``hidden_size`` (lets a narrow ELECTRA generator share a discriminator's
                table). Empty: the hidden size.
            global_rope_theta: Rotary base of the global-attention layers.
            local_rope_theta: Rotary base of the sliding-window layers.
            global_every: Layers 0, n, 2n, ... attend globally; the others locally.
            local_window: Sliding window of local layers, in tokens: a token sees those at
                most ``local_window / 2`` positions away on either side (even, >= 2).
            norm_eps: LayerNorm epsilon.
            embedding_dropout: Dropout after the embedding norm.
            attention_dropout: Dropout on attention probabilities and the attention output.
            mlp_dropout: Dropout inside the GeGLU, before its output matrix.
            activation: Of the GeGLU value: ``gelu`` (exact, ModernBERT), ``gelu_tanh``,
                ``silu`` or ``relu``.
            initializer_range: Standard deviation of the truncated-normal initialisation
                (output matrices: divided by sqrt(2 x num_layers)).
            initializer_cutoff_factor: The initialisation is truncated at this many standard
                deviations.
            unpad: Compute embeddings, norms, projections and the feed-forward on real tokens
                only, attention over variable-length sequences (flash-attn's varlen kernel
                when installed and on CUDA in fp16/bf16, else re-padded SDPA). False: run
                everything padded.
        """
        super().__init__()
        check_options(hidden_size, num_layers, num_heads, intermediate_size, embedding_size,
                      global_every, local_window, activation,
                      dict(embedding_dropout=embedding_dropout,
                           attention_dropout=attention_dropout, mlp_dropout=mlp_dropout))
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embedding_size = embedding_size or hidden_size
        self.max_positions = max_positions
        self.num_layers = num_layers
        self.head_size = hidden_size // num_heads
        self.global_rope_theta = global_rope_theta
        self.local_rope_theta = local_rope_theta
        self.local_window = local_window
        self.norm_eps = norm_eps  # objectives build their heads' LayerNorms with it
        self.unpad = unpad
        self.embeddings = Embeddings(vocab_size, hidden_size, self.embedding_size, norm_eps,
                                     embedding_dropout)
        self.blocks = nn.ModuleList(
            ModernBertBlock(hidden_size, num_heads, intermediate_size, activation, norm_eps,
                            attention_dropout, mlp_dropout, first=layer == 0,
                            local=layer % global_every != 0)
            for layer in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_size, eps=norm_eps, bias=False)
        self._init_weights(initializer_range, initializer_cutoff_factor)


    def _init_weights(self, std: float, cutoff: float) -> None:
        """Truncated normal: ``std`` for embeddings and input matrices, std / sqrt(2 L) for the
        matrices that write into the residual stream (attention and GeGLU outputs)."""
        out_std = std / math.sqrt(2.0 * self.num_layers)
        for name, param in self.named_parameters():
            if param.ndim < 2:
                continue  # norms keep weight 1
            sigma = out_std if name.endswith(("attention.out.weight", "mlp.wo.weight")) else std
            nn.init.trunc_normal_(param, std=sigma, a=-cutoff * sigma, b=cutoff * sigma)

    def layer_kinds(self) -> list[str]:
        """``global`` or ``local`` for each block."""
        return ["local" if block.local else "global" for block in self.blocks]

    def flops_per_token(self, seq_len: int) -> float:
        """Matmul FLOPs per token (forward + backward): 6 per weight outside the token table,
        plus Q K^T and A V over the keys each layer sees (T in global layers, at most the
        window in local ones): 3 * 2 * 2 * keys * C per layer."""
        matrices = [p for p in self.blocks.parameters() if p.ndim >= 2]
        matrices += list(self.embeddings.project.parameters())
        weights = 6.0 * sum(p.numel() for p in matrices)
        keys = sum(min(seq_len, self.local_window) if block.local else seq_len
                   for block in self.blocks)
        return weights + 12.0 * keys * self.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode ``input_ids`` (B, T) into (B, T, C); padding positions come out zero when
        unpadded. ``token_type_ids`` are ignored (ModernBERT has no segments)."""
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"a batch of {input_ids.shape[1]} tokens exceeds max_positions="
                             f"{self.max_positions}; lower the data's max_length or raise "
                             "max_positions")
        segments = sequence_ids(input_ids, attention_mask, document_ids)  # (B, T)
        if position_ids is None and document_ids is not None:
            position_ids = restarting_positions(segments)  # (B, T)
        elif position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        layout = TokenLayout.build(segments, document_ids is not None, self.local_window // 2,
                                   self.unpad)
        positions = layout.gather(position_ids.expand_as(input_ids))  # (N,) or (B, T)
        ropes = {False: rotary(positions, self.head_size, self.global_rope_theta),
                 True: rotary(positions, self.head_size, self.local_rope_theta)}
        x = self.embeddings(layout.gather(input_ids))  # (..., C)
        for block in self.blocks:
            x = block(x, ropes[block.local], layout)  # (..., C)
        return layout.scatter(self.final_norm(x))  # (B, T, C)


def check_options(hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                  embedding_size: int | None, global_every: int, local_window: int,
                  activation: str, dropouts: dict[str, float]) -> None:
    """Raise a ``ValueError`` naming the first option that cannot work."""
    positive = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    intermediate_size=intermediate_size, global_every=global_every)
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size={hidden_size} / num_heads={num_heads} must be a whole, "
                         "even head size (rotary positions rotate channel pairs); choose "
                         "num_heads accordingly")
    if embedding_size is not None and embedding_size < 1:
        raise ValueError(f"embedding_size={embedding_size} must be at least 1, or empty for "
                         "the hidden size")
    if local_window < 2 or local_window % 2:
        raise ValueError(f"local_window={local_window} must be an even number >= 2 (a token "
                         "sees local_window / 2 tokens on either side)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is unknown; use one of "
                         f"{sorted(ACTIVATIONS)}")
    for name, value in dropouts.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1)")
