"""Every registered architecture (fillmask's and installed plugins') under every objective it
can train with, and every registered masking under MLM: one optimiser step at tiny size, through
a Lightning Trainer, with a finite loss that moves the encoder's weights."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fillmask.architectures.base import Encoder, real_tokens
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import EncoderObjective
from fillmask.objectives.classify import SequenceClassification, TokenClassification
from fillmask.objectives.distill import Distillation
from fillmask.objectives.mlm import MaskedLM
from fillmask.objectives.rtd import ReplacedTokenDetection
from fillmask.objectives.span_boundary import SpanBoundaryLM
from fillmask.registry import registry
from fillmask.testing import fit_losses

ASSETS = Path(__file__).resolve().parent / "assets" / "golden"
FOUND = registry()
ARCHITECTURES = sorted(FOUND.group("architectures"))
MASKINGS = sorted(FOUND.group("maskings"))


@functools.cache
def batches(masking: str) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Two training batches of the golden corpus masked by ``masking``, and the vocab size."""
    dm = MaskedLMDataModule(corpus=str(ASSETS / "corpus.txt"),
                            tokenizer=str(ASSETS / "tokenizer.json"), max_length=32,
                            batch_size=8, masking=FOUND.group("maskings")[masking].cls())
    dm.prepare_data()
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    return [next(loader), next(loader)], dm.vocab_size


def tiny_encoder(architecture: str, vocab_size: int) -> Encoder:
    cls = FOUND.group("architectures")[architecture].cls
    assert hasattr(cls, "preset"), f"{architecture} needs a `preset('tiny')` for tests"
    return cls.preset("tiny", vocab_size=vocab_size, max_positions=32)


def distillation(encoder: Encoder, folder: Path) -> Distillation:
    """Distil from a teacher checkpoint of the student's own architecture."""
    teacher = MaskedLM(copy.deepcopy(encoder))
    checkpoint = {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}
    teacher.on_save_checkpoint(checkpoint)
    checkpoint["fillmask"]["tokenizer"] = (ASSETS / "tokenizer.json").read_text()
    torch.save(checkpoint, folder / "teacher.ckpt")
    return Distillation(teacher=str(folder / "teacher.ckpt"), encoder=encoder)


def with_sequence_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**batch, "labels": torch.arange(len(batch["input_ids"])) % 2}


def with_token_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    labels = (batch["input_ids"] % 3).masked_fill(~real_tokens(batch), IGNORE_INDEX)
    return {**batch, "labels": labels}


Recipe = tuple[Callable[[Encoder, Path], EncoderObjective], str, Callable | None]
OBJECTIVES: dict[str, Recipe] = {
    # name: (build from a tiny encoder, the masking its batches need, batch transform)
    "MaskedLM": (lambda e, _: MaskedLM(e), "TokenMasking", None),
    "SpanBoundaryLM": (lambda e, _: SpanBoundaryLM(e), "SpanMasking", None),
    "ReplacedTokenDetection": (
        lambda e, _: ReplacedTokenDetection(e, generator_size_divisor=2, generator_layers=1,
                                            embedding_sharing="gdes"), "TokenMasking", None),
    "Distillation": (distillation, "TokenMasking", None),
    "SequenceClassification": (lambda e, _: SequenceClassification(e, num_labels=2),
                               "TokenMasking", with_sequence_labels),
    "TokenClassification": (lambda e, _: TokenClassification(e, num_labels=3), "TokenMasking",
                            with_token_labels),
}


def one_step(model: EncoderObjective, data: list[dict[str, torch.Tensor]], folder: Path) -> None:
    """Train one optimiser step; the loss is finite and the encoder's weights moved."""
    before = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    losses = fit_losses(model, data, folder, steps=1)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    after = model.encoder.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, "no encoder weight changed after one optimiser step"


def test_every_registered_objective_has_a_recipe_here():
    missing = sorted(set(FOUND.group("objectives")) - set(OBJECTIVES))
    assert not missing, f"add a tiny recipe for {missing} to OBJECTIVES in this file"


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_trains_under_objective(architecture, objective, tmp_path):
    build, masking, transform = OBJECTIVES[objective]
    data, vocab_size = batches(masking)
    if transform is not None:
        data = [transform(b) for b in data]
    torch.manual_seed(0)
    one_step(build(tiny_encoder(architecture, vocab_size), tmp_path), data, tmp_path)


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_trains_under_masking(architecture, masking, tmp_path):
    data, vocab_size = batches(masking)
    assert any((b["labels"] != IGNORE_INDEX).any() for b in data)
    torch.manual_seed(0)
    one_step(MaskedLM(tiny_encoder(architecture, vocab_size)), data, tmp_path)
