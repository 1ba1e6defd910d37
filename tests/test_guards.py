"""NonFiniteGuard: stop with a checkpoint and a precise message, or skip bad steps bitwise."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from fillmask import cli, fit
from fillmask.architectures.bert import BertEncoder
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerTraining
from fillmask.errors import FillmaskError
from fillmask.guards import NonFiniteError, NonFiniteGuard
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import read_checkpoint
from fillmask.objectives.mlm import MaskedLM

LAYER = "encoder.blocks.1.ffn"


class Snapshots(L.Callback):
    """The weights and sample ids at the start of every training batch (before its step)."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}  # global step -> state dict
        self.ids: dict[int, list[int]] = {}  # batch index -> sample ids
        self.losses: dict[int, float] = {}  # batch index -> training loss

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.setdefault(trainer.global_step, {
            k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        self.ids[batch_idx] = batch["sample_id"].tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[batch_idx] = outputs["loss"].item()


class Poison(L.Callback):
    """Make ``LAYER``'s forward output infinite for the training batches ``batch_indices``.

    The batch is recognised by its input ids, so the guard's replay of it is poisoned too.
    """

    def __init__(self, *batch_indices: int) -> None:
        self.batch_indices = batch_indices
        self.targets: list[torch.Tensor] = []
        self.armed = False

    def on_fit_start(self, trainer, pl_module):
        pl_module.encoder.register_forward_pre_hook(self._arm)
        pl_module.get_submodule(LAYER).register_forward_hook(self._poison)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.batch_indices:
            self.targets.append(batch["input_ids"].clone())

    def _arm(self, module, args):
        self.armed = module.training and any(torch.equal(args[0], t) for t in self.targets)

    def _poison(self, module, args, output):
        return output * float("inf") if self.armed else None


def fit_setup(corpus: Path, root: Path, *callbacks: L.Callback, max_steps: int = 5,
              accumulate: int = 1, logger: CSVLogger | bool = False
              ) -> tuple[L.Trainer, MaskedLM, MaskedLMDataModule]:
    dm = MaskedLMDataModule(corpus=str(corpus), tokenizer_training=TokenizerTraining(
        vocab_size=600), max_length=32, batch_size=8)
    torch.manual_seed(0)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    model = MaskedLM(encoder, learning_rate=1e-3, warmup_steps=0, schedule="constant")
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=1,
                        default_root_dir=root, callbacks=list(callbacks))
    return trainer, model, dm


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_stop_checkpoints_the_weights_before_the_bad_step_and_names_the_layer(
        small_corpus, tmp_path, accumulate):
    bad_batch = 3  # with accumulate 2: the second micro-batch of step 1
    step = bad_batch // accumulate
    snapshots = Snapshots()
    trainer, model, dm = fit_setup(small_corpus, tmp_path, snapshots, Poison(bad_batch),
                                   NonFiniteGuard(), accumulate=accumulate)
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit(model, datamodule=dm)
    error, message = caught.value, str(caught.value)
    path = tmp_path / "checkpoints" / f"nonfinite-step{step}.ckpt"
    assert "\n" not in message and message.startswith(f"step {step}: non-finite loss and grad")
    assert f"sample ids {snapshots.ids[bad_batch]};" in message  # that micro-batch only
    assert f"first non-finite module output: {LAYER} (FeedForward)" in message
    assert "first non-finite gradient: " in message and str(path) in message
    assert "--ckpt_path" in message and "learning rate" in message and "clipping" in message
    assert (error.step, error.sample_ids, error.checkpoint) == (step, snapshots.ids[bad_batch],
                                                                str(path))
    assert trainer.global_step == step
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step
    assert same(ckpt["state_dict"], snapshots.weights[step])
    assert not same(snapshots.weights[step], snapshots.weights[0])  # earlier steps trained
    assert all(torch.isfinite(w).all() for w in ckpt["state_dict"].values())
    assert same(model.state_dict(), snapshots.weights[step])  # the bad step was not applied
    assert read_checkpoint(path)["fillmask"]["encoder"]  # a checkpoint fillmask can load


def test_non_finite_gradient_with_finite_loss_under_accumulation(small_corpus, tmp_path):
    snapshots = Snapshots()
    trainer, model, dm = fit_setup(small_corpus, tmp_path / "run", snapshots,
                                   NonFiniteGuard(dirpath=str(tmp_path / "guard")), accumulate=2)
    weight = model.encoder.blocks[0].attention.qkv.weight

    class PoisonGradient(L.Callback):  # the first micro-batch of step 1 (batch 2)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.armed = batch_idx == 2

        def on_fit_start(self, trainer, pl_module):
            weight.register_hook(lambda g: g * float("nan") if self.armed else None)

    trainer.callbacks.insert(0, PoisonGradient())
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit(model, datamodule=dm)
    message = str(caught.value)
    assert message.startswith("step 1: non-finite gradients (the loss was finite)")
    assert "first non-finite gradient: encoder.blocks.0.attention.qkv.weight;" in message
    assert "no module output was non-finite" in message
    both = snapshots.ids[2] + snapshots.ids[3]  # the whole accumulated step
    assert f"sample ids {both};" in message
    assert (tmp_path / "guard" / "nonfinite-step1.ckpt").is_file()
    # Batch 2 (the poisoned micro-batch) ended normally: the check came at batch 3's optimizer step.
    assert sorted(snapshots.ids) == [0, 1, 2, 3] and sorted(snapshots.losses) == [0, 1, 2]


def test_skip_leaves_the_weights_bitwise_unchanged_and_counts(small_corpus, tmp_path):
    snapshots, guard = Snapshots(), NonFiniteGuard(policy="skip")
    logger = CSVLogger(tmp_path, name="csv")
    trainer, model, dm = fit_setup(small_corpus, tmp_path, snapshots, Poison(2), guard,
                                   logger=logger)
    with pytest.warns(UserWarning) as records:
        trainer.fit(model, datamodule=dm)
    warned = [str(r.message) for r in records if "non-finite" in str(r.message)]
    assert warned == [f"step 2: non-finite loss and gradients; the step was skipped, no weight "
                      f"changed (sample ids {snapshots.ids[2]}; 1 skipped so far)"]
    assert trainer.global_step == 5 and guard.skipped_steps == 1
    weights = snapshots.weights
    assert same(weights[2], weights[3])  # AdamW skipped every parameter, weight decay included
    assert not same(weights[1], weights[2]) and not same(weights[3], weights[4])
    assert all(torch.isfinite(w).all() for w in model.state_dict().values())
    optimizer = trainer.optimizers[0]
    assert all(int(optimizer.state[p]["step"]) == 4 for p in model.parameters())
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("train/skipped_steps")]
    assert [(int(r["step"]), float(r["train/skipped_steps"])) for r in rows] == [
        (2, 1.0), (3, 1.0), (4, 1.0)]
    assert trainer.callback_metrics["train/skipped_steps"] == 1


def test_skip_stops_after_max_skips_in_a_row(small_corpus, tmp_path):
    guard = NonFiniteGuard(policy="skip", max_skips=1)
    trainer, model, dm = fit_setup(small_corpus, tmp_path, Poison(1, 2), guard)
    with pytest.warns(UserWarning, match="step 1: non-finite"), \
            pytest.raises(NonFiniteError, match=r"^step 2: .*after 1 skipped step\(s\) in a row"):
        trainer.fit(model, datamodule=dm)
    assert guard.skipped_steps == 1
    assert (tmp_path / "checkpoints" / "nonfinite-step2.ckpt").is_file()


def test_a_batch_with_nothing_masked_gives_a_zero_finite_loss(small_corpus, tmp_path):
    torch.manual_seed(0)
    model = MaskedLM(BertEncoder.preset("tiny", vocab_size=128, max_positions=32))
    ids = torch.randint(5, 128, (4, 16))
    loss, logits = model({"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)})
    assert loss.item() == 0.0 and torch.isfinite(loss) and logits.shape == (0, 128)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)

    class Unmask(L.Callback):  # batch 1 reaches training_step with nothing masked
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                batch["labels"].fill_(IGNORE_INDEX)

    snapshots = Snapshots()
    trainer, model, dm = fit_setup(small_corpus, tmp_path, Unmask(), snapshots, NonFiniteGuard(),
                                   max_steps=3)
    trainer.fit(model, datamodule=dm)  # the guard does not fire
    assert snapshots.losses[1] == 0.0 and snapshots.losses[0] > 0 and trainer.global_step == 3


def test_fp16_loss_scaling_turns_the_guard_off():
    guard = NonFiniteGuard()
    scaled = SimpleNamespace(precision="16-mixed", precision_plugin=SimpleNamespace(scaler=1))
    guard.on_fit_start(scaled, None)
    assert not guard.active
    plain = SimpleNamespace(precision="bf16-mixed", precision_plugin=SimpleNamespace())
    guard.on_fit_start(plain, None)
    assert guard.active


def test_bad_options_and_the_cli_prints_one_line(monkeypatch, capsys):
    assert issubclass(NonFiniteError, FillmaskError)
    with pytest.raises(FillmaskError, match="policy 'halt'"):
        NonFiniteGuard(policy="halt")
    with pytest.raises(FillmaskError, match="check_every_n_steps=0"):
        NonFiniteGuard(check_every_n_steps=0)
    error = NonFiniteError("step 3: non-finite loss; sample ids [1, 2]", 3, [1, 2], "x.ckpt", None)

    def fail(args):
        raise error

    monkeypatch.setattr(fit, "run_lightning", fail)
    assert cli.main(["fit", "--config", "x.yaml"]) == 2
    printed = capsys.readouterr().err
    assert printed == "fillmask: error: step 3: non-finite loss; sample ids [1, 2]\n"


def test_huge_finite_gradients_are_not_mistaken_for_non_finite(small_corpus, tmp_path):
    huge = torch.full((64,), 1e20)
    assert torch._foreach_norm([huge])[0].isinf()  # the fast check's 2-norm overflows
    trainer, model, dm = fit_setup(small_corpus, tmp_path, NonFiniteGuard(), max_steps=3)
    model.encoder.blocks[0].ffn.up.weight.register_hook(lambda g: torch.full_like(g, 1e20))
    trainer.fit(model, datamodule=dm)  # no NonFiniteError: the exact check clears the step
    assert trainer.global_step == 3


def test_checking_every_other_step_reports_weights_already_non_finite(small_corpus, tmp_path):
    class PoisonWeight(L.Callback):  # step 1 is not checked: its NaN reaches the weights
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                with torch.no_grad():
                    pl_module.encoder.blocks[1].ffn.down.weight[0, 0] = float("nan")

    trainer, model, dm = fit_setup(small_corpus, tmp_path, PoisonWeight(),
                                   NonFiniteGuard(check_every_n_steps=2))
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit(model, datamodule=dm)
    message = str(caught.value)
    assert message.startswith("step 2: non-finite loss and gradients")
    # Step 1's NaN gradients spread through AdamW to every weight: the first layer fails.
    assert "first non-finite module output: encoder.embeddings.tokens (Embedding)" in message
    assert "resume from an earlier checkpoint with --ckpt_path (the weights are already " \
           "non-finite, first encoder.embeddings.tokens.weight: a bad step was applied" in message
