"""The MaskedLM objective: sparse decoding, schedules, vocabulary checks, learning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from fillmask.architectures.bert import BertEncoder
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerTraining
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.mlm import MaskedLM, warmup_then_decay


def tiny_model(vocab_size: int = 128, **kwargs) -> MaskedLM:
    torch.manual_seed(0)
    encoder = BertEncoder.preset("tiny", vocab_size=vocab_size, max_positions=64, dropout=0.0,
                                 attention_dropout=0.0)
    return MaskedLM(encoder, **kwargs)


def test_sparse_head_equals_dense_decoding():
    model = tiny_model()
    ids = torch.randint(5, 128, (4, 16))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, ::5] = ids[:, ::5]
    loss, _ = model({"input_ids": ids, "labels": labels})
    dense_logits = model.head(model.encoder(ids))  # (B, T, V)
    dense = F.cross_entropy(dense_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, dense)
    loss.backward()
    sparse_grad = model.encoder.token_embedding().weight.grad.clone()
    model.zero_grad()
    dense.backward()
    torch.testing.assert_close(sparse_grad, model.encoder.token_embedding().weight.grad)


def test_nothing_masked_gives_zero_loss_with_gradients():
    model = tiny_model()
    ids = torch.randint(5, 128, (2, 8))
    loss, _ = model({"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)})
    assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_then_decay(schedule):
    scale = warmup_then_decay(10, 110, schedule, 0.1)
    assert scale(0) == pytest.approx(0.1) and scale(9) == pytest.approx(1.0)
    assert scale(10) == pytest.approx(1.0)
    end = 1.0 if schedule == "constant" else 0.1
    assert scale(110) == pytest.approx(end)
    assert scale(200) == pytest.approx(end)


def test_decoupled_weight_decay_is_independent_of_the_learning_rate():
    encoder = BertEncoder.preset("tiny", vocab_size=128)
    plain = MaskedLM(encoder, learning_rate=5e-4, weight_decay=0.01)
    assert plain._parameter_groups()[0]["weight_decay"] == 0.01
    for rate in (5e-4, 1e-3):  # AdamW removes rate x decay per step: always 1e-5 here
        model = MaskedLM(BertEncoder.preset("tiny", vocab_size=128), learning_rate=rate,
                         weight_decay=1e-5, decoupled_weight_decay=True)
        decay, no_decay = model._parameter_groups()
        assert decay["weight_decay"] * rate == pytest.approx(1e-5)
        assert no_decay["weight_decay"] == 0.0


def test_warmup_stable_decay_holds_the_peak_then_decays_by_one_minus_sqrt():
    scale = warmup_then_decay(10, 110, "wsd", 0.0, decay_fraction=0.2)  # decay from step 88
    assert [scale(s) for s in (9, 10, 50, 88)] == pytest.approx([1.0] * 4)
    assert scale(88 + 11) == pytest.approx(1 - (11 / 22) ** 0.5)
    assert scale(110) == pytest.approx(0.0) and scale(98) > scale(99) > scale(100)
    with pytest.raises(ValueError, match="decay_fraction=0"):
        warmup_then_decay(10, 110, "wsd", 0.0, decay_fraction=0.0)


def test_vocabulary_larger_than_model_fails_before_training(small_corpus, tmp_path):
    dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer_training=TokenizerTraining(
        vocab_size=600), max_length=32, batch_size=8)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"has only 128 rows; set the encoder's vocab_size"):
        trainer.fit(tiny_model(vocab_size=128), datamodule=dm)


def test_tiny_model_learns_on_small_corpus(small_corpus, tmp_path):
    dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer_training=TokenizerTraining(
        vocab_size=600), max_length=32, batch_size=16)
    model = tiny_model(vocab_size=dm.vocab_size, learning_rate=3e-3, warmup_steps=10)
    trainer = L.Trainer(max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=4, val_check_interval=60,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer.callbacks.append(Record())
    trainer.fit(model, datamodule=dm)
    start = sum(losses[:10]) / 10
    assert sum(losses[-10:]) / 10 < start - 0.5
    assert trainer.callback_metrics["val/loss"] < start - 0.5  # held-out loss falls too
    tester = L.Trainer(logger=False, enable_progress_bar=False, limit_test_batches=4,
                       default_root_dir=tmp_path)
    results = tester.test(model, datamodule=dm, verbose=False)[0]
    assert set(results) == {"test/loss", "test/perplexity", "test/accuracy"}
    assert results["test/perplexity"] == pytest.approx(math.exp(results["test/loss"]), rel=1e-4)


def test_untied_decoder_has_its_own_weight_and_gets_gradients():
    model = tiny_model(tie_embeddings=False)
    assert model.head.decoder_weight is not model.encoder.token_embedding().weight
    ids = torch.randint(5, 128, (2, 16))
    labels = torch.where(torch.rand(2, 16) < 0.5, ids, torch.full_like(ids, IGNORE_INDEX))
    model({"input_ids": ids, "labels": labels})[0].backward()
    assert model.head.decoder.grad is not None and model.head.decoder.grad.abs().sum() > 0
    names = [n for n, _ in model.named_parameters()]
    assert "head.decoder" in names and len(names) == len(set(names))


def test_weight_decay_groups_survive_flattened_parameters():
    """Under FSDP parameters are flat shards when the optimiser is built; the groups recorded
    at setup (before wrapping) still decide."""
    from fillmask.objectives.base import decay_flags

    model = MaskedLM(BertEncoder.preset("tiny", vocab_size=128))
    expected = [len(g["params"]) for g in model._parameter_groups()]
    model._decays = decay_flags(model)  # what setup() records before the strategy wraps
    with torch.no_grad():
        for module in model.modules():  # flatten every parameter, as FSDP's shards are
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(param.reshape(-1)))
    assert [len(g["params"]) for g in model._parameter_groups()] == expected
