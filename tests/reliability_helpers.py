"""Callbacks the reliability tests put into runs: send a signal at a chosen point, record what
each training step saw."""

from __future__ import annotations

import json
import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send ``signal_name`` to this process after training step ``step`` (or, with
    ``in_validation``, after the second validation batch that follows it)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", in_validation: bool = False):
        self.step = step
        self.signum = getattr(signal, signal_name)
        self.in_validation = in_validation
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.in_validation and not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if self.in_validation and not self.sent and trainer.global_step >= self.step \
                and batch_idx == 1:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class StepLog(L.Callback):
    """Append (step, sample ids, loss) of every training step to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "ids": batch["sample_id"].tolist(),
               "loss": float(outputs["loss"])}
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")
