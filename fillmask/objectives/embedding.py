"""Sentence embeddings: pool an encoder's token states into one vector per text, and train them
contrastively (SimCSE, Gao et al. 2021).

- :func:`pool` turns hidden states (B, T, C) into sentence vectors (B, C) over real tokens only
  (``cls``, ``mean`` or ``max``); ``fillmask embed`` and the objective share it.
- :func:`info_nce` is the in-batch-negatives InfoNCE loss over cosine similarity / temperature.
- :class:`SentenceEmbedding` trains an encoder with it: unsupervised SimCSE (each sentence
  encoded twice, dropout on, is its own positive), supervised pairs (anchor, positive) and
  triplets (anchor, positive, hard negative). Validation logs ``val/spearman``, the Spearman
  correlation between cosine similarity and gold scores of STS-style pairs.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric

from fillmask.architectures.base import Encoder
from fillmask.errors import FillmaskError
from fillmask.heads import POOLINGS, Pooling, check_pooling, pool
from fillmask.objectives.base import Deliverable, EncoderObjective
from fillmask.objectives.classify import resolve_encoder

__all__ = ["POOLINGS", "Pooling", "SentenceEmbedding", "SentencePooling", "average_ranks",
           "info_nce", "pool", "sentence_transformers_files", "spearman"]

def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float,
             negatives: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row i of the (B, B [+ B]) matrix of cosine similarities
    / ``temperature`` between ``anchors`` (B, C) and the candidates (``positives`` (B, C), then
    the hard ``negatives`` (B, C) as extra columns) is a softmax classification whose answer is
    column i. Mean cross-entropy over the rows."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (K, C)
    a = F.normalize(anchors.float(), dim=-1)  # (B, C)
    c = F.normalize(candidates.float(), dim=-1)  # (K, C)
    logits = a @ c.T / temperature  # (B, K)
    targets = torch.arange(len(anchors), device=anchors.device)  # (B,)
    return F.cross_entropy(logits, targets)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (N,), ties given the mean of the ranks they span (scipy's
    ``rankdata(method="average")``)."""
    order = torch.argsort(values, stable=True)  # (N,)
    sorted_values = values[order]  # (N,)
    # Each group of equal values: its first and last sorted positions.
    new_group = torch.ones_like(sorted_values, dtype=torch.bool)  # (N,)
    new_group[1:] = sorted_values[1:] != sorted_values[:-1]
    group = torch.cumsum(new_group.long(), dim=0) - 1  # (N,)
    positions = torch.arange(1, len(values) + 1, dtype=torch.float64, device=values.device)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64, device=values.device)
    sums.index_add_(0, group, positions)
    counts = torch.bincount(group).double()  # (G,)
    ranks = torch.empty(len(values), dtype=torch.float64, device=values.device)  # (N,)
    ranks[order] = (sums / counts)[group]
    return ranks


def spearman(predicted: torch.Tensor, gold: torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (ties as scipy's
    ``spearmanr``). NaN when either side is constant or has fewer than two values."""
    if len(predicted) < 2:
        return float("nan")
    x = average_ranks(predicted.double().flatten())
    y = average_ranks(gold.double().flatten())
    x, y = x - x.mean(), y - y.mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else float("nan")


def sentence_transformers_files(hidden_size: int, pooling: str, normalize: bool,
                                max_seq_length: int) -> dict[str, str]:
    """The files sentence-transformers reads beside a transformers encoder folder (module 0 at
    the folder's root): ``modules.json`` (Transformer -> Pooling [-> Normalize]),
    ``sentence_bert_config.json``, ``config_sentence_transformers.json`` and the pooling
    module's ``1_Pooling/config.json`` (its legacy ``pooling_mode_*`` flags, which every
    sentence-transformers version from 2 on reads)."""
    check_pooling(pooling)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "max": "pooling_mode_max_tokens"}
    pooling_config: dict[str, Any] = {"word_embedding_dimension": hidden_size}
    for mode, flag in flags.items():
        pooling_config[flag] = mode == pooling
    pooling_config.update(pooling_mode_mean_sqrt_len_tokens=False,
                          pooling_mode_weightedmean_tokens=False, pooling_mode_lasttoken=False,
                          include_prompt=True)
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None,
                                              "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": pooling_config,
    }
    if normalize:
        files["2_Normalize/config.json"] = {}
    return {name: json.dumps(value, indent=2) for name, value in files.items()}


class SentencePooling(nn.Module):
    """Token states (B, T, C) and mask (B, T) -> sentence vectors (B, C): :func:`pool`, then
    L2 normalisation when ``normalize``. No parameters: what leaves with the encoder."""

    def __init__(self, pooling: str = "mean", normalize: bool = False) -> None:
        super().__init__()
        self.pooling = check_pooling(pooling)
        self.normalize = normalize

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        vectors = pool(hidden, mask, self.pooling)  # (B, C)
        return F.normalize(vectors, dim=-1) if self.normalize else vectors

    def extra_repr(self) -> str:
        return f"pooling={self.pooling}, normalize={self.normalize}"


class SentenceEmbedding(EncoderObjective):
    """Contrastive sentence embeddings (SimCSE): InfoNCE over cosine similarity with in-batch
    negatives.

    Training batches (from :class:`~fillmask.data.sentences.SentenceDataModule`) hold one
    padded batch per role: ``anchor``, optionally ``positive`` and ``negative``. Without
    ``positive`` (unsupervised SimCSE) the anchors are encoded a second time, dropout on, and
    each sentence's second view is its positive. Validation batches hold ``sentence1``,
    ``sentence2`` and ``scores``; the epoch logs ``val/spearman``.
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        pretrained: str | None = None,
        pooling: Pooling = "mean",
        temperature: float = 0.05,
        normalize: bool = False,
        learning_rate: float = 3e-5,
        warmup_steps: float = 0.0,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Configure contrastive training.

        Args:
            encoder: An encoder to train (e.g. rebuilt from a checkpoint); takes precedence
                over ``pretrained``.
            pretrained: A checkpoint written by ``fillmask fit`` (any objective) or a
                transformers folder; its encoder is trained, its tokenizer encodes the data.
            pooling: How token states become a sentence vector: ``cls`` (the first token),
                ``mean`` (over real tokens) or ``max`` (element-wise, over real tokens).
                ``fillmask embed`` and the sentence-transformers export use the same.
            temperature: InfoNCE temperature on cosine similarities (SimCSE: 0.05).
            normalize: Whether exported and embedded vectors are L2-normalised (training
                uses cosine similarity either way).
            learning_rate: Peak AdamW rate. SimCSE used 3e-5 for BERT-base (1e-5 for large);
                small models (hidden 32 to 256) train well at 5e-5 to 1e-4.
            warmup_steps: Linear warm-up: a fraction (< 1) of all steps, or a step count
                (SimCSE: none).
            num_labels: Unused: sentences have no classes (``fillmask finetune`` links the
                data's label count, 0, into every objective).
            label_names: Unused, as ``num_labels``.
            **kwargs: Other optimisation options of :class:`EncoderObjective` (weight_decay,
                schedule, ...).
        """
        if temperature <= 0:
            raise FillmaskError(f"temperature={temperature} must be positive (SimCSE: 0.05)")
        super().__init__(resolve_encoder(encoder, pretrained), learning_rate=learning_rate,
                         warmup_steps=warmup_steps, **kwargs)
        self.pooler = SentencePooling(pooling, normalize)
        self.temperature = temperature
        self.val_cosines = CatMetric()
        self.val_scores = CatMetric()

    @property
    def pooling(self) -> str:
        return self.pooler.pooling

    def deliverables(self) -> dict[str, Deliverable]:
        """The encoder alone (a transformers base model); the pooling leaves as the
        sentence-transformers files of :meth:`folder_files`."""
        return {"": Deliverable(self.encoder, "base", self.pooler)}

    def folder_files(self) -> dict[str, str]:
        """Files ``fillmask export`` writes beside the encoder: the sentence-transformers
        layout, so that ``SentenceTransformer(folder)`` loads the export."""
        return sentence_transformers_files(self.encoder.hidden_size, self.pooler.pooling,
                                           self.pooler.normalize, self.encoder.max_positions)

    def embed(self, texts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sentence vectors (B, C) of one padded batch of texts (``input_ids``,
        ``attention_mask``, ``token_type_ids``); normalised when the model normalises."""
        hidden = self.encode(texts)  # (B, T, C)
        return self.pooler(hidden, texts["attention_mask"])  # (B, C)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The InfoNCE loss of one training batch."""
        anchors = self.embed(batch["anchor"])  # (B, C)
        # Unsupervised SimCSE: a second pass draws other dropout masks.
        positives = self.embed(batch.get("positive") or batch["anchor"])  # (B, C)
        negatives = self.embed(batch["negative"]) if "negative" in batch else None  # (B, C)
        return info_nce(anchors, positives, self.temperature, negatives)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["anchor"]["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        first = self.embed(batch["sentence1"])  # (B, C)
        second = self.embed(batch["sentence2"])  # (B, C)
        self.val_cosines.update(F.cosine_similarity(first.float(), second.float(), dim=-1))
        self.val_scores.update(batch["scores"].float())

    def on_validation_epoch_end(self) -> None:
        self._log_correlation("val", prog_bar=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_correlation("test", prog_bar=False)

    def _log_correlation(self, split: str, prog_bar: bool) -> None:
        """Log the Spearman correlation of every pair seen this epoch (all processes'), then
        reset."""
        if self.val_cosines.update_count == 0:
            return
        cosines, scores = self.val_cosines.compute(), self.val_scores.compute()
        value = spearman(cosines.flatten().cpu(), scores.flatten().cpu())
        self.log(f"{split}/spearman", value, prog_bar=prog_bar)
        self.val_cosines.reset()
        self.val_scores.reset()
