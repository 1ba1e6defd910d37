"""The MLM DataModule: corpus -> tokenizer -> packed samples -> stateful loader -> masked
batches."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from functools import cached_property
from typing import Any, Literal, Protocol

import datasets
import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from fillmask.data.collate import MaskingCollator
from fillmask.data.corpus import EncodingErrors, SampleBy, load_corpus
from fillmask.data.mixture import CorpusSource, MixtureSampler, mixture_probabilities
from fillmask.data.packing import ChunkPacking, Packing, pack_corpus, packing_efficiency
from fillmask.data.phasing import DataPhase, PhaseSampler
from fillmask.data.tokenize import (
    SpecialTokens,
    TokenizerTraining,
    batched,
    load_tokenizer,
    resolve_special_tokens,
    train_tokenizer,
)
from fillmask.errors import FillmaskError
from fillmask.masking.base import Masking, VocabInfo
from fillmask.masking.random import derive_seed
from fillmask.masking.token import TokenMasking
from fillmask.paths import cache_root

MaskingMode = Literal["dynamic", "static"]


class EpochOrder(Protocol):
    """An epoch's global order of sample ids, a pure function of (seed, epoch)."""

    epoch: int

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def order(self) -> np.ndarray: ...


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: a permutation that is a pure function of (seed, epoch).

    Carrying the epoch with each index lets loader workers seed masking by (seed, epoch, id).
    """

    def __init__(self, size: int, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def order(self) -> np.ndarray:
        """This epoch's sample ids, in order (int64)."""
        if not self.shuffle:
            return np.arange(self.size, dtype=np.int64)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        return torch.randperm(self.size, generator=generator).numpy()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.order().tolist())


class ShardedSampler(DistributedSampler):
    """This process's share of an epoch's global order: positions rank, rank + W, rank + 2W...

    The global order (``source``: an :class:`EpochSampler` or a mixture's sampler) is the same
    on every process, so the W shards never overlap and together hold the whole epoch. Strided
    shards (not contiguous blocks) make the k-th step of W processes with batch b use exactly
    the samples of the k-th batch of one process with batch W x b. Every process gets the same
    number of samples: training drops the last ``len % W`` samples of the order (a different
    tail each epoch, as ``drop_last`` drops a partial batch), evaluation wraps round to the
    start of the order and repeats up to W - 1 samples. With W = 1 it is the source itself.

    Being a ``DistributedSampler`` is what keeps Lightning from replacing it: its data
    connector (``_requires_distributed_sampler``) injects a sampler only into loaders whose
    sampler is not one, under ``ddp`` and ``fsdp`` alike, whatever ``use_distributed_sampler``.
    """

    def __init__(self, source: EpochOrder, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        """Args:
            source: The epoch's global order.
            num_replicas: Data-parallel processes W (all nodes together).
            rank: This process's data-parallel rank, in [0, W).
            drop_last: Equal shares by dropping the tail (training) instead of wrapping round.
        """
        super().__init__(range(len(source)), num_replicas=num_replicas, rank=rank,
                         shuffle=bool(getattr(source, "shuffle", True)),
                         seed=int(getattr(source, "seed", 0)), drop_last=drop_last)
        self.source = source

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch; the source's order follows it."""
        super().set_epoch(epoch)
        self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        ids = np.resize(self.source.order(), self.total_size)  # drops the tail, or wraps round
        epoch = self.source.epoch
        return ((epoch, i) for i in ids[self.rank::self.num_replicas].tolist())


class ResumeLayoutError(FillmaskError, ValueError):
    """A mid-epoch loader state written with another number of processes or batch size."""


class EpochLoader(StatefulDataLoader):
    """A StatefulDataLoader that knows where its epochs end.

    Its state records the batches yielded in the current epoch: a state saved after an epoch's
    last batch resumes at the start of the next epoch (torchdata alone would fast-forward the
    next epoch by a whole epoch's batches), and a mid-epoch state resumes at the next batch.

    Under DDP/FSDP only rank 0's state reaches the checkpoint, and every rank resumes from it.
    That is exact because the state holds counts, never sample ids: every rank has yielded the
    same number of batches of the same size, and torchdata's sampler position is a count of
    samples drawn (it fast-forwards this rank's own :class:`ShardedSampler`). A mid-epoch state
    therefore needs the same processes and batch size to resume; at an epoch boundary anything
    may change.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        self._yielded, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    @property
    def processes(self) -> int:
        """Data-parallel processes sharing each epoch (1 unless the sampler is sharded)."""
        return int(getattr(self.sampler, "num_replicas", 1))

    def state_dict(self) -> dict[str, Any]:
        return {"loader": super().state_dict(), "yielded": self._yielded,
                "finished": self._yielded >= len(self), "processes": self.processes,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "loader" not in state:  # a plain torchdata state
            super().load_state_dict(state)
            return
        if state.get("finished", state["yielded"] >= len(self)):  # start the next epoch afresh
            return
        self._check_layout(state)
        super().load_state_dict(state["loader"])
        self._resume_at = state["yielded"]

    def _check_layout(self, state: dict[str, Any]) -> None:
        saved = (state.get("processes", 1), state.get("batch_size", self.batch_size))
        if state["yielded"] == 0 or saved == (self.processes, self.batch_size):
            return
        raise ResumeLayoutError(
            f"the checkpoint was written {state['yielded']} batches into an epoch by "
            f"{saved[0]} process(es) with batch_size={saved[1]}; this run has {self.processes} "
            f"with batch_size={self.batch_size}, so the rest of that epoch cannot be split the "
            "same way. Resume with the same devices x num_nodes and data.batch_size, or from a "
            "checkpoint written at an epoch boundary")


class BlockDataset(Dataset):
    """Packed samples, read from memory-mapped Arrow by ``(epoch, sample id)`` keys.

    Sample ids may exceed the dataset (a mixture's repeats); rows are read at ``id % len``.
    """

    def __init__(self, samples: datasets.Dataset) -> None:
        self.samples = samples.with_format("numpy")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, Any]:
        epochs, ids = zip(*keys, strict=True)
        ids = np.asarray(ids, dtype=np.int64)
        rows = self.samples[(ids % len(self.samples)).tolist()]
        return {**rows, "sample_id": ids, "epoch": np.asarray(epochs)}

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])


class TokenizedData:
    """The vocabulary a masked-LM data module gives the model, and its masking: subclasses
    provide ``tokenizer``, ``special_tokens``, ``token_counts()``, ``vocab_multiple``, ``seed``
    and ``pad_to_multiple_of``, and keep their masking options with :meth:`_set_masking`."""

    tokenizer: Tokenizer
    special_tokens: SpecialTokens
    masking: Masking
    masking_mode: MaskingMode
    duplication_factor: int
    vocab_multiple: int
    seed: int
    pad_to_multiple_of: int

    def _set_masking(self, masking: Masking | None, masking_mode: MaskingMode,
                     duplication_factor: int) -> None:
        """Check and keep the masking options (default masking: BERT's token masking)."""
        if masking_mode not in ("dynamic", "static"):
            raise ValueError(f"masking_mode={masking_mode!r}: choose 'dynamic' or 'static'")
        if duplication_factor < 1:
            raise ValueError(f"duplication_factor={duplication_factor} must be at least 1")
        self.masking = masking or TokenMasking()
        self.masking_mode = masking_mode
        self.duplication_factor = duplication_factor

    def masking_collator(self, train: bool, keep_word_ids: bool = False,
                         masking: Masking | None = None) -> MaskingCollator:
        """The collator that pads and masks this module's samples (with ``masking``, e.g. a
        phase's copy at its own rate, instead of the module's)."""
        return MaskingCollator(
            masking or self.masking, self.vocab_info, self.seed, train, self.pad_to_multiple_of,
            static=self.masking_mode == "static", duplication_factor=self.duplication_factor,
            keep_word_ids=keep_word_ids,
        )

    def token_counts(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's, rounded up to ``vocab_multiple``."""
        n = self.tokenizer.get_vocab_size()
        return -(-n // self.vocab_multiple) * self.vocab_multiple

    @cached_property
    def vocab_info(self) -> VocabInfo:
        counts = self.token_counts() if self.masking.needs_counts else None
        special = self.special_tokens
        return VocabInfo(self.tokenizer.get_vocab_size(), special.mask_id, special.pad_id,
                         special.special_ids, counts)


class MaskedLMDataModule(TokenizedData, L.LightningDataModule):
    """Masked-language-model data: any corpus or mixture, any tokenizer, packing and masking."""

    def __init__(
        self,
        corpus: str | list[str] = "python-docs",
        text_column: str = "text",
        sample_by: SampleBy = "paragraph",
        mixture: list[CorpusSource] | None = None,
        mixture_alpha: float = 1.0,
        tokenizer: str | None = None,
        tokenizer_training: TokenizerTraining | None = None,
        max_length: int = 128,
        packing: Packing | None = None,
        pad_to_multiple_of: int = 8,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        masking: Masking | None = None,
        masking_mode: MaskingMode = "dynamic",
        duplication_factor: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        validation_fraction: float = 0.05,
        vocab_multiple: int = 64,
        cache_dir: str | None = None,
        encoding_errors: EncodingErrors = "strict",
    ) -> None:
        """Configure the data pipeline.

        Args:
            corpus: An embedded corpus name (``python-docs``), a saved `datasets` folder, or
                text/JSONL/Parquet files and globs. Ignored when ``mixture`` is given.
            text_column: The column holding the text in JSONL, Parquet and saved datasets.
            sample_by: How plain-text files are split into documents: ``line``, ``paragraph``
                (blank-line separated) or ``document`` (one per file).
            mixture: Several corpora sampled together (each with its own weight, or weighted by
                size and ``mixture_alpha``).
            mixture_alpha: Temperature of mixture sampling when no weight is given:
                q_i ~ (n_i / n) ** alpha; 1 keeps proportions, XLM-R used 0.3.
            tokenizer: A ``tokenizer.json`` file or a transformers folder. Empty: train one on
                the training split with ``tokenizer_training`` (cached by corpus and settings).
            tokenizer_training: Algorithm and vocabulary size when a tokenizer is trained.
            max_length: Most tokens per sample, CLS and SEP included.
            packing: How documents become samples: ``ChunkPacking`` (default; concatenate and
                cut), ``LinePacking``, ``DocumentPacking`` (no attention across documents) or
                ``SentencePairs`` (NSP/SOP).
            pad_to_multiple_of: Variable-length batches are padded to the longest sample,
                rounded up to this.
            batch_size: Samples per training batch (per device).
            eval_batch_size: Samples per validation batch; defaults to ``batch_size``.
            masking: The masking scheme; defaults to BERT's token masking (15%, 80/10/10).
            masking_mode: ``dynamic`` masks every epoch afresh (RoBERTa); ``static`` keeps each
                sample's masks across epochs (original BERT), cycling ``duplication_factor``
                of them.
            duplication_factor: Distinct static masks per sample (BERT used 10).
            num_workers: Loader worker processes (masking runs in them).
            seed: Seed of shuffling and masking (masks depend on seed, epoch and sample id).
            validation_fraction: Share of documents held out when a corpus has no validation split.
            vocab_multiple: Round the model's vocabulary up to a multiple of this (faster matmuls).
            cache_dir: Where corpora and trained tokenizers are cached (default
                ``$FILLMASK_CACHE`` or ``~/.cache/fillmask``).
            encoding_errors: Text that is not valid UTF-8: ``strict`` stops with the file, line
                and byte offset; ``replace`` reads undecodable bytes as U+FFFD (counted, logged).
        """
        super().__init__()
        self._set_masking(masking, masking_mode, duplication_factor)
        self.sources = list(mixture) if mixture else [
            CorpusSource(corpus if isinstance(corpus, str) else ",".join(corpus),
                         text_column=text_column, sample_by=sample_by)]
        self._corpus_specs = [corpus] if not mixture else [s.path for s in mixture]
        self.mixture_alpha = mixture_alpha
        self.tokenizer_path = tokenizer
        self.tokenizer_training = tokenizer_training or TokenizerTraining()
        self.max_length = max_length
        self.packing = packing or ChunkPacking()
        self.pad_to_multiple_of = pad_to_multiple_of
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.validation_fraction = validation_fraction
        self.vocab_multiple = max(1, vocab_multiple)
        self.cache_dir = cache_root(cache_dir)
        self.encoding_errors = encoding_errors
        self._text: list[datasets.DatasetDict] | None = None
        self.samples: dict[str, datasets.Dataset] | None = None
        self.corpus_sizes: list[int] = []
        self.phases: list[DataPhase] | None = None
        self._phase_samples: dict[str, tuple[datasets.Dataset, list[int]]] = {}

    # Corpora and the tokenizer (resolved on first use: the CLI needs the vocabulary size).

    def _load_text(self) -> list[datasets.DatasetDict]:
        if self._text is None:  # loaded once: the tokenizer, prepare_data and setup share it
            self._text = self._read_corpora()
        return self._text

    def _read_corpora(self) -> list[datasets.DatasetDict]:
        return [load_corpus(spec, source.text_column, source.sample_by, self.validation_fraction,
                            self.seed, self.cache_dir, self.encoding_errors)
                for spec, source in zip(self._corpus_specs, self.sources, strict=True)]

    @cached_property
    def _tokenizer_and_roles(self) -> tuple[Tokenizer, SpecialTokens]:
        if self.tokenizer_path:
            tok, declared = load_tokenizer(self.tokenizer_path)
            return tok, resolve_special_tokens(tok, declared, source=str(self.tokenizer_path))
        tok = self._trained_tokenizer()
        return tok, resolve_special_tokens(tok)

    def _trained_tokenizer(self) -> Tokenizer:
        texts = [corpus["train"] for corpus in self._load_text()]
        corpora = "-".join(t._fingerprint for t in texts)
        key = hashlib.sha256(
            f"{corpora}-{self.tokenizer_training.fingerprint()}".encode()
        ).hexdigest()[:16]
        file = self.cache_dir / "tokenizers" / f"{key}.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(file) + ".lock"):
            if not file.is_file():
                def stream() -> Iterator[str]:
                    return (t for split in texts for b in batched(split["text"]) for t in b)

                tok = train_tokenizer(stream, self.tokenizer_training)
                tmp = file.with_suffix(".tmp")
                tok.save(str(tmp))
                tmp.replace(file)
        return Tokenizer.from_file(str(file))

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer_and_roles[0]

    @property
    def special_tokens(self) -> SpecialTokens:
        return self._tokenizer_and_roles[1]

    def token_counts(self) -> np.ndarray:
        """How often each token id occurs in the packed training samples."""
        samples = self._samples()["train"]
        flat = pc.list_flatten(samples.data.column("input_ids")).to_numpy()
        return np.bincount(flat, minlength=self.tokenizer.get_vocab_size()).astype(np.float64)

    # Packing.

    def prepare_data(self) -> None:
        self._packed()

    def setup(self, stage: str | None = None) -> None:
        self._samples()

    def _packed(self) -> list[datasets.DatasetDict]:
        return [pack_corpus(text, self.tokenizer, self.special_tokens, self.max_length,
                            self.packing, self.seed)
                for text in self._load_text()]

    def _samples(self) -> dict[str, datasets.Dataset]:
        if self.samples is None:
            packed = self._packed()
            self.corpus_sizes = [len(p["train"]) for p in packed]
            self.samples = {split: datasets.concatenate_datasets([p[split] for p in packed])
                            for split in ("train", "validation")}
            sizes = ", ".join(f"{source.label}: {size}" for source, size in
                              zip(self.sources, self.corpus_sizes, strict=True))
            fill = self.packing_efficiency("train")
            rank_zero_info(f"training samples ({sizes}); {type(self.packing).__name__} fills "
                           f"{fill:.1%} of max_length={self.max_length}")
        return self.samples

    def packing_efficiency(self, split: str = "train") -> float:
        """Share of the split's ``samples x max_length`` slots filled with tokens."""
        return packing_efficiency(self._samples()[split], self.max_length)

    def mixture_probabilities(self) -> np.ndarray:
        """Probability of drawing from each corpus of the mixture."""
        self._samples()
        return mixture_probabilities(self.corpus_sizes, [s.weight for s in self.sources],
                                     self.mixture_alpha)

    # Loaders.

    def collator(self, train: bool, keep_word_ids: bool = False) -> MaskingCollator:
        return self.masking_collator(train, keep_word_ids)

    def _sampler(self, split: str, train: bool) -> ShardedSampler:
        size = len(self._samples()[split])
        if train and len(self.sources) > 1:
            source: EpochOrder = MixtureSampler(self.corpus_sizes, self.mixture_probabilities(),
                                                self.seed)
        else:
            source = EpochSampler(size, self.seed, shuffle=train)
        processes, rank = self.data_parallel()
        return ShardedSampler(source, processes, rank, drop_last=train)

    def data_parallel(self) -> tuple[int, int]:
        """(processes, rank) of data parallelism, read when a loader is made (the strategy has
        set up its process group by then).

        The trainer's strategy decides when there is one (``ddp``, ``fsdp``: every process of
        every node; a model-parallel strategy: only its data-parallel dimension), else an
        initialised ``torch.distributed`` (a script under torchrun), else one process.
        """
        trainer = getattr(self, "trainer", None)
        kwargs = getattr(trainer, "distributed_sampler_kwargs", None) if trainer else None
        if kwargs:
            return int(kwargs["num_replicas"]), int(kwargs["rank"])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _loader(self, split: str, train: bool, keep_word_ids: bool = False) -> EpochLoader:
        dataset = BlockDataset(self._samples()[split])
        if len(dataset) == 0:
            raise ValueError(f"the {split} split of corpus {self._corpus_specs!r} gives no "
                             f"sample of max_length={self.max_length} tokens; lower max_length "
                             "or add text")
        return EpochLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._sampler(split, train),
            collate_fn=self.collator(train, keep_word_ids),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
            # Worker seeds come from this generator, not the global one, so creating an
            # iterator (each epoch, or on resume) leaves the RNG that dropout uses untouched.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, int(train))),
        )

    def train_dataloader(self) -> EpochLoader:
        if self.phases:
            return self._phase_loader(self._current_phase())
        loader = self._loader("train", train=True)
        if loader.processes > 1:
            w = loader.processes
            rank_zero_info(f"data parallel: {w} processes share each epoch (process r takes "
                           f"samples r, r + {w}, ... of its order): {len(loader)} batches of "
                           f"{self.batch_size} per process")
        return loader

    # Phases (fillmask.phases.Phases): each phase is one epoch with its own data settings.

    def set_phases(self, phases: list[DataPhase] | None) -> None:
        """Train in ``phases`` (one epoch each) from now on; None: the module's own settings."""
        self.phases = list(phases) if phases else None

    def _current_phase(self) -> int:
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        assert self.phases is not None
        return min(epoch, len(self.phases) - 1)

    def phase_samples(self, phase: DataPhase) -> tuple[datasets.Dataset, list[int]]:
        """The training samples packed at ``phase``'s length and packing, and each corpus's
        share (packed once per setting; `datasets` caches them on disk too)."""
        key = f"{phase.max_length}-{phase.packing.fingerprint()}"
        if key not in self._phase_samples:
            packed = [pack_corpus(text, self.tokenizer, self.special_tokens, phase.max_length,
                                  phase.packing, self.seed)["train"]
                      for text in self._load_text()]
            self._phase_samples[key] = (datasets.concatenate_datasets(packed),
                                        [len(p) for p in packed])
        return self._phase_samples[key]

    def _phase_loader(self, index: int) -> EpochLoader:
        assert self.phases is not None
        phase = self.phases[index]
        samples, sizes = self.phase_samples(phase)
        if len(samples) == 0:
            raise ValueError(f"phase {index + 1}: corpus {self._corpus_specs!r} gives no sample "
                             f"of max_length={phase.max_length} tokens; lower it or add text")
        source, span = self._phase_order(phase, sizes)
        processes, rank = self.data_parallel()
        masking = copy.copy(self.masking)
        masking.rate = phase.mask_rate
        collator = self.masking_collator(train=True, masking=masking)
        return EpochLoader(
            BlockDataset(samples), batch_size=phase.batch_size,
            sampler=PhaseSampler(source, phase.samples, phase.phase, max(1, span), phase.skip,
                                 processes, rank),
            collate_fn=collator, num_workers=self.num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(), drop_last=True,
            generator=torch.Generator().manual_seed(derive_seed(self.seed, 1, phase.phase)))

    def _phase_order(self, phase: DataPhase, sizes: list[int]) -> tuple[Any, int]:
        """The global order a phase's passes follow, and the span of one pass's sample ids: a
        shuffle of all samples, or a mixture drawn from the phase's corpora and weights."""
        if len(self.sources) == 1:
            return EpochSampler(sum(sizes), self.seed, shuffle=True), sum(sizes)
        active = set(range(len(sizes)) if phase.corpora is None else phase.corpora)
        weights = list(phase.mixture_weights or [s.weight for s in self.sources])
        if any(w is not None for w in weights):  # explicit weights: the others get none
            weights = [w if i in active else 0.0 for i, w in enumerate(weights)]
        drawn = [n if i in active else 0 for i, n in enumerate(sizes)]  # alpha over the active
        order = MixtureSampler(sizes, mixture_probabilities(drawn, weights, phase.mixture_alpha),
                               self.seed)
        repeats = max(-(-int(q) // n) if n else 1 for q, n in zip(order.quotas, sizes,
                                                                  strict=True))
        return order, order.total * repeats

    def val_dataloader(self) -> EpochLoader:
        return self._loader("validation", train=False)

    def test_dataloader(self) -> EpochLoader:
        return self._loader("validation", train=False)
