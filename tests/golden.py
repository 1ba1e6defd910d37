"""The golden loss curve: a tiny quickstart variant trained from checked-in assets.

    python tests/golden.py           # print the curve and compare it with the golden file
    python tests/golden.py --write   # regenerate tests/assets/golden/losses.json

Regenerate only when a change is meant to alter the numerics (and say so in the commit): the
test compares every loss bit for bit, so any unintended change to masking, packing, the model
or the optimiser shows up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.masking.token import TokenMasking
from fillmask.objectives.mlm import MaskedLM

ASSETS = Path(__file__).resolve().parent / "assets" / "golden"
STEPS = 24


class Curve(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def golden_curve(cache_dir: str | None = None) -> list[float]:
    """Train the tiny quickstart variant for STEPS steps on one thread; its loss per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.seed_everything(0, verbose=False)
        dm = MaskedLMDataModule(corpus=str(ASSETS / "corpus.txt"),
                                tokenizer=str(ASSETS / "tokenizer.json"), max_length=32,
                                batch_size=16, masking=TokenMasking(rate=0.3, eval_rate=0.15),
                                seed=0, cache_dir=cache_dir)
        encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32,
                                     norm="pre", position_init="sinusoidal")
        model = MaskedLM(encoder, learning_rate=2e-3, betas=(0.9, 0.98), warmup_steps=4)
        curve = Curve()
        trainer = L.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False,
                            limit_val_batches=0, callbacks=[curve], accelerator="cpu",
                            deterministic=True)
        trainer.fit(model, datamodule=dm)
        return curve.losses
    finally:
        torch.set_num_threads(threads)


def stored() -> dict:
    return json.loads((ASSETS / "losses.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    losses = golden_curve()
    if "--write" in sys.argv:
        record = {"torch": torch.__version__, "steps": STEPS, "losses": losses}
        (ASSETS / "losses.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {ASSETS / 'losses.json'}")
    else:
        print("\n".join(f"{i + 1:3d} {x!r}" for i, x in enumerate(losses)))
        print("matches the golden file" if losses == stored()["losses"] else "DIFFERS")
