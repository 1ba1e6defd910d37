"""Phased pretraining declared once: ModernBERT's and mmBERT's schedules as one ``fillmask fit``.

``Phases`` is a callback that lists the run's phases, each with its length (training tokens,
optimiser steps, or a share of ``trainer.max_steps``) and what changes at its start: the
sequence length and packing, the masking rate, the mixture temperature or weights, encoder
options that need no new weights (rotary bases), the per-device batch size and gradient
accumulation, and the learning-rate segment.
Anything a phase leaves out stays as the phase before set it (the first inherits the YAML's
``data`` and ``trainer`` settings).

Each phase is one Lightning epoch: the data module builds the phase's loader when the epoch
starts, so a checkpoint taken anywhere resumes in the same phase at the same batch. Weights,
optimiser state (moments and step counts) and the learning-rate schedule carry over from one
phase to the next; the data position does not: each phase draws its own passes over the corpus,
shuffled and masked from (seed, phase, pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from fillmask.data.packing import Packing
from fillmask.data.phasing import DataPhase
from fillmask.errors import FillmaskError
from fillmask.objectives.base import data_parallel_processes

Shape = Literal["constant", "linear", "cosine", "sqrt"]


class PhaseError(FillmaskError, ValueError):
    """Phases that cannot be run as declared, with the phase and option to fix."""


@dataclass
class LearningRate:
    """A phase's learning-rate segment, as fractions of the objective's ``learning_rate``."""

    shape: Shape = "constant"
    """``constant`` (hold ``start``), or ``linear``, ``cosine`` or ``sqrt`` (1 - sqrt, the
    trapezoid's decay of ModernBERT and MiniCPM) from ``start`` to ``end``."""
    start: float | None = None
    """The rate after the phase's warm-up; default: where the previous phase ended (1.0)."""
    end: float = 0.0
    """The rate at the phase's end (not used by ``constant``)."""
    warmup_tokens: float = 0.0
    """Linear warm-up from 0 to ``start`` at the phase's start, in training tokens."""
    warmup_steps: int = 0
    """The same in optimiser steps (added to ``warmup_tokens``)."""


@dataclass
class Phase:
    """One phase: its length and what changes when it starts (None: unchanged)."""

    tokens: float | None = None
    """Length in training tokens (sequences x max_length), as the papers count them."""
    steps: int | None = None
    """Length in optimiser steps (instead of ``tokens``)."""
    share: float | None = None
    """Length as a share of ``trainer.max_steps`` (instead of ``tokens`` or ``steps``), as a
    warm-up-stable-decay run states its decay: shares of 0.75 and 0.25 split the run 3:1 at
    any ``max_steps``."""
    name: str | None = None
    max_length: int | None = None
    packing: Packing | None = None
    mask_rate: float | None = None
    """The training masking rate of the data module's masking (its eval_rate stays)."""
    mixture_alpha: float | None = None
    """The mixture's sampling temperature (XLM-R / mmBERT alpha) when no weights are given."""
    mixture_weights: list[float] | None = None
    """One weight per corpus of the mixture (replacing alpha)."""
    corpora: list[str] | None = None
    """The mixture members sampled from this phase on, by name (``data.mixture[].name`` or
    path): mmBERT adds languages phase by phase. None: unchanged (at first, every member)."""
    encoder: dict[str, Any] = field(default_factory=dict)
    """Encoder options that change without new weights (its ``phase_options``)."""
    batch_size: int | None = None
    """Sequences per batch per device."""
    accumulate_grad_batches: int | None = None
    """Batches per optimiser step: with batch_size and the processes, the global batch."""
    lr: LearningRate | None = None
    """The learning-rate segment; None: hold the rate the previous phase ended at."""
    batch_ramp: BatchRamp | None = None
    """Grow the global batch by accumulation over the phase's first tokens."""


@dataclass
class BatchRamp:
    """Batch-size warm-up at a phase's start by gradient accumulation (ModernBERT ramped its
    global batch over the first 50B tokens): the first ``tokens`` of the phase run in equal
    parts at accumulation ``start``, ``start + 1``, ... up to the phase's own, each part with a
    global batch of ``batch_size x accumulation x processes`` sequences."""

    tokens: float
    start: int = 1


@dataclass(frozen=True)
class PlannedPhase:
    """A phase (or one part of a phase's batch ramp) with every setting resolved and its
    length in optimiser steps; it is one epoch of the run."""

    index: int
    """Position in the run's epochs."""
    phase: int
    """The declared phase (index in ``Phases.phases``) it belongs to."""
    name: str
    start: int
    """The optimiser step it starts at."""
    steps: int
    accumulate: int
    processes: int
    encoder: dict[str, Any]
    data: DataPhase

    @property
    def global_batch(self) -> int:
        return self.data.batch_size * self.accumulate * self.processes

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.data.max_length


def plan(phases: list[Phase], datamodule: Any, accumulate: int, processes: int,
         max_steps: int = -1) -> list[PlannedPhase]:
    """Resolve ``phases`` against the data module's settings (inherited phase by phase), each
    split into the parts of its batch ramp if it has one; ``max_steps`` is the trainer's (for
    lengths given as a ``share``)."""
    if not phases:
        raise PhaseError("Phases needs at least one phase")
    phases = shares_to_steps(phases, max_steps)
    current: dict[str, Any] = dict(
        max_length=datamodule.max_length, packing=datamodule.packing,
        mask_rate=datamodule.masking.rate, batch_size=datamodule.batch_size,
        mixture_alpha=datamodule.mixture_alpha, mixture_weights=None,
        accumulate_grad_batches=accumulate, corpora=None)
    encoder: dict[str, Any] = {}
    planned: list[PlannedPhase] = []
    for index, phase in enumerate(phases):
        label = phase_label(index, phase)
        for key in current:
            value = getattr(phase, key)
            if value is not None:
                current[key] = value
        encoder = {**encoder, **phase.encoder}
        check_phase(phase, current, label, len(datamodule.sources))
        members = corpus_indices(current["corpora"], datamodule.sources, label)
        weights = current["mixture_weights"]
        settings = dict(max_length=current["max_length"], packing=current["packing"],
                        mask_rate=current["mask_rate"], batch_size=current["batch_size"],
                        mixture_alpha=current["mixture_alpha"],
                        mixture_weights=tuple(weights) if weights else None, corpora=members)
        name, skip = phase.name or f"phase {index + 1}", 0
        for part, (accumulation, steps) in enumerate(parts(phase, current, processes, label)):
            samples = steps * accumulation * current["batch_size"]
            start = planned[-1].start + planned[-1].steps if planned else 0
            title = name if phase.batch_ramp is None else f"{name}, part {part + 1}"
            planned.append(PlannedPhase(len(planned), index, title, start, steps, accumulation,
                                        processes, dict(encoder), DataPhase(
                                            samples=samples, phase=index, skip=skip,
                                            **settings)))
            skip += samples * processes
    return planned


def phase_label(index: int, phase: Phase) -> str:
    """How errors name a phase: its position, and its name if it has one."""
    return f"phase {index + 1}" + (f" ({phase.name})" if phase.name else "")


def shares_to_steps(phases: list[Phase], max_steps: int) -> list[Phase]:
    """``phases`` with each ``share`` replaced by its steps of ``max_steps``: a phase ends at
    the rounded step of its shares so far, so shares adding up to 1 fill ``max_steps``."""
    resolved, before = [], 0.0
    for index, phase in enumerate(phases):
        if phase.share is None or phase.tokens is not None or phase.steps is not None:
            resolved.append(phase)  # check_phase names what is wrong with it
            continue
        label = phase_label(index, phase)
        if max_steps < 1:
            raise PhaseError(f"{label}: share={phase.share:g} is a share of trainer.max_steps, "
                             "which is not set; set it or give the length as tokens or steps")
        steps = round((before + phase.share) * max_steps) - round(before * max_steps)
        if not 0.0 < phase.share <= 1.0 or steps < 1:
            raise PhaseError(f"{label}: share={phase.share:g} of trainer.max_steps={max_steps} "
                             "must be in (0, 1] and at least one step")
        before += phase.share
        resolved.append(replace(phase, share=None, steps=steps))
    return resolved


def parts(phase: Phase, current: dict[str, Any], processes: int, label: str
          ) -> list[tuple[int, int]]:
    """(accumulation, optimiser steps) of each part of ``phase``: one part, or the ramp's."""
    final = current["accumulate_grad_batches"]
    sequence_tokens = current["batch_size"] * processes * current["max_length"]
    total = phase.tokens if phase.tokens is not None else phase.steps * final * sequence_tokens
    ramp = phase.batch_ramp
    if ramp is None:
        steps = phase.steps if phase.steps is not None else \
            math.ceil(total / (final * sequence_tokens))
        return [(final, steps)]
    if not 1 <= ramp.start < final:
        raise PhaseError(f"{label}: batch_ramp.start={ramp.start} must be at least 1 and below "
                         f"the phase's accumulate_grad_batches={final}")
    if not 0 < ramp.tokens < total:
        raise PhaseError(f"{label}: batch_ramp.tokens={ramp.tokens:g} must be positive and "
                         f"below the phase's {total:g} tokens")
    values = range(ramp.start, final + 1)
    share = ramp.tokens / (len(values) - 1)  # the last value runs the rest of the phase
    out = [(a, max(1, math.ceil(share / (a * sequence_tokens)))) for a in values[:-1]]
    rest = total - sum(a * n * sequence_tokens for a, n in out)
    return [*out, (final, max(1, math.ceil(rest / (final * sequence_tokens))))]


def corpus_indices(names: list[str] | None, sources: list[Any], label: str
                   ) -> tuple[int, ...] | None:
    """The indices of the mixture members ``names`` (None: all)."""
    if names is None:
        return None
    known = {source.label: index for index, source in enumerate(sources)}
    missing = [name for name in names if name not in known]
    if missing or not names:
        raise PhaseError(f"{label}: corpora {missing or names} are not members of data.mixture "
                         f"(its members: {', '.join(known)})")
    return tuple(sorted(known[name] for name in names))


def check_phase(phase: Phase, current: dict[str, Any], label: str, corpora: int) -> None:
    """One line naming the phase and option that cannot work."""
    if [phase.tokens, phase.steps, phase.share].count(None) != 2:
        raise PhaseError(f"{label}: give its length as tokens, steps or share (exactly one)")
    if (phase.tokens is not None and phase.tokens <= 0) or (phase.steps is not None
                                                             and phase.steps < 1):
        raise PhaseError(f"{label}: its length must be positive")
    for key in ("max_length", "batch_size", "accumulate_grad_batches"):
        if current[key] < 1:
            raise PhaseError(f"{label}: {key}={current[key]} must be at least 1")
    if not 0.0 < current["mask_rate"] <= 1.0:
        raise PhaseError(f"{label}: mask_rate={current['mask_rate']} must be in (0, 1]")
    weights = current["mixture_weights"]
    if weights is not None and len(weights) != corpora:
        raise PhaseError(f"{label}: mixture_weights has {len(weights)} values for {corpora} "
                         "corpora; give one per member of data.mixture")
    lr = phase.lr
    if lr is not None and (lr.warmup_tokens < 0 or lr.warmup_steps < 0):
        raise PhaseError(f"{label}: lr warm-up must not be negative")


def segment(shape: Shape, start: float, end: float, progress: float) -> float:
    """The rate at ``progress`` in [0, 1] of a segment from ``start`` to ``end``."""
    if shape == "constant":
        return start
    if shape == "linear":
        fraction = progress
    elif shape == "cosine":
        fraction = 0.5 * (1 - math.cos(math.pi * progress))
    else:  # sqrt: 1 - sqrt decay
        fraction = math.sqrt(progress)
    return start + (end - start) * fraction


class PhaseSchedule:
    """The learning-rate multiplier of every optimiser step of a phased run (a picklable
    ``LambdaLR`` function). Segments are laid out in training tokens, so a batch ramp or a
    change of batch size moves steps, not the schedule: each phase's warm-up, then its shape
    over the rest of its tokens."""

    def __init__(self, phases: list[Phase], planned: list[PlannedPhase]) -> None:
        self.steps = []  # (first step, steps, first token, tokens per step) of each part
        tokens = 0
        for part in planned:
            self.steps.append((part.start, part.steps, tokens, part.tokens_per_step))
            tokens += part.steps * part.tokens_per_step
        self.segments = []  # (first token, tokens, warm-up tokens, shape, start, end)
        rate = 1.0
        for index, phase in enumerate(phases):
            mine = [p for p in planned if p.phase == index]
            first = self.steps[mine[0].index][2]
            length = sum(p.steps * p.tokens_per_step for p in mine)
            lr = phase.lr or LearningRate(start=rate)
            start = rate if lr.start is None else lr.start
            end = start if lr.shape == "constant" else lr.end
            warmup = min(length, lr.warmup_tokens + lr.warmup_steps * mine[0].tokens_per_step)
            self.segments.append((first, length, warmup, lr.shape, start, end))
            rate = end

    def tokens_at(self, step: int) -> tuple[int, int]:
        """(tokens trained before ``step``, tokens ``step`` trains)."""
        for first, steps, tokens, per_step in self.steps:
            if step < first + steps:
                return tokens + (step - first) * per_step, per_step
        first, steps, tokens, per_step = self.steps[-1]
        return tokens + (step - first) * per_step, per_step

    def __call__(self, step: int) -> float:
        seen, size = self.tokens_at(step)
        for first, length, warmup, shape, start, end in self.segments:
            if seen < first + length:
                local = max(0, seen - first)
                if local < warmup:
                    return start * min(1.0, (local + size) / warmup)
                return segment(shape, start, end, (local - warmup) / max(1, length - warmup))
        return self.segments[-1][-1]


class Phases(L.Callback):
    """Train in phases (see the module's documentation); add it to ``trainer.callbacks``."""

    def __init__(self, phases: list[Phase]) -> None:
        """Args:
            phases: The run's phases in order; their lengths add up to the run's ``max_steps``
                (set from them, or, with lengths given as a ``share``, split among them).
        """
        self.phases = list(phases)
        self.planned: list[PlannedPhase] = []
        self._applied: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "set_phases"):
            raise PhaseError(f"Phases need a data module that trains in phases "
                             f"(MaskedLMDataModule); {type(datamodule).__name__} does not")
        self.planned = plan(self.phases, datamodule, trainer.accumulate_grad_batches,
                            data_parallel_processes(trainer), trainer.max_steps)
        self._check_model(pl_module)
        datamodule.set_phases([p.data for p in self.planned])
        if any(p.lr is not None for p in self.phases):
            pl_module.phase_schedule = PhaseSchedule(self.phases, self.planned)
        pl_module.phased = True
        pl_module.phased_options = {k for p in self.planned for k in p.encoder}
        total = sum(p.steps for p in self.planned)
        if trainer.max_steps not in (-1, total):
            raise PhaseError(f"trainer.max_steps={trainer.max_steps} disagrees with the phases, "
                             f"which add up to {total} steps: leave max_steps out (the phases "
                             "set it), or give the phases' lengths as a share of it")
        trainer.fit_loop.epoch_loop.max_steps = total
        # Epochs unbounded (max_steps ends the run): Lightning then never builds a loader
        # early to estimate the run's length, before a resumed run's loop state is restored.
        trainer.fit_loop.max_epochs = -1
        trainer.reload_dataloaders_every_n_epochs = 1
        rank_zero_info("phases: " + "; ".join(
            f"{p.name}: {p.steps} steps of {p.global_batch} x {p.data.max_length} tokens"
            for p in self.planned) + f" ({total} steps)")

    def _check_model(self, pl_module: L.LightningModule) -> None:
        encoder = pl_module.encoder
        limit = getattr(encoder, "max_positions", None)
        for p in self.planned:
            try:
                encoder.check_phase_options(p.encoder)
            except ValueError as error:
                raise PhaseError(f"{p.name}: {error}") from None
            if limit is not None and p.data.max_length > limit:
                raise PhaseError(f"{p.name}: max_length={p.data.max_length} exceeds the "
                                 f"encoder's max_positions={limit}; build the encoder with "
                                 f"max_positions >= {p.data.max_length}")

    def current(self, trainer: L.Trainer) -> PlannedPhase:
        return self.planned[min(trainer.current_epoch, len(self.planned) - 1)]

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_phase(trainer, pl_module)  # validation before step 0 sees the phase's encoder

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_phase(trainer, pl_module)  # a run resumed mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_phase(trainer, pl_module)

    def start_phase(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the current phase's model-side settings (idempotent; logged once)."""
        phase = self.current(trainer)
        trainer.accumulate_grad_batches = phase.accumulate
        pl_module.phase_label = f"{phase.name} ({phase.phase + 1}/{len(self.phases)})"  # the bar's
        if phase.encoder:
            pl_module.encoder.set_options(**phase.encoder)
        if self._applied != phase.index:
            self._applied = phase.index
            rank_zero_info(
                f"{phase.name} (phase {phase.phase + 1}/{len(self.phases)}) from step "
                f"{phase.start}: "
                f"{phase.steps} steps, global batch {phase.global_batch} x max_length "
                f"{phase.data.max_length}, mask rate {phase.data.mask_rate}"
                + (f", encoder {phase.encoder}" if phase.encoder else ""))
            for logger in trainer.loggers:
                logger.log_metrics({"train/phase": float(phase.phase + 1),
                                    "train/global_batch_size": float(phase.global_batch)},
                                   step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": [p.steps for p in self.planned]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, ours = list(state_dict.get("steps", [])), [p.steps for p in self.planned]
        if ours and saved != ours:
            raise PhaseError(f"the checkpoint was written by a run of {len(saved)} phases of "
                             f"{saved} steps, this run plans {ours}; resume with the phases, "
                             "batch settings and trainer.max_steps that wrote it")


__all__ = ["BatchRamp", "LearningRate", "Phase", "PhaseError", "PhaseSchedule", "Phases",
           "plan"]
