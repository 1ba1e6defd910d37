"""ELECTRA: replaced-token detection, with DeBERTa-v3's gradient-disentangled embedding sharing.

A small generator (an MLM) fills the masked positions with tokens it samples; a discriminator
(the encoder users keep) labels every token as original or replaced. Loss = generator MLM +
``rtd_weight`` x discriminator binary cross-entropy over real tokens. A sampled token that
equals the original counts as original.

Embedding sharing between the two:
- ``tied`` (ELECTRA): both read the same token, position and type embeddings, and both losses
  train them.
- ``gdes`` (DeBERTa-v3): the discriminator's token embedding is the generator's with gradients
  stopped, plus a zero-initialised delta; the discriminator loss never reaches the generator's
  embedding, so the two objectives stop pulling it in opposite directions.
- ``none``: separate embeddings.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryPrecision, BinaryRecall

from fillmask.architectures.base import Encoder, encoder_inputs, real_tokens
from fillmask.heads import mlm_head
from fillmask.masking.base import IGNORE_INDEX
from fillmask.masking.random import derive_seed
from fillmask.objectives.base import Deliverable, EncoderObjective

Sharing = Literal["tied", "gdes", "none"]


class DeltaEmbedding(nn.Module):
    """An embedding that reads ``stop_gradient(shared) + delta`` (DeBERTa-v3's GDES)."""

    def __init__(self, shared: nn.Embedding) -> None:
        super().__init__()
        self.shared = [shared]  # a list, so the shared table is not registered twice
        self.delta = nn.Parameter(torch.zeros_like(shared.weight))

    @property
    def weight(self) -> torch.Tensor:
        return self.shared[0].weight.detach() + self.delta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def generator_from(discriminator: Encoder, size_divisor: int, num_layers: int | None,
                   overrides: dict[str, Any] | None = None) -> Encoder:
    """A generator shaped like ``discriminator``: hidden and feed-forward sizes divided by
    ``size_divisor`` (ELECTRA: 4 small, 3 base), heads = hidden / 64, embeddings as wide as the
    discriminator's (so they can be shared), ``num_layers`` (default: the same depth), then any
    other constructor arguments in ``overrides``."""
    args = discriminator.spec()["init_args"]
    unknown = sorted(set(overrides or {}) - set(args))
    if unknown:
        raise ValueError(f"generator_overrides names {unknown}, which "
                         f"{type(discriminator).__name__} does not take; use its arguments "
                         f"({', '.join(sorted(args))})")
    hidden = args["hidden_size"] // size_divisor
    shape = dict(
        hidden_size=hidden,
        intermediate_size=args["intermediate_size"] // size_divisor,
        num_heads=max(1, hidden // 64) if size_divisor > 1 else args["num_heads"],
        embedding_size=getattr(discriminator, "embedding_size", args["hidden_size"]),
        num_layers=num_layers or args["num_layers"],
    )
    return discriminator.resized(**{**shape, **(overrides or {})})


class DiscriminatorHead(nn.Module):
    """Linear -> GELU -> Linear(1): one replaced-or-original logit per token."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(F.gelu(self.dense(hidden))).squeeze(-1)  # (B, T)


class ReplacedTokenDetection(EncoderObjective):
    """ELECTRA pretraining: generator MLM + discriminator replaced-token detection."""

    def __init__(
        self,
        encoder: Encoder,
        generator_size_divisor: int = 4,
        generator_layers: int | None = None,
        rtd_weight: float = 50.0,
        embedding_sharing: Sharing = "tied",
        temperature: float = 1.0,
        generator_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Configure the objective.

        Args:
            encoder: The discriminator: the encoder downstream users take.
            generator_size_divisor: Generator hidden and feed-forward sizes are the
                discriminator's divided by this (ELECTRA: 4 small, 3 base; DeBERTa-v3: 1).
            generator_layers: Generator depth (default: the discriminator's; DeBERTa-v3: half).
            rtd_weight: Weight of the discriminator loss (ELECTRA: 50; DeBERTa-v3: 10).
            embedding_sharing: ``tied`` (ELECTRA), ``gdes`` (DeBERTa-v3) or ``none``.
            temperature: Sampling temperature of the generator (Gumbel-max at 1.0).
            generator_overrides: Encoder arguments of the generator alone (DeBERTa-v3:
                ``{enhanced_mask_decoder: true}``, the decoder only its MLM head uses).
            **kwargs: Optimisation options of :class:`EncoderObjective`.
        """
        super().__init__(encoder, **kwargs)
        if embedding_sharing not in ("tied", "gdes", "none"):
            raise ValueError(f"embedding_sharing={embedding_sharing!r}: choose tied, gdes or none")
        self.generator = generator_from(encoder, generator_size_divisor, generator_layers,
                                        generator_overrides)
        self._share_embeddings(embedding_sharing)
        self.generator_head = mlm_head(self.generator)
        self.discriminator_head = DiscriminatorHead(encoder.hidden_size)
        self.val_generator_loss = MeanMetric()
        self.val_discriminator_loss = MeanMetric()
        self.val_generator_accuracy = MeanMetric()
        self.val_accuracy = BinaryAccuracy()
        self.val_precision = BinaryPrecision()
        self.val_recall = BinaryRecall()

    def _share_embeddings(self, sharing: Sharing) -> None:
        if sharing == "none":
            return
        disc, gen = self.encoder.embedding_tables(), self.generator.embedding_tables()
        shared = [role for role in disc if role in gen
                  and disc[role].weight.shape == gen[role].weight.shape]
        if "tokens" not in shared:
            raise ValueError(f"embedding_sharing={sharing!r} needs generator and discriminator "
                             f"embeddings of one shape, got {tuple(gen['tokens'].weight.shape)} "
                             f"and {tuple(disc['tokens'].weight.shape)}")
        for role in shared:
            if sharing == "tied":
                self.generator.set_embedding_table(role, disc[role])
            elif role == "tokens":  # gdes: the discriminator reads the generator's through a delta
                self.encoder.set_embedding_table(role, DeltaEmbedding(gen[role]))
            else:
                self.encoder.set_embedding_table(role, gen[role])

    # The loss.

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        inputs = encoder_inputs(batch)
        selected = labels != IGNORE_INDEX  # (B, T)
        gen_hidden = self.generator(batch["input_ids"], **inputs)  # (B, T, Cg)
        gen_logits = self.generator_head(gen_hidden[selected])  # (N, V)
        targets = labels[selected]
        if targets.numel():
            gen_loss = F.cross_entropy(gen_logits.float(), targets)
        else:
            gen_loss = gen_logits.sum() * 0.0
        sampled = self._sample(gen_logits.detach(), batch.get("sample_id"))  # (N,)
        corrupted = batch["input_ids"].clone()
        corrupted[selected] = sampled
        replaced = torch.zeros_like(selected)
        replaced[selected] = sampled != targets
        disc_logits = self.discriminator_head(self.encoder(corrupted, **inputs))  # (B, T)
        real = real_tokens(batch)  # (B, T)
        disc_loss = F.binary_cross_entropy_with_logits(disc_logits[real].float(),
                                                       replaced[real].float())
        total = gen_loss + self.hparams.rtd_weight * disc_loss
        return {"loss": total, "generator_loss": gen_loss, "discriminator_loss": disc_loss,
                "generator_correct": (gen_logits.argmax(-1) == targets).float(),
                "disc_logits": disc_logits[real], "replaced": replaced[real]}

    def _sample(self, logits: torch.Tensor, sample_ids: torch.Tensor | None) -> torch.Tensor:
        """Gumbel-max sampling from the generator's distribution at ``temperature``.

        The noise comes from a generator keyed by (step, the batch's sample ids), not from the
        global RNG, so a resumed run samples exactly what the uninterrupted one did."""
        first = int(sample_ids[0]) if sample_ids is not None and len(sample_ids) else 0
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(derive_seed(self.global_step, first, int(self.training)))
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
        uniform = uniform.clamp_(1e-9, 1.0 - 1e-9)
        gumbel = -torch.log(-torch.log(uniform))
        return (logits.float() / self.hparams.temperature + gumbel).argmax(-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._step(batch)["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        predicted = out["disc_logits"] > 0
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/generator_loss", out["generator_loss"])
        self.log("train/discriminator_loss", out["discriminator_loss"])
        if out["generator_correct"].numel():
            self.log("train/generator_accuracy", out["generator_correct"].mean())
        self.log("train/discriminator_accuracy",
                 (predicted == out["replaced"]).float().mean())
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        self.val_generator_loss.update(out["generator_loss"])
        self.val_discriminator_loss.update(out["discriminator_loss"])
        if out["generator_correct"].numel():
            self.val_generator_accuracy.update(out["generator_correct"])
        probabilities = torch.sigmoid(out["disc_logits"].float())
        for metric in (self.val_accuracy, self.val_precision, self.val_recall):
            metric.update(probabilities, out["replaced"].long())

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _log_evaluation(self, split: str) -> None:
        gen, disc = self.val_generator_loss.compute(), self.val_discriminator_loss.compute()
        values = {
            "loss": gen + self.hparams.rtd_weight * disc,
            "generator_loss": gen, "discriminator_loss": disc,
            "generator_accuracy": self.val_generator_accuracy.compute(),
            "discriminator_accuracy": self.val_accuracy.compute(),
            "replaced_precision": self.val_precision.compute(),
            "replaced_recall": self.val_recall.compute(),
        }
        for name, value in values.items():
            self.log(f"{split}/{name}", value, prog_bar=name in ("loss", "discriminator_accuracy"),
                     sync_dist=True)
        for metric in (self.val_generator_loss, self.val_discriminator_loss,
                       self.val_generator_accuracy, self.val_accuracy, self.val_precision,
                       self.val_recall):
            metric.reset()

    def deliverables(self) -> dict[str, Deliverable]:
        """The discriminator with its replaced-token head (GDES deltas merged) and the
        generator with its MLM head."""
        return {"discriminator": Deliverable(self.discriminator(), "rtd", self.discriminator_head),
                "generator": Deliverable(self.generator, "mlm", self.generator_head)}

    def discriminator(self) -> Encoder:
        """A standalone copy of the discriminator, its token embedding materialised under GDES
        (``shared + delta``): what downstream users fine-tune."""
        standalone = copy.deepcopy(self.encoder)
        tokens = standalone.embedding_tables()["tokens"]
        if isinstance(tokens, DeltaEmbedding):
            merged = nn.Embedding(*tokens.delta.shape)
            with torch.no_grad():
                merged.weight.copy_(tokens.weight)
            standalone.set_embedding_table("tokens", merged)
        return standalone
