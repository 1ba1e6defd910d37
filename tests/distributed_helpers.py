"""A callback the distributed tests put into multi-process runs: each rank records what every
training step saw in a JSON-lines file of its own."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RankLog(L.Callback):
    """Append (step, epoch, sample ids, loss, masked tokens) of every training step to
    ``<folder>/rank<global rank>.jsonl``."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "ids": batch["sample_id"].tolist(), "loss": float(outputs["loss"]),
               "masked": int((batch["labels"] != -100).sum())}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
