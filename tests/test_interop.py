"""Import of a real transformers BERT folder: same logits as transformers, usable everywhere."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from fillmask.interop.hf import HFImportError, import_bert
from fillmask.objectives.base import CheckpointError
from fillmask.objectives.pretrained import load_pretrained


def test_imported_bert_for_masked_lm_matches_transformers(hf_bert_folder):
    model, tokenizer = import_bert(hf_bert_folder)
    reference = transformers.BertForMaskedLM.from_pretrained(str(hf_bert_folder)).eval()
    model.eval()
    encoding = tokenizer.encode("the capital of france is [MASK] .")
    ids = torch.tensor([encoding.ids])
    with torch.no_grad():
        ours = model.head(model.encoder(ids))
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert model.encoder.vocab_size == 30522 and model.head.decoder is None  # tied


def test_load_pretrained_reads_folders_and_names_bad_sources(hf_bert_folder, tmp_path):
    model, tokenizer = load_pretrained(hf_bert_folder)
    assert tokenizer.token_to_id("[MASK]") is not None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFImportError, match=r"config.json has model_type 'gpt2', which no "):
        import_bert(tmp_path)


def test_a_transformers_tokenizer_packs_without_its_saved_padding(hf_bert_folder, small_corpus):
    from fillmask.data.datamodule import MaskedLMDataModule

    dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer=str(hf_bert_folder),
                            max_length=64, vocab_multiple=1)
    dm.setup()
    blocks = dm.samples["train"].with_format("numpy")[:]["input_ids"]
    assert len(blocks) > 100 and not (blocks == dm.special_tokens.pad_id).any()
    assert dm.vocab_size == 30522
