"""Configuration of a model exported by fillmask without an equivalent transformers class.

Written by fillmask's export; loads with ``trust_remote_code=True`` and needs torch and
transformers only. ``backbone`` describes the encoder: either fillmask's own BERT-family encoder
(``model_type: fillmask-bert`` and its constructor arguments) or a transformers model
(``model_type`` and its config fields, e.g. ``modernbert``) that carries a head transformers
has no class for.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class FillmaskConfig(PretrainedConfig):
    model_type = "fillmask"

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        head_norm_eps: float = 1e-12,
        classifier_dropout: float = 0.1,
        classifier_pooling: str = "cls",
        **kwargs: Any,
    ) -> None:
        self.backbone = dict(backbone or {"model_type": "fillmask-bert"})
        self.head_norm_eps = head_norm_eps
        self.classifier_dropout = classifier_dropout
        self.classifier_pooling = classifier_pooling
        for key in ("vocab_size", "hidden_size", "embedding_size", "num_layers"):
            if key in self.backbone and key not in kwargs:
                kwargs[key] = self.backbone[key]
        super().__init__(**kwargs)
