"""Masked-language modelling: the fill-mask objective, with BERT's optional sentence-pair head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

from fillmask.architectures.base import Encoder, encoder_inputs
from fillmask.heads import MaskedLMParts, PairHead, mlm_head
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import Deliverable, EncoderObjective, warmup_then_decay

__all__ = ["MaskedLM", "warmup_then_decay"]


class MaskedLM(EncoderObjective):
    """An encoder, a tied MLM head that decodes masked positions only, and AdamW with warm-up.

    With ``pair_head`` it also classifies sentence pairs from the CLS state (next-sentence
    prediction, BERT, or sentence-order prediction, ALBERT: whichever the data module's
    ``SentencePairs`` task produces) and adds that loss.
    """

    def __init__(
        self,
        encoder: Encoder,
        tie_embeddings: bool = True,
        pair_head: bool = False,
        pair_loss_weight: float = 1.0,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Configure the objective.

        Args:
            encoder: Any fillmask encoder; its vocabulary size is linked from the tokenizer.
            tie_embeddings: Decode with the input token embedding (BERT) or, when false, with
                an output matrix of its own (learns faster in small, short runs; exports as
                ``BertForMaskedLM`` with ``tie_word_embeddings: false``).
            pair_head: Add a sentence-pair classifier (pooler + 2-way linear, BERT's NSP layout)
                trained on the batch's ``pair_label`` (data: ``packing: SentencePairs``).
            pair_loss_weight: Weight of the sentence-pair loss in the total.
            init_from: Continued pretraining (BioBERT, SciBERT): start from this fillmask
                checkpoint or transformers folder. The encoder must have its shape; with a
                new (domain) tokenizer, rows of tokens both vocabularies share are copied and
                new tokens start from the mean of their old pieces. Ignored when resuming a run
                (the checkpoint's weights win).
            **kwargs: Optimisation options of :class:`EncoderObjective` (learning_rate, ...).
        """
        super().__init__(encoder, **kwargs)
        self.head = mlm_head(encoder, tied=tie_embeddings)
        self.pair_head = PairHead(encoder.hidden_size) if pair_head else None
        self.val_loss = MeanMetric()
        self.val_accuracy = MulticlassAccuracy(
            num_classes=encoder.vocab_size, average="micro", ignore_index=IGNORE_INDEX
        )
        self.val_pair_accuracy = BinaryAccuracy() if pair_head else None
        self.val_extra: nn.ModuleDict = nn.ModuleDict()  # name -> MeanMetric of extra losses
        self._initialised = False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.init_from and stage == "fit" and not self._initialised:
            self.initialise_from(self.hparams.init_from)

    def initialise_from(self, source: str) -> None:
        """Copy a pretrained model's weights into this one (see ``init_from``)."""
        from fillmask.objectives.pretrained import load_pretrained, transfer_weights

        pretrained, old_tokenizer = load_pretrained(source)
        new_tokenizer = self._datamodule_tokenizer() or old_tokenizer
        counts = transfer_weights(self, pretrained, new_tokenizer, old_tokenizer)
        self._initialised = True
        rank_zero_info(f"initialised from {source}: {counts['copied']} token rows copied, "
                       f"{counts['composed']} composed from the old tokenizer's pieces")

    @classmethod
    def from_parts(cls, parts: MaskedLMParts) -> MaskedLM:
        """A MaskedLM around an encoder and MLM head read without an objective (a
        transformers folder, :func:`fillmask.sources.read_transformers`)."""
        model = cls(parts.encoder, tie_embeddings=parts.head.decoder is None)
        model.head.load_state_dict(parts.head.state_dict())
        return model

    def deliverables(self) -> dict[str, Deliverable]:
        """The encoder with its MLM head (a pair or span-boundary head stays behind)."""
        return {"": Deliverable(self.encoder, "mlm", self.head)}

    # The loss.

    def mlm_loss(self, hidden: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy over masked positions: (loss, logits (N, V), targets (N,))."""
        selected = labels != IGNORE_INDEX  # (B, T)
        return self.masked_loss(hidden[selected], labels[selected])

    def masked_loss(self, states: torch.Tensor, targets: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy of the masked tokens' states (N, C) against their ``targets`` (N,):
        (loss, logits (N, V), targets)."""
        logits = self.head(states)  # (N, V)
        if targets.numel() == 0:  # nothing masked: contribute zero, keep the graph
            return logits.sum() * 0.0, logits, targets
        return F.cross_entropy(logits.float(), targets), logits, targets

    def needs_every_state(self) -> bool:
        """Whether a loss reads hidden states beyond the masked tokens' (the pair head reads
        CLS, subclasses' extra losses others); if not, the encoder computes only what the
        masked tokens need (:meth:`Encoder.selected_states`)."""
        return self.pair_head is not None or type(self).extra_losses is not MaskedLM.extra_losses

    def extra_losses(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor
                     ) -> dict[str, tuple[torch.Tensor, float]]:
        """Auxiliary losses and their weights; subclasses add theirs (span boundary, ...)."""
        if self.pair_head is None:
            return {}
        if "pair_label" not in batch:
            raise ValueError("pair_head needs sentence-pair batches; set data.packing to "
                             "SentencePairs (task nsp or sop)")
        logits = self.pair_head(hidden[:, 0])  # (B, 2)
        loss = F.cross_entropy(logits.float(), batch["pair_label"])
        self._pair_logits = logits
        return {"pair_loss": (loss, self.hparams.pair_loss_weight)}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss and masked-position logits (N, V) of one batch."""
        total, logits, _, _ = self._step(batch)
        return total, logits

    def _step(self, batch: dict[str, torch.Tensor]):
        if not self.needs_every_state():
            selected = batch["labels"] != IGNORE_INDEX  # (B, T)
            states = self.encoder.selected_states(batch["input_ids"], selected,
                                                  **encoder_inputs(batch))  # (N, C)
            mlm, logits, targets = self.masked_loss(states, batch["labels"][selected])
            return mlm, logits, targets, {"mlm_loss": mlm}
        hidden = self.encode(batch)
        mlm, logits, targets = self.mlm_loss(hidden, batch["labels"])
        extras = self.extra_losses(batch, hidden)
        total = mlm + sum(weight * loss for loss, weight in extras.values())
        return total, logits, targets, {"mlm_loss": mlm, **{k: v for k, (v, _) in extras.items()}}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits, targets, parts = self._step(batch)
        if targets.numel():
            self.log("train/accuracy", (logits.argmax(-1) == targets).float().mean())
        if len(parts) > 1:
            for name, value in parts.items():
                self.log(f"train/{name}", value)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, logits, targets, parts = self._step(batch)
        self.val_loss.update(parts["mlm_loss"], weight=max(targets.numel(), 1))
        self.val_accuracy.update(logits, targets)
        for name, value in parts.items():
            if name != "mlm_loss":
                if name not in self.val_extra:
                    self.val_extra[name] = MeanMetric().to(self.device)
                self.val_extra[name].update(value)
        if self.val_pair_accuracy is not None:
            self.val_pair_accuracy.update(self._pair_logits.argmax(-1), batch["pair_label"])

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", prog_bar=False)

    def _log_evaluation(self, split: str, prog_bar: bool) -> None:
        """Log MLM loss, perplexity and masked-token accuracy (plus extra losses and the pair
        accuracy) over the epoch, then reset them."""
        loss = self.val_loss.compute()
        self.log(f"{split}/loss", loss, prog_bar=prog_bar, sync_dist=True)
        self.log(f"{split}/perplexity", torch.exp(loss), sync_dist=True)
        self.log(f"{split}/accuracy", self.val_accuracy.compute(), prog_bar=prog_bar,
                 sync_dist=True)
        for name, metric in self.val_extra.items():
            self.log(f"{split}/{name}", metric.compute(), sync_dist=True)
            metric.reset()
        if self.val_pair_accuracy is not None:
            self.log(f"{split}/pair_accuracy", self.val_pair_accuracy.compute(), sync_dist=True)
            self.val_pair_accuracy.reset()
        self.val_loss.reset()
        self.val_accuracy.reset()
