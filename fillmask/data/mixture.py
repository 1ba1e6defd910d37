"""Corpus mixtures: several corpora sampled by weight or by temperature (XLM-R's alpha).

With sizes n_i, temperature sampling draws from corpus i with probability
q_i = p_i ** alpha / sum_j p_j ** alpha, where p_i = n_i / sum_j n_j: alpha = 1 keeps the natural
proportions, alpha = 0.3 (XLM-R) up-samples small corpora and down-samples large ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

from fillmask.data.corpus import SampleBy
from fillmask.masking.random import derive_seed


@dataclass(frozen=True)
class CorpusSource:
    """One member of a corpus mixture."""

    path: str
    """An embedded corpus name, a saved `datasets` folder, or text/JSONL/Parquet files (globs)."""
    weight: float | None = None
    """Relative sampling weight; when no member sets one, weights come from sizes and alpha."""
    name: str | None = None
    """A label for logs (defaults to the path)."""
    text_column: str = "text"
    """Column holding the text in JSONL, Parquet and saved datasets."""
    sample_by: SampleBy = "paragraph"
    """How plain-text files are split into documents."""

    @property
    def label(self) -> str:
        return self.name or self.path


def mixture_probabilities(sizes: list[int], weights: list[float | None], alpha: float
                          ) -> np.ndarray:
    """Sampling probability of each corpus: explicit weights, else sizes tempered by alpha."""
    if any(w is not None for w in weights):
        if any(w is None or w < 0 for w in weights):
            raise ValueError("give every corpus of the mixture a weight >= 0, or none (then "
                             "sizes and mixture_alpha decide)")
        raw = np.asarray(weights, dtype=np.float64)
    else:
        sizes_arr = np.asarray(sizes, dtype=np.float64)
        raw = (sizes_arr / sizes_arr.sum()) ** alpha
        raw[sizes_arr == 0] = 0.0
    if raw.sum() <= 0:
        raise ValueError("the corpus mixture has no weight on any non-empty corpus")
    return raw / raw.sum()


def _quotas(probabilities: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` draws by probability (largest remainder, so they sum to ``total``)."""
    exact = probabilities * total
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: total - quotas.sum()]] += 1
    return quotas


class MixtureSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, sample id)`` over the concatenated corpora, drawing each corpus's quota.

    An epoch has as many samples as all corpora together; corpus i contributes
    round(q_i x that) samples, taken from fresh permutations of its own samples (repeating them
    when up-sampled). A repeated sample gets the id ``index + k x total`` on its k-th repeat, so
    its masks differ; the dataset reads ``id % total``. Everything follows from (seed, epoch).

    It knows nothing of processes: under DDP/FSDP the data module wraps it in a
    ``ShardedSampler``, which gives each process its share of this global order.
    """

    def __init__(self, sizes: list[int], probabilities: np.ndarray, seed: int) -> None:
        self.sizes = list(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.total = int(sum(sizes))
        self.quotas = _quotas(np.asarray(probabilities), self.total)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total

    def _generator(self, *parts: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, *parts))

    def order(self) -> np.ndarray:
        """This epoch's sample ids, in order (int64); the same on every process."""
        drawn = []
        for corpus, (size, quota) in enumerate(zip(self.sizes, self.quotas, strict=True)):
            rounds = -(-int(quota) // size) if size else 0
            for repeat in range(rounds):
                order = torch.randperm(size, generator=self._generator(corpus, repeat)).numpy()
                take = order[: min(size, int(quota) - repeat * size)]
                drawn.append(self.offsets[corpus] + take + repeat * self.total)
        ids = np.concatenate(drawn) if drawn else np.zeros(0, np.int64)
        return ids[torch.randperm(len(ids), generator=self._generator(-1)).numpy()]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.order().tolist())
