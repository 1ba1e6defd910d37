"""Models exported by fillmask without an equivalent transformers class.

Written by fillmask's export; loads with ``trust_remote_code=True`` and needs torch and
transformers only. Two pieces:

- :class:`FillmaskBertEncoder`, fillmask's BERT-family encoder with every option it trains with
  (post- or pre-LN, optional embedding LayerNorm, learned or ALiBi positions, MLP or gated
  feed-forward, factorised embeddings, shared layers). Its parameter names are fillmask's, so
  weights map one to one. Unpadding is an execution detail of training and changes no output.
- the heads (masked LM, replaced-token detection, sequence and token classification) on that
  encoder or on a transformers encoder named by ``config.backbone``.

Shapes: B batch, T tokens, C hidden size, E embedding size, H heads, V vocabulary, K labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

from .configuration_fillmask import FillmaskConfig

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu, "silu": F.silu}


# fillmask's BERT-family encoder.


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's head slopes (H,): geometric for a power of two, interleaved otherwise."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    power = 2 ** math.floor(math.log2(num_heads))
    return torch.tensor(geometric(power) + geometric(2 * power)[0::2][: num_heads - power])


class Embeddings(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        hidden = spec["hidden_size"]
        width = spec.get("embedding_size") or hidden
        alibi = spec.get("positions", "learned") == "alibi"
        self.tokens = nn.Embedding(spec["vocab_size"], width)
        self.positions = None if alibi else nn.Embedding(spec["max_positions"], width)
        self.token_types = nn.Embedding(max(spec["type_vocab_size"], 1), width)
        norm = spec.get("embedding_norm", True)
        self.norm = nn.LayerNorm(width, eps=spec["layer_norm_eps"]) if norm else nn.Identity()
        self.dropout = nn.Dropout(spec["dropout"])
        self.project = nn.Linear(width, hidden) if width != hidden else nn.Identity()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.tokens(input_ids)  # (B, T, E)
        if self.positions is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.positions(position_ids)
        if token_type_ids is None:
            x = x + self.token_types.weight[0]
        else:
            x = x + self.token_types(token_type_ids)
        return self.project(self.dropout(self.norm(x)))  # (B, T, C)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, -1).unbind(2)  # (B, T, H, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class FeedForward(nn.Module):
    """Linear -> activation -> Linear, or gated: activation(gate) * value (gate first)."""

    def __init__(self, hidden: int, inner: int, activation: str, bias: bool, gated: bool):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(hidden, (2 if gated else 1) * inner, bias=bias)
        self.down = nn.Linear(inner, hidden, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down(self.act(self.up(x)))
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(self.act(gate) * value)


class Block(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps, bias = spec["hidden_size"], spec["layer_norm_eps"], spec.get("bias", True)
        self.pre = spec.get("norm", "post") == "pre"
        self.attention = Attention(hidden, spec["num_heads"], spec["attention_dropout"], bias)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn = FeedForward(hidden, spec["intermediate_size"], spec["activation"], bias,
                               spec.get("ffn", "mlp") == "glu")
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(spec["dropout"])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pre:
            x = x + self.dropout(self.attention(self.attention_norm(x), mask))
            return x + self.dropout(self.ffn(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class FillmaskBertEncoder(nn.Module):
    """fillmask's ``BertEncoder`` from its constructor arguments (``spec``): (B, T) -> (B, T, C)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.num_layers = spec["num_layers"]
        self.num_heads = spec["num_heads"]
        self.alibi = spec.get("positions", "learned") == "alibi"
        self.embeddings = Embeddings(spec)
        shared = spec.get("share_layers", False)
        self.blocks = nn.ModuleList(Block(spec) for _ in range(1 if shared else self.num_layers))
        pre = spec.get("norm", "post") == "pre"
        eps = spec["layer_norm_eps"]
        self.final_norm = nn.LayerNorm(spec["hidden_size"], eps=eps) if pre else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        if self.alibi:
            T = input_ids.shape[1]
            position = torch.arange(T, device=input_ids.device)
            distance = (position[None, :] - position[:, None]).abs()  # (T, T)
            slopes = alibi_slopes(self.num_heads).to(input_ids.device)
            bias = (-slopes[:, None, None] * distance)[None]  # (1, H, T, T)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        for layer in range(self.num_layers):
            x = self.blocks[0 if len(self.blocks) == 1 else layer](x, mask)
        return x if self.final_norm is None else self.final_norm(x)


def build_backbone(spec: dict[str, Any]) -> nn.Module:
    """fillmask's encoder for ``model_type: fillmask-bert``, else the transformers model the
    spec's ``model_type`` and fields describe."""
    spec = dict(spec)
    model_type = spec.pop("model_type")
    if model_type == "fillmask-bert":
        return FillmaskBertEncoder(spec)
    spec.pop("architectures", None)
    return AutoModel.from_config(AutoConfig.for_model(model_type, **spec))


# Heads: fillmask's, parameter names included.


class MaskedLMHead(nn.Module):
    """Linear -> GELU -> LayerNorm, then the token embedding (tied) or a matrix of its own."""

    def __init__(self, hidden: int, width: int, vocab: int, eps: float, tied: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = None if tied else nn.Parameter(torch.zeros(vocab, width))
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(states)))  # (B, T, E)
        weight = embedding if self.decoder is None else self.decoder
        return F.linear(x, weight, self.bias)  # (B, T, V)


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head: Linear -> GELU -> Linear(1), a logit per token."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.score(F.gelu(self.dense(states))).squeeze(-1)  # (B, T)


class SequenceHead(nn.Module):
    """BERT's classifier on pooled states (``cls``: the first token; ``mean``/``max`` over real
    tokens): Linear -> tanh, dropout, Linear."""

    def __init__(self, hidden: int, labels: int, dropout: float, pooling: str = "cls") -> None:
        super().__init__()
        self.pooling = pooling
        self.pooler = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, labels)

    def pool(self, states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return states[:, 0]  # (B, C)
        real = (torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
                if mask is None else mask.bool()).unsqueeze(-1)  # (B, T, 1)
        if self.pooling == "max":
            return states.masked_fill(~real, torch.finfo(states.dtype).min).amax(dim=1)
        return (states * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)  # (B, C)

    def forward(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(self.pool(states, mask)))  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, K)


class TokenHead(nn.Module):
    """Dropout then Linear on every token."""

    def __init__(self, hidden: int, labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(states))  # (B, T, K)


@dataclass
class ReplacedTokenOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class FillmaskPreTrainedModel(PreTrainedModel):
    config_class = FillmaskConfig
    base_model_prefix = "backbone"

    def __init__(self, config: FillmaskConfig) -> None:
        super().__init__(config)
        self.backbone = build_backbone(config.backbone)

    def _init_weights(self, module: nn.Module) -> None:
        std = float(self.config.backbone.get("initializer_range", 0.02))
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None
               ) -> torch.Tensor:
        """The backbone's last hidden states (B, T, C)."""
        inputs = {"attention_mask": attention_mask, "position_ids": position_ids}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.backbone(input_ids, **inputs)
        return out if isinstance(out, torch.Tensor) else out.last_hidden_state

    def _width(self) -> tuple[int, int, int]:
        """Hidden size, embedding (decoder) width and vocabulary size."""
        vocab, width = self.get_input_embeddings().weight.shape
        return int(self.config.backbone["hidden_size"]), int(width), int(vocab)


class FillmaskModel(FillmaskPreTrainedModel):
    """The encoder alone: ``last_hidden_state`` (B, T, C)."""

    def __init__(self, config: FillmaskConfig) -> None:
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        states = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        return BaseModelOutput(last_hidden_state=states)


class FillmaskForMaskedLM(FillmaskPreTrainedModel):
    """The encoder and fillmask's MLM head: ``logits`` (B, T, V)."""

    def __init__(self, config: FillmaskConfig) -> None:
        super().__init__(config)
        hidden, width, vocab = self._width()
        width = getattr(config, "head_width", None) or width
        self.head = MaskedLMHead(hidden, width, vocab, config.head_norm_eps,
                                 config.tie_word_embeddings)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> MaskedLMOutput:
        states = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.head(states, self.get_input_embeddings().weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class Classifier(FillmaskPreTrainedModel):
    """A head on the encoder's states (built by :meth:`build_head`) and its loss against
    ``labels``: cross-entropy (-100: ignored) unless a subclass says otherwise."""

    head_class: type[nn.Module]
    output_class: type[ModelOutput]

    def __init__(self, config: FillmaskConfig) -> None:
        super().__init__(config)
        self.head = self.build_head(config)
        self.post_init()

    def build_head(self, config: FillmaskConfig) -> nn.Module:
        return self.head_class(self._width()[0], config.num_labels, config.classifier_dropout)

    def logits(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.head(states)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> ModelOutput:
        states = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.logits(states, attention_mask)
        loss = None if labels is None else self.loss(logits, labels, attention_mask)
        return self.output_class(loss=loss, logits=logits)


class FillmaskForPreTraining(Classifier):
    """An ELECTRA-style discriminator: a replaced-or-original ``logits`` (B, T) per token;
    binary cross-entropy over real tokens."""

    output_class = ReplacedTokenOutput

    def build_head(self, config: FillmaskConfig) -> nn.Module:
        return ReplacedTokenHead(self._width()[0])

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
        real = torch.ones_like(labels, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask.bool()
        return F.binary_cross_entropy_with_logits(logits[real], labels[real].float())


class FillmaskForSequenceClassification(Classifier):
    """One label per text (pair): states pooled as ``config.classifier_pooling`` says, then
    BERT's pooler."""

    head_class = SequenceHead
    output_class = SequenceClassifierOutput

    def build_head(self, config: FillmaskConfig) -> nn.Module:
        return SequenceHead(self._width()[0], config.num_labels, config.classifier_dropout,
                            getattr(config, "classifier_pooling", "cls"))

    def logits(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.head(states, attention_mask)


class FillmaskForTokenClassification(Classifier):
    """One label per token."""

    head_class = TokenHead
    output_class = TokenClassifierOutput


class FillmaskForQuestionAnswering(FillmaskPreTrainedModel):
    """Extractive question answering: a start and an end logit (B, T) per token from one Linear
    (``qa_outputs`` in BERT); with ``start_positions`` and ``end_positions`` (B,), the mean of the
    two cross-entropies (positions outside the sequence ignored, as transformers does)."""

    def __init__(self, config: FillmaskConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(self._width()[0], 2)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None,
                **kwargs: Any) -> QuestionAnsweringModelOutput:
        states = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        start, end = self.head(states).unbind(-1)  # (B, T), (B, T)
        loss = None
        if start_positions is not None and end_positions is not None:
            width = start.shape[1]
            loss = (F.cross_entropy(start, start_positions.clamp(0, width), ignore_index=width)
                    + F.cross_entropy(end, end_positions.clamp(0, width), ignore_index=width)) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start.contiguous(),
                                            end_logits=end.contiguous())
