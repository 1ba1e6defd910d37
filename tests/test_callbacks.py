"""Callbacks: throughput and utilisation logging, the end-of-fit summary."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.callbacks import FitSummary, Throughput, measure_matmul_peak
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerTraining
from fillmask.objectives.mlm import MaskedLM


def test_bert_flops_per_token_counts_weights_and_attention():
    encoder = BertEncoder.preset("tiny", vocab_size=100, max_positions=64)
    C, F, L_ = 32, 64, 2
    per_layer = 3 * C * C + C * C + 2 * C * F  # qkv, out, ffn up and down
    assert encoder.flops_per_token(16) == pytest.approx(6 * L_ * per_layer + 12 * L_ * 16 * C)


def test_matmul_peak_is_positive():
    assert measure_matmul_peak(torch.device("cpu"), torch.float32, size=128, repeats=2) > 0


def test_throughput_and_summary_are_logged(small_corpus, tmp_path, caplog):
    dm = MaskedLMDataModule(corpus=str(small_corpus), max_length=32, batch_size=8,
                            tokenizer_training=TokenizerTraining(vocab_size=600))
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    seen: list[dict[str, float]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(max_steps=6, log_every_n_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=2, val_check_interval=6,
                        num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[Throughput(), FitSummary(), Record()])
    with caplog.at_level("INFO"):
        trainer.fit(MaskedLM(encoder), datamodule=dm)
    last = seen[-1]
    assert last["throughput/tokens_per_sec"] > 0
    tokens = last["throughput/tokens_per_sec"]
    assert last["throughput/real_tokens_per_sec"] == pytest.approx(tokens)  # packed: no padding
    assert 0 < last["throughput/utilisation"] < 1.5
    assert "fit done: 6 steps" in caplog.text and "validation: accuracy" in caplog.text


def test_every_pretraining_run_monitors_throughput(tmp_path):
    from fillmask.fit import monitor_throughput

    trainer = L.Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    monitor_throughput(trainer)
    monitor_throughput(trainer)  # a run whose config names one keeps only that one
    assert sum(isinstance(cb, Throughput) for cb in trainer.callbacks) == 1


def test_progress_bar_reads_metrics_on_logging_steps_only(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import RichProgressBar

    from fillmask.callbacks import ProgressBar

    reads: list[int] = []
    read = RichProgressBar.get_metrics

    def spy(self, trainer, pl_module):
        if trainer.training:
            reads.append(trainer.global_step)
        return read(self, trainer, pl_module)

    monkeypatch.setattr(RichProgressBar, "get_metrics", spy)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (9, 4, 16), generator=generator)
    batches = [{"input_ids": row, "labels": row} for row in ids]
    shown = {}
    for bar in (RichProgressBar(), ProgressBar()):
        reads.clear()
        model = MaskedLM(BertEncoder.preset("tiny", vocab_size=64, max_positions=32))
        trainer = L.Trainer(max_steps=9, log_every_n_steps=3, logger=False,
                            enable_checkpointing=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path, callbacks=[bar])
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches,
                                                                            batch_size=None))
        shown[type(bar).__name__] = (list(reads), bar.get_metrics(trainer, model))
    assert sorted(set(shown["RichProgressBar"][0])) == list(range(1, 10))  # Lightning: every step
    assert shown["ProgressBar"][0] == [1, 3, 6, 9]  # fillmask's: on logging steps
    assert "train/loss" in shown["ProgressBar"][1]
