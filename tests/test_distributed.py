"""Data parallelism: rank-aware sampling that Lightning leaves alone, the same global batch
whatever the number of processes, exact mid-epoch resume of every rank, global-batch logging.

The multi-process tests run the ordinary command with ``--trainer.strategy ddp
--trainer.devices 2 --trainer.accelerator cpu`` (gloo); Lightning launches the second process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

from fillmask.data.datamodule import (
    EpochLoader,
    EpochSampler,
    MaskedLMDataModule,
    ResumeLayoutError,
    ShardedSampler,
)
from fillmask.data.mixture import MixtureSampler

TESTS = Path(__file__).resolve().parent
ASSETS = TESTS / "assets" / "golden"
BATCH = 4  # per process
EPOCH_STEPS = 105  # 844 samples of the golden corpus: 422 per process, 105 batches of 4
SEED = 0  # the data module's default


# Sharding and loader state, in one process.

def global_order(sampler: ShardedSampler) -> list[int]:
    return sampler.source.order().tolist()


def shards(source, processes: int, drop_last: bool) -> list[list[int]]:
    return [[i for _, i in ShardedSampler(source, processes, rank, drop_last)]
            for rank in range(processes)]


@pytest.mark.parametrize("source", [EpochSampler(10, seed=3, shuffle=True),
                                    MixtureSampler([7, 3], np.array([0.5, 0.5]), seed=3)],
                         ids=["epoch", "mixture"])
def test_shards_split_the_global_order_evenly_without_overlap(source):
    order = source.order().tolist()
    assert shards(source, 1, True) == [order] == shards(source, 1, False)  # one process: as is
    for processes in (2, 3, 4):
        train = shards(source, processes, drop_last=True)
        keep = len(order) // processes * processes
        assert {len(s) for s in train} == {len(order) // processes}
        assert sorted(i for s in train for i in s) == sorted(order[:keep])  # tail dropped
        assert [s[0] for s in train] == order[:processes]  # strided: rank r takes r, r + W...
        evaluation = shards(source, processes, drop_last=False)
        assert {len(s) for s in evaluation} == {-(-len(order) // processes)}
        assert set(i for s in evaluation for i in s) == set(order)  # wraps round, loses none


def golden_datamodule(tmp_path: Path, **overrides) -> MaskedLMDataModule:
    dm = MaskedLMDataModule(corpus=str(ASSETS / "corpus.txt"),
                            tokenizer=str(ASSETS / "tokenizer.json"), max_length=32,
                            batch_size=BATCH, cache_dir=str(tmp_path / "cache"), **overrides)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def rank_loader(dm: MaskedLMDataModule, processes: int, rank: int) -> EpochLoader:
    dm.data_parallel = lambda: (processes, rank)  # as the strategy would report
    return dm.train_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_rank_zero_loader_state_resumes_every_rank(tmp_path, workers):
    dm = golden_datamodule(tmp_path, num_workers=workers)
    expected = [b["sample_id"].tolist() for b in rank_loader(dm, 2, 1)]
    rank0 = rank_loader(dm, 2, 0)
    batches = iter(rank0)
    for _ in range(3):
        next(batches)
    state = rank0.state_dict()  # only rank 0's state reaches the checkpoint
    assert state["yielded"] == 3 and state["processes"] == 2
    rank1 = rank_loader(dm, 2, 1)
    rank1.load_state_dict(state)
    assert [b["sample_id"].tolist() for b in rank1] == expected[3:]


def test_mid_epoch_state_of_another_layout_is_a_clear_error(tmp_path):
    dm = golden_datamodule(tmp_path)
    loader = rank_loader(dm, 2, 0)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    with pytest.raises(ResumeLayoutError, match=r"1 batches into an epoch by 2 process"):
        rank_loader(dm, 1, 0).load_state_dict(state)
    finished = {**state, "finished": True}  # at an epoch boundary anything may change
    rank_loader(dm, 1, 0).load_state_dict(finished)


def test_lightning_keeps_the_sharded_sampler(tmp_path):
    dm = golden_datamodule(tmp_path)
    trainer = L.Trainer(strategy="ddp", devices=2, accelerator="cpu", logger=False)
    connector = trainer._data_connector
    ours = rank_loader(dm, 2, 0)
    assert not connector._requires_distributed_sampler(ours)
    assert connector._prepare_dataloader(ours, shuffle=True, mode=RunningStage.TRAINING) is ours
    plain = DataLoader(list(range(8)), batch_size=2)
    assert connector._requires_distributed_sampler(plain)  # what would happen otherwise


# The command with two processes.

def write_config(folder: Path, steps: int, batch_size: int = BATCH, checkpoint_every: int = 1
                 ) -> Path:
    """A tiny MLM run on the checked-in golden corpus and tokenizer. Dropout is off, and
    ``selection: smoothed`` masks the same number of tokens in every (full) sample, so each
    process's mean loss weighs its tokens as one process's mean over the whole batch does."""
    config = folder / "run.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 2
  val_check_interval: 50
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  log_every_n_steps: 2
  default_root_dir: {folder}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {folder}, name: csv, version: ""}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {folder}/checkpoints, every_n_train_steps: {checkpoint_every},
                  save_last: true}}
    - class_path: distributed_helpers.RankLog
      init_args: {{folder: {folder}/ids}}
model:
  class_path: fillmask.objectives.mlm.MaskedLM
  init_args:
    encoder:
      class_path: BertEncoder
      init_args: {{hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64,
                  max_positions: 32, dropout: 0.0, attention_dropout: 0.0}}
    learning_rate: 1.0e-3
    warmup_steps: 2
    total_steps: 200
data:
  corpus: {ASSETS / "corpus.txt"}
  tokenizer: {ASSETS / "tokenizer.json"}
  max_length: 32
  batch_size: {batch_size}
  masking:
    class_path: fillmask.masking.token.TokenMasking
    init_args: {{selection: smoothed}}
""", encoding="utf-8")
    return config


def fit(config: Path, *args: str, processes: int = 2) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    parallel = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if processes == 2 \
        else ["--trainer.devices", "1"]
    result = subprocess.run([sys.executable, "-m", "fillmask", "fit", "--config", str(config),
                             *parallel, *args], capture_output=True, text=True, env=env,
                            timeout=240, cwd=config.parent)
    assert result.returncode == 0, result.stderr[-3000:]


def rank_rows(folder: Path, rank: int) -> list[dict]:
    path = folder / "ids" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Two processes, one epoch and two steps of the next, never interrupted."""
    folder = tmp_path_factory.mktemp("ddp")
    fit(write_config(folder, EPOCH_STEPS + 2, checkpoint_every=1000))
    return folder


def test_two_ranks_split_each_epoch_without_overlap(reference, tmp_path):
    order = EpochSampler(844, SEED, shuffle=True).order().tolist()
    assert len(golden_datamodule(tmp_path).samples["train"]) == len(order)
    seen = []
    for rank in (0, 1):
        rows = [r for r in rank_rows(reference, rank) if r["epoch"] == 0]
        assert [r["step"] for r in rows] == list(range(1, EPOCH_STEPS + 1))
        ids = [i for r in rows for i in r["ids"]]
        assert ids == order[rank::2][: EPOCH_STEPS * BATCH]  # Lightning kept our sampler
        seen.append(set(ids))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(order[: 2 * EPOCH_STEPS * BATCH])  # all but a 4-sample tail
    next_epoch = [r for r in rank_rows(reference, 0) if r["epoch"] == 1]
    assert len(next_epoch) == 2 and next_epoch[0]["ids"] != rank_rows(reference, 0)[0]["ids"]


def test_global_batch_size_and_tokens_per_step_are_logged(reference):
    with open(reference / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    sizes = {r["train/global_batch_size"] for r in rows if r["train/global_batch_size"]}
    assert sizes == {"8.0"}  # 4 per process x 1 accumulated x 2 processes
    tokens = [float(r["train/tokens_per_step"]) for r in rows if r["train/tokens_per_step"]]
    assert len(tokens) >= EPOCH_STEPS // 2 and set(tokens) == {8 * 32.0}  # summed over ranks


def test_same_global_batch_gives_the_same_losses(reference, tmp_path):
    """2 processes x batch 4 against 1 process x batch 8, from the same initial weights.

    Not bitwise: each process's gradient is summed over 4 samples and the all-reduce adds the
    two halves, where one process sums 8 at once (and batches of 4 and 8 run their matmuls with
    other blockings), so float32 rounding differs; measured differences are about 1e-6."""
    steps = 8
    fit(write_config(tmp_path, steps, 2 * BATCH, checkpoint_every=1000), processes=1)
    single = rank_rows(tmp_path, 0)
    ranks = [rank_rows(reference, rank)[:steps] for rank in (0, 1)]
    for one, first, second in zip(single, *ranks, strict=True):
        assert sorted(one["ids"]) == sorted(first["ids"] + second["ids"])  # same global batch
        assert first["masked"] == second["masked"]
        assert (first["loss"] + second["loss"]) / 2 == pytest.approx(one["loss"], abs=1e-4)


def test_two_rank_resume_from_a_mid_epoch_checkpoint_is_exact(reference, tmp_path):
    stop, end = 5, 12
    fit(write_config(tmp_path, stop))
    fit(write_config(tmp_path, end), "--ckpt_path", "last")
    for rank in (0, 1):
        rows, expected = rank_rows(tmp_path, rank), rank_rows(reference, rank)[:end]
        assert [r["step"] for r in rows] == list(range(1, end + 1))
        assert [r["ids"] for r in rows[stop:]] == [r["ids"] for r in expected[stop:]]
        assert [r["loss"] for r in rows] == [r["loss"] for r in expected]  # bitwise on CPU
