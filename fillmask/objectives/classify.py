"""Fine-tuning objectives: a pretrained encoder plus a classifier, for GLUE-style sequence
(pair) classification and CoNLL-style token classification."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fillmask.architectures.base import Encoder
from fillmask.architectures.transformers_format import HeadKind
from fillmask.errors import FillmaskError
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import Deliverable, EncoderObjective

__all__ = ["ClassificationObjective", "SequenceClassification", "TokenClassification"]


def resolve_encoder(encoder: Encoder | None, pretrained: str | None) -> Encoder:
    """``encoder`` when given (e.g. rebuilt from a fine-tuned checkpoint), else the encoder of
    the ``pretrained`` model (a fillmask checkpoint or a transformers folder)."""
    if encoder is not None:
        return encoder
    if not pretrained:
        raise FillmaskError("give the model a pretrained model (model.init_args.pretrained: a "
                            "checkpoint or a transformers folder) or an encoder")
    from fillmask.objectives.pretrained import load_pretrained

    objective, _ = load_pretrained(pretrained)
    return objective.encoder


class SequenceHead(nn.Module):
    """BERT's sequence classifier: pooler (Linear -> tanh) on the CLS state, dropout, Linear."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(cls_state))  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, K)


class TokenHead(nn.Module):
    """BERT's token classifier: dropout then Linear on each token state."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(states))  # (N, K)


class ClassificationObjective(EncoderObjective):
    """Shared by the fine-tuning objectives: the encoder, cross-entropy, accuracy and macro F1.

    Subclasses name their ``head_class`` (built as ``head_class(hidden, num_labels, dropout)``)
    and implement :meth:`logits_and_targets`.
    """

    head_class: type[nn.Module]
    head_kind: HeadKind

    def __init__(
        self,
        encoder: Encoder | None = None,
        pretrained: str | None = None,
        num_labels: int = 2,
        dropout: float = 0.1,
        learning_rate: float = 2e-5,
        warmup_steps: float = 0.1,
        **kwargs: Any,
    ) -> None:
        """Configure fine-tuning.

        Args:
            encoder: An encoder to fine-tune (built from scratch, or rebuilt from a fine-tuned
                checkpoint); takes precedence over ``pretrained``.
            pretrained: A checkpoint written by ``fillmask fit`` or a transformers folder;
                its encoder (weights included) is fine-tuned and its tokenizer encodes the data.
            num_labels: Number of classes (or tags); ``fillmask finetune`` links it from the
                data.
            dropout: Dropout before the classifier (after the pooler for sequences).
            learning_rate: Peak AdamW learning rate (BERT fine-tuning: 2e-5 to 5e-5).
            warmup_steps: Linear warm-up: a fraction (< 1) of all steps, or a step count.
            **kwargs: Other optimisation options of :class:`EncoderObjective` (weight_decay,
                schedule, ...).
        """
        if num_labels < 2:
            raise FillmaskError(f"num_labels={num_labels}: classification needs at least 2 "
                                "labels; check the data's label column")
        super().__init__(resolve_encoder(encoder, pretrained), learning_rate=learning_rate,
                         warmup_steps=warmup_steps, **kwargs)
        self.num_labels = num_labels
        self.head = self.head_class(self.encoder.hidden_size, num_labels, dropout)
        self.val_loss = MeanMetric()
        self.val_accuracy = MulticlassAccuracy(num_labels, average="micro",
                                               ignore_index=IGNORE_INDEX)
        self.val_f1 = MulticlassF1Score(num_labels, average="macro", ignore_index=IGNORE_INDEX)

    def deliverables(self) -> dict[str, Deliverable]:
        """The fine-tuned encoder with its classifier."""
        return {"": Deliverable(self.encoder, self.head_kind, self.head)}

    def logits_and_targets(self, batch: dict[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, K) of the labelled items of a batch and their class ids (N,)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits (N, K) of one batch."""
        loss, logits, _ = self._step(batch)
        return loss, logits

    def _step(self, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, targets = self.logits_and_targets(batch)
        if targets.numel() == 0:  # no labelled item: contribute zero, keep the graph
            return logits.sum() * 0.0, logits, targets
        return F.cross_entropy(logits.float(), targets), logits, targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, targets = self._step(batch)
        if targets.numel():
            self.log("train/accuracy", (logits.argmax(-1) == targets).float().mean())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch)
        self.val_loss.update(loss, weight=max(targets.numel(), 1))
        self.val_accuracy.update(logits, targets)
        self.val_f1.update(logits, targets)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", prog_bar=False)

    def _log_evaluation(self, split: str, prog_bar: bool) -> None:
        """Log loss, accuracy and macro F1 over the epoch, then reset them."""
        self.log(f"{split}/loss", self.val_loss.compute(), sync_dist=True)
        self.log(f"{split}/accuracy", self.val_accuracy.compute(), prog_bar=prog_bar,
                 sync_dist=True)
        self.log(f"{split}/f1", self.val_f1.compute(), prog_bar=prog_bar, sync_dist=True)
        for metric in (self.val_loss, self.val_accuracy, self.val_f1):
            metric.reset()


class SequenceClassification(ClassificationObjective):
    """One label per text or text pair (GLUE-style), from the CLS state through BERT's pooler.

    Batches carry ``labels`` of shape (B,). Logs ``val/accuracy`` and ``val/f1`` (macro).
    """

    head_class = SequenceHead
    head_kind = "sequence"

    def logits_and_targets(self, batch: dict[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encode(batch)  # (B, T, C)
        return self.head(hidden[:, 0]), batch["labels"]  # (B, K), (B,)


class TokenClassification(ClassificationObjective):
    """One tag per word (CoNLL-style), predicted from each word's first sub-token.

    Batches carry ``labels`` of shape (B, T), ``-100`` where no tag applies. Logs token-level
    ``val/accuracy`` and macro ``val/f1`` over the labelled positions.
    """

    head_class = TokenHead
    head_kind = "token"

    def logits_and_targets(self, batch: dict[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encode(batch)  # (B, T, C)
        labels = batch["labels"]  # (B, T)
        selected = labels != IGNORE_INDEX
        return self.head(hidden[selected]), labels[selected]  # (N, K), (N,)
