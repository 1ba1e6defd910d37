"""Phased pretraining (fillmask.phases.Phases): lengths in tokens or steps, what each phase
changes, the learning-rate segments, exact resume inside a phase and at its boundary, and the
one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from reliability_helpers import SignalAt

from fillmask.architectures.bert import BertEncoder
from fillmask.checkpointing import AtomicCheckpointIO, Preemption, resolve_resume_path
from fillmask.data.datamodule import EpochSampler, MaskedLMDataModule
from fillmask.data.mixture import CorpusSource
from fillmask.data.phasing import PhaseSampler
from fillmask.data.tokenize import TokenizerTraining
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.mlm import MaskedLM
from fillmask.phases import (
    BatchRamp,
    LearningRate,
    Phase,
    PhaseError,
    Phases,
    PhaseSchedule,
    plan,
)

PEAK = 1e-3


def two_phases() -> list[Phase]:
    """6 steps of 16 x 32 at 30% masking after a 2-step warm-up; then 4096 tokens = 4 steps of
    2 x 8 sequences of 64 tokens at 15%, decaying by 1 - sqrt to 0."""
    return [Phase(name="short", steps=6, mask_rate=0.3, lr=LearningRate(warmup_steps=2)),
            Phase(name="long", tokens=4096, max_length=64, batch_size=8,
                  accumulate_grad_batches=2, mask_rate=0.15,
                  lr=LearningRate(shape="sqrt", end=0.0))]


class BatchLog(L.Callback):
    """Append what every training batch was to a JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lr = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this batch steps with

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        real = batch["input_ids"] != 0
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch,
               "shape": list(batch["input_ids"].shape), "ids": batch["sample_id"].tolist(),
               "masked": float((batch["labels"] != IGNORE_INDEX).sum() / real.sum()),
               "lr": self.lr,
               "accumulate": trainer.accumulate_grad_batches, "loss": float(outputs["loss"])}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")


def build(corpus: Path) -> tuple[MaskedLMDataModule, MaskedLM]:
    L.seed_everything(0, verbose=False)
    dm = MaskedLMDataModule(corpus=str(corpus), tokenizer_training=TokenizerTraining(
        vocab_size=600), max_length=32, batch_size=16, seed=3)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64)
    return dm, MaskedLM(encoder, learning_rate=PEAK)


def run(folder: Path, corpus: Path, phases: list[Phase], *callbacks: L.Callback,
        ckpt_path: str | None = None, max_steps: int = -1) -> L.Trainer:
    dm, model = build(corpus)
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=folder, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=folder / "checkpoints",
                                                   save_last=True),
                                   Preemption(), Phases(phases), *callbacks])
    trainer.fit(model, datamodule=dm, ckpt_path=resolve_resume_path(ckpt_path, trainer))
    return trainer


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory) -> tuple[list[dict], L.Trainer]:
    folder = tmp_path_factory.mktemp("phased")
    trainer = run(folder, small_corpus, two_phases(), BatchLog(folder / "log.jsonl"))
    return rows(folder / "log.jsonl"), trainer


def test_each_phase_trains_with_its_own_settings(reference):
    log, trainer = reference
    assert trainer.global_step == 10 and trainer.current_epoch == 2  # 6 + 4 steps, 2 epochs
    short, long = [r for r in log if r["epoch"] == 0], [r for r in log if r["epoch"] == 1]
    assert len(short) == 6 and len(long) == 8  # 4 steps x 2 accumulated batches
    assert all(r["shape"][0] == 16 and r["shape"][1] <= 32 and r["accumulate"] == 1
               for r in short)
    assert all(r["shape"][0] == 8 and r["accumulate"] == 2 for r in long)
    assert max(r["shape"][1] for r in long) == 64
    assert 0.24 < sum(r["masked"] for r in short) / 6 < 0.36
    assert 0.11 < sum(r["masked"] for r in long) / 8 < 0.19
    ids = [i for r in short for i in r["ids"]]
    assert len(ids) == len(set(ids))  # one pass: no sample twice


def test_the_learning_rate_follows_the_phases_segments(reference):
    log, _ = reference
    rates = [r["lr"] / PEAK for r in log]  # the rate each batch trained with
    assert rates[:6] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    decay = [1 - math.sqrt(t / 4) for t in range(4)]
    assert rates[6::2] == pytest.approx(decay) and rates[7::2] == pytest.approx(decay)


def test_the_optimiser_state_carries_over_between_phases(reference):
    _, trainer = reference
    state = trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {10}  # moments kept across the boundary


@pytest.mark.parametrize("stop", [4, 6, 8])  # inside phase 1, at the boundary, inside phase 2
def test_resume_inside_a_phase_or_at_its_boundary_is_exact(small_corpus, tmp_path, reference,
                                                           stop):
    expected, _ = reference
    log = tmp_path / "log.jsonl"
    with pytest.raises(SIGTERMException):
        run(tmp_path, small_corpus, two_phases(), BatchLog(log), SignalAt(stop))
    run(tmp_path, small_corpus, two_phases(), BatchLog(log), ckpt_path="last")
    got = rows(log)
    assert [r["ids"] for r in got] == [r["ids"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bitwise on CPU
    assert [r["lr"] for r in got] == [r["lr"] for r in expected]


def test_resuming_with_other_phases_is_one_line(small_corpus, tmp_path):
    with pytest.raises(SIGTERMException):
        run(tmp_path, small_corpus, two_phases(), SignalAt(3))
    changed = two_phases()
    changed[0].steps = 7
    with pytest.raises(PhaseError, match=r"of \[6, 4\] steps, this run plans \[7, 4\]"):
        run(tmp_path, small_corpus, changed, ckpt_path="last")


def test_token_lengths_follow_the_global_batch(small_corpus):
    dm, _ = build(small_corpus)
    phases = [Phase(tokens=10_000), Phase(tokens=10_000, max_length=64, batch_size=4)]
    one, two = plan(phases, dm, accumulate=2, processes=1), plan(phases, dm, 2, processes=4)
    assert [p.steps for p in one] == [math.ceil(10_000 / (16 * 2 * 32)),
                                      math.ceil(10_000 / (4 * 2 * 64))]
    assert [p.steps for p in two] == [math.ceil(10_000 / (16 * 2 * 4 * 32)),
                                      math.ceil(10_000 / (4 * 2 * 4 * 64))]
    assert two[1].global_batch == 32 and two[1].data.samples == two[1].steps * 2 * 4
    assert one[1].start == one[0].steps  # phase 2 starts where phase 1 ends


def test_phase_schedule_shapes():
    phases = [Phase(steps=10, lr=LearningRate(warmup_tokens=2 * 64)),
              Phase(steps=10), Phase(steps=10, lr=LearningRate(shape="linear", end=0.1)),
              Phase(steps=10, lr=LearningRate(shape="cosine", start=0.5, end=0.0))]

    class Data:  # the data module's settings plan() reads
        max_length, packing, batch_size, mixture_alpha, sources = 32, None, 2, 1.0, [None]
        masking = type("M", (), {"rate": 0.15})()

    scale = PhaseSchedule(phases, plan(phases, Data(), 1, 1))  # 64 tokens per step
    assert [scale(s) for s in (0, 1, 2, 9, 10, 19)] == pytest.approx([0.5, 1, 1, 1, 1, 1])
    assert scale(20) == pytest.approx(1.0) and scale(25) == pytest.approx(1 - 0.9 * 0.5)
    assert scale(30) == pytest.approx(0.5) and scale(35) == pytest.approx(0.25)
    assert scale(100) == pytest.approx(0.0)


def test_mixture_temperature_changes_between_phases(tmp_path):
    from fillmask.data.embedded import python_docs_documents

    docs = python_docs_documents()
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("\n\n".join(d.text for d in docs[:80]), encoding="utf-8")
    small.write_text("\n\n".join(d.text for d in docs[80:90]), encoding="utf-8")
    dm = MaskedLMDataModule(mixture=[CorpusSource(str(big), name="big"),
                                     CorpusSource(str(small), name="small")],
                            tokenizer_training=TokenizerTraining(vocab_size=600), max_length=32,
                            batch_size=8, mixture_alpha=1.0)
    phases = plan([Phase(steps=20, corpora=["big"]), Phase(steps=20),
                   Phase(steps=20, corpora=["big", "small"], mixture_alpha=0.1)], dm, 1, 1)
    dm.set_phases([p.data for p in phases])
    first = dm.phase_samples(phases[0].data)[1][0]  # samples of the big corpus

    def small_share(index: int) -> float:
        ids = [i for _, i in dm._phase_loader(index).sampler]
        return sum(i % len(dm.phase_samples(phases[0].data)[0]) >= first for i in ids) / len(ids)

    assert small_share(0) == 0.0  # the small corpus joins in phase 2
    assert small_share(2) > small_share(1) + 0.1  # alpha 0.1 up-samples it


def test_bad_phases_are_one_line(small_corpus, tmp_path):
    cases = [([Phase()], "give its length as tokens, steps or share"),
             ([Phase(steps=2, tokens=10.0)], "exactly one"),
             ([Phase(steps=2, max_length=128)], r"max_length=128 exceeds .*max_positions=64"),
             ([Phase(steps=2, encoder={"rope_theta": 1.0})],
              r"BertEncoder cannot change rope_theta.*may change: none"),
             ([Phase(steps=2, mask_rate=0.0)], r"mask_rate=0.0 must be in \(0, 1\]"),
             ([Phase(steps=2, mixture_weights=[1.0, 2.0])], "2 values for 1 corpora"),
             ([Phase(steps=2, corpora=["wiki"])], r"corpora \['wiki'\] are not members")]
    for phases, message in cases:
        with pytest.raises(PhaseError, match=message):
            run(tmp_path, small_corpus, phases)
    shares = [([Phase(share=0.5)], -1, r"share=0.5 is a share of trainer.max_steps, which is "
                                       "not set"),
              ([Phase(share=1.5)], 10, r"share=1.5 of trainer.max_steps=10 must be in \(0, 1\]"),
              ([Phase(share=0.01)], 10, "at least one step"),
              ([Phase(steps=2)], 5, "trainer.max_steps=5 disagrees with the phases, which add "
                                    "up to 2 steps"),
              ([Phase(share=0.5)], 10, "trainer.max_steps=10 disagrees .* 5 steps")]
    for phases, max_steps, message in shares:
        with pytest.raises(PhaseError, match=message):
            run(tmp_path, small_corpus, phases, max_steps=max_steps)
    assert not (tmp_path / "checkpoints").exists()  # refused before step 0


def test_shares_split_the_trainers_max_steps(small_corpus, tmp_path):
    dm, _ = build(small_corpus)
    wsd = [Phase(share=0.75), Phase(share=0.25, lr=LearningRate(shape="linear"))]
    assert [p.steps for p in plan(wsd, dm, 1, 1, max_steps=4000)] == [3000, 1000]
    assert [p.steps for p in plan(wsd, dm, 1, 1, max_steps=13)] == [10, 3]
    thirds = [Phase(share=1 / 3)] * 3
    assert [p.steps for p in plan(thirds, dm, 1, 1, max_steps=10)] == [3, 4, 3]
    mixed = [Phase(steps=4), Phase(share=0.5)]
    assert [p.steps for p in plan(mixed, dm, 1, 1, max_steps=8)] == [4, 4]
    trainer = run(tmp_path, small_corpus, wsd, max_steps=8)
    assert trainer.global_step == 8 and trainer.current_epoch == 2  # 6 + 2 steps, 2 epochs


def ramped() -> list[Phase]:
    return [Phase(name="ramp", tokens=16 * 32 * 24, accumulate_grad_batches=3,
                  batch_ramp=BatchRamp(tokens=16 * 32 * 6, start=1),
                  lr=LearningRate(warmup_tokens=16 * 32 * 6))]


def test_a_batch_ramp_grows_accumulation_and_continues_the_phases_passes(small_corpus,
                                                                          tmp_path):
    log = tmp_path / "log.jsonl"
    trainer = run(tmp_path, small_corpus, ramped(), BatchLog(log))
    parts = next(c for c in trainer.callbacks if isinstance(c, Phases)).planned
    # 3,072 ramp tokens in two parts (accumulation 1, then 2, rounded up to whole steps), the
    # rest at 3
    assert [(p.accumulate, p.steps) for p in parts] == [(1, 3), (2, 2), (3, 6)]
    assert [p.global_batch for p in parts] == [16, 32, 48]
    got = rows(log)
    assert [r["accumulate"] for r in got] == [1] * 3 + [2] * 4 + [3] * 18
    ids = [i for r in got for i in r["ids"]]
    assert len(ids) == len(set(ids))  # the parts continue one pass: no sample twice
    # warm-up in tokens: 3,072 tokens = steps of 512, 512, 512 then 1,024, 1,024...
    steps = [r for r in got if r["accumulate"] == 1] + [got[3], got[5], got[7]]
    assert [r["lr"] / PEAK for r in steps] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 5 / 6, 1, 1])


def test_a_bad_batch_ramp_is_one_line(small_corpus):
    dm, _ = build(small_corpus)
    with pytest.raises(PhaseError, match=r"batch_ramp.start=2 must be .* below .*=2"):
        plan([Phase(steps=10, accumulate_grad_batches=2, batch_ramp=BatchRamp(1e3, 2))], dm,
             1, 1)
    with pytest.raises(PhaseError, match=r"batch_ramp.tokens=1e\+09 must be .* below"):
        plan([Phase(steps=10, accumulate_grad_batches=2, batch_ramp=BatchRamp(1e9))], dm, 1, 1)


def test_resume_inside_a_ramp_part_is_exact(small_corpus, tmp_path):
    run(tmp_path / "a", small_corpus, ramped(), BatchLog(tmp_path / "a.jsonl"))
    log = tmp_path / "b.jsonl"
    with pytest.raises(SIGTERMException):
        run(tmp_path / "b", small_corpus, ramped(), BatchLog(log), SignalAt(4))  # in part 2
    run(tmp_path / "b", small_corpus, ramped(), BatchLog(log), ckpt_path="last")
    assert rows(log) == rows(tmp_path / "a.jsonl")


def test_phase_sampler_gives_every_process_its_share_of_each_pass():
    def keys(samples: int, rank: int, skip: int = 0) -> list[tuple[int, int]]:
        source = EpochSampler(10, seed=1, shuffle=True)
        return list(PhaseSampler(source, samples, phase=2, span=10, skip=skip, num_replicas=2,
                                 rank=rank))

    both = keys(12, 0) + keys(12, 1)  # 24 positions: two passes of 10, 4 of a third
    assert {phase for phase, _ in both} == {2} and len(keys(12, 0)) == 12
    passes = [sorted(i % 10 for _, i in both if i // 10 == turn) for turn in range(3)]
    assert passes[0] == passes[1] == list(range(10)) and len(set(passes[2])) == 4
    split = keys(5, 0) + keys(7, 0, skip=10) + keys(5, 1) + keys(7, 1, skip=10)
    assert sorted(split) == sorted(both)  # parts of a phase continue its passes


def test_a_data_module_that_cannot_train_in_phases_is_one_line():
    from types import SimpleNamespace

    trainer = SimpleNamespace(datamodule=SimpleNamespace())
    with pytest.raises(PhaseError, match="need a data module that trains in phases"):
        Phases([Phase(steps=1)]).setup(trainer, None, "fit")


def test_two_processes_share_each_phase_without_overlap(tmp_path):
    from test_distributed import fit as fit_command
    from test_distributed import rank_rows, write_config

    config = write_config(tmp_path, steps=7, checkpoint_every=1000)  # the phases add up to 7
    text = config.read_text().replace("  callbacks:\n", """  callbacks:
    - class_path: fillmask.phases.Phases
      init_args:
        phases:
          - {steps: 3, mask_rate: 0.3}
          - {steps: 4, batch_size: 2, accumulate_grad_batches: 2, mask_rate: 0.15}
""", 1)
    config.write_text(text)
    fit_command(config)
    ranks = [rank_rows(tmp_path, rank) for rank in (0, 1)]
    for rank in ranks:
        assert [r["epoch"] for r in rank] == [0] * 3 + [1] * 8  # 3 steps, then 4 x 2 batches
        assert [len(r["ids"]) for r in rank] == [4] * 3 + [2] * 8
    for phase in (0, 1):
        ids = [{i for r in rank if r["epoch"] == phase for i in r["ids"]} for rank in ranks]
        assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1])


def test_each_part_logs_its_phase_and_global_batch(small_corpus, tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    dm, model = build(small_corpus)
    trainer = L.Trainer(max_steps=-1, logger=CSVLogger(tmp_path, name="csv", version=""),
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                        log_every_n_steps=1, callbacks=[Phases(ramped() + two_phases()[1:])])
    trainer.fit(model, datamodule=dm)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = [r for r in csv.DictReader(file) if r.get("train/global_batch_size")]
    assert [(float(r["train/phase"]), float(r["train/global_batch_size"])) for r in rows] == \
        [(1, 16), (1, 32), (1, 48), (2, 16)]  # the ramp's three parts, then phase 2 (8 x 2)
