"""Counter-based randomness keyed by (seed, epoch, sample id).

Every random number a masking scheme draws is a hash of (seed, epoch, sample id, stream,
position). A sample is therefore masked the same way whatever batch it lands in, however many
loader workers run, and after a resume in the middle of an epoch; no global RNG is touched.
The hash is SplitMix64's finaliser, evaluated on whole int64 tensors at once.
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _as_int64(value: int) -> int:
    """Wrap a Python integer into the signed 64-bit range, as int64 arithmetic would."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser: a bijective scramble of int64 values (wrapping arithmetic)."""
    x = (x ^ _shift_right(x, 30)) * _MUL1
    x = (x ^ _shift_right(x, 27)) * _MUL2
    return x ^ _shift_right(x, 31)


class SampleRandom:
    """Random numbers for a batch, each row a pure function of (seed, epoch, sample id)."""

    def __init__(self, seed: int, epoch: int, sample_ids: torch.Tensor) -> None:
        key = torch.as_tensor(sample_ids, dtype=torch.int64)
        for part in (seed, epoch):
            key = mix64(key * _GOLDEN + _as_int64(int(part) * _MUL2 + _GOLDEN))
        self.keys = key  # (B,)

    def _bits(self, length: int, stream: int) -> torch.Tensor:
        positions = torch.arange(length, dtype=torch.int64, device=self.keys.device)
        counter = self.keys[:, None] + (positions + (stream << 32)) * _GOLDEN  # (B, T)
        return mix64(counter)

    def uniform(self, length: int, stream: int) -> torch.Tensor:
        """Floats in [0, 1) of shape (B, length); ``stream`` separates independent draws."""
        top24 = _shift_right(self._bits(length, stream), 40)
        return top24.to(torch.float32) * (1.0 / (1 << 24))

    def integers(self, length: int, stream: int, high: int) -> torch.Tensor:
        """Integers in [0, high) of shape (B, length)."""
        top53 = _shift_right(self._bits(length, stream), 11).to(torch.float64)
        return (top53 * (high / float(1 << 53))).to(torch.int64).clamp_(max=high - 1)
