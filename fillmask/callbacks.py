"""Callbacks that tell users how their run is going."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class FitSummary(L.Callback):
    """At the end of ``fit``, print the steps, wall time and last validation metrics."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        minutes = (time.perf_counter() - self._start) / 60
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(metrics.items()))
        rank_zero_info(f"fit done: {trainer.global_step} steps in {minutes:.1f} min; "
                       f"validation: {shown or 'not run'}")
