"""``fillmask data prepare``: tokenise and pack a corpus once into Parquet shards.

The corpus, tokenizer, ``max_length`` and packing come from a run config's ``data:`` section
(the in-memory :class:`~fillmask.data.datamodule.MaskedLMDataModule`'s options, ``--data.*``
overrides on top). fillmask's own pipeline reads and packs the corpus (memory-mapped Arrow,
cached by fingerprint, processed in map batches), then ``datasets`` writes the blocks shard by
shard with ``Dataset.to_parquet``: memory holds one shard at a time, whatever the corpus size.
Training blocks are written in a random order (by the config's seed) so that any stretch of a
shard is a sample of the whole corpus (the stream shuffles windows of it); validation blocks in
order. Parquet keeps the packed types (uint16 ids, uint8 word starts). Why Parquet and
``datasets``, and the layout: :mod:`fillmask.data.streaming`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from fillmask.data.config import datamodule_from_config, parse_with_data_overrides
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.streaming import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TOKEN_COUNTS,
    TOKENIZER,
    ShardError,
    is_remote,
    packing_spec,
)
from fillmask.errors import FillmaskError
from fillmask.masking.random import derive_seed

BLOCKS_PER_TASK = 4096  # blocks counted at a time
ROW_GROUP = 1024  # rows per Parquet row group: the stream reads a shard a row group at a time
UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def prepare_shards(data: MaskedLMDataModule, output: str | Path, shard_bytes: str = "64MB",
                   workers: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Pack ``data``'s corpus and write it as Parquet shards under ``output`` (each about
    ``shard_bytes`` of Arrow data, written by ``workers`` processes); returns the manifest.

    The manifest is written last: a folder without one was not finished, and training refuses it.
    """
    folder = _checked_output(output, overwrite)
    splits = _packed_splits(data)
    if folder.exists():
        shutil.rmtree(folder)  # only a shard folder, and only with overwrite (checked above)
    folder.mkdir(parents=True)
    data.tokenizer.save(str(folder / TOKENIZER))
    counts, tokens = _count_tokens(splits["train"], data.tokenizer.get_vocab_size())
    np.save(folder / TOKEN_COUNTS, counts)
    summary = {}
    for name, samples in splits.items():
        files = _write_split(samples, folder, name, _bytes(shard_bytes), workers,
                             data.seed if name == "train" else None)
        summary[name] = {"folder": name, "samples": len(samples),
                         "tokens": tokens if name == "train" else _count_tokens(samples)[1],
                         "files": [name for name, _ in files],
                         "file_samples": [rows for _, rows in files]}
    manifest = _manifest(data, summary)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _checked_output(output: str | Path, overwrite: bool) -> Path:
    """The local folder to write: new, empty, or (with ``overwrite``) a shard folder."""
    if is_remote(str(output)):
        raise ShardError(f"--output {output}: prepare writes to a local folder; copy it to object "
                         "storage afterwards (e.g. `aws s3 sync DIR s3://bucket/prefix`)")
    folder = Path(output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ShardError(f"--output {folder} is a file; give a folder")
    if not folder.exists() or not any(folder.iterdir()):
        return folder
    if not overwrite:
        raise ShardError(f"--output {folder} is not empty; give a new folder, or pass "
                         "--overwrite to replace what it holds")
    if not (folder / MANIFEST).is_file() and not any((folder / s).is_dir() for s in SPLITS):
        raise ShardError(f"--output {folder} holds files that are not fillmask shards; "
                         "--overwrite only replaces a shard folder: give a new folder")
    return folder


def _packed_splits(data: MaskedLMDataModule) -> dict[str, datasets.Dataset]:
    """The corpus tokenised and packed by fillmask (memory-mapped, cached by fingerprint)."""
    if len(data.sources) > 1:
        raise ShardError("data.mixture: a mixture cannot be prepared into one shard folder yet; "
                         "prepare one corpus (data.corpus), or train the mixture in memory")
    packed = data._packed()
    splits = {name: datasets.concatenate_datasets([p[name] for p in packed]) for name in SPLITS}
    for name, samples in splits.items():
        if len(samples) == 0:
            raise ShardError(f"the {name} split of corpus {data._corpus_specs!r} gives no "
                             f"sample of max_length={data.max_length} tokens; lower max_length "
                             "or add text")
    return splits


def _count_tokens(samples: datasets.Dataset, vocab_size: int | None = None
                  ) -> tuple[np.ndarray | None, int]:
    """Token frequencies (when ``vocab_size`` is given) and the number of tokens, read range by
    range from the memory-mapped split."""
    counts = np.zeros(vocab_size, dtype=np.int64) if vocab_size else None
    total = 0
    table = samples.with_format("arrow")
    for lo in range(0, len(samples), BLOCKS_PER_TASK):
        ids = pc.list_flatten(table[lo: lo + BLOCKS_PER_TASK]["input_ids"]).to_numpy()
        total += len(ids)
        if counts is not None:
            counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    return counts, total


def _bytes(size: str) -> int:
    """``"64MB"`` as bytes (KB, MB, GB: powers of 1024; a bare number is bytes)."""
    text = str(size).strip().upper()
    unit = next((u for u in UNITS if text.endswith(u)), "")
    try:
        return max(1, int(float(text[: len(text) - len(unit)]) * UNITS.get(unit, 1)))
    except ValueError:
        raise ShardError(f"shard size {size!r}: give bytes, or a number with KB, MB or GB"
                         ) from None


def _write_split(samples: datasets.Dataset, folder: Path, split: str, shard_bytes: int,
                 workers: int, seed: int | None) -> list[tuple[str, int]]:
    """Write a split as ``split/part-NNNNN.parquet`` (in a random order by ``seed``, or in
    order); returns the files, relative to ``folder``, with their rows."""
    (folder / split).mkdir()
    n = len(samples)
    order = (np.random.default_rng(derive_seed(seed, n)).permutation(n) if seed is not None
             else np.arange(n))
    rows = max(1, int(shard_bytes * n // max(1, samples.data.nbytes)))
    names = [f"{split}/part-{i:05d}.parquet" for i in range(-(-n // rows))]
    tasks = [(samples, order[i * rows: (i + 1) * rows], str(folder / name))
             for i, name in enumerate(names)]
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar per shard otherwise
    try:
        if workers > 1 and len(tasks) > 1:
            # Forked workers inherit the packed split instead of re-importing everything.
            context = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                list(pool.map(_write_shard, *zip(*tasks, strict=True)))
        else:
            for task in tasks:
                _write_shard(*task)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    return [(name, len(ids)) for name, (_, ids, _) in zip(names, tasks, strict=True)]


def _write_shard(samples: datasets.Dataset, ids: np.ndarray, path: str) -> None:
    """The blocks ``ids`` of a packed split, with their sample ids, as one Parquet file (written
    to a temporary name, then renamed)."""
    shard = samples.select(ids).flatten_indices()
    shard = shard.add_column("sample_id", ids.astype(np.int64),
                             feature=datasets.Value("int64"))
    part = f"{path}.part"
    shard.to_parquet(part, batch_size=ROW_GROUP)  # datasets picks the columns' encodings
    Path(part).replace(path)


def _manifest(data: MaskedLMDataModule, splits: dict[str, Any]) -> dict[str, Any]:
    special = data.special_tokens
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": TOKENIZER,
        "special_tokens": {"mask_id": special.mask_id, "pad_id": special.pad_id,
                           "cls_id": special.cls_id, "sep_id": special.sep_id,
                           "unk_id": special.unk_id, "special_ids": list(special.special_ids)},
        "max_length": data.max_length,
        "packing": packing_spec(data.packing),
        "token_counts": TOKEN_COUNTS,
        "splits": splits,
        "corpus": [str(spec) for spec in data._corpus_specs],
        "seed": data.seed,
        "validation_fraction": data.validation_fraction,
        "written_by": {"fillmask": version("fillmask"), "datasets": version("datasets"),
                       "pyarrow": version("pyarrow")},
    }


# The command.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fillmask data", description=(
        "Corpora larger than memory: tokenise and pack once into shards, then train with "
        "data.class_path fillmask.data.streaming.StreamingMaskedLMDataModule."))
    sub = parser.add_subparsers(dest="action", required=True)
    prepare = sub.add_parser(
        "prepare", help="pack a config's corpus into Parquet shards", description=(
            "Tokenise and pack the corpus of a run config's data section (--data.* options "
            "override it) into Parquet shards under --output, with the tokenizer and a "
            "manifest."))
    prepare.add_argument("--config", required=True, help="a run YAML whose data section names "
                         "the corpus, tokenizer, max_length and packing")
    prepare.add_argument("--output", required=True, help="the local folder to write")
    prepare.add_argument("--shard-bytes", default="64MB",
                         help="Arrow data per shard file (default 64MB)")
    prepare.add_argument("--workers", type=int, default=1, help="processes writing shards")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace an existing shard folder")
    return parser


def data_main(argv: list[str]) -> int:
    """``fillmask data prepare --config RUN.yaml --output DIR [--data.* overrides]``."""
    args, overrides = parse_with_data_overrides(
        _parser(), argv, "prepare takes --data.* overrides besides its own")
    try:
        data = datamodule_from_config(args.config, overrides)
        manifest = prepare_shards(data, args.output, args.shard_bytes, max(1, args.workers),
                                  args.overwrite)
    except (FillmaskError, ValueError) as error:
        print(f"fillmask data prepare: error: {error}", file=sys.stderr)
        return 2
    splits = manifest["splits"]
    print(f"wrote {splits['train']['samples']} training and {splits['validation']['samples']} "
          f"validation samples of max_length {manifest['max_length']} to {args.output}; train on "
          "them with data: {class_path: fillmask.data.streaming.StreamingMaskedLMDataModule, "
          f"init_args: {{path: {args.output}}}}}")
    return 0
