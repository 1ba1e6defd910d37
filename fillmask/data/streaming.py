"""Stream packed samples from Parquet shards: corpora larger than memory, local or remote.

``fillmask data prepare`` (:mod:`fillmask.data.prepare`) tokenises and packs a corpus once and
writes the blocks as Parquet shards::

    DIR/fillmask.json       the manifest: tokenizer, special tokens, max_length, packing, counts,
                            and each split's shard files (written last: no manifest, not finished)
    DIR/tokenizer.json      the tokenizer the blocks were made with
    DIR/token_counts.npy    token frequencies of the training split (for unigram/smoothed masking)
    DIR/train/part-00000.parquet ...   one row per packed block
    DIR/validation/part-00000.parquet ...

Each row is one packed block as the in-memory data module holds it (``input_ids`` as uint16
where the vocabulary fits, ``word_starts`` as uint8, and by packing ``doc_lengths``,
``token_type_ids``, ``pair_label``; Parquet keeps these types) plus its ``sample_id``: the
block's index in fillmask's packed split, the same id the in-memory module gives it, so the masks
(keyed by seed, epoch and sample id) are the in-memory module's.

Why Parquet read with pyarrow and fsspec: both are already dependencies of fillmask (through
``datasets``; no extra package, none that pins torch or torchvision); fsspec reads local folders
and any URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``file://``; install s3fs, gcsfs,
adlfs) with ``storage_options`` for credentials, and ``pyarrow.parquet.ParquetFile`` reads a
shard one row group (``ROW_GROUP`` rows, written by ``prepare``) at a time, skipping those before
a resume point unread. (``datasets``' streaming ``IterableDataset``, read before, took 33 MiB
more peak memory training on a 20x corpus than on 1x, most of it reading its first window, and
its state could only be recorded, not computed.)

How an epoch is read (:class:`BlockStream`), on every rank:

1. Shard order: the shard files are permuted by (seed, epoch) (evaluation: in order), giving
   every rank the same common order of rows. The manifest records each file's rows
   (``file_samples``; older folders: read from each file's Parquet footer), so any row of the
   common order is found without reading the rows before it.
2. Rank split: rank r keeps rows r, r + W, ... of that common order, so ranks never overlap
   (and shards of unequal size cannot unbalance them). Every rank reads every shard and keeps
   1/W of the rows.
3. Equal steps: every rank takes exactly ``floor(n / W)`` rows per epoch (``n`` from the
   manifest; the up to W - 1 rows left over differ from epoch to epoch), then whole batches of
   them: ``floor(floor(n / W) / batch_size)`` batches on every rank, or DDP/FSDP would hang.
   Evaluation (validation, unshuffled) also takes ``floor(n / W)`` rows per rank (all of them
   on one process) and keeps its last partial batch: ``ceil(floor(n / W) / batch_size)``.
4. Shuffle buffer: the rank's rows are read in windows of ``shuffle_buffer`` rows (default
   8192), each permuted by (seed, epoch, window); batches take their rows through the
   permutation, so a window is held once, as read. Window k starts at row k x window x W + r
   of the common order: the state saved after a batch is just (epoch, window, offset in it,
   batches yielded), and a resume re-reads at most one window and continues exactly. Memory
   holds one window (8192 blocks of 512 tokens: about 13 MB per loader worker); after each,
   the pyarrow pool hands its freed pages back. ``prepare`` already wrote the training blocks
   in a random order (by the config's seed), so a window is a sample of the whole corpus, not
   a stretch of consecutive text.
5. Loader workers: each worker reads the rank's stream and collates (masks) batches
   k, k + K, ... of it; torchdata interleaves them in that order, so the batches are the same
   with any number of workers, and each worker's state is its own position in the stream.

Epochs: :class:`StreamLoader` owns the epoch, which the stream uses for the shard order and
windows and passes with every batch to :class:`~fillmask.data.collate.MaskingCollator`: each new
iteration of the loader is the next epoch, except the first one after ``load_state_dict`` of a
mid-epoch state, which continues it; a state saved after an epoch's last batch resumes at the
start of the next. (Lightning's ``set_epoch`` on samplers is not used: the fit loop creates the
train iterator before calling it, and on a resume from an epoch's end it names the epoch just
finished.) Inside and outside Lightning the epochs are the same.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import fsspec
import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer

from fillmask.data.collate import MaskingCollator
from fillmask.data.datamodule import (
    EpochLoader,
    MaskedLMDataModule,
    MaskingMode,
    TokenizedData,
)
from fillmask.data.packing import Packing
from fillmask.data.tokenize import SpecialTokens, load_tokenizer
from fillmask.errors import FillmaskError
from fillmask.masking.base import Masking
from fillmask.masking.random import derive_seed
from fillmask.paths import cache_root

MANIFEST = "fillmask.json"
TOKENIZER = "tokenizer.json"
TOKEN_COUNTS = "token_counts.npy"
SPLITS = ("train", "validation")
FORMAT = "fillmask-shards"
FORMAT_VERSION = 2  # 2: Parquet shards, listed in the manifest
ROW_BATCH = 1024  # rows read from Parquet at a time


class ShardError(FillmaskError):
    """Shards that cannot be used, with the folder and the fix."""


def is_remote(path: str) -> bool:
    """True for URLs (``s3://``, ``gs://``, ``file://``, ...), which fsspec reads."""
    return "://" in str(path)


def join(path: str, *names: str) -> str:
    """``path/name`` for local folders and URLs alike."""
    return "/".join([str(path).rstrip("/"), *names])


def packing_spec(packing: Packing) -> dict[str, Any]:
    """The packing as JSON: its class path and constructor arguments."""
    cls = type(packing)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": vars(packing),
            "variable_length": packing.variable_length}


def packing_from_spec(spec: dict[str, Any]) -> Packing:
    """Rebuild the packing a manifest names."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def table_columns(table: pa.Table, fixed_length: bool) -> dict[str, Any]:
    """A batch of rows as the columns :class:`MaskingCollator` takes (the in-memory module's):
    fixed-length ids and word starts as (B, T) arrays, other lists as one array per row."""
    columns: dict[str, Any] = {}
    for name in table.column_names:
        array = table.column(name).combine_chunks()
        if not pa.types.is_list(array.type):
            columns[name] = array.to_numpy(zero_copy_only=False)
            continue
        values = array.flatten().to_numpy()
        if fixed_length and name in ("input_ids", "word_starts"):
            columns[name] = values.reshape(len(array), -1)
        else:
            offsets = array.offsets.to_numpy() - array.offsets[0].as_py()
            columns[name] = [values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    columns["sample_id"] = np.array(columns["sample_id"], dtype=np.int64)  # writable
    return columns


class BlockStream(torch.utils.data.IterableDataset):
    """One rank's batches of packed blocks, read from Parquet shards (see the module docstring:
    shard order, rank split, equal steps, windows, workers, state)."""

    def __init__(self, files: list[str], samples: int, batch_size: int, seed: int, shuffle: bool,
                 fixed_length: bool, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 8192, storage_options: dict[str, Any] | None = None,
                 file_samples: list[int] | None = None) -> None:
        """Args:
            files: The split's shard files (paths or URLs).
            samples: Rows in all of them (from the manifest).
            batch_size: Rows per batch.
            seed: Seed of the shard order and windows.
            shuffle: Shuffle (training); evaluation reads the shards in order.
            fixed_length: Rows all have the same length (stacked, not listed).
            rank: This process's data-parallel rank.
            world_size: Data-parallel processes W.
            shuffle_buffer: Rows per shuffled window.
            storage_options: fsspec options of object storage (credentials, endpoint).
            file_samples: Rows of each file (from the manifest); read from the files' Parquet
                footers when not given.
        """
        self.files = files
        self.per_rank = samples // world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.fixed_length = fixed_length
        self.rank = rank
        self.world_size = world_size
        self.window = max(1, shuffle_buffer) if shuffle else max(batch_size, 1024)
        self.storage_options = storage_options
        self.file_samples = file_samples
        self.epoch = 0
        self._state: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank (evaluation keeps a last partial one)."""
        if self.shuffle:
            return self.per_rank // self.batch_size
        return -(-self.per_rank // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any] | None:
        """Where the next batch starts: the epoch, the window holding its first row, the row's
        offset in it, the batch's index."""
        return self._state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from ``state`` when its epoch is the next one read."""
        self._resume = state

    def _open(self, file: str) -> Any:
        return fsspec.open(file, "rb", **(self.storage_options or {}))

    def rows_per_file(self) -> list[int]:
        """Rows of each shard file (the manifest's, else each file's footer)."""
        if self.file_samples is None:
            counts = []
            for file in self.files:
                with self._open(file) as handle:
                    counts.append(pq.ParquetFile(handle).metadata.num_rows)
            self.file_samples = counts
        return self.file_samples

    def order(self) -> list[int]:
        """The epoch's shard order: permuted by (seed, epoch) for training, else as listed."""
        if not self.shuffle:
            return list(range(len(self.files)))
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch, len(self.files)))
        return rng.permutation(len(self.files)).tolist()

    def rows(self, start: int) -> Iterator[pa.Table]:
        """This rank's rows of the epoch from row ``start`` of the shards' common order on
        (rows ``start``, ``start`` + W, ...), a Parquet record batch at a time: only the row
        group being read is in memory, never a whole file."""
        counts, step = self.rows_per_file(), self.world_size
        offset = 0  # the common order's index of the current row group's first row
        for file in self.order():
            if offset + counts[file] <= start:
                offset += counts[file]
                continue
            with self._open(self.files[file]) as handle:
                parquet = pq.ParquetFile(handle)
                group = 0  # the first row group holding row ``start`` or a later one
                while offset + parquet.metadata.row_group(group).num_rows <= start:
                    offset += parquet.metadata.row_group(group).num_rows  # skipped, not read
                    group += 1
                groups = list(range(group, parquet.num_row_groups))
                for batch in parquet.iter_batches(batch_size=ROW_BATCH, row_groups=groups,
                                                  use_threads=False):
                    first = max(start, offset)
                    first += (self.rank - first) % step  # this rank's next row
                    if first < offset + len(batch):
                        table = pa.Table.from_batches([batch])
                        yield (table.slice(first - offset) if step == 1 else
                               table.take(np.arange(first - offset, len(batch), step)))
                    offset += len(batch)

    def windows(self, first: int) -> Iterator[tuple[int, pa.Table, np.ndarray | None]]:
        """(index, rows, permutation) of each window from ``first`` on, cut at this rank's
        quota of rows. The rows stay as read (one copy in memory); batches take theirs through
        the permutation (``None``: in order, evaluation)."""
        index, pieces, have = first, [], 0
        size = min(self.window, self.per_rank - index * self.window)
        if size <= 0:
            return
        for piece in self.rows((first * self.window) * self.world_size + self.rank):
            while len(piece):
                part = piece.slice(0, size - have)
                pieces.append(part)
                have += len(part)
                piece = piece.slice(len(part))
                if have < size:
                    continue
                table = pa.concat_tables(pieces)  # the pieces as read, not copied
                order = None
                if self.shuffle:
                    rng = np.random.default_rng(derive_seed(self.seed, self.epoch, index))
                    order = rng.permutation(len(table))
                yield index, table, order
                del table, part, pieces
                # The pool keeps freed buffers (mimalloc's pages) for reuse; hand them back, or
                # the process holds the peak of every window read so far.
                pa.default_memory_pool().release_unused()
                index, pieces, have = index + 1, [], 0
                size = min(self.window, self.per_rank - index * self.window)
                if size <= 0:
                    return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        resume, self._resume = self._resume, None
        first, skip, batch = 0, 0, 0
        if resume and resume["epoch"] == self.epoch:
            first, skip, batch = resume["window"], resume["offset"], resume["batch"]
        self._state = None
        carry = None  # the previous window's rows after its last whole batch (permuted)
        for index, table, order in self.windows(first):
            held = len(carry) if carry is not None else 0
            before = skip - held  # offset in the window of the rows' first one
            size = held + len(table) - skip  # rows: carry, then the window's from ``skip`` on

            def rows(lo: int, hi: int, table: pa.Table = table, order: Any = order,
                     carry: pa.Table | None = carry, held: int = held, skip: int = skip
                     ) -> pa.Table:
                """Rows [lo, hi) of the carried rows and the (permuted) window."""
                parts = [carry.slice(lo, min(hi, held) - lo)] if lo < held else []
                if hi > held:
                    a, b = skip + max(lo, held) - held, skip + hi - held
                    parts.append(table.slice(a, b - a) if order is None
                                 else table.take(order[a:b]))
                if not parts:  # none: a resume at the very end of a window
                    return table.slice(0, 0)
                return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

            for lo in range(0, size - self.batch_size + 1, self.batch_size):
                self._state = {"epoch": self.epoch, "window": index,
                               "offset": before + lo + self.batch_size, "batch": batch + 1}
                if batch % workers == worker:
                    yield self.batch(rows(lo, lo + self.batch_size))
                batch += 1
            tail = size - size % self.batch_size
            carry, skip = rows(tail, size), 0
            del table, order, rows
        if not self.shuffle and carry is not None and len(carry) and batch % workers == worker:
            yield self.batch(carry)  # evaluation: the last partial batch too

    def batch(self, rows: pa.Table) -> dict[str, Any]:
        columns = table_columns(rows, self.fixed_length)
        columns["epoch"] = np.full(len(rows), self.epoch, dtype=np.int64)
        return columns



class StreamLoader(EpochLoader):
    """A resumable loader of a :class:`BlockStream` (whole batches, collated in the workers).

    The loader owns the epoch: each new iteration reads the next epoch (0 first), except the
    first iteration after :meth:`load_state_dict` of a state saved in the middle of an epoch,
    which continues that epoch at its next batch. A state saved after an epoch's last batch
    (``finished``: :class:`~fillmask.data.datamodule.EpochLoader` counts the batches yielded)
    resumes at the start of the next epoch. Lightning's ``set_epoch`` is not used: it creates
    the train iterator before calling it, and on a resume from an epoch's end it would name the
    epoch just finished. torchdata saves the stream's own position (per worker with workers).
    """

    def __init__(self, dataset: BlockStream, **kwargs: Any) -> None:
        self._epoch = -1  # the epoch of the latest iteration (none yet)
        self._continue = False  # the next iteration continues ``_epoch`` (a loaded state)
        super().__init__(dataset, batch_size=None, **kwargs)

    @property
    def processes(self) -> int:
        return self.dataset.world_size

    @property
    def epoch(self) -> int:
        """The epoch being read (or, before the first iteration, the one read next)."""
        return max(self._epoch, 0)

    def __iter__(self) -> Iterator[Any]:
        if not self._continue:
            self._epoch += 1
        self._continue = False
        self.dataset.set_epoch(self._epoch)  # workers get the stream with this epoch
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "loader" not in state or "epoch" not in state:  # a plain torchdata state
            return
        finished = state.get("finished", state["yielded"] >= len(self))
        self._epoch = int(state["epoch"])
        self._continue = not finished  # finished: the next iteration starts epoch + 1


class StreamCollator:
    """Masks a streamed batch with :class:`MaskingCollator` (in the loader worker)."""

    def __init__(self, collator: MaskingCollator) -> None:
        self.collator = collator

    def __call__(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.collator(columns)


class StreamingMaskedLMDataModule(TokenizedData, L.LightningDataModule):
    """Masked-language-model data streamed from Parquet shards written by ``fillmask data
    prepare``.

    The same batches as :class:`~fillmask.data.datamodule.MaskedLMDataModule` (collation and
    masks keyed by (seed, epoch, sample id)) without the corpus in memory or on the training
    machine: blocks come from a local folder or an fsspec URL, shuffled by (seed, epoch), split
    over ranks (the same number of batches on each) and loader workers, and the loader's
    position is saved in Lightning checkpoints, so a resume in the middle of an epoch continues
    with the next batch (with the same devices, batch size and shuffle buffer).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        masking: Masking | None = None,
        masking_mode: MaskingMode = "dynamic",
        duplication_factor: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        pad_to_multiple_of: int = 8,
        vocab_multiple: int = 64,
        shuffle_buffer: int = 8192,
        cache_dir: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        """Configure the stream.

        Args:
            path: The folder ``fillmask data prepare`` wrote: a local path or an fsspec URL
                (``s3://bucket/prefix``, ``gs://``, ``az://``, ``hf://``, ``file://``).
            batch_size: Samples per training batch (per device).
            eval_batch_size: Samples per validation batch; defaults to ``batch_size``.
            masking: The masking scheme; defaults to BERT's token masking (15%, 80/10/10).
            masking_mode: ``dynamic`` masks every epoch afresh; ``static`` keeps each sample's
                masks across epochs, cycling ``duplication_factor`` of them.
            duplication_factor: Distinct static masks per sample.
            num_workers: Loader worker processes (each reads the stream, and masks every
                ``num_workers``-th batch).
            seed: Seed of shuffling and masking.
            pad_to_multiple_of: Variable-length batches are padded to the longest sample,
                rounded up to this.
            vocab_multiple: Round the model's vocabulary up to a multiple of this.
            shuffle_buffer: Training rows shuffled together (a window; held in memory by each
                loader worker, and re-read at most once on a resume).
            cache_dir: Where the manifest, tokenizer and token counts of a URL are downloaded
                (default: fillmask's cache). Shards are streamed, not cached.
            storage_options: fsspec options of object storage (credentials, endpoint), passed
                to fsspec.
        """
        super().__init__()
        self._set_masking(masking, masking_mode, duplication_factor)
        self.path = str(path) if is_remote(str(path)) else str(Path(path).expanduser())
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.vocab_multiple = max(1, vocab_multiple)
        self.shuffle_buffer = shuffle_buffer
        self.cache_dir = cache_dir
        self.storage_options = storage_options
        self._train_loader: StreamLoader | None = None

    # The manifest and what it names (read on first use: the CLI needs the vocabulary size).

    def _local(self, name: str) -> Path:
        """A file of the shard folder on local disk; from a URL, downloaded afresh (a folder
        prepared again is never read stale) under a name no other process writes."""
        if not is_remote(self.path):
            return Path(self.path) / name
        key = hashlib.sha256(self.path.encode()).hexdigest()[:16]
        folder = cache_root(self.cache_dir) / "streams" / key
        folder.mkdir(parents=True, exist_ok=True)
        part, target = folder / f"{name}.{os.getpid()}.part", folder / name
        with fsspec.open(join(self.path, name), "rb", **(self.storage_options or {})) as source:
            part.write_bytes(source.read())
        os.replace(part, target)
        return target

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The folder's ``fillmask.json``."""
        fix = (f"prepare it with `fillmask data prepare --config RUN.yaml --output {self.path}` "
               "(a preparation that was interrupted leaves no manifest: run it again)")
        try:
            file = self._local(MANIFEST)
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ShardError(f"data.path {self.path} holds no readable {MANIFEST}; {fix}"
                             ) from error
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise ShardError(f"{join(self.path, MANIFEST)} is not a fillmask shard manifest of "
                             f"version {FORMAT_VERSION}; {fix}")
        return manifest

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with."""
        return load_tokenizer(self._local(self.manifest["tokenizer"]))[0]

    @cached_property
    def special_tokens(self) -> SpecialTokens:
        """Special-token roles, as resolved when the shards were prepared."""
        roles = dict(self.manifest["special_tokens"])
        roles["special_ids"] = tuple(roles["special_ids"])
        return SpecialTokens(**roles)

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs in the training split (counted when preparing)."""
        return np.load(self._local(self.manifest["token_counts"])).astype(np.float64)

    @property
    def max_length(self) -> int:
        """Most tokens per sample, as prepared."""
        return int(self.manifest["max_length"])

    @cached_property
    def packing(self) -> Packing:
        """How the shards' samples were packed."""
        return packing_from_spec(self.manifest["packing"])

    def num_samples(self, split: str = "train") -> int:
        """Samples stored for ``split``."""
        return int(self.manifest["splits"][split]["samples"])

    def files(self, split: str) -> list[str]:
        """The split's shard files, as paths or URLs."""
        return [join(self.path, name) for name in self.manifest["splits"][split]["files"]]

    # Loaders.

    def setup(self, stage: str | None = None) -> None:
        self.manifest  # noqa: B018  (a missing or foreign folder fails here, before step 0)

    def collator(self, train: bool, keep_word_ids: bool = False) -> StreamCollator:
        return StreamCollator(self.masking_collator(train, keep_word_ids))

    def data_parallel(self) -> tuple[int, int]:
        """(processes, rank) of data parallelism, as the in-memory module reads them."""
        return MaskedLMDataModule.data_parallel(self)  # type: ignore[arg-type]

    def dataset(self, split: str, train: bool) -> BlockStream:
        """This rank's batches of the split; training shuffles them by (seed, epoch)."""
        processes, rank = self.data_parallel()
        return BlockStream(
            self.files(split), self.num_samples(split),
            self.batch_size if train else self.eval_batch_size, self.seed, shuffle=train,
            fixed_length=not self.manifest["packing"]["variable_length"], rank=rank,
            world_size=processes, shuffle_buffer=self.shuffle_buffer,
            storage_options=self.storage_options,
            file_samples=self.manifest["splits"][split].get("file_samples"))

    def _loader(self, split: str, train: bool) -> StreamLoader:
        stream = self.dataset(split, train)
        if len(stream) == 0:
            raise ShardError(f"the {split} split of {self.path} has {self.num_samples(split)} "
                             f"samples: not one batch of {stream.batch_size} per process; lower "
                             "the batch size, or prepare more text")
        return StreamLoader(
            stream,
            num_workers=self.num_workers,
            collate_fn=self.collator(train),
            pin_memory=torch.cuda.is_available(),
            # Worker seeds come from this generator, not the global one (dropout's).
            generator=torch.Generator().manual_seed(derive_seed(self.seed, int(train))),
        )

    def train_dataloader(self) -> StreamLoader:
        """One loader for the whole run (reloading dataloaders keeps its epoch count)."""
        if self._train_loader is None:
            self._train_loader = self._loader("train", train=True)
        return self._train_loader

    def val_dataloader(self) -> StreamLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> StreamLoader:
        return self._loader("validation", train=False)
