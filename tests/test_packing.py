"""Packing modes (chunk, line, document-aware, sentence pairs), static vs dynamic masking,
corpus mixtures, and masks that survive a mid-epoch resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fillmask.architectures import bert
from fillmask.architectures.bert import BertEncoder
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.mixture import CorpusSource, MixtureSampler, mixture_probabilities
from fillmask.data.packing import DocumentPacking, LinePacking, SentencePairs, best_fit
from fillmask.data.tokenize import TokenizerTraining
from fillmask.masking.span import SpanMasking
from fillmask.masking.token import TokenMasking
from fillmask.masking.whole_word import WholeWordMasking

SMALL_TOKENIZER = TokenizerTraining(vocab_size=600)


def datamodule(corpus: Path | str, **overrides) -> MaskedLMDataModule:
    options = dict(corpus=str(corpus), tokenizer_training=SMALL_TOKENIZER, max_length=64,
                   batch_size=8, seed=3)
    dm = MaskedLMDataModule(**{**options, **overrides})
    dm.setup("fit")
    return dm


def ordinary_tokens(dm: MaskedLMDataModule, split: str = "train") -> int:
    """Tokens of the split's documents, special tokens excluded, as the tokenizer gives them."""
    texts = dm._load_text()[0][split]["text"]
    return sum(len(e.ids) for e in dm.tokenizer.encode_batch(texts, add_special_tokens=False))


def packed_ordinary(dm: MaskedLMDataModule, split: str = "train") -> int:
    rows = dm.samples[split].with_format("numpy")[:]["input_ids"]
    special = dm.vocab_info.is_special
    return int(sum((~special[np.asarray(r)]).sum() for r in rows))


@pytest.mark.parametrize("packing", [LinePacking(), DocumentPacking()])
def test_no_token_is_lost_or_duplicated(small_corpus, packing):
    dm = datamodule(small_corpus, packing=packing)
    assert packed_ordinary(dm) == ordinary_tokens(dm)
    lengths = [len(r) for r in dm.samples["train"].with_format("numpy")[:]["input_ids"]]
    assert max(lengths) <= 64


def test_document_packing_is_efficient_and_records_boundaries(small_corpus):
    docs = datamodule(small_corpus, packing=DocumentPacking())
    lines = datamodule(small_corpus, packing=LinePacking())
    assert docs.packing_efficiency() > 0.9 > lines.packing_efficiency()
    row = docs.samples["train"].with_format("numpy")[0]
    assert row["doc_lengths"].sum() == len(row["input_ids"])
    starts = np.cumsum(row["doc_lengths"]) - row["doc_lengths"]
    assert (row["input_ids"][starts] == docs.special_tokens.cls_id).all()


def test_best_fit_fills_tightly_and_keeps_every_item():
    lengths = list(np.random.default_rng(0).integers(3, 60, 400))
    bins = best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(400))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert sum(lengths) / (64 * len(bins)) > 0.95


def test_no_token_attends_across_documents(small_corpus, monkeypatch):
    dm = datamodule(small_corpus, packing=DocumentPacking())
    batch = next(iter(dm.train_dataloader()))
    assert batch["cu_seqlens"][-1] == (batch["document_ids"] >= 0).sum()
    seen = []
    attention = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return attention(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(bert.F, "scaled_dot_product_attention", spy)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, dropout=0.0,
                                 attention_dropout=0.0).eval()
    from fillmask.architectures.base import encoder_inputs

    hidden = encoder(batch["input_ids"], **encoder_inputs(batch))
    docs = batch["document_ids"]
    mask = seen[0][:, 0]  # (B, T, T)
    real = docs >= 0
    pairs = real[:, :, None] & real[:, None, :]
    assert torch.equal(mask[pairs], (docs[:, :, None] == docs[:, None, :])[pairs])
    assert (batch["position_ids"][docs >= 0] < 64).all()
    # Behaviour, not only the mask: a document's states ignore its neighbours in the row.
    row = int((docs.amax(dim=1) >= 1).nonzero()[0])
    first = docs[row] == 0
    alone = {k: v[row: row + 1, first] if v.dim() == 2 and v.shape[1] == docs.shape[1] else v
             for k, v in batch.items()}
    seen.clear()
    single = encoder(alone["input_ids"], **encoder_inputs(alone))
    torch.testing.assert_close(single[0], hidden[row, first], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_sentence_pairs_have_segments_types_and_balanced_labels(tmp_path, task):
    sentences = [f"Sentence {i} of story {d} tells about the {('cat', 'dog', 'fox')[i % 3]}."
                 for d in range(60) for i in range(12)]
    stories = ["\n".join(sentences[d * 12:(d + 1) * 12]) for d in range(60)]
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(stories), encoding="utf-8")
    dm = datamodule(path, packing=SentencePairs(task=task), max_length=48)
    rows = dm.samples["train"].with_format("numpy")[:]
    sep = dm.special_tokens.sep_id
    for ids, types in zip(rows["input_ids"][:50], rows["token_type_ids"][:50], strict=True):
        seps = np.flatnonzero(ids == sep)
        assert len(seps) == 2 and seps[1] == len(ids) - 1 and len(ids) <= 48
        assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1:] == 1).all()
    labels = rows["pair_label"]
    assert len(labels) > 100 and 0.4 < labels.mean() < 0.6
    batch = next(iter(dm.train_dataloader()))
    assert {"token_type_ids", "pair_label", "attention_mask"} <= set(batch)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


def collect(loader, epoch: int) -> dict[int, list[int]]:
    loader.sampler.set_epoch(epoch)
    return {int(s): lab.tolist() for b in loader for s, lab in zip(b["sample_id"], b["labels"],
                                                                   strict=True)}


@pytest.mark.parametrize("masking", [WholeWordMasking(), SpanMasking()])
def test_static_masks_repeat_across_epochs_and_dynamic_ones_change(small_corpus, masking):
    static = datamodule(small_corpus, masking=masking, masking_mode="static")
    first, second = collect(static.train_dataloader(), 0), collect(static.train_dataloader(), 1)
    common = set(first) & set(second)
    assert len(common) > 0.9 * len(first) and all(first[i] == second[i] for i in common)
    cycled = datamodule(small_corpus, masking=masking, masking_mode="static",
                        duplication_factor=2)
    e0, e1, e2 = (collect(cycled.train_dataloader(), e) for e in (0, 1, 2))
    common = set(e0) & set(e1) & set(e2)
    assert all(e0[i] == e2[i] for i in common)
    assert sum(e0[i] != e1[i] for i in common) > 0.9 * len(common)
    dynamic = datamodule(small_corpus, masking=masking)
    d0, d1 = collect(dynamic.train_dataloader(), 0), collect(dynamic.train_dataloader(), 1)
    common = set(d0) & set(d1)
    assert sum(d0[i] != d1[i] for i in common) > 0.9 * len(common)


@pytest.mark.parametrize("workers", [0, 2])
def test_masks_survive_a_mid_epoch_resume(small_corpus, workers):
    dm = datamodule(small_corpus, masking=SpanMasking(), num_workers=workers)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    reference = [(b["sample_id"].tolist(), b["labels"].tolist()) for b in loader]
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    head = [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    resumed = datamodule(small_corpus, masking=SpanMasking(), num_workers=workers)
    fresh = resumed.train_dataloader()
    fresh.sampler.set_epoch(1)
    fresh.load_state_dict(state)
    tail = [(b["sample_id"].tolist(), b["labels"].tolist()) for b in fresh]
    got = [(b["sample_id"].tolist(), b["labels"].tolist()) for b in head] + tail
    assert got == reference


def test_mixture_probabilities_follow_alpha_or_weights():
    sizes = [9000, 900, 100]
    natural = mixture_probabilities(sizes, [None] * 3, 1.0)
    assert np.allclose(natural, [0.9, 0.09, 0.01])
    tempered = mixture_probabilities(sizes, [None] * 3, 0.3)
    p = np.array(sizes) / sum(sizes)
    assert np.allclose(tempered, p**0.3 / (p**0.3).sum())
    assert tempered[2] > 5 * natural[2] and tempered[0] < natural[0]
    assert np.allclose(mixture_probabilities(sizes, [1, 1, 2], 0.3), [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="weight"):
        mixture_probabilities(sizes, [1, None, 2], 1.0)


def test_mixture_sampler_draws_quotas_reproducibly():
    sizes = [600, 60, 20]
    probabilities = mixture_probabilities(sizes, [None] * 3, 0.3)
    sampler = MixtureSampler(sizes, probabilities, seed=5)
    draws = [i for _, i in sampler]
    assert len(draws) == sum(sizes)
    corpus = np.searchsorted(np.cumsum(sizes), np.asarray(draws) % sum(sizes), side="right")
    counts = np.bincount(corpus, minlength=3)
    assert np.abs(counts - probabilities * sum(sizes)).max() <= 1
    assert len(set(draws)) == len(draws)  # repeats of a small corpus get distinct sample ids
    assert draws == [i for _, i in MixtureSampler(sizes, probabilities, seed=5)]
    sampler.set_epoch(1)
    assert draws != [i for _, i in sampler]


def test_mixture_of_two_corpora_trains_one_tokenizer_and_samples_both(small_corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"le chat numero {i} dort sur le tapis rouge" for i in
                                 range(200)), encoding="utf-8")
    dm = MaskedLMDataModule(mixture=[CorpusSource(str(small_corpus)), CorpusSource(str(other))],
                            mixture_alpha=0.3, tokenizer_training=SMALL_TOKENIZER,
                            max_length=32, batch_size=8)
    dm.setup()
    assert len(dm.corpus_sizes) == 2 and min(dm.corpus_sizes) > 0
    q = dm.mixture_probabilities()
    sizes = np.asarray(dm.corpus_sizes)
    assert q[np.argmin(sizes)] > sizes.min() / sizes.sum()  # the small corpus is up-sampled
    ids = [int(s) for b in dm.train_dataloader() for s in b["sample_id"]]
    from_small = np.mean([(i % sizes.sum() >= sizes[0]) == (np.argmin(sizes) == 1) for i in ids])
    assert abs(from_small - q.min()) < 0.05


@pytest.mark.parametrize("packing,masking", [
    (LinePacking(), WholeWordMasking()),
    (DocumentPacking(), SpanMasking()),
    (SentencePairs(task="sop"), TokenMasking(selection="smoothed", replacement="unigram")),
])
def test_every_packing_and_masking_trains_the_mlm_objective(small_corpus, tmp_path, packing,
                                                            masking):
    import lightning as L

    from fillmask.objectives.mlm import MaskedLM

    dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer_training=SMALL_TOKENIZER,
                            max_length=48, batch_size=8, packing=packing, masking=masking)
    model = MaskedLM(BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64),
                     learning_rate=3e-3, warmup_steps=2)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=2, val_check_interval=6,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 6
    assert np.isfinite(trainer.callback_metrics["val/loss"].item())
