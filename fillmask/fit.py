"""``fillmask fit`` (and validate, test, predict): LightningCLI for pretraining.

Imported only by those commands: ``fillmask fill``, ``score`` and ``--help`` never pay for
importing Lightning.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fillmask.callbacks import Throughput, use_fillmask_summary
from fillmask.checkpointing import (
    AtomicCheckpointIO,
    Preemption,
    place_run,
    refuse_rerun,
    resolve_resume_path,
)
from fillmask.data.config import DEFAULT_DATA  # and the data options' short names
from fillmask.errors import FillmaskError
from fillmask.objectives.base import EncoderObjective
from fillmask.options import rejected_option
from fillmask.registry import load_plugins


class RunCLI(LightningCLI):
    """LightningCLI whose run lives in one folder (``trainer.default_root_dir``): checkpoints
    and logs placed there, written atomically, a preemption checkpoint and a final one, a new
    run refused where an earlier one is, and ``--ckpt_path last`` that skips broken files."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:  # a constructor's rejection: one line naming the option
            config = self.config[self.subcommand] if self.subcommand else self.config
            rejected = rejected_option(error, config.as_dict())
            if rejected is None or isinstance(error, FillmaskError):
                raise
            raise rejected from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        place_run(trainer, config["trainer"].get("logger"))
        make_reliable(trainer)
        use_fillmask_summary(trainer)
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads an explicit checkpoint while parsing: check it first, so a
        # truncated file is one line naming it, not a zip error from inside torch.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path not in (None, "last", "auto", "best", "hpc"):
            resolve_resume_path(path, None)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") is None:
            refuse_rerun(self.trainer)
        elif config["ckpt_path"] in ("last", "auto"):  # explicit paths were checked above
            config["ckpt_path"] = resolve_resume_path(config["ckpt_path"], self.trainer)


class FillmaskCLI(RunCLI):
    """The run CLI with the tokenizer's vocabulary linked into the encoder and throughput
    logged in every run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data.vocab_size", "model.init_args.encoder.init_args.vocab_size",
            apply_on="instantiate",
        )
        # A data section without class_path (every recipe) is the in-memory module; streamed
        # shards are `class_path: StreamingMaskedLMDataModule`.
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        monitor_throughput(trainer)
        return trainer


def make_reliable(trainer: L.Trainer) -> None:
    """Give a trainer atomic checkpoint writes and a preemption checkpoint (unless it has
    its own checkpoint IO or Preemption callback)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(cb, Preemption) for cb in trainer.callbacks):
        trainer.callbacks.append(Preemption())


def monitor_throughput(trainer: L.Trainer) -> None:
    """Log tokens/s and useful-FLOP utilisation in every run: add a :class:`Throughput`
    callback unless the configuration has one."""
    if not any(isinstance(cb, Throughput) for cb in trainer.callbacks):
        trainer.callbacks.append(Throughput())


def run_lightning(args: list[str] | None = None) -> FillmaskCLI:
    """Run LightningCLI for MLM pretraining (``fillmask fit --config X.yaml``).

    Every registered architecture, objective and masking (fillmask's and installed plugins')
    is imported first, so YAML may name them by class name alone."""
    load_plugins()
    check_resume_classes(sys.argv[1:] if args is None else args)
    return FillmaskCLI(
        EncoderObjective,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def check_resume_classes(args: list[str]) -> None:
    """With ``--ckpt_path FILE``, make sure the classes the checkpoint was trained with import
    before the config is parsed, so a missing plugin is one line naming the distribution to
    install, not a parser error about an unknown class."""
    from fillmask.objectives.base import checkpoint_classes, read_checkpoint

    for index, word in enumerate(args):
        path = word.partition("=")[2] if word.startswith("--ckpt_path=") else None
        if word == "--ckpt_path" and index + 1 < len(args):
            path = args[index + 1]
        if path and Path(path).is_file():
            resolve_resume_path(path, None)  # a broken file: one line naming it
            checkpoint_classes(read_checkpoint(path))
