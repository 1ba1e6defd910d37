"""`fillmask export`: checkpoints as transformers folders that AutoModelForMaskedLM,
AutoTokenizer and pipeline("fill-mask") load, with fillmask's logits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from fillmask.architectures.bert import BertEncoder
from fillmask.interop.export import ExportError, export_checkpoint
from fillmask.interop.hf import import_bert, read_hf_weights
from fillmask.objectives.mlm import MaskedLM

TOKENIZER = Path(__file__).resolve().parent / "assets" / "golden" / "tokenizer.json"


def save_checkpoint(model: MaskedLM, tokenizer: Tokenizer, path: Path) -> Path:
    """A checkpoint as `fillmask fit` writes one (metadata, hyper-parameters, weights)."""
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    checkpoint["fillmask"]["tokenizer"] = tokenizer.to_str()
    torch.save(checkpoint, path)
    return path


def tiny_model(tie: bool) -> MaskedLM:
    torch.manual_seed(0)
    encoder = BertEncoder.preset("tiny", vocab_size=512, max_positions=64)
    model = MaskedLM(encoder, tie_embeddings=tie).eval()
    with torch.no_grad():  # a trained head has a non-zero bias and LayerNorm
        for parameter in model.head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def padded_batch(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    texts = ["The [MASK] statement exits a function.", "A list [MASK] values."]
    encodings = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in encodings)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
    return ids, ids != 0


@pytest.mark.parametrize("tie", [True, False])
def test_exported_model_gives_fillmask_logits(tmp_path, tie):
    from transformers import AutoModelForMaskedLM

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    model = tiny_model(tie)
    targets = export_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "m.ckpt"),
                                tmp_path / "hf")
    assert list(targets) == [""] and targets[""].architecture == "BertForMaskedLM"
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "BertForMaskedLM"
    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        ours = model.head(model.encoder(ids, mask))  # (B, T, V)
        theirs = exported(input_ids=ids, attention_mask=mask.long()).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-5


def test_exported_tokenizer_and_fill_mask_pipeline(tmp_path):
    from transformers import AutoTokenizer, pipeline

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    model = tiny_model(tie=True)
    export_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "m.ckpt"), tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The [MASK] statement exits a function."
    assert loaded(text)["input_ids"] == tokenizer.encode(text).ids
    assert loaded.mask_token == "[MASK]" and loaded.pad_token_id == tokenizer.token_to_id("[PAD]")
    fill = pipeline("fill-mask", model=str(tmp_path / "hf"), top_k=3)
    candidates = fill(text)
    assert len(candidates) == 3 and all("token_str" in c for c in candidates)
    ids = torch.tensor([tokenizer.encode(text).ids])
    with torch.no_grad():
        position = (ids[0] == tokenizer.token_to_id("[MASK]")).nonzero()[0, 0]
        best = model.head(model.encoder(ids)[0, position]).argmax().item()
    assert candidates[0]["token"] == best


def test_import_then_export_round_trips_a_transformers_folder_bitwise(hf_bert_folder, tmp_path):
    model, tokenizer = import_bert(hf_bert_folder)
    export_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "m.ckpt"), tmp_path / "hf")
    original, again = read_hf_weights(hf_bert_folder), read_hf_weights(tmp_path / "hf")
    shared = [k for k in original if k in again]
    assert len(shared) >= len(original) - 2  # a legacy position_ids buffer may not come back
    assert all(torch.equal(original[k], again[k]) for k in shared)


def test_existing_output_is_kept_and_bad_checkpoints_are_one_line(tmp_path):
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    checkpoint = save_checkpoint(tiny_model(tie=True), tokenizer, tmp_path / "m.ckpt")
    output = tmp_path / "hf"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_checkpoint(checkpoint, output)
    assert [p.name for p in output.iterdir()] == ["notes.txt"]
    export_checkpoint(checkpoint, output, overwrite=True)
    assert (output / "model.safetensors").is_file() and not (output / "notes.txt").exists()

    pre_ln = MaskedLM(BertEncoder.preset("tiny", vocab_size=512, norm="pre"))
    pre_ckpt = save_checkpoint(pre_ln, tokenizer, tmp_path / "pre.ckpt")
    broken = torch.load(pre_ckpt, weights_only=False)
    broken["state_dict"]["encoder.blocks.0.ffn.up.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.ckpt")
    command = [sys.executable, "-m", "fillmask", "export", "--checkpoint"]
    result = subprocess.run([*command, str(tmp_path / "broken.ckpt"), "--output",
                             str(tmp_path / "broken")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "weights do not match" in result.stderr
    assert "encoder.blocks.0.ffn.up.weight has shape (3, 3)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "broken").exists()
    result = subprocess.run([*command, str(pre_ckpt), "--output", str(tmp_path / "pre")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "FillmaskForMaskedLM" in result.stdout and "trust_remote_code=True" in result.stdout


def test_an_objective_without_a_deliverable_head_is_one_line():
    from fillmask.interop.export import transformers_models
    from fillmask.objectives.base import EncoderObjective

    with pytest.raises(ExportError, match="EncoderObjective has no deliverable head"):
        transformers_models(EncoderObjective(BertEncoder.preset("tiny", vocab_size=64)))


@pytest.mark.parametrize("sharing", ["tied", "gdes"])
def test_electra_exports_discriminator_and_generator(tmp_path, sharing):
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    from fillmask.objectives.rtd import ReplacedTokenDetection

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    torch.manual_seed(0)
    encoder = BertEncoder.preset("tiny", vocab_size=512, hidden_size=64, embedding_size=32)
    # generator hidden 16 < embeddings 32: factorised, which only ELECTRA's classes hold
    model = ReplacedTokenDetection(encoder, generator_size_divisor=4, embedding_sharing=sharing)
    with torch.no_grad():  # trained-looking weights: GDES deltas, head biases
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.eval()
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "electra.ckpt")
    written = export_checkpoint(checkpoint, tmp_path / "hf")
    assert {k: v.architecture for k, v in written.items()} == {
        "discriminator": "ElectraForPreTraining", "generator": "ElectraForMaskedLM"}
    ids, mask = padded_batch(tokenizer)
    real = mask.bool()
    discriminator = ElectraForPreTraining.from_pretrained(tmp_path / "hf" / "discriminator")
    generator = ElectraForMaskedLM.from_pretrained(tmp_path / "hf" / "generator")
    with torch.no_grad():
        ours = model.discriminator_head(model.discriminator()(ids, mask))  # (B, T)
        theirs = discriminator.eval()(input_ids=ids, attention_mask=mask.long()).logits
        assert (ours[real] - theirs[real]).abs().max() < 1e-5
        ours = model.generator_head(model.generator(ids, mask))  # (B, T, V)
        theirs = generator.eval()(input_ids=ids, attention_mask=mask.long()).logits
        assert (ours[real] - theirs[real]).abs().max() < 1e-5
    assert (tmp_path / "hf" / "generator" / "tokenizer.json").is_file()
