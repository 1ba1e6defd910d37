"""Data pipeline: corpora, tokenizers, packing, and masks that depend on (seed, epoch, sample)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from fillmask.data.corpus import CorpusError, load_corpus
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerError, TokenizerTraining, train_tokenizer
from fillmask.masking.base import IGNORE_INDEX

SMALL_TOKENIZER = TokenizerTraining(vocab_size=600)


def datamodule(corpus: Path, **overrides) -> MaskedLMDataModule:
    options = dict(corpus=str(corpus), tokenizer_training=SMALL_TOKENIZER, max_length=32,
                   batch_size=8, seed=3)
    dm = MaskedLMDataModule(**{**options, **overrides})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def masks_by_sample(loader, epoch: int = 0) -> dict[int, tuple[list[int], list[int]]]:
    loader.sampler.set_epoch(epoch)
    seen = {}
    for batch in loader:
        for sid, ids, labels in zip(batch["sample_id"], batch["input_ids"], batch["labels"],
                                    strict=True):
            assert int(sid) not in seen, "a sample appeared twice in one epoch"
            seen[int(sid)] = (ids.tolist(), labels.tolist())
    return seen


def test_blocks_are_packed_with_cls_and_sep(small_corpus):
    dm = datamodule(small_corpus)
    blocks = dm.samples["train"].with_format("numpy")[:]["input_ids"]
    special = dm.special_tokens
    assert blocks.shape[1] == 32 and len(blocks) > 100
    assert (blocks[:, 0] == special.cls_id).all() and (blocks[:, -1] == special.sep_id).all()
    assert dm.vocab_size % 64 == 0 and dm.vocab_size >= dm.tokenizer.get_vocab_size()


def test_same_mask_whatever_batch_size_or_workers(small_corpus):
    reference = masks_by_sample(datamodule(small_corpus, batch_size=4).train_dataloader())
    other = datamodule(small_corpus, batch_size=7, num_workers=2).train_dataloader()
    other_masks = masks_by_sample(other)
    common = set(reference) & set(other_masks)  # drop_last trims a different tail
    assert len(common) > 0.9 * len(reference)
    assert all(reference[i] == other_masks[i] for i in common)


def test_masks_are_dynamic_across_epochs_and_validation_is_fixed(small_corpus):
    dm = datamodule(small_corpus)
    first = masks_by_sample(dm.train_dataloader(), 0)
    second = masks_by_sample(dm.train_dataloader(), 1)
    common = set(first) & set(second)  # drop_last trims a different tail each epoch
    assert len(common) > 0.9 * len(first)
    changed = sum(first[i][1] != second[i][1] for i in common)
    assert changed > 0.9 * len(common)
    val = dm.val_dataloader()
    assert masks_by_sample(val, 0) == masks_by_sample(val, 5)


def test_every_training_sample_seen_once_per_epoch(small_corpus):
    dm = datamodule(small_corpus, batch_size=1)
    seen = masks_by_sample(dm.train_dataloader())
    assert sorted(seen) == list(range(len(dm.samples["train"])))
    labels = torch.tensor([lab for _, lab in seen.values()])
    assert 0.12 < (labels != IGNORE_INDEX).float().mean() < 0.16  # 15% of non-special tokens


def test_trained_tokenizer_is_cached(small_corpus, isolated_cache):
    first = datamodule(small_corpus)
    files = sorted((isolated_cache / "tokenizers").glob("*.json"))
    assert files
    second = datamodule(small_corpus)
    assert sorted((isolated_cache / "tokenizers").glob("*.json")) == files
    assert first.tokenizer.to_str() == second.tokenizer.to_str()


TIED_MERGES = ["Wel come to the 🤗 Tok en izers libr ary.",
               "token izers and words, lib rary of tokens", "a rare bird in the library"] * 3


def test_wordpiece_training_is_the_same_every_time_merges_tie():
    """The library's trainer alone gave 4 vocabularies in 40 trainings of this corpus."""
    options = TokenizerTraining(vocab_size=90, min_frequency=1)
    trained = {train_tokenizer(TIED_MERGES, options).to_str() for _ in range(30)}
    assert len(trained) == 1
    once = Tokenizer.from_str(trained.pop())
    assert iter(TIED_MERGES) is not TIED_MERGES
    assert once.to_str() == train_tokenizer(iter(TIED_MERGES), options).to_str()
    assert once.to_str() == train_tokenizer(lambda: iter(TIED_MERGES), options).to_str()
    # the continuation pieces numbered first are ordinary pieces, not tokens matched in text
    assert "##a" in once.get_vocab()
    assert once.encode("##a lib", add_special_tokens=False).tokens == ["[UNK]", "[UNK]", "a", "lib"]
    assert [t["content"] for t in json.loads(once.to_str())["added_tokens"]] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_tokenizer_from_file_and_transformers_folder(small_corpus, tmp_path):
    trained = datamodule(small_corpus).tokenizer
    trained.save(str(tmp_path / "tokenizer.json"))
    for source in (tmp_path / "tokenizer.json", tmp_path):
        dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer=str(source))
        assert dm.tokenizer.get_vocab_size() == trained.get_vocab_size()
        assert dm.tokenizer.id_to_token(dm.special_tokens.mask_id) == "[MASK]"


def test_transformers_folder_declares_its_mask_token(tmp_path):
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<cls>": 1, "<sep>": 2, "[BLANK]": 3, "a": 4},
                                     unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<cls>", "<sep>", "[BLANK]"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"mask_token": "[BLANK]"}))
    dm = MaskedLMDataModule(tokenizer=str(tmp_path))
    assert dm.special_tokens.mask_id == 3


def test_tokenizer_without_mask_token_is_a_clear_error(tmp_path):
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3},
                                     unk_token="[UNK]"))
    path = tmp_path / "nomask.json"
    tok.save(str(path))
    dm = MaskedLMDataModule(tokenizer=str(path))
    with pytest.raises(TokenizerError, match=r"nomask\.json has no mask token"):
        _ = dm.vocab_size


def test_missing_tokenizer_file_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match="absent.json does not exist"):
        _ = MaskedLMDataModule(tokenizer=str(tmp_path / "absent.json")).vocab_size


def test_unknown_corpus_path_names_the_path(tmp_path):
    with pytest.raises(CorpusError, match="nowhere/.*matches no file"):
        load_corpus(str(tmp_path / "nowhere" / "*.txt"))


def test_jsonl_and_parquet_corpora_with_a_text_column(tmp_path):
    rows = [{"body": f"document number {i} says something about the cat"} for i in range(40)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    for path in (jsonl, tmp_path / "c.parquet"):
        corpus = load_corpus(str(path), text_column="body")
        assert corpus["train"].column_names == ["text"]
        assert len(corpus["train"]) + len(corpus["validation"]) == 40
    with pytest.raises(CorpusError, match="no 'text' column"):
        load_corpus(str(jsonl))


def test_saved_datasets_folder(tmp_path):
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["one two three"] * 10}),
        validation=datasets.Dataset.from_dict({"text": ["four five"] * 3}),
    ).save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(str(tmp_path / "saved"))
    assert (len(corpus["train"]), len(corpus["validation"])) == (10, 3)
