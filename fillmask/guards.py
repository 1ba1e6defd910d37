"""Guard training against non-finite values: stop at the first NaN/inf step, or skip such steps.

Enable it in the YAML given to ``fillmask fit``::

    trainer:
      callbacks:
        - class_path: fillmask.guards.NonFiniteGuard
          init_args:
            policy: stop          # or skip
            max_skips: 10         # with skip: stop after 10 bad steps in a row

A step is bad when the training loss of one of its micro-batches or one of the gradients the
optimizer is about to apply holds a NaN or an infinity. The check runs in
``on_before_optimizer_step``: after backward (of every micro-batch, with gradient
accumulation) and before gradient clipping and the optimizer step, so no weight has changed yet.
Normal steps pay for one 2-norm per gradient (``torch._foreach_norm``), one ``isfinite`` per
micro-batch loss and one device-to-host read of the combined flag; everything else runs only
after a bad step.

With fp16 mixed precision (``precision: 16-mixed``) the loss scaler already skips steps whose
gradients overflow and lowers its scale, and such steps are routine there, so the guard turns
itself off (bf16 and fp32 runs have no scaler and are guarded).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from fillmask.errors import FillmaskError

Policy = Literal["stop", "skip"]

__all__ = ["NonFiniteError", "NonFiniteGuard"]

_MAX_IDS_SHOWN = 64  # sample ids written into a message; the exception keeps them all


class NonFiniteError(FillmaskError):
    """A training step produced a non-finite loss or gradient (see :class:`NonFiniteGuard`).

    Attributes:
        step: The global step (optimizer steps done before the bad one).
        sample_ids: Dataset ids of the samples of the offending batch(es).
        checkpoint: Path of the checkpoint holding the weights that precede the bad step.
        module: The first module whose forward output was non-finite, when one was found.
    """

    def __init__(self, message: str, step: int, sample_ids: list[int], checkpoint: str,
                 module: str | None) -> None:
        """Args:
            message: The one-line explanation the CLI prints.
            step: The global step of the bad step.
            sample_ids: Dataset ids of the offending samples.
            checkpoint: Path of the checkpoint saved before the bad step.
            module: Name of the first module with a non-finite output, if any.
        """
        super().__init__(message)
        self.step = step
        self.sample_ids = sample_ids
        self.checkpoint = checkpoint
        self.module = module


@dataclass
class _MicroBatch:
    """One training batch of the step being checked, kept to name and replay it after a fault."""

    batch: Any
    batch_idx: int
    rng: tuple[torch.Tensor, torch.device | None, torch.Tensor | None]
    loss_finite: torch.Tensor | None = None  # 0-d bool on the loss's device


class NonFiniteGuard(L.Callback):
    """Stop or skip training steps whose loss or gradients are NaN or infinite.

    ``policy="stop"`` saves a checkpoint of the weights (and optimizer state) that precede the
    bad step, named ``nonfinite-step{N}.ckpt`` with ``N`` the global step, then raises
    :class:`NonFiniteError`. Its one-line message names the step, the batch's sample ids, what
    was non-finite, the first parameter with a non-finite gradient and the first module whose
    forward output was non-finite. The module is found by replaying ``training_step`` on the kept
    batch under ``torch.no_grad()`` with a forward hook on every submodule (same train/eval mode
    and random state, logging silenced), which is done only after a fault.

    ``policy="skip"`` drops the bad step: every gradient is set to ``None`` before the optimizer
    step, so AdamW changes no weight and no optimizer state (weight decay included); the
    learning-rate schedule and ``global_step`` still advance. Each skip warns with the step and
    sample ids, and from the first skip on, every checked step logs ``train/skipped_steps``
    (skips so far, kept in checkpoints) so the count reaches the logger whatever
    ``log_every_n_steps`` is.

    The guard expects a single optimizer; in distributed runs every rank takes the same decision
    (a bad value on any rank stops or skips the step everywhere).
    """

    def __init__(
        self,
        policy: Policy = "stop",
        check_every_n_steps: int = 1,
        dirpath: str | None = None,
        max_skips: int | None = None,
    ) -> None:
        """Configure the guard.

        Args:
            policy: ``stop`` (checkpoint, then raise :class:`NonFiniteError`) or ``skip`` (the
                bad step changes no weight and training goes on).
            check_every_n_steps: Check every n-th optimizer step only. A bad step between checks
                is applied and may make the weights themselves non-finite; the message then
                says so. The check is cheap: keep 1 unless profiling says otherwise.
            dirpath: Folder of the stop checkpoint; defaults to the checkpoint callback's folder,
                else ``<default_root_dir>/checkpoints``.
            max_skips: With ``skip``: the most bad steps skipped in a row (consecutive checked
                steps); the next one stops training as ``stop`` does. Isolated bad batches in a
                long run never add up to it, while a run that has diverged (every step bad) stops
                quickly. ``None``: never stop.
        """
        if policy not in ("stop", "skip"):
            raise FillmaskError(f"NonFiniteGuard policy {policy!r}: use 'stop' or 'skip'")
        if check_every_n_steps < 1:
            raise FillmaskError(f"NonFiniteGuard check_every_n_steps={check_every_n_steps}: "
                                "use 1 or more")
        if max_skips is not None and max_skips < 0:
            raise FillmaskError(f"NonFiniteGuard max_skips={max_skips}: use 0 or more, or null")
        self.policy = policy
        self.check_every_n_steps = check_every_n_steps
        self.dirpath = dirpath
        self.max_skips = max_skips
        self.skipped_steps = 0
        self.skipped_in_a_row = 0
        self.active = True
        self._step = -1
        self._micro: list[_MicroBatch] = []

    # Checkpointed state: the number of skipped steps survives a resume.

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    # Hooks.

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = not _uses_loss_scaling(trainer)
        if not self.active:
            rank_zero_info("NonFiniteGuard is off: with fp16 mixed precision the loss scaler "
                           "skips steps with non-finite gradients itself")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._step:  # a new optimizer step: forget the last one's
            self._step = trainer.global_step
            self._micro = []
        if self.active and trainer.global_step % self.check_every_n_steps == 0:
            self._micro.append(_MicroBatch(batch, batch_idx, _rng_state(pl_module.device)))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        if not self._micro:
            return
        finite = torch.isfinite(loss.detach()).all()
        last = self._micro[-1]
        last.loss_finite = finite if last.loss_finite is None else last.loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self._micro:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        flags = [m.loss_finite for m in self._micro if m.loss_finite is not None]
        flags += _gradients_finite([p.grad for p in params if p.grad is not None])
        bad = bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())
        bad = bad and self._confirmed(params)
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.skipped_in_a_row = 0
            self._log_skips(pl_module)
            return
        what = self._what(pl_module)
        if self.policy == "skip" and (self.max_skips is None
                                      or self.skipped_in_a_row < self.max_skips):
            self._skip(trainer, pl_module, params, what)
        else:
            self._stop(trainer, pl_module, what)

    # Skipping.

    def _skip(self, trainer: L.Trainer, pl_module: L.LightningModule,
              params: list[nn.Parameter], what: str) -> None:
        for param in params:
            param.grad = None  # AdamW leaves parameters without a gradient untouched
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        self._log_skips(pl_module)
        rank_zero_warn(f"step {trainer.global_step}: non-finite {what}; the step "
                       f"was skipped, no weight changed (sample ids "
                       f"{_shown(self._sample_ids(self._micro))}; {self.skipped_steps} skipped "
                       "so far)")

    def _log_skips(self, pl_module: L.LightningModule) -> None:
        if self.skipped_steps:
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True,
                          on_epoch=False)

    # Stopping.

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        path = self._checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # before anything else runs the model again
        module, culprit = self._locate(pl_module)
        ids = self._sample_ids([culprit] if culprit else self._culprits())
        parts = [f"step {trainer.global_step}: non-finite {what}",
                 f"sample ids {_shown(ids)}"]
        if self.skipped_in_a_row:
            parts.append(f"after {self.skipped_in_a_row} skipped step(s) in a row "
                         f"(max_skips={self.max_skips})")
        gradient = _first_non_finite(pl_module, lambda p: p.grad)
        if gradient:
            parts.append(f"first non-finite gradient: {gradient}")
        parts.append(f"first non-finite module output: {module}" if module else
                     "no module output was non-finite when the batch was replayed (the loss "
                     "computation or the backward pass overflowed)")
        weight = _first_non_finite(pl_module, lambda p: p)
        resume = ("then resume from that checkpoint with --ckpt_path" if weight is None else
                  f"then resume from an earlier checkpoint with --ckpt_path (the weights are "
                  f"already non-finite, first {weight}: a bad step was applied between checks)")
        parts.append(f"saved the weights before this step to {path}; fix: lower the learning "
                     "rate or enable/lower gradient clipping (trainer.gradient_clip_val), "
                     f"{resume}, or use the guard's policy skip")
        raise NonFiniteError("; ".join(parts), trainer.global_step, ids, path, module)

    def _checkpoint_path(self, trainer: L.Trainer) -> str:
        folder = (self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
                  or os.path.join(trainer.default_root_dir, "checkpoints"))
        return os.path.join(folder, f"nonfinite-step{trainer.global_step}.ckpt")

    def _locate(self, pl_module: L.LightningModule) -> tuple[str | None, _MicroBatch | None]:
        """Replay the step's batches; the first module with a non-finite output and its batch."""
        for micro in self._micro:
            module = _first_non_finite_module(pl_module, micro)
            if module:
                return module, micro
        return None, None

    # What went wrong, from the flags of the step.

    def _confirmed(self, params: list[nn.Parameter]) -> bool:
        """Rule out a 2-norm that overflowed on finite gradients: check the values exactly."""
        loss = any(m.loss_finite is not None and not m.loss_finite for m in self._micro)
        return loss or any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                           for p in params)

    def _culprits(self) -> list[_MicroBatch]:
        bad = [m for m in self._micro if m.loss_finite is not None and not m.loss_finite]
        return bad or self._micro

    def _what(self, pl_module: L.LightningModule) -> str:
        loss = any(m.loss_finite is not None and not m.loss_finite for m in self._micro)
        gradient = _first_non_finite(pl_module, lambda p: p.grad) is not None
        if loss and gradient:
            return "loss and gradients"
        if loss or gradient:
            return "loss" if loss else "gradients (the loss was finite)"
        return "loss or gradients on another process"  # all are finite here

    @staticmethod
    def _sample_ids(micro: Sequence[_MicroBatch]) -> list[int]:
        ids: list[int] = []
        for m in micro:
            if isinstance(m.batch, Mapping) and "sample_id" in m.batch:
                ids += [int(i) for i in torch.as_tensor(m.batch["sample_id"]).flatten().tolist()]
        return ids


def _uses_loss_scaling(trainer: L.Trainer) -> bool:
    """Whether fp16 loss scaling (which skips overflowing steps itself) is on."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None or str(trainer.precision) == "16-mixed"


def _first_non_finite_module(pl_module: L.LightningModule, micro: _MicroBatch) -> str | None:
    """Replay ``training_step`` on a kept batch with a forward hook on every submodule.

    Hooks fire when a module's forward returns, so the first non-finite output found is the
    innermost module where the values went wrong.

    Args:
        pl_module: The model, in the train/eval mode and with the weights of the bad step.
        micro: The kept batch, its index and the random state its forward began with.

    Returns:
        ``"name (Class)"`` of the first module with a non-finite output, or ``None``.
    """
    found: list[str] = []

    def watch(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not found and _has_non_finite(output):
                found.append(f"{name} ({type(module).__name__})")
        return hook

    handles = [m.register_forward_hook(watch(n)) for n, m in pl_module.named_modules() if n]
    try:
        with torch.no_grad(), _replayed_rng(micro.rng), _logging_silenced(pl_module):
            pl_module.training_step(micro.batch, micro.batch_idx)
    except Exception as error:  # the diagnosis must not hide the fault it explains
        if not found:
            found.append(f"unknown (replaying the batch failed: {type(error).__name__})")
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def _gradients_finite(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-d bool per device: the 2-norm of each gradient is finite (NaN and inf propagate).

    A 2-norm can overflow on large finite values; ``NonFiniteGuard._confirmed`` checks a
    positive exactly.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    return [torch.stack(torch._foreach_norm(group)).isfinite().all()
            for group in by_device.values()]


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value).all())
    if isinstance(value, Mapping):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _first_non_finite(module: nn.Module, tensor_of) -> str | None:
    """Name of the first parameter whose ``tensor_of(param)`` (weight or gradient) is not
    finite."""
    for name, param in module.named_parameters():
        value = tensor_of(param)
        if value is not None and not bool(torch.isfinite(value).all()):
            return name
    return None


def _shown(ids: list[int]) -> str:
    if len(ids) <= _MAX_IDS_SHOWN:
        return str(ids)
    return f"{ids[:_MAX_IDS_SHOWN]} and {len(ids) - _MAX_IDS_SHOWN} more"


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.device | None,
                                               torch.Tensor | None]:
    """The CPU random state and, on CUDA, the device's: what dropout will draw from."""
    if device.type == "cuda":
        return torch.get_rng_state(), device, torch.cuda.get_rng_state(device)
    return torch.get_rng_state(), None, None


@contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.device | None, torch.Tensor | None]
                  ) -> Iterator[None]:
    cpu, device, cuda = state
    with torch.random.fork_rng(devices=[device] if device is not None else []):
        torch.set_rng_state(cpu)
        if device is not None and cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


@contextmanager
def _logging_silenced(pl_module: L.LightningModule) -> Iterator[None]:
    """Make ``self.log``/``self.log_dict`` no-ops while ``training_step`` is replayed."""

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    pl_module.log = ignore
    pl_module.log_dict = ignore
    try:
        yield
    finally:
        del pl_module.log
        del pl_module.log_dict
