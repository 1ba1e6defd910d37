"""Callbacks that show how a run goes: fill-mask probes, pseudo-perplexity and gradient norm."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from fillmask import callbacks
from fillmask.architectures.bert import BertEncoder
from fillmask.callbacks import FillMaskProbes, GradNorm
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.errors import FillmaskError
from fillmask.masking.token import TokenMasking
from fillmask.objectives.mlm import MaskedLM

ASSETS = Path(__file__).resolve().parent / "assets" / "golden"
CLOZE = ["the [MASK] command creates a distribution.", "a [MASK] of [MASK] files."]
PLAIN = ["the build command creates a distribution.", "install the package."]


pytestmark = pytest.mark.usefixtures("one_thread")


class Losses(L.Callback):
    """Records the training loss of every step."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self.values.append(float(outputs["loss"]))


class Recorder(Logger):
    """A logger that keeps every (step, metrics) it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.records if key in m]


def fit(steps: int, callbacks_: list[L.Callback], logger: Logger | bool = False,
        log_every_n_steps: int = 50, **trainer_options: Any) -> tuple[list[float], L.Trainer]:
    """Train a tiny model (dropout on) on the golden corpus: the loss of every step, the
    trainer."""
    L.seed_everything(0, verbose=False)
    dm = MaskedLMDataModule(corpus=str(ASSETS / "corpus.txt"),
                            tokenizer=str(ASSETS / "tokenizer.json"), max_length=32,
                            batch_size=8, masking=TokenMasking(rate=0.3), seed=0)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    assert encoder.spec()["init_args"]["dropout"] > 0  # probes in train mode would draw masks
    losses = Losses()
    trainer = L.Trainer(max_steps=steps, logger=logger, log_every_n_steps=log_every_n_steps,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, accelerator="cpu",
                        deterministic=True, callbacks=[*callbacks_, losses], **trainer_options)
    trainer.fit(MaskedLM(encoder, learning_rate=2e-3, warmup_steps=2), datamodule=dm)
    return losses.values, trainer


@torch.no_grad()
def pseudo_perplexity_one_by_one(model: MaskedLM, tokenizer: Any, texts: list[str]) -> float:
    """Reference: mask each ordinary token of each text alone, one unpadded forward each."""
    model.eval()
    log_probs = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        for position in range(1, len(ids) - 1):  # CLS ... SEP
            masked = torch.tensor([ids])
            masked[0, position] = tokenizer.token_to_id("[MASK]")
            logits = model.head(model.encoder(masked)[0, position])
            log_probs.append(logits[: tokenizer.get_vocab_size()].log_softmax(-1)[ids[position]])
    return math.exp(-float(torch.stack(log_probs).mean()))


def text_summaries(folder: Path, tag: str) -> dict[int, str]:
    """The text logged under ``tag`` in the TensorBoard events of ``folder``, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()
    return {e.step: make_ndarray(e.tensor_proto).item().decode()
            for e in events.Tensors(f"{tag}/text_summary")}


def test_probes_log_top_k_candidates_and_pseudo_perplexity_to_tensorboard(tmp_path):
    probes = FillMaskProbes(CLOZE, every_n_steps=3, top_k=4, pseudo_perplexity=True,
                            ppl_sentences=PLAIN)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _, trainer = fit(4, [probes], logger=logger)
    logger.experiment.flush()
    texts = text_summaries(tmp_path, "probe/fill_mask")
    assert sorted(texts) == [3, 4]  # every 3 steps, and at the end of fit
    rows = texts[4].splitlines()[2:]
    assert len(rows) == len(CLOZE)
    assert [len(masks) for masks in probes.last_predictions] == [1, 2]
    for row, masks in zip(rows, probes.last_predictions, strict=True):
        assert row.count("[") == len(masks)  # one candidate list per mask: [1] ..., [2] ...
        for candidates in masks:
            assert len(candidates) == 4
            assert all(f"`{token}` {p:.3f}" in row for token, p in candidates)
            assert [p for _, p in candidates] == sorted((p for _, p in candidates), reverse=True)
    assert "**" in rows[0]  # the top-1 candidate, filled in
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("probe/pseudo_perplexity")]
    assert [step for step, _ in logged] == [3, 4]
    assert all(math.isfinite(v) and v > 1 for _, v in logged)
    assert logged[-1][1] == pytest.approx(probes.last_pseudo_perplexity, rel=1e-6)
    reference = pseudo_perplexity_one_by_one(trainer.lightning_module,
                                             trainer.datamodule.tokenizer, PLAIN)
    assert probes.last_pseudo_perplexity == pytest.approx(reference, rel=1e-4)


def test_probes_leave_the_loss_curve_unchanged_and_print_without_tensorboard(caplog):
    class DrawsRandomness(L.Callback):  # control: a callback using the global RNG
        def on_train_batch_end(self, trainer, *args: Any) -> None:
            torch.rand(1)

    plain, _ = fit(10, [])
    probes = FillMaskProbes(CLOZE, every_n_steps=2, top_k=3, pseudo_perplexity=True,
                            ppl_sentences=PLAIN, batch_size=5)
    with caplog.at_level("INFO"):
        probed, _ = fit(10, [probes])
    assert probed == plain
    assert fit(10, [DrawsRandomness()])[0] != plain  # so the comparison can fail
    assert caplog.text.count("probes at step") == 5
    assert "probes at step 10 (pseudo-perplexity" in caplog.text
    assert probes.plain_text() in caplog.text  # each sentence filled in, then its candidates
    assert "files.\n    [1] " in caplog.text and "\n    [2] " in caplog.text


def test_a_sentence_without_a_mask_is_an_error_naming_it():
    probes = FillMaskProbes([CLOZE[0], "no blank here."], every_n_steps=1)
    with pytest.raises(FillmaskError, match=r"'no blank here\.' has no mask token; write \[MASK\]"):
        fit(1, [probes])


def test_probe_options_are_checked():
    with pytest.raises(ValueError, match="needs ppl_sentences"):
        FillMaskProbes(CLOZE, pseudo_perplexity=True)
    with pytest.raises(ValueError, match="every_n_steps=0"):
        FillMaskProbes(CLOZE, every_n_steps=0)


def test_grad_norm_logs_the_norm_before_clipping_on_logging_steps_only(monkeypatch):
    by_hand: dict[int, float] = {}

    class ByHand(L.Callback):  # runs after GradNorm, still before clipping
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            squares = sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters()
                          if p.grad is not None)
            by_hand[trainer.global_step] = math.sqrt(squares)

    calls = []
    norm = callbacks.total_grad_norm
    monkeypatch.setattr(callbacks, "total_grad_norm", lambda g: calls.append(1) or norm(g))
    logger = Recorder()
    fit(6, [GradNorm(), ByHand()], logger=logger, log_every_n_steps=3, gradient_clip_val=1e-3)
    logged = logger.values("train/grad_norm")
    assert [step for step, _ in logged] == [2, 5] and len(calls) == 2
    for step, value in logged:
        assert value == pytest.approx(by_hand[step], rel=1e-5)
        assert value > 1e-2  # the clipped norm would be 1e-3
