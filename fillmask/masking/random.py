"""Counter-based randomness keyed by (seed, epoch, sample id).

Every random number a masking scheme draws is a hash of (seed, epoch, sample id, stream,
position). A sample is therefore masked the same way whatever batch it lands in, however many
loader workers run, and after a resume in the middle of an epoch; no global RNG is touched.
The hash is SplitMix64's finaliser on whole uint64 arrays (numpy wraps and shifts them the way
the algorithm needs, and costs far less per call than tensor ops on batch-sized arrays).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_STREAM = np.uint64(1 << 32)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective scramble of uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MUL1
        x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def _key(values: np.ndarray, part: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        salt = np.uint64(int(part) % (1 << 64)) * _MUL2 + _GOLDEN
        return mix64(values * _GOLDEN + salt)


class SampleRandom:
    """Random numbers for a batch, each row a pure function of (seed, epoch, sample id)."""

    def __init__(self, seed: int, epoch: int, sample_ids: np.ndarray | list[int]) -> None:
        key = np.asarray(sample_ids).astype(np.int64).view(np.uint64)
        for part in (seed, epoch):
            key = _key(key, part)
        self.keys = key  # (B,)

    def __len__(self) -> int:
        return len(self.keys)

    def bits(self, length: int, stream: int) -> np.ndarray:
        """Raw 64-bit draws of shape (B, length); ``stream`` separates independent draws."""
        with np.errstate(over="ignore"):
            counter = np.arange(length, dtype=np.uint64) + np.uint64(stream) * _STREAM
            return mix64(self.keys[:, None] + counter * _GOLDEN)

    def uniform(self, length: int, stream: int) -> np.ndarray:
        """float32 in [0, 1) of shape (B, length)."""
        top24 = self.bits(length, stream) >> np.uint64(40)
        return top24.astype(np.float32) * np.float32(1.0 / (1 << 24))

    def uniform64(self, length: int, stream: int) -> np.ndarray:
        """float64 in (0, 1) of shape (B, length), never exactly 0 (safe under log)."""
        top53 = self.bits(length, stream) >> np.uint64(11)
        return (top53.astype(np.float64) + 0.5) * (1.0 / (1 << 53))

    def integers(self, length: int, stream: int, high: int) -> np.ndarray:
        """int64 in [0, high) of shape (B, length)."""
        drawn = (self.uniform64(length, stream) * high).astype(np.int64)
        return np.minimum(drawn, high - 1)


def derive_seed(*parts: int) -> int:
    """A non-negative 63-bit integer hashed from integer ``parts`` (for torch generators)."""
    value = np.zeros(1, dtype=np.uint64)
    for part in parts:
        value = _key(value, part)
    return int(value[0] >> np.uint64(1))
