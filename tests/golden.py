"""The golden loss curve: a tiny quickstart variant trained from checked-in assets.

    python tests/golden.py           # print the curve and compare it with the golden file
    python tests/golden.py --write   # regenerate tests/assets/golden/losses.json

Regenerate only when a change is meant to alter the numerics (and say so in the commit), with
the torch build the file names (``"torch"``, today 2.13.0+cpu: ``pip install torch==2.13.0``).
On that build, and a CPU with the kernels it records (``"cpu"``: torch's CPU capability, AVX2
or AVX512), the test compares every loss bit for bit, so any unintended change to masking,
packing, the model or the optimiser shows up. Other builds (the CUDA wheel pip picks, another
release) or CPUs round a few kernels differently: there each loss must be within ``TOLERANCE``
of the golden one, far below what any change of masking, data or model moves (1e-2 and more).
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
TOLERANCE = 1e-4
"""Largest absolute difference per loss allowed on a torch build other than the recording one."""


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


def build() -> dict[str, str]:
    """What the bitwise comparison depends on: the torch build and the CPU kernels it picks."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def difference(losses: list[float], record: dict) -> str | None:
    """Why ``losses`` do not reproduce ``record`` on this build, or ``None``: bit for bit on
    the recording build (torch and CPU capability), within :data:`TOLERANCE` on others."""
    if len(losses) != record["steps"]:
        return f"{len(losses)} losses, the golden file has {record['steps']}"
    if all(build()[key] == record[key] for key in ("torch", "cpu") if key in record):
        if losses == record["losses"]:
            return None
        first = next(i for i, (a, b) in enumerate(zip(losses, record["losses"], strict=True))
                     if a != b)
        return (f"not bit for bit on the recording build {_named(record)}: step {first + 1} "
                f"gives {losses[first]!r}, the golden file {record['losses'][first]!r}")
    worst = max(abs(a - b) for a, b in zip(losses, record["losses"], strict=True))
    if worst <= TOLERANCE:
        return None
    return (f"max abs difference {worst:.3g} > {TOLERANCE} on {_named(build())} (recorded "
            f"with {_named(record)})")


def _named(record: dict) -> str:
    return f"torch {record['torch']}" + (f" on {record['cpu']}" if record.get("cpu") else "")


if __name__ == "__main__":
    losses = golden_curve()
    if "--write" in sys.argv:
        record = {**build(), "steps": STEPS, "losses": losses}
        (ASSETS / "losses.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {ASSETS / 'losses.json'}")
    else:
        print("\n".join(f"{i + 1:3d} {x!r}" for i, x in enumerate(losses)))
        problem = difference(losses, stored())
        print(f"DIFFERS: {problem}" if problem else f"matches the golden file "
              f"({_named(build())}; recorded with {_named(stored())})")
