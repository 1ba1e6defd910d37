"""A run config's data section: the data module it builds, for ``fit``, ``inspect`` and
``data prepare``.

Importing this module imports every class a data section may name by its short name
(``class_path: DocumentPacking``, ``StreamingMaskedLMDataModule``), so jsonargparse resolves them
for the run CLI (:mod:`fillmask.fit`) and for :func:`datamodule_from_config` alike. The commands
that read a config's data section alone (``inspect``, ``data prepare``) take ``--data.*``
overrides besides their own options: :func:`parse_with_data_overrides` parses both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.mixture import CorpusSource
from fillmask.data.packing import ChunkPacking, DocumentPacking, LinePacking, SentencePairs
from fillmask.data.streaming import StreamingMaskedLMDataModule
from fillmask.errors import FillmaskError
from fillmask.registry import load_plugins

DEFAULT_DATA = f"{MaskedLMDataModule.__module__}.{MaskedLMDataModule.__qualname__}"
"""The data module of a data section without ``class_path`` (every recipe): the in-memory one."""

SHORT_NAMES: tuple[type, ...] = (CorpusSource, ChunkPacking, DocumentPacking, LinePacking,
                                 SentencePairs, StreamingMaskedLMDataModule)
"""Data options a config may name by class name alone (imported, so jsonargparse finds them)."""


def parse_with_data_overrides(parser: argparse.ArgumentParser, argv: list[str], takes: str
                              ) -> tuple[argparse.Namespace, list[str]]:
    """A command's own options, and the rest of ``argv``: ``--data.*`` overrides of the config.

    Any other option exits through ``parser.error`` (usage and status 2), naming the option and
    ending with ``takes`` (what the command accepts, e.g. ``inspect takes --data.* overrides
    only``).
    """
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("--") and not o.startswith("--data.")]
    if bad:
        parser.error(f"unknown option {bad[0]}; {takes}")
    return args, overrides


def datamodule_from_config(config: str, overrides: list[str]) -> MaskedLMDataModule:
    """Build only the data module of a run config (no model, no trainer), ``overrides``
    (``--data.*`` options) on top of its data section."""
    section = data_section(config)
    load_plugins()  # registered maskings resolve by short name
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MaskedLMDataModule, "data", fail_untyped=False, sub_configs=True)
    try:
        parsed = parser.parse_args(["--data", json.dumps(section), *overrides])
    except Exception as error:  # jsonargparse reports bad options as ArgumentError
        raise FillmaskError(f"the data section of {config} is invalid: {error}") from error
    return parser.instantiate_classes(parsed).data


def data_section(config: str) -> dict:
    """The init arguments of the in-memory data module in a run config's ``data:`` section
    (plain, or in the subclass form LightningCLI saves with every run)."""
    path = Path(config)
    if not path.is_file():
        raise FillmaskError(f"config {config} does not exist; give the YAML you pass to fit")
    section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}
    if "class_path" in section:  # the subclass form LightningCLI saves with every run
        if section["class_path"].rpartition(".")[2] != MaskedLMDataModule.__name__:
            raise FillmaskError(
                f"the data section of {config} is a {section['class_path']}, not a corpus; "
                "give the config that reads the corpus (MaskedLMDataModule: data.corpus, "
                "data.tokenizer)")
        section = section.get("init_args") or {}
    return section
