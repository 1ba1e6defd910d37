"""Fine-tuning objectives: a pretrained encoder plus a classifier, for GLUE-style sequence
(pair) classification and CoNLL-style token classification (with conlleval's entity F1)."""

from __future__ import annotations

from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fillmask.architectures.base import Encoder, real_tokens
from fillmask.architectures.transformers_format import HeadKind
from fillmask.errors import FillmaskError
from fillmask.heads import Pooling, check_pooling, pool
from fillmask.masking.base import IGNORE_INDEX
from fillmask.metrics.conll import (
    OUTSIDE,
    Scheme,
    SchemeOrAuto,
    detect_scheme,
    entity_counts,
    scores_from_counts,
    split_tag,
)
from fillmask.objectives.base import Deliverable, EncoderObjective, layerwise_groups

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
    """BERT's sequence classifier: pool the token states (``cls``: the first token's, as BERT;
    ``mean`` or ``max`` over the real tokens), then the pooler (Linear -> tanh), dropout,
    Linear. The weights are BERT's whatever the pooling."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float,
                 pooling: Pooling = "cls") -> None:
        super().__init__()
        self.pooling = check_pooling(pooling)
        self.pooler = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) from token states (B, T, C) and the mask of real tokens (B, T)."""
        pooled = torch.tanh(self.pooler(pool(states, attention_mask, self.pooling)))  # (B, C)
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
        label_names: list[str] | None = None,
        dropout: float = 0.1,
        learning_rate: float = 2e-5,
        warmup_steps: float = 0.1,
        layer_decay: float = 1.0,
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
            label_names: The label of each class id (linked from the data by ``fillmask
                finetune``); kept in checkpoints. Token classification scores entities with it.
            dropout: Dropout before the classifier (after the pooler for sequences).
            learning_rate: Peak AdamW learning rate (BERT fine-tuning: 2e-5 to 5e-5).
            warmup_steps: Linear warm-up: a fraction (< 1) of all steps, or a step count.
            layer_decay: Layer-wise learning-rate decay: the classifier trains at
                ``learning_rate``, each encoder block at ``layer_decay`` times the rate of the
                block above, the embeddings slowest (ELECTRA fine-tunes its base models with
                0.8, its large one with 0.9). 1.0: one rate for all.
            **kwargs: Other optimisation options of :class:`EncoderObjective` (weight_decay,
                schedule, ...).
        """
        if not 0.0 < layer_decay <= 1.0:
            raise FillmaskError(f"model.init_args.layer_decay={layer_decay}: give a factor in "
                                "(0, 1], e.g. 0.8 (1.0 turns layer-wise decay off)")
        if num_labels < 2:
            raise FillmaskError(f"num_labels={num_labels}: classification needs at least 2 "
                                "labels; check the data's label column")
        super().__init__(resolve_encoder(encoder, pretrained), learning_rate=learning_rate,
                         warmup_steps=warmup_steps, **kwargs)
        if label_names is not None and len(label_names) != num_labels:
            raise FillmaskError(f"label_names has {len(label_names)} names but num_labels is "
                                f"{num_labels}; give one name per class id")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names is not None else None
        self.head = self.head_class(self.encoder.hidden_size, num_labels, dropout,
                                    **self.head_options())
        self.val_loss = MeanMetric()
        self.val_accuracy = MulticlassAccuracy(num_labels, average="micro",
                                               ignore_index=IGNORE_INDEX)
        self.val_f1 = MulticlassF1Score(num_labels, average="macro", ignore_index=IGNORE_INDEX)

    def _parameter_groups(self) -> list[dict[str, Any]]:
        groups = super()._parameter_groups()
        decay = self.hparams.layer_decay
        return groups if decay == 1.0 else layerwise_groups(self, groups,
                                                            self.hparams.learning_rate, decay)

    def head_options(self) -> dict[str, Any]:
        """Keyword arguments of ``head_class`` beyond (hidden, num_labels, dropout)."""
        return {}

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
        self._update_evaluation(loss, logits, targets)

    def _update_evaluation(self, loss: torch.Tensor, logits: torch.Tensor,
                           targets: torch.Tensor) -> None:
        self.val_loss.update(loss, weight=max(targets.numel(), 1))
        self.val_accuracy.update(logits, targets)
        self.val_f1.update(logits, targets)

    def on_validation_epoch_start(self) -> None:
        # A validate() before fit() leaves the states as inference-mode tensors (reset ran
        # under inference mode); fit's validation could not update those in place.
        for metric in (self.val_loss, self.val_accuracy, self.val_f1):
            metric.reset()

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
    """One label per text or text pair (GLUE-style): the token states pooled (BERT's CLS state
    by default, or the mean or maximum over real tokens), then BERT's pooler and a classifier.

    Batches carry ``labels`` of shape (B,). Logs ``val/accuracy`` and ``val/f1`` (macro).
    """

    head_class = SequenceHead
    head_kind = "sequence"

    def __init__(
        self,
        encoder: Encoder | None = None,
        pretrained: str | None = None,
        num_labels: int = 2,
        label_names: list[str] | None = None,
        pooling: Pooling = "cls",
        **kwargs: Any,
    ) -> None:
        """Configure sequence classification.

        Args:
            encoder: An encoder to fine-tune; takes precedence over ``pretrained``.
            pretrained: A fillmask checkpoint or a transformers folder whose encoder to tune.
            num_labels: Number of classes; ``fillmask finetune`` links it from the data.
            label_names: The label of each class id; linked from the data.
            pooling: What the classifier reads: ``cls`` (the first token's state: BERT's, and
                what transformers' ``BertForSequenceClassification`` computes), ``mean`` or
                ``max`` over the real tokens (as ModernBERT's ``classifier_pooling``). An MLM
                never trains the CLS state; ``mean`` reads every token's. Mean- and max-pooled
                exports load with remote code.
            **kwargs: Other options of :class:`ClassificationObjective` (dropout,
                learning_rate, ...).
        """
        super().__init__(encoder, pretrained, num_labels, label_names, **kwargs)

    def head_options(self) -> dict[str, Any]:
        return {"pooling": self.hparams.pooling}  # saved before the base class builds the head

    def logits_and_targets(self, batch: dict[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encode(batch)  # (B, T, C)
        return self.head(hidden, real_tokens(batch)), batch["labels"]  # (B, K), (B,)


class TokenClassification(ClassificationObjective):
    """One tag per word (CoNLL-style), predicted from each word's first sub-token.

    Batches carry ``labels`` of shape (B, T), ``-100`` where no tag applies. Logs token-level
    ``val/accuracy`` and macro ``val/f1`` over the labelled positions and, when the tags are
    chunk tags (``O``, ``B-PER``, ...), conlleval's entity scores ``val/entity_precision``,
    ``val/entity_recall``, ``val/entity_f1`` (micro over entities, fractions) and
    ``val/entity_f1/TYPE`` per entity type (``test/`` likewise).

    A sentence's tag sequence is the tags of its labelled words, in order. Words cut off by the
    data's ``max_length`` carry no label: they are in neither the gold nor the predicted
    sequence, so an entity past the cut counts nowhere (not as a miss) and one cut in its
    middle is scored as its kept words; the data module warns how many words were cut.
    Across processes each one scans its own sentences and the chunk counts are summed before
    dividing, so the scores are those of all sentences together (a distributed sampler that
    repeats a few sentences to even out the shards counts them twice).
    """

    head_class = TokenHead
    head_kind = "token"

    def __init__(
        self,
        encoder: Encoder | None = None,
        pretrained: str | None = None,
        num_labels: int = 2,
        label_names: list[str] | None = None,
        tag_scheme: SchemeOrAuto = "auto",
        **kwargs: Any,
    ) -> None:
        """Configure token classification.

        Args:
            encoder: An encoder to fine-tune; takes precedence over ``pretrained``.
            pretrained: A fillmask checkpoint or a transformers folder whose encoder to tune.
            num_labels: Number of tags; ``fillmask finetune`` links it from the data.
            label_names: The tag of each class id; ``fillmask finetune`` links it from the
                data. Without it, or when the tags are not chunk tags and ``tag_scheme`` is
                ``auto``, only the token metrics are logged.
            tag_scheme: How tags mark entities: ``iob1``, ``iob2`` (prefixes ``B-``, ``I-``),
                ``iobes`` (also ``E-``, ``S-``) or ``auto``: ``iobes`` when a tag begins
                ``S-`` or ``E-``, else ``iob2``. Tags alone cannot tell IOB1 from IOB2, and
                need not: conlleval decodes both with one rule set, so the scores are the same.
            **kwargs: Other options of :class:`ClassificationObjective` (dropout,
                learning_rate, ...).
        """
        super().__init__(encoder, pretrained, num_labels, label_names, **kwargs)
        self.tag_scheme = tag_scheme
        self.entity_scheme = self._entity_scheme(self.label_names, tag_scheme)
        self._entity_types = sorted({split_tag(t, self.entity_scheme)[1]
                                     for t in self.label_names or [] if t != OUTSIDE}
                                    ) if self.entity_scheme else []
        self._gold_tags: list[list[str]] = []
        self._predicted_tags: list[list[str]] = []

    def _entity_scheme(self, names: list[str] | None, scheme: SchemeOrAuto) -> Scheme | None:
        """The chunk scheme of ``names``; None (token metrics only) when there is nothing to
        decode: no names, or, with ``auto``, names that are not chunk tags."""
        if scheme not in get_args(SchemeOrAuto):
            raise FillmaskError(f"tag_scheme={scheme!r} is unknown; use one of "
                                f"{', '.join(get_args(SchemeOrAuto))}")
        if names is None:
            return None
        resolved = detect_scheme(names) if scheme == "auto" else scheme
        try:
            for name in names:
                split_tag(name, resolved)
        except ValueError as error:
            if scheme == "auto":
                return None
            raise FillmaskError(f"{error}; set model.init_args.tag_scheme to the data's scheme "
                                f"(tags: {', '.join(names)}) or to auto") from error
        if set(names) <= {OUTSIDE}:  # no entity type to score
            return None
        return resolved

    def logits_and_targets(self, batch: dict[str, torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encode(batch)  # (B, T, C)
        labels = batch["labels"]  # (B, T)
        selected = labels != IGNORE_INDEX
        return self.head(hidden[selected]), labels[selected]  # (N, K), (N,)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch)
        self._update_evaluation(loss, logits, targets)
        if self.entity_scheme is not None:
            self._collect_tags(batch["labels"], logits.argmax(-1), targets)

    def _collect_tags(self, labels: torch.Tensor, predicted: torch.Tensor,
                      targets: torch.Tensor) -> None:
        """Keep each row's gold and predicted tags of its labelled words, in order."""
        per_row = (labels != IGNORE_INDEX).sum(dim=1).tolist()  # (B,) labelled words a row
        names = self.label_names or []
        # Boolean indexing kept row-major order: the items split back into rows.
        for gold, guess in zip(targets.split(per_row), predicted.split(per_row), strict=True):
            self._gold_tags.append([names[i] for i in gold.tolist()])
            self._predicted_tags.append([names[i] for i in guess.tolist()])

    def _log_evaluation(self, split: str, prog_bar: bool) -> None:
        super()._log_evaluation(split, prog_bar)
        if self.entity_scheme is None:
            return
        counts = entity_counts(self._gold_tags, self._predicted_tags, self.entity_scheme)
        self._gold_tags, self._predicted_tags = [], []
        kinds = ("correct", "gold", "predicted")
        table = torch.tensor([[sum(counts[k].values()) for k in kinds]]
                             + [[counts[k][t] for k in kinds] for t in self._entity_types],
                             dtype=torch.long, device=self.device)  # (1 + types, 3)
        if self.trainer.world_size > 1:
            table = self.trainer.strategy.reduce(table, reduce_op="sum")
        total = scores_from_counts(*(int(c) for c in table[0].tolist()))
        for name in ("precision", "recall", "f1"):
            self.log(f"{split}/entity_{name}", float(total[name]),
                     prog_bar=prog_bar and name == "f1")
        for kind, row in zip(self._entity_types, table[1:].tolist(), strict=True):
            score = scores_from_counts(*(int(c) for c in row))
            self.log(f"{split}/entity_f1/{kind}", float(score["f1"]))
