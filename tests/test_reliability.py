"""Reliability: exact resume after SIGTERM or from periodic checkpoints, preemption through the
command, atomic checkpoints, clear mismatch errors, and bitwise determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from reliability_helpers import SignalAt, StepLog

from fillmask.architectures.bert import BertEncoder
from fillmask.checkpointing import (
    PREEMPTED_NAME,
    AtomicCheckpointIO,
    Preemption,
    atomic_save,
    checkpoint_problem,
    resolve_resume_path,
)
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerTraining
from fillmask.objectives.base import CheckpointError
from fillmask.objectives.mlm import MaskedLM

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def build(corpus: Path, workers: int = 0) -> tuple[MaskedLMDataModule, MaskedLM]:
    L.seed_everything(0, verbose=False)
    dm = MaskedLMDataModule(corpus=str(corpus), tokenizer_training=TokenizerTraining(
        vocab_size=600), max_length=32, batch_size=64, num_workers=workers, seed=5)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    return dm, MaskedLM(encoder, learning_rate=1e-3, warmup_steps=2)  # dropout 0.1 is on


def run(folder: Path, corpus: Path, steps: int, log: Path, *callbacks, workers: int = 0,
        ckpt_path: str | None = None, every: int | None = None) -> L.Trainer:
    dm, model = build(corpus, workers)
    checkpoints = ModelCheckpoint(dirpath=folder / "checkpoints", save_top_k=-1,
                                  every_n_train_steps=every, filename="step{step}",
                                  auto_insert_metric_name=False,
                                  save_last=True) if every else ModelCheckpoint(
        dirpath=folder / "checkpoints", save_last=True)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, val_check_interval=10,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        default_root_dir=folder, plugins=[AtomicCheckpointIO()],
                        callbacks=[checkpoints, Preemption(), StepLog(str(log)), *callbacks])
    trainer.fit(model, datamodule=dm, ckpt_path=resolve_resume_path(ckpt_path, trainer))
    return trainer


def steps_of(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> tuple[list[dict], int]:
    folder = tmp_path_factory.mktemp("reference")
    trainer = run(folder, small_corpus, 45, folder / "log.jsonl")
    return steps_of(folder / "log.jsonl"), trainer.num_training_batches


@pytest.mark.parametrize("workers,where", [(0, "mid-epoch"), (2, "mid-epoch"),
                                           (0, "epoch-end"), (2, "validation")])
def test_resume_after_sigterm_is_exact(small_corpus, tmp_path, reference, workers, where):
    expected, per_epoch = reference
    assert per_epoch < 45  # the run crosses an epoch boundary
    stop = {"mid-epoch": 7, "epoch-end": per_epoch, "validation": 10}[where]
    log = tmp_path / "log.jsonl"
    signal_cb = SignalAt(stop, in_validation=where == "validation")
    with pytest.raises(SIGTERMException):
        run(tmp_path, small_corpus, 45, log, signal_cb, workers=workers)
    assert (tmp_path / "checkpoints" / PREEMPTED_NAME).is_file()
    run(tmp_path, small_corpus, 45, log, workers=workers, ckpt_path="last")
    got = steps_of(log)
    assert [r["ids"] for r in got] == [r["ids"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bitwise on CPU
    first_epoch = [i for r in got[:per_epoch] for i in r["ids"]]
    assert len(first_epoch) == len(set(first_epoch))  # nothing seen twice in an epoch


def test_resume_from_a_periodic_mid_epoch_checkpoint_is_exact(small_corpus, tmp_path,
                                                              reference):
    expected, per_epoch = reference
    run(tmp_path / "a", small_corpus, 45, tmp_path / "first.jsonl", every=6)
    assert steps_of(tmp_path / "first.jsonl") == expected  # checkpointing changes nothing
    for step in (12, 6 * (per_epoch // 6)):  # mid-epoch, and the last one before the boundary
        log = tmp_path / f"from{step}.jsonl"
        run(tmp_path / f"b{step}", small_corpus, 45, log,
            ckpt_path=str(tmp_path / "a" / "checkpoints" / f"step{step}.ckpt"))
        assert steps_of(log) == expected[step:]


def test_two_fresh_runs_are_bitwise_equal(small_corpus, tmp_path, reference):
    expected, _ = reference
    run(tmp_path, small_corpus, 45, tmp_path / "log.jsonl")
    assert steps_of(tmp_path / "log.jsonl") == expected


# Atomic checkpoints and resume fallback.

KILL_SAVER = """
import sys, torch
from pathlib import Path
from fillmask.checkpointing import atomic_save
path = Path(sys.argv[1])
big = {"weights": torch.randn(4_000_000)}
print("ready", flush=True)
for i in range(10_000):
    big["step"] = i
    atomic_save(big, path)
"""


def test_kill_9_during_saves_leaves_a_valid_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"weights": torch.zeros(3), "step": -1}, path)
    for delay in (0.3, 0.7, 1.1):
        saver = subprocess.Popen([sys.executable, "-c", KILL_SAVER, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(delay)
        saver.send_signal(signal.SIGKILL)
        saver.wait()
        assert checkpoint_problem(path) is None
        assert "step" in torch.load(path, weights_only=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert all(name.startswith(".last.ckpt.") for name in leftovers)  # temp files, never final


def test_last_skips_truncated_and_empty_checkpoints(tmp_path, small_corpus):
    trainer = run(tmp_path, small_corpus, 6, tmp_path / "log.jsonl")
    folder = tmp_path / "checkpoints"
    good = folder / "last.ckpt"
    data = good.read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (folder / "empty.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping checkpoint .*(truncated|empty)"):
        assert resolve_resume_path("last", trainer) == str(good)
    for bad, reason in (("truncated.ckpt", "truncated"), ("empty.ckpt", "empty")):
        with pytest.raises(CheckpointError, match=rf"{bad} is unusable: .*{reason}"):
            resolve_resume_path(str(folder / bad), trainer)


# The command: preemption exit code, resume, one-line errors.

def write_config(folder: Path, corpus: Path, *callbacks: str, hidden: int = 32,
                 max_length: int = 32, steps: int = 24) -> Path:
    extra = "".join(f"\n    - {c}" for c in callbacks)
    config = folder / "run.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  max_steps: {steps}
  logger: false
  enable_progress_bar: false
  limit_val_batches: 2
  val_check_interval: 8
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  default_root_dir: {folder}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {folder}/checkpoints, save_last: true}}
    - class_path: reliability_helpers.StepLog
      init_args: {{path: {folder}/log.jsonl}}{extra}
model:
  class_path: fillmask.objectives.mlm.MaskedLM
  init_args:
    encoder:
      class_path: BertEncoder
      init_args: {{hidden_size: {hidden}, num_layers: 2, num_heads: 2, intermediate_size: 64,
                  max_positions: 32}}
data:
  corpus: {corpus}
  tokenizer_training: {{vocab_size: 600}}
  max_length: {max_length}
  batch_size: 16
""", encoding="utf-8")
    return config


def fillmask(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fillmask", "fit", "--config", str(config),
                           *args], capture_output=True, text=True, env=env, timeout=300,
                          cwd=config.parent)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_preempted_command_exits_75_and_resumes_with_ckpt_path_last(small_corpus, tmp_path,
                                                                    signal_name):
    stop = ("{class_path: reliability_helpers.SignalAt, init_args: {step: 5, signal_name: "
            f"{signal_name}}}}}")
    first = fillmask(write_config(tmp_path, small_corpus, stop))
    assert first.returncode == 75, first.stderr[-2000:]
    assert "preempted" in first.stderr and "--ckpt_path last" in first.stderr
    assert (tmp_path / "checkpoints" / PREEMPTED_NAME).is_file()
    second = fillmask(write_config(tmp_path, small_corpus), "--ckpt_path", "last")
    assert second.returncode == 0, second.stderr[-2000:]
    steps = [r["step"] for r in steps_of(tmp_path / "log.jsonl")]
    assert steps == list(range(1, 25))  # every step once, none skipped or repeated


def test_resuming_with_another_architecture_is_one_clear_line(small_corpus, tmp_path):
    assert fillmask(write_config(tmp_path, small_corpus, steps=4)).returncode == 0
    other = fillmask(write_config(tmp_path, small_corpus, hidden=64, steps=8),
                     "--ckpt_path", "last")
    assert other.returncode == 2, other.stderr[-2000:]
    assert "hidden_size=32" in other.stderr and "hidden_size=64" in other.stderr
    assert "Traceback" not in other.stderr


def test_max_length_above_position_limit_fails_before_step_0(small_corpus, tmp_path):
    result = fillmask(write_config(tmp_path, small_corpus, max_length=48))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "max_length=48 exceeds the encoder's max_positions=32" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "log.jsonl").exists()  # no step ran


def test_a_truncated_explicit_checkpoint_is_one_clear_line(small_corpus, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a checkpoint")
    result = fillmask(write_config(tmp_path, small_corpus), "--ckpt_path", str(broken))
    assert result.returncode == 2 and "broken.ckpt is unusable" in result.stderr
    assert "Traceback" not in result.stderr


def test_golden_loss_curve_is_reproduced(tmp_path):
    """Bit for bit on the torch build that recorded it, within golden.TOLERANCE on others."""
    from golden import difference, golden_curve, stored

    problem = difference(golden_curve(cache_dir=str(tmp_path)), stored())
    assert problem is None, (
        f"the tiny quickstart's loss curve changed ({problem}): if the change to the numerics "
        "is intended, run `python tests/golden.py --write` on the recording build and commit "
        "tests/assets/golden/losses.json")


def test_golden_comparison_is_exact_on_the_recording_build_only():
    from golden import TOLERANCE, build, difference

    record = {**build(), "steps": 2, "losses": [6.0, 5.5]}
    assert difference([6.0, 5.5], record) is None
    assert "bit for bit" in difference([6.0, 5.5 + 1e-7], record)
    for other in ({**record, "torch": "0.0.0+other"}, {**record, "cpu": "OTHER"}):
        assert difference([6.0, 5.5 + 1e-7], other) is None
        assert difference([6.0, 5.5 + TOLERANCE / 2], other) is None
        assert "max abs difference" in difference([6.0, 5.5 + 2 * TOLERANCE], other)
    assert "the golden file has 2" in difference([6.0], record)
