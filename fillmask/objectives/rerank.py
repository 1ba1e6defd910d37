"""Cross-encoder reranking: a pretrained encoder reads ``CLS query SEP passage SEP`` and BERT's
sequence head (pooler, one output) scores the pair's relevance (Nogueira & Cho's monoBERT).

Exported, it is a ``BertForSequenceClassification`` with ``num_labels=1``: what
sentence-transformers' ``CrossEncoder`` loads.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from fillmask.architectures.base import Encoder, real_tokens
from fillmask.errors import FillmaskError
from fillmask.metrics.ranking import ranking_metrics
from fillmask.objectives.base import Deliverable, EncoderObjective
from fillmask.objectives.classify import SequenceHead, resolve_encoder

__all__ = ["CrossEncoder", "listwise_loss", "pointwise_loss"]

Loss = Literal["pointwise", "listwise"]


def pointwise_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each pair's logit against its 1 / 0 label, averaged."""
    return F.binary_cross_entropy_with_logits(scores.float(), labels.float())


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each group (B, G) of scores, the positive in column 0:
    mean over groups of ``-log(exp(s_0) / sum_j exp(s_j))``."""
    targets = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)  # (B,)
    return F.cross_entropy(scores.float(), targets)


class CrossEncoder(EncoderObjective):
    """Scores (query, passage) pairs; trained on groups of one relevant passage and hard
    negatives; validation reranks each query's candidates and logs ``val/mrr@10`` (MS MARCO)
    and ``val/ndcg@10`` (trec_eval).

    Use it with :class:`~fillmask.data.ranking.RerankingDataModule`, whose batches carry
    ``labels`` (B, G) for training groups and ``query_index`` / ``doc_index`` (N,) per pair.
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        pretrained: str | None = None,
        loss: Loss = "listwise",
        num_labels: int = 1,
        label_names: list[str] | None = None,
        dropout: float = 0.1,
        learning_rate: float = 2e-5,
        warmup_steps: float = 0.1,
        **kwargs: Any,
    ) -> None:
        """Configure the cross-encoder.

        Args:
            encoder: An encoder to fine-tune; takes precedence over ``pretrained``.
            pretrained: A checkpoint written by ``fillmask fit`` or a transformers folder; its
                encoder is fine-tuned and its tokenizer encodes the pairs.
            loss: ``listwise``: softmax cross-entropy over each query's group (the positive
                against its negatives); ``pointwise``: binary cross-entropy of each pair's
                logit (1 for the positive, 0 for each negative).
            num_labels: Outputs of the head; must be 1 (the CLI links it from the data).
            label_names: Linked from the data by the CLI; unused (relevance has no classes).
            dropout: Dropout after the pooler.
            learning_rate: Peak AdamW learning rate.
            warmup_steps: Linear warm-up: a fraction (< 1) of all steps, or a step count.
            **kwargs: Other optimisation options of :class:`EncoderObjective`.
        """
        if num_labels != 1:
            raise FillmaskError(f"num_labels={num_labels}: a cross-encoder has one relevance "
                                "score per pair; set num_labels to 1 (or leave it out)")
        if loss not in ("pointwise", "listwise"):
            raise FillmaskError(f"loss={loss!r} is unknown; use 'pointwise' or 'listwise'")
        super().__init__(resolve_encoder(encoder, pretrained), learning_rate=learning_rate,
                         warmup_steps=warmup_steps, **kwargs)
        self.loss_name = loss
        self.num_labels = 1
        self.head = SequenceHead(self.encoder.hidden_size, 1, dropout)
        self._scored: list[torch.Tensor] = []

    def deliverables(self) -> dict[str, Deliverable]:
        """The encoder with its one-output sequence head (``BertForSequenceClassification``,
        ``num_labels=1``)."""
        return {"": Deliverable(self.encoder, "sequence", self.head)}

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The relevance logit (N,) of each pair of a batch."""
        hidden = self.encode(batch)  # (N, T, C)
        return self.head(hidden, real_tokens(batch)).squeeze(-1)  # (N,)

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The configured loss of training groups: ``scores`` (N,) and ``labels`` (B, G)."""
        grouped = scores.view(labels.shape)  # (B, G)
        if self.loss_name == "pointwise":
            return pointwise_loss(grouped, labels)
        return listwise_loss(grouped)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and scores (N,) of a training batch."""
        scores = self.scores(batch)
        return self.loss(scores, batch["labels"]), scores

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, scores = self(batch)
        grouped = scores.detach().view(batch["labels"].shape)  # (B, G)
        self.log("train/positive_first", (grouped.argmax(-1) == 0).float().mean())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # Evaluation: score every candidate, rerank, compare with the judgements.

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.scores(batch).detach().double()  # (N,)  float64: exact indices
        self._scored.append(torch.stack([batch["query_index"].to(scores.device).double(),
                                         batch["doc_index"].to(scores.device).double(),
                                         scores]).cpu())  # (3, N)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._scored = []

    def on_test_epoch_start(self) -> None:
        self._scored = []

    def on_validation_epoch_end(self) -> None:
        self._log_ranking("val", "validation", prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_ranking("test", "test", prog_bar=False)

    def _log_ranking(self, prefix: str, split: str, prog_bar: bool) -> None:
        """Build the reranked run from the scored pairs of every process and log its MRR@10
        and nDCG@10."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "qrels"):
            raise FillmaskError("CrossEncoder evaluates with a RerankingDataModule (data: "
                                "class_path: fillmask.data.ranking.RerankingDataModule)")
        empty = torch.zeros(3, 0, dtype=torch.float64)
        scored = torch.cat(self._scored, dim=1) if self._scored else empty  # (3, N)
        self._scored = []
        if self.trainer.sanity_checking:
            return
        scored = gather_columns(scored)  # (3, N) of all processes
        run = reranked_run(scored, datamodule.query_ids, datamodule.doc_ids)
        metrics = ranking_metrics(run, datamodule.qrels(split), k=10)
        for name in ("mrr@10", "ndcg@10"):
            self.log(f"{prefix}/{name}", metrics[name], prog_bar=prog_bar, rank_zero_only=False)


def reranked_run(scored: torch.Tensor, query_ids: list[str], doc_ids: list[str]
                 ) -> dict[str, dict[str, float]]:
    """A run {query id: {doc id: score}} from rows (query index, doc index, score) (3, N)."""
    run: dict[str, dict[str, float]] = {}
    for query, doc, score in zip(*scored.tolist(), strict=True):
        run.setdefault(query_ids[int(query)], {})[doc_ids[int(doc)]] = score
    return run


def gather_columns(local: torch.Tensor) -> torch.Tensor:
    """``local`` (3, N) concatenated with every other process's (as Python objects: the
    processes' counts differ); itself when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return torch.cat(parts, dim=1)  # (3, N)
