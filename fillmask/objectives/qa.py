"""Extractive question answering (SQuAD): a pretrained encoder with a start/end head.

The head is one ``Linear(hidden, 2)`` over every token (transformers'
``BertForQuestionAnswering.qa_outputs``): its two outputs are the token's start and end
logits. Training minimises the mean of the start and end cross-entropies. Evaluation decodes
each question from all its windows, as BERT's ``run_squad.py`` does, and scores the answers
with the official SQuAD metric (:mod:`fillmask.metrics.squad`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fillmask.architectures.base import Encoder
from fillmask.errors import FillmaskError
from fillmask.metrics.squad import squad_scores
from fillmask.objectives.base import Deliverable, EncoderObjective
from fillmask.objectives.classify import resolve_encoder

__all__ = ["QuestionAnswering", "best_span", "decode_answers"]

Offsets = Sequence[tuple[int, int] | None]
Window = tuple[np.ndarray, np.ndarray, Offsets]
"""One window of a question: start logits (T,), end logits (T,), context offsets (T,)."""


def best_span(windows: Sequence[Window], context: str, n_best_size: int = 20,
              max_answer_length: int = 30) -> tuple[str, float, float]:
    """The best answer of one question over its windows: its text, its score (start + end
    logit) and the null score (the lowest CLS start + end logit over the windows).

    In each window the ``n_best_size`` highest start and end logits are paired; a pair counts
    when both tokens are in the context, the end is not before the start and the span has at
    most ``max_answer_length`` tokens. The text is cut from ``context`` by character offsets.
    No valid pair gives ``("", -inf, null)``.
    """
    best_text, best_score, null = "", float("-inf"), float("inf")
    for start_logits, end_logits, offsets in windows:
        null = min(null, float(start_logits[0] + end_logits[0]))
        starts = np.argsort(start_logits)[::-1][:n_best_size]
        ends = np.argsort(end_logits)[::-1][:n_best_size]
        for i in starts.tolist():
            for j in ends.tolist():
                if offsets[i] is None or offsets[j] is None or j < i:
                    continue
                if j - i + 1 > max_answer_length:
                    continue
                score = float(start_logits[i] + end_logits[j])
                if score > best_score:
                    best_score = score
                    best_text = context[offsets[i][0]:offsets[j][1]]  # type: ignore[index]
    return best_text, best_score, null


def decode_answers(examples: Sequence[Any], features: Sequence[Any],
                   logits: dict[int, tuple[np.ndarray, np.ndarray]], n_best_size: int = 20,
                   max_answer_length: int = 30, version_2_with_negative: bool = False,
                   null_score_diff_threshold: float = 0.0) -> dict[str, str]:
    """The predicted text of each example {id: text} from the logits of its features.

    ``examples`` have ``id`` and ``context``; ``features`` have ``example`` (index into
    ``examples``) and ``offsets``; ``logits`` maps a feature index to its start and end
    logits. With ``version_2_with_negative`` the answer is empty when the null score exceeds
    the best span's score by more than ``null_score_diff_threshold`` (BERT's rule).
    An example none of whose features were scored gets no prediction.
    """
    windows: dict[int, list[Window]] = {}
    for index, (start, end) in logits.items():
        feature = features[index]
        windows.setdefault(feature.example, []).append((start, end, feature.offsets))
    predictions: dict[str, str] = {}
    for example_index, example_windows in windows.items():
        example = examples[example_index]
        text, score, null = best_span(example_windows, example.context, n_best_size,
                                      max_answer_length)
        if version_2_with_negative and null - score > null_score_diff_threshold:
            text = ""
        predictions[example.id] = text
    return predictions


class QuestionAnswering(EncoderObjective):
    """SQuAD-style span extraction: start and end logits for every token.

    Batches come from :class:`~fillmask.data.squad.QuestionAnsweringDataModule` and carry
    ``start_positions`` and ``end_positions`` (B,) (0, CLS, when the window holds no answer)
    and ``feature_index`` (B,). Logs ``train/loss``, ``val/loss``, and the official
    ``val/exact_match`` and ``val/f1`` in percent (for SQuAD 2.0 also
    ``val/has_answer_f1``, ``val/no_answer_f1``, ...; ``test/`` likewise).
    """

    def __init__(
        self,
        encoder: Encoder | None = None,
        pretrained: str | None = None,
        num_labels: int = 2,
        learning_rate: float = 1e-4,
        warmup_steps: float = 0.1,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """Configure question answering.

        Args:
            encoder: An encoder to fine-tune; takes precedence over ``pretrained``.
            pretrained: A checkpoint written by ``fillmask fit`` or a transformers folder; its
                encoder is fine-tuned and its tokenizer encodes the data.
            num_labels: Outputs per token; must be 2, start and end (the CLI links it from
                the data).
            learning_rate: Peak AdamW learning rate. The default 1e-4 suits small models
                trained briefly; BERT-base and larger use BERT's SQuAD recipe, 3e-5.
            warmup_steps: Linear warm-up: a fraction (< 1) of all steps, or a step count.
            n_best_size: Highest start and end logits of each window paired when decoding.
            max_answer_length: Longest answer in tokens.
            version_2_with_negative: SQuAD 2.0: a question may have no answer; predict the
                empty answer when the null (CLS) score beats the best span's.
            null_score_diff_threshold: Predict no answer when the null score exceeds the best
                span's score by more than this (tune it on the dev set; BERT's default 0).
            **kwargs: Other optimisation options of :class:`EncoderObjective`.
        """
        if num_labels != 2:
            raise FillmaskError(f"num_labels={num_labels}: question answering has two outputs "
                                "per token (start, end); set num_labels to 2 (or leave it out)")
        if n_best_size < 1 or max_answer_length < 1:
            raise FillmaskError(f"n_best_size={n_best_size} and max_answer_length="
                                f"{max_answer_length} must be at least 1")
        super().__init__(resolve_encoder(encoder, pretrained), learning_rate=learning_rate,
                         warmup_steps=warmup_steps, **kwargs)
        self.num_labels = 2
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length
        self.version_2_with_negative = version_2_with_negative
        self.null_score_diff_threshold = null_score_diff_threshold
        self.qa_outputs = nn.Linear(self.encoder.hidden_size, 2)
        self._logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._losses: list[tuple[float, int]] = []

    def deliverables(self) -> dict[str, Deliverable]:
        """The encoder with its start/end Linear (``BertForQuestionAnswering`` natively)."""
        return {"": Deliverable(self.encoder, "qa", self.qa_outputs)}

    def span_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits (B, T) of a batch."""
        hidden = self.encode(batch)  # (B, T, C)
        logits = self.qa_outputs(hidden).float()  # (B, T, 2)
        start, end = logits.unbind(-1)  # (B, T), (B, T)
        return start, end

    def loss(self, start: torch.Tensor, end: torch.Tensor, batch: dict[str, torch.Tensor]
             ) -> torch.Tensor:
        """Mean of the start and end cross-entropies."""
        return (F.cross_entropy(start, batch["start_positions"])
                + F.cross_entropy(end, batch["end_positions"])) / 2

    def forward(self, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss and start and end logits (B, T) of a batch."""
        start, end = self.span_logits(batch)
        return self.loss(start, end, batch), start, end

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    # Evaluation: keep every window's logits, decode each question, score with SQuAD's metric.

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, start, end = self(batch)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # (B,) real tokens per window
        start_cpu, end_cpu = start.detach().cpu().numpy(), end.detach().cpu().numpy()
        for row, (index, length) in enumerate(zip(batch["feature_index"].tolist(), lengths,
                                                  strict=True)):
            self._logits[index] = (start_cpu[row, :length], end_cpu[row, :length])
        self._losses.append((float(loss), len(lengths)))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._logits, self._losses = {}, []

    def on_test_epoch_start(self) -> None:
        self._logits, self._losses = {}, []

    def on_validation_epoch_end(self) -> None:
        self._log_answers("val", "validate", prog_bar=True)

    def on_test_epoch_end(self) -> None:
        self._log_answers("test", "test", prog_bar=False)

    def predict_answers(self, datamodule: Any, split: str) -> dict[str, str]:
        """The answer text of each question of ``split`` from the logits collected so far."""
        return decode_answers(datamodule.examples(split), datamodule.features(split),
                              self._logits, self.n_best_size, self.max_answer_length,
                              self.version_2_with_negative, self.null_score_diff_threshold)

    def _log_answers(self, prefix: str, stage: str, prog_bar: bool) -> None:
        """Decode the answers of every process's windows and log the official scores."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "features"):
            raise FillmaskError("QuestionAnswering evaluates with a QuestionAnsweringDataModule "
                                "(data: class_path: fillmask.data.squad."
                                "QuestionAnsweringDataModule)")
        logits, losses = _gather((self._logits, self._losses))
        self._logits, self._losses = {}, []
        if self.trainer.sanity_checking:
            return
        self._logits = logits
        split = datamodule.evaluation_split(stage)
        scores = squad_scores(datamodule.references(split), self.predict_answers(datamodule,
                                                                                  split))
        self._logits = {}
        count = sum(n for _, n in losses)
        self.log(f"{prefix}/loss", sum(v * n for v, n in losses) / max(count, 1),
                 rank_zero_only=False)
        for name, value in scores.items():
            if name != "total":
                self.log(f"{prefix}/{name}", value, prog_bar=prog_bar and name in (
                    "exact_match", "f1"), rank_zero_only=False)


def _gather(local: tuple[dict[int, Any], list[tuple[float, int]]]
            ) -> tuple[dict[int, Any], list[tuple[float, int]]]:
    """Every process's logits and losses merged (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    logits: dict[int, Any] = {}
    losses: list[tuple[float, int]] = []
    for part_logits, part_losses in parts:
        logits |= part_logits
        losses += part_losses
    return logits, losses
