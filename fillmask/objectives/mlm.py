"""Masked-language modelling: the fill-mask objective itself."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fillmask.architectures.base import Encoder, encoder_inputs
from fillmask.heads import MLMHead
from fillmask.masking.base import IGNORE_INDEX

Schedule = Literal["linear", "cosine", "constant"]


class MaskedLM(L.LightningModule):
    """An encoder, a tied MLM head that decodes masked positions only, and AdamW with warm-up."""

    def __init__(
        self,
        encoder: Encoder,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        warmup_steps: float = 10_000,
        schedule: Schedule = "linear",
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        tie_embeddings: bool = True,
    ) -> None:
        """Configure the objective.

        Args:
            encoder: Any fillmask encoder; its vocabulary size is linked from the tokenizer.
            learning_rate: Peak AdamW learning rate.
            weight_decay: Decoupled weight decay (not applied to biases, norms or embeddings'
                bias-like parameters).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: Linear warm-up length: optimiser steps, or a fraction (< 1) of all steps.
            schedule: Decay after warm-up: ``linear``, ``cosine`` or ``constant``.
            min_lr_ratio: Final learning rate as a fraction of the peak.
            total_steps: Length of the schedule in optimiser steps; defaults to the trainer's
                (``max_steps`` or epochs). Set it when one schedule spans several runs, as
                BERT's sequence-128 and sequence-512 phases do.
            tie_embeddings: Decode with the input token embedding (BERT) or, when false, with
                an output matrix of its own (learns faster in small, short runs; exports as
                ``BertForMaskedLM`` with ``tie_word_embeddings: false``).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self.head = MLMHead(encoder.token_embedding(), tied=tie_embeddings)
        self.val_loss = MeanMetric()
        self.val_accuracy = MulticlassAccuracy(
            num_classes=encoder.vocab_size, average="micro", ignore_index=IGNORE_INDEX
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and masked-position logits (N, V) of one batch."""
        hidden = self.encoder(batch["input_ids"], **encoder_inputs(batch))  # (B, T, C)
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX  # (B, T)
        logits = self.head(hidden[selected])  # (N, V)
        targets = labels[selected]  # (N,)
        if targets.numel() == 0:  # nothing masked: contribute zero, keep the graph
            return logits.sum() * 0.0, logits
        return F.cross_entropy(logits.float(), targets), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self(batch)
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        if targets.numel():
            self.log("train/accuracy", (logits.argmax(-1) == targets).float().mean())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self(batch)
        targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
        self.val_loss.update(loss, weight=max(targets.numel(), 1))
        self.val_accuracy.update(logits, targets)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val", prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test", prog_bar=False)

    def _log_evaluation(self, split: str, prog_bar: bool) -> None:
        """Log loss, perplexity and masked-token accuracy over the epoch, then reset them."""
        loss = self.val_loss.compute()
        self.log(f"{split}/loss", loss, prog_bar=prog_bar, sync_dist=True)
        self.log(f"{split}/perplexity", torch.exp(loss), sync_dist=True)
        self.log(f"{split}/accuracy", self.val_accuracy.compute(), prog_bar=prog_bar,
                 sync_dist=True)
        self.val_loss.reset()
        self.val_accuracy.reset()

    # Optimisation.

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self._parameter_groups(), lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps
        )
        total = hp.total_steps or max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps
        warmup = int(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)
        scale = warmup_then_decay(warmup, total, hp.schedule, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
        return [{"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # Checkpoints carry what `fillmask fill` needs to rebuild the model without the YAML.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info: dict[str, Any] = {"encoder": self.encoder.spec(),
                                "objective": f"{type(self).__module__}.{type(self).__qualname__}"}
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            info["tokenizer"] = datamodule.tokenizer.to_str()
        checkpoint["fillmask"] = info

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "tokenizer"):
            return
        tokens = datamodule.tokenizer.get_vocab_size()
        if tokens > self.encoder.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokens} tokens but the encoder's embedding has only "
                f"{self.encoder.vocab_size} rows; set the encoder's vocab_size to at least "
                f"{tokens} (the CLI links it from the data module) or use a smaller tokenizer"
            )


def warmup_then_decay(warmup: int, total: int, schedule: Schedule, floor: float):
    """Learning-rate multiplier: linear warm-up to 1, then decay to ``floor`` at ``total``."""

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return scale
