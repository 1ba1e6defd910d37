"""Callbacks that tell users how their run is going."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


class FitSummary(L.Callback):
    """At the end of ``fit``, print the steps, wall time and last validation metrics."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        minutes = (time.perf_counter() - self._start) / 60
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(metrics.items()))
        rank_zero_info(f"fit done: {trainer.global_step} steps in {minutes:.1f} min; "
                       f"validation: {shown or 'not run'}")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024,
                        repeats: int = 10) -> float:
    """FLOP/s of a square matmul on ``device`` in ``dtype``: the peak utilisation is measured
    against (the hardware's dense peak is not known on every machine)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput(L.Callback):
    """Log training tokens per second and useful-FLOP utilisation.

    Every ``log_every_n_steps`` the callback logs ``throughput/tokens_per_sec`` (all tokens),
    ``throughput/real_tokens_per_sec`` (non-padding) and ``throughput/utilisation``: useful model
    FLOPs (encoder on every real token, MLM head on masked positions only) per second over the
    peak measured by a square matmul at the start of training. Counts stay on the device
    between logs, so the training step is never synchronised for them.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        """Args:
            peak_flops: The device's peak FLOP/s; measured with a matmul when not given.
        """
        self.peak_flops = peak_flops
        self._paused: float | None = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._since = now
        self._tokens = self._real = self._masked = 0
        self._steps = 0
        self._seq_len = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = measure_matmul_peak(pl_module.device, dtype)
        self._reset(time.perf_counter())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is not None:  # validation time does not count as training time
            self._since += time.perf_counter() - self._paused
            self._paused = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        self._tokens += ids.numel()
        mask = batch.get("attention_mask")
        self._real += ids.numel() if mask is None else mask.sum()
        if "labels" in batch:
            self._masked += (batch["labels"] != -100).sum()
        self._seq_len = ids.shape[1]
        self._steps += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        real, masked = float(self._real), float(self._masked)
        metrics = {"throughput/tokens_per_sec": self._tokens / elapsed,
                   "throughput/real_tokens_per_sec": real / elapsed}
        encoder = getattr(pl_module, "encoder", None)
        if encoder is not None and self.peak_flops:
            flops = real * encoder.flops_per_token(self._seq_len)
            head = getattr(pl_module, "head", None)
            if head is not None:
                head_weights = sum(p.numel() for p in head.parameters() if p.ndim >= 2)
                flops += 6.0 * masked * head_weights
            metrics["throughput/utilisation"] = flops / elapsed / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        pl_module.log("tok/s", metrics["throughput/tokens_per_sec"], prog_bar=True,
                      on_step=True, on_epoch=False, logger=False)
        self._reset(now)
