"""The `fillmask finetune` command: fine-tune a pretrained encoder on labelled data.

``fillmask finetune fit --config configs/finetune-sst2.yaml`` (and ``validate``/``test``) is a
LightningCLI whose model is a fine-tuning objective (``SequenceClassification`` or
``TokenClassification``) and whose data is a :class:`LabelledDataModule`. The data's number of
labels is linked into the model, and the model's ``pretrained`` path into the data, so the
examples are encoded with the tokenizer the encoder was trained with.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

from fillmask.data.labelled import LabelledDataModule
from fillmask.errors import FillmaskError
from fillmask.fit import RunCLI
from fillmask.objectives.base import EncoderObjective
from fillmask.registry import load_plugins


class FinetuneCLI(RunCLI):
    """The run CLI (one run folder, reliable checkpoints) with the label count linked into the
    model and the pretrained model's tokenizer into the data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.pretrained", "data.init_args.pretrained",
                              apply_on="parse")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels",
                              apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.init_args.label_names",
                              apply_on="instantiate")


def run_finetune(args: list[str] | dict[str, Any] | None = None, run: bool = True
                 ) -> FinetuneCLI:
    """Run LightningCLI for fine-tuning (``fillmask finetune fit --config X.yaml``); with
    ``run=False``, ``args`` is one run's configuration (no subcommand) and nothing runs yet."""
    load_plugins()  # short names of every registered objective and architecture resolve
    return FinetuneCLI(
        EncoderObjective,
        LabelledDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,  # a task's own data module (class_path), else LabelledDataModule
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "fillmask finetune"},
    )


def finetune_main(argv: list[str]) -> int:
    """Entry point of ``fillmask finetune``; a user error is one line on stderr and exit 2."""
    try:
        with warnings.catch_warnings():  # argv is sys.argv less "finetune", as it must be
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            run_finetune(argv)
    except FillmaskError as error:
        print(f"fillmask finetune: error: {error}", file=sys.stderr)
        return 2
    return 0
