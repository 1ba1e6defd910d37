"""Checkpoints that survive crashes and preemption.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target folder,
  fsyncs it and renames it over the final path: a crash or ``kill -9`` during a save leaves the
  previous checkpoint intact and never a partial file under the final name.
- :class:`Preemption` turns SIGTERM (and SIGUSR1, the usual SLURM warning signal, when nothing
  else handles it) into: finish the current step, save ``preempted.ckpt``, stop. The ``fillmask``
  command then exits with :data:`PREEMPTED_EXIT_CODE`.
- :func:`resolve_resume_path` gives ``--ckpt_path last`` (or ``auto``) its meaning: the newest
  *valid* checkpoint of the run, skipping truncated or empty files with a warning.
- :func:`place_run` makes ``trainer.default_root_dir`` the one option that places a run: its
  checkpoints go to ``<root>/checkpoints``, its TensorBoard logs (and resolved config) to
  ``<root>/tensorboard``; :func:`refuse_rerun` stops a second run from landing on a first one
  (so ``last.ckpt`` is always the folder's own run's), and :class:`FinalCheckpoint` saves the
  state a run ends in whatever ``max_steps``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fillmask.checkpoint_file import CheckpointError
from fillmask.errors import PREEMPTED_EXIT_CODE, FillmaskError  # noqa: F401

PREEMPTED_NAME = "preempted.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, fsync, then rename over it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_save(checkpoint, Path(path))


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save so that ``path`` is either the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint (empty, truncated, corrupt), or None if it is.

    torch.save writes a zip archive; reading every member checks the CRCs, so a file cut short
    by a crash is caught without unpickling anything.
    """
    try:
        if path.stat().st_size == 0:
            return "it is empty"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return None if bad is None else f"its member {bad} is corrupt"
    except zipfile.BadZipFile:
        return "it is truncated or not a checkpoint written by torch.save"
    except OSError as error:
        return f"it cannot be read ({error.strerror})"


def run_checkpoints(trainer: L.Trainer) -> list[Path]:
    """Every ``*.ckpt`` in the folders of the trainer's checkpoint callbacks, newest first."""
    folders = {Path(cb.dirpath) for cb in trainer.callbacks
               if isinstance(cb, (ModelCheckpoint, Preemption)) and cb.dirpath}
    files = [f for folder in folders if folder.is_dir() for f in folder.glob("*.ckpt")]
    return sorted(files, key=lambda f: f.stat().st_mtime, reverse=True)


def resolve_resume_path(ckpt_path: str | None, trainer: L.Trainer | None) -> str | None:
    """``last``/``auto``: the newest valid checkpoint of this run (None when there is none);
    an explicit path: itself, after checking it is readable."""
    if ckpt_path in ("last", "auto"):
        for candidate in run_checkpoints(trainer) if trainer is not None else []:
            problem = checkpoint_problem(candidate)
            if problem is None:
                return str(candidate)
            rank_zero_warn(f"skipping checkpoint {candidate}: {problem}")
        if ckpt_path == "last":
            rank_zero_warn("--ckpt_path last: this run has no valid checkpoint yet; starting "
                           "from scratch")
        return None
    if ckpt_path in (None, "best", "hpc"):
        return ckpt_path
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give an existing .ckpt or "
                              "--ckpt_path last")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is unusable: {problem}; resume from an "
                              "earlier checkpoint, or use --ckpt_path last to pick the newest "
                              "valid one")
    return str(path)


class Preemption(L.Callback):
    """Save ``preempted.ckpt`` and stop when the job is told to end (SIGTERM, SIGUSR1).

    Lightning already turns SIGTERM into a stop after the current training (or validation)
    batch; this callback writes the checkpoint at that point, in the run's checkpoint folder,
    so ``fillmask fit ... --ckpt_path last`` continues exactly where the run stopped. SIGUSR1
    (sent by SLURM before the time limit with ``--signal=USR1@90``) is treated like SIGTERM
    unless another handler (Lightning's SLURM auto-requeue) already owns it.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        """Args:
            dirpath: Folder of ``preempted.ckpt``; defaults to the ModelCheckpoint's folder, or
                ``<default_root_dir>/checkpoints``.
        """
        super().__init__()
        self.dirpath = dirpath
        self.saved: Path | None = None
        self._previous_usr1: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            model_checkpoint = trainer.checkpoint_callback
            folder = getattr(model_checkpoint, "dirpath", None)
            self.dirpath = folder or os.path.join(trainer.default_root_dir, "checkpoints")
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and signal.getsignal(usr1) in (signal.SIG_DFL, None):
            with contextlib.suppress(ValueError):  # only the main thread may set handlers
                self._previous_usr1 = signal.signal(usr1, self._treat_as_sigterm(trainer))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None

    @staticmethod
    def _treat_as_sigterm(trainer: L.Trainer):
        def handler(signum: int, frame: Any) -> None:
            trainer._signal_connector.received_sigterm = True

        return handler

    @property
    def ckpt_path(self) -> Path:
        return Path(self.dirpath or ".") / PREEMPTED_NAME

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            trainer.save_checkpoint(self.ckpt_path)
            self.saved = self.ckpt_path


RUN_LOGS = "tensorboard"
"""Subfolder of the run folder that holds the TensorBoard event files and the resolved config."""


def place_run(trainer: L.Trainer, logger_setting: Any) -> None:
    """Put a run's TensorBoard logs in ``<default_root_dir>/tensorboard`` (when the config
    names no logger: ``logger_setting`` is None or True) and the checkpoints of every
    ModelCheckpoint or Preemption callback without a ``dirpath`` in
    ``<default_root_dir>/checkpoints``: one option, ``trainer.default_root_dir``, moves a run."""
    root = Path(trainer.default_root_dir)
    if logger_setting is None or logger_setting is True:
        trainer.logger = TensorBoardLogger(save_dir=str(root), name=RUN_LOGS, version="")
    for callback in trainer.callbacks:
        if isinstance(callback, (ModelCheckpoint, Preemption)) and callback.dirpath is None:
            callback.dirpath = str(root / "checkpoints")
    if not any(isinstance(cb, FinalCheckpoint) for cb in trainer.callbacks):
        # Before the checkpoint callbacks (Lightning keeps them last): their own end-of-training
        # save of last.ckpt would otherwise come first and leave no step checkpoint.
        first = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)),
                     len(trainer.callbacks))
        trainer.callbacks.insert(first, FinalCheckpoint())


class RerunError(FillmaskError):
    """A new run pointed at a folder that holds an earlier run."""


def refuse_rerun(trainer: L.Trainer) -> None:
    """Refuse to start a new run (no ``--ckpt_path``) in a folder that holds another run's
    checkpoints or logs: the new ``last.ckpt`` would sit beside the old files (Lightning
    writes ``last-v1.ckpt``) and the event files would mix. Nothing is written or removed."""
    earlier = run_checkpoints(trainer)
    log_dir = trainer.log_dir if trainer.loggers else None
    if not earlier and log_dir and Path(log_dir).is_dir():
        earlier = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    if not earlier:
        return
    root = Path(trainer.default_root_dir)
    raise RerunError(
        f"{root} already holds a run ({earlier[0]}); continue it with --ckpt_path last, start "
        f"a new one elsewhere with --trainer.default_root_dir {root.name}-2 (or another "
        f"folder), or delete {root} to train it again from scratch")


class FinalCheckpoint(L.Callback):
    """Save the state a run ends in: at the end of training, every ModelCheckpoint that did
    not save at the final step writes its checkpoint (and ``last.ckpt`` when it keeps one).

    Lightning saves on its schedule only (``every_n_train_steps``, epoch ends, validation),
    so a run whose ``max_steps`` is not on that schedule would end with a ``last.ckpt`` of an
    earlier step. This uses ModelCheckpoint's own saving methods, so file names, top-k and
    ``last.ckpt`` follow its configuration.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 or trainer.sanity_checking:
            return
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if callback._last_global_step_saved == trainer.global_step:
                continue
            candidates = callback._monitor_candidates(trainer)
            if callback.monitor is None or callback.monitor in candidates:
                callback._save_topk_checkpoint(trainer, candidates)
            callback._save_last_checkpoint(trainer, candidates)
