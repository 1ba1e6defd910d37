"""Objectives at tiny size: SpanBERT's SBO, ELECTRA's RTD (tied and GDES), the sentence-pair
head, ALBERT's options and continued pretraining. Each learns, is wired as published, and
reloads from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.packing import SentencePairs
from fillmask.data.tokenize import TokenizerTraining
from fillmask.masking.base import IGNORE_INDEX
from fillmask.masking.span import SpanMasking
from fillmask.masking.token import TokenMasking
from fillmask.objectives.base import load_objective
from fillmask.objectives.mlm import MaskedLM
from fillmask.objectives.rtd import DeltaEmbedding, ReplacedTokenDetection
from fillmask.objectives.span_boundary import SpanBoundaryLM

TOKENIZER = TokenizerTraining(vocab_size=600)


def data(corpus: Path, **overrides) -> MaskedLMDataModule:
    options = dict(corpus=str(corpus), tokenizer_training=TOKENIZER, max_length=48,
                   batch_size=16, seed=1)
    return MaskedLMDataModule(**{**options, **overrides})


def tiny(dm: MaskedLMDataModule, **overrides) -> BertEncoder:
    return BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64, dropout=0.0,
                              attention_dropout=0.0, norm="pre", embedding_norm=False,
                              **overrides)


class Losses(L.Callback):
    def __init__(self, *names: str) -> None:
        self.names = names
        self.values: dict[str, list[float]] = {n: [] for n in names}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name in self.names:
            self.values[name].append(float(trainer.callback_metrics[name]))


def fit(model, dm, tmp_path: Path, steps: int = 40, *names: str) -> tuple[Losses, L.Trainer]:
    record = Losses("train/loss", *names)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        limit_val_batches=2, val_check_interval=steps, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None,
                        default_root_dir=tmp_path, callbacks=[record],
                        enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    return record, trainer


def falls(values: list[float], by: float) -> bool:
    return sum(values[-8:]) / 8 < sum(values[:8]) / 8 - by


def reloads(trainer: L.Trainer, tmp_path: Path, model) -> None:
    """Save, reload with load_objective: the same weights, and the same loss on a batch."""
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    again, tokenizer = load_objective(path)
    assert type(again) is type(model) and tokenizer is not None
    saved, loaded = model.state_dict(), again.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    batch = next(iter(trainer.datamodule.val_dataloader()))
    model.eval(), again.eval()
    with torch.no_grad():
        if isinstance(model, ReplacedTokenDetection):  # sampling is keyed by the step
            first, second = (m._step(batch)["generator_loss"] for m in (model, again))
        else:
            first, second = model(batch)[0], again(batch)[0]
    torch.testing.assert_close(first, second)


def test_span_boundary_objective_learns_and_reloads(small_corpus, tmp_path):
    dm = data(small_corpus, masking=SpanMasking())
    model = SpanBoundaryLM(tiny(dm), learning_rate=3e-3, warmup_steps=4)
    record, trainer = fit(model, dm, tmp_path, 40, "train/sbo_loss", "train/mlm_loss")
    assert falls(record.values["train/sbo_loss"], 0.5)
    assert falls(record.values["train/mlm_loss"], 0.5)
    assert {"val/sbo_loss", "val/loss", "val/accuracy"} <= set(trainer.callback_metrics)
    reloads(trainer, tmp_path, model)


def test_sbo_reads_boundary_states_not_the_masked_ones(small_corpus):
    dm = data(small_corpus, masking=SpanMasking(rate=0.3))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    model = SpanBoundaryLM(tiny(dm))
    hidden = torch.randn(*batch["input_ids"].shape, 32, requires_grad=True)
    model.sbo_loss(hidden, batch).backward()
    touched = hidden.grad.abs().sum(-1) > 0  # (B, T)
    masked = (batch["labels"] != IGNORE_INDEX) & (batch["span_left"] >= 0)
    boundary = torch.zeros_like(touched)
    rows = torch.nonzero(masked)[:, 0]
    boundary[rows, batch["span_left"][masked]] = True
    boundary[rows, batch["span_right"][masked]] = True
    assert masked.any() and torch.equal(touched, boundary)
    assert not (touched & masked).any()


@pytest.mark.parametrize("sharing", ["tied", "gdes"])
def test_replaced_token_detection_learns_and_reloads(small_corpus, tmp_path, sharing):
    torch.manual_seed(0)  # the weights' initialisation, whatever ran before in this process
    dm = data(small_corpus, masking=TokenMasking(mask_fraction=0.85, random_fraction=0.0))
    encoder = tiny(dm, hidden_size=64, num_heads=2, intermediate_size=128)
    model = ReplacedTokenDetection(encoder, generator_size_divisor=2, learning_rate=3e-3,
                                   warmup_steps=4, embedding_sharing=sharing)
    record, trainer = fit(model, dm, tmp_path, 40, "train/generator_loss",
                          "train/discriminator_loss")
    assert falls(record.values["train/generator_loss"], 0.5)
    # The discriminator first learns how rare replacements are (from ~0.69, chance, to about the
    # entropy of the replaced share); telling which tokens were replaced needs longer runs.
    disc = record.values["train/discriminator_loss"]
    assert sum(disc[-8:]) / 8 < disc[0] - 0.15
    metrics = trainer.callback_metrics
    assert {"val/replaced_precision", "val/replaced_recall", "val/generator_accuracy",
            "val/discriminator_accuracy"} <= set(metrics)
    reloads(trainer, tmp_path, model)


def rtd_batch(dm: MaskedLMDataModule) -> dict[str, torch.Tensor]:
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_gdes_stops_discriminator_gradients_at_the_shared_embedding(small_corpus):
    dm = data(small_corpus)
    model = ReplacedTokenDetection(tiny(dm), generator_size_divisor=1, generator_layers=1,
                                   embedding_sharing="gdes", rtd_weight=10.0)
    assert isinstance(model.encoder.embeddings.tokens, DeltaEmbedding)
    assert model.generator.num_layers == 1 and model.generator.hidden_size == 32
    out = model._step(rtd_batch(dm))
    shared = model.generator.embeddings.tokens.weight
    delta = model.encoder.embeddings.tokens.delta
    grad_disc = torch.autograd.grad(out["discriminator_loss"], [shared, delta],
                                    allow_unused=True)
    assert grad_disc[0] is None or grad_disc[0].abs().sum() == 0
    assert grad_disc[1].abs().sum() > 0
    grad_gen = torch.autograd.grad(out["generator_loss"], shared)[0]
    assert grad_gen.abs().sum() > 0
    merged = model.discriminator()
    torch.testing.assert_close(merged.embeddings.tokens.weight, shared + delta)


def test_generator_overrides_change_the_generator_alone(small_corpus):
    dm = data(small_corpus)
    model = ReplacedTokenDetection(tiny(dm), generator_size_divisor=1, generator_layers=1,
                                   generator_overrides={"activation": "relu"})
    assert model.generator.spec()["init_args"]["activation"] == "relu"
    assert model.encoder.spec()["init_args"]["activation"] == "gelu"
    with pytest.raises(ValueError, match=r"generator_overrides names \['depth'\]"):
        ReplacedTokenDetection(tiny(dm), generator_overrides={"depth": 3})


def test_tied_sharing_trains_one_table_from_both_losses(small_corpus):
    dm = data(small_corpus)
    model = ReplacedTokenDetection(tiny(dm), generator_size_divisor=2)
    assert model.generator.embeddings.tokens is model.encoder.embeddings.tokens
    assert model.generator.hidden_size == 16 and model.generator.embedding_size == 32
    out = model._step(rtd_batch(dm))
    grad = torch.autograd.grad(out["discriminator_loss"],
                               model.encoder.embeddings.tokens.weight)[0]
    assert grad.abs().sum() > 0


def test_a_sample_equal_to_the_original_counts_as_original(small_corpus):
    dm = data(small_corpus, masking=TokenMasking(rate=0.5, mask_fraction=1.0,
                                                 random_fraction=0.0))
    model = ReplacedTokenDetection(tiny(dm), generator_size_divisor=2)
    batch = rtd_batch(dm)
    selected = batch["labels"] != IGNORE_INDEX
    original = batch["labels"][selected]
    model._sample = lambda logits, ids: original.clone()  # a perfect generator
    out = model._step(batch)
    assert not out["replaced"].any()


TOPICS = ["cat", "ship", "bread", "river", "clock", "storm", "garden", "piano", "horse", "lamp",
          "train", "apple", "snow", "book", "door", "bird"]


def stories(path: Path) -> Path:
    """Documents of eight sentences, each document about one topic word."""
    docs = ["\n".join(f"The {TOPICS[d % 16]} was {('old', 'new', 'red', 'big')[i % 4]} and the "
                      f"{TOPICS[d % 16]} stayed {('here', 'there', 'late', 'still')[(i + d) % 4]}."
                      for i in range(8)) for d in range(120)]
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_sentence_pair_head_trains_on_pair_batches(tmp_path, task):
    dm = data(stories(tmp_path / "stories.txt"), packing=SentencePairs(task=task), max_length=40)
    model = MaskedLM(tiny(dm), pair_head=True, learning_rate=3e-3, warmup_steps=4)
    record, trainer = fit(model, dm, tmp_path, 120, "train/pair_loss")
    assert "val/pair_accuracy" in trainer.callback_metrics
    if task == "nsp":  # a random B is about another topic: learnable at this size
        assert falls(record.values["train/pair_loss"], 0.05)
        assert trainer.callback_metrics["val/pair_accuracy"] > 0.65
    reloads(trainer, tmp_path, model)


def test_pair_head_without_pair_batches_is_a_clear_error(small_corpus):
    dm = data(small_corpus)
    model = MaskedLM(tiny(dm), pair_head=True)
    with pytest.raises(ValueError, match="SentencePairs"):
        model(rtd_batch(dm))


def test_albert_factorised_embeddings_and_shared_layers(small_corpus, tmp_path):
    dm = data(small_corpus)
    albert = tiny(dm, hidden_size=64, num_heads=2, intermediate_size=128, num_layers=4,
                  embedding_size=32, share_layers=True)
    plain = tiny(dm, hidden_size=64, num_heads=2, intermediate_size=128, num_layers=4)
    assert len(albert.blocks) == 1 and albert.token_embedding().weight.shape[1] == 32
    assert sum(p.numel() for p in albert.parameters()) < sum(
        p.numel() for p in plain.parameters()) / 3
    assert albert.flops_per_token(48) > 0.9 * plain.flops_per_token(48)  # the compute remains
    model = MaskedLM(albert, learning_rate=5e-3, warmup_steps=4)
    assert model.head.dense.out_features == 32  # hidden 64 -> embedding 32, then tied decoder
    record, trainer = fit(model, dm, tmp_path, 40)
    assert falls(record.values["train/loss"], 0.5)
    reloads(trainer, tmp_path, model)


def test_continued_pretraining_starts_from_a_transformers_folder(small_corpus, tmp_path,
                                                                 hf_bert_folder):
    from fillmask.interop.hf import import_bert

    source, _ = import_bert(hf_bert_folder)
    shape = dict(vocab_size=30522, hidden_size=128, num_layers=2, num_heads=2,
                 intermediate_size=512, max_positions=512)
    dm = data(small_corpus, tokenizer=str(hf_bert_folder), vocab_multiple=1, max_length=32)
    model = MaskedLM(BertEncoder(**shape), init_from=str(hf_bert_folder), learning_rate=1e-4,
                     warmup_steps=2)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        fresh = MaskedLM(BertEncoder(**shape)).eval()(batch)[0]
        pretrained = source.eval()(batch)[0]
    record, trainer = fit(model, dm, tmp_path, 3)
    assert model._initialised
    # Three small steps move the weights only a little from the pretrained ones.
    drift = (model.encoder.blocks[0].ffn.up.weight - source.encoder.blocks[0].ffn.up.weight)
    assert drift.abs().max() < 0.01
    assert pretrained < fresh - 1.5  # the folder's model knows English; a fresh one does not
    assert record.values["train/loss"][0] < fresh - 1.0


def test_continued_pretraining_with_a_domain_tokenizer_maps_rows_by_token(small_corpus,
                                                                          hf_bert_folder):
    from fillmask.interop.hf import import_bert
    from fillmask.objectives.pretrained import transfer_weights

    source, old = import_bert(hf_bert_folder)
    dm = data(small_corpus)  # a domain WordPiece trained on the corpus
    new = dm.tokenizer
    model = MaskedLM(BertEncoder(vocab_size=dm.vocab_size, hidden_size=128, num_layers=2,
                                 num_heads=2, intermediate_size=512))
    counts = transfer_weights(model, source, new, old)
    assert counts["copied"] > 300 and counts["composed"] > 0
    table = model.encoder.token_embedding().weight
    old_table = source.encoder.token_embedding().weight
    for token in ("the", "[MASK]", "function"):
        if token in new.get_vocab():
            torch.testing.assert_close(table[new.token_to_id(token)],
                                       old_table[old.token_to_id(token)])
    torch.testing.assert_close(model.encoder.blocks[1].ffn.down.weight,
                               source.encoder.blocks[1].ffn.down.weight)
