"""What a training phase changes on the data side, and the sampler that draws a phase's samples.

A phased run (:class:`fillmask.phases.Phases`) makes each phase one Lightning epoch. The data
module builds that epoch's loader from the phase's :class:`DataPhase`: its samples packed at its
``max_length``, its masking rate, mixture weights and batch size, and exactly ``samples`` samples
per process, drawn in passes over the corpus. Pass ``j`` of phase ``k`` shuffles with its own
seed, and its sample ids are offset by ``j x span``, so masks, keyed by (seed, epoch = k, id),
differ between passes and phases and follow from those numbers alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch.utils.data import DistributedSampler

from fillmask.data.packing import Packing

PASSES_PER_PHASE = 1 << 24
"""Seeds of pass orders are ``phase x PASSES_PER_PHASE + pass``: distinct for every pass."""


@dataclass(frozen=True)
class DataPhase:
    """A phase's data settings, every one resolved (nothing left to the data module)."""

    samples: int
    """Samples each process draws in the phase (optimiser steps x accumulation x batch size)."""
    phase: int
    """The declared phase it belongs to: it keys shuffling and masks."""
    skip: int
    """Samples of that phase (all processes) drawn before this part (a batch-size ramp splits
    a phase into parts that continue one another's passes)."""
    max_length: int
    packing: Packing
    mask_rate: float
    batch_size: int
    mixture_alpha: float
    mixture_weights: tuple[float, ...] | None = None
    corpora: tuple[int, ...] | None = None
    """The mixture members sampled in this phase (indices; None: all of them)."""


class PassOrder(Protocol):
    """A global order of sample ids that changes with its epoch (EpochSampler, MixtureSampler)."""

    epoch: int

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def order(self) -> np.ndarray: ...


class PhaseSampler(DistributedSampler):
    """This process's ``samples`` of a phase: passes over ``source``'s global order, strided.

    The phase reads the global orders of its passes one after another; in every pass the W
    processes take positions rank, rank + W, ... (its last ``len % W`` dropped, as training does
    each epoch), so together they see every sample of a pass once. A part of a phase starts at
    global position ``skip``. The keys are ``(phase, id + pass x span)``; ``span`` exceeds every
    id of one pass, and the dataset reads ids modulo its length.
    """

    def __init__(self, source: PassOrder, samples: int, phase: int, span: int, skip: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(max(1, len(source))), num_replicas=num_replicas, rank=rank,
                         shuffle=False, drop_last=True)
        if len(source) < num_replicas:
            raise ValueError(f"the phase's corpus has {len(source)} samples, fewer than the "
                             f"{num_replicas} processes that share it")
        self.source, self.samples, self.phase, self.span = source, samples, phase, span
        self.skip = skip

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch is the phase; the passes' orders follow from it already."""

    def __len__(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        step = self.num_replicas
        usable = len(self.source) - len(self.source) % step  # positions per pass
        first, end = self.skip, self.skip + self.samples * step  # global positions
        for turn in range(first // usable, -(-end // usable)):
            self.source.set_epoch(self.phase * PASSES_PER_PHASE + turn)
            order = self.source.order()
            lo, hi = max(first, turn * usable) - turn * usable, min(end, (turn + 1) * usable) \
                - turn * usable
            ids = order[lo + self.rank:hi:step] + turn * self.span
            yield from ((self.phase, i) for i in ids.tolist())
