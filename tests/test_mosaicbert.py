"""MosaicBERT's encoder options: ALiBi, a gated-linear-unit feed-forward, unpadded execution,
and the recipe's config run end to end at tiny size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_cli import ROOT, fillmask

from fillmask.architectures import bert
from fillmask.architectures.bert import BertEncoder, alibi_bias, alibi_slopes
from fillmask.architectures.bert_transformers import bert_config_dict

VOCAB = 60


def tiny(**overrides) -> BertEncoder:
    """A tiny encoder without dropout, in train mode (dropout 0 keeps it deterministic)."""
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, max_positions=32, dropout=0.0, attention_dropout=0.0)
    return BertEncoder.preset("tiny", **{**options, **overrides})


def random_ids(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows of 12 tokens, with 12, 7 and 3 real ones."""
    attention = torch.zeros(3, 12, dtype=torch.bool)
    for row, length in enumerate((12, 7, 3)):
        attention[row, :length] = True
    return {"input_ids": random_ids(3, 12), "attention_mask": attention}


def packed_batch() -> dict[str, torch.Tensor]:
    """Two document-packed rows of 12 tokens: documents of 4 + 5 (+ 3 padding), and 12."""
    document_ids = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 3, [0] * 12])
    position_ids = torch.tensor([list(range(4)) + list(range(5)) + [0] * 3, list(range(12))])
    return {"input_ids": random_ids(2, 12), "document_ids": document_ids,
            "position_ids": position_ids}


def real_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "attention_mask" in batch:
        return batch["attention_mask"]
    return batch["document_ids"] >= 0


# ALiBi


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -k for k in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(2), torch.tensor([2.0 ** -4, 2.0 ** -8]))
    # Not a power of two: the 8-head slopes, then every other slope of 16 heads for the rest.
    twelve = [2.0 ** -k for k in range(1, 9)] + [2.0 ** -(k / 2) for k in (1, 3, 5, 7)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(twelve))
    six = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six))


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = alibi_slopes(4)
    bias = alibi_bias(slopes, 7)  # (H, T, T)
    assert bias.shape == (4, 7, 7)
    torch.testing.assert_close(bias, bias.transpose(1, 2))
    assert torch.all(bias.diagonal(dim1=1, dim2=2) == 0)
    for offset in range(1, 7):  # constant along each diagonal: depends on |i - j| only
        diagonal = bias.diagonal(offset, dim1=1, dim2=2)  # (H, T - offset)
        torch.testing.assert_close(diagonal, -slopes[:, None].expand_as(diagonal) * offset)


def test_alibi_encoder_has_no_position_table():
    encoder = tiny(positions="alibi")
    assert set(encoder.embedding_tables()) == {"tokens", "token_types"}
    assert not any("positions" in name for name in encoder.state_dict())
    with pytest.raises(KeyError, match="no 'positions' embedding"):
        encoder.set_embedding_table("positions", torch.nn.Embedding(32, 32))
    with pytest.raises(ValueError, match="exceeds max_positions=32"):
        encoder(random_ids(1, 33))
    with pytest.raises(ValueError, match="sinusoidal.*alibi"):
        tiny(positions="alibi", position_init="sinusoidal")
    with pytest.raises(ValueError, match="positions='rope' is unknown"):
        tiny(positions="rope")
    # The recorded arguments rebuild it (checkpoints, ELECTRA's generator).
    assert "positions" not in encoder.resized(hidden_size=64, num_heads=2).embedding_tables()


@pytest.mark.parametrize("unpad", [False, True])
def test_alibi_states_do_not_depend_on_where_a_sequence_sits(unpad):
    """The same 6 tokens at the start of a row and after 4 padding tokens: equal states, with a
    padding mask and with document ids (no position ids: ALiBi sees only distances)."""
    encoder = tiny(positions="alibi", unpad=unpad).eval()
    tokens = random_ids(6)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0, :6], ids[1, 4:] = tokens, tokens
    real = torch.zeros(2, 10, dtype=torch.bool)
    real[0, :6], real[1, 4:] = True, True
    with torch.no_grad():
        masked = encoder(ids, attention_mask=real)  # (2, 10, C)
        documents = encoder(ids, document_ids=torch.where(real, 0, -1))  # (2, 10, C)
    for states in (masked, documents):
        torch.testing.assert_close(states[0, :6], states[1, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["alibi", "learned"])
@pytest.mark.parametrize("unpad", [False, True])
def test_packed_row_equals_each_document_alone(positions, unpad):
    encoder = tiny(positions=positions, unpad=unpad, ffn="glu", norm="pre").eval()
    batch = packed_batch()
    ids = batch["input_ids"][0]
    with torch.no_grad():
        packed = encoder(**batch)  # (2, 12, C)
        first = encoder(ids[None, :4])  # (1, 4, C)
        second = encoder(ids[None, 4:9])  # (1, 5, C)
    torch.testing.assert_close(packed[0, :4], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 4:9], second[0], atol=1e-5, rtol=1e-5)


# GLU


def test_glu_shapes_and_flops():
    glu, mlp = tiny(ffn="glu"), tiny()
    up, down = glu.blocks[0].ffn.up, glu.blocks[0].ffn.down
    assert up.weight.shape == (2 * 64, 32) and up.bias.shape == (2 * 64,)
    assert down.weight.shape == (32, 64)
    extra_weights = 2 * 64 * 32  # the second half of each layer's up matrix
    assert glu.flops_per_token(16) - mlp.flops_per_token(16) == 6.0 * extra_weights
    with pytest.raises(ValueError, match="ffn='swiglu' is unknown"):
        tiny(ffn="swiglu")


def test_glu_encoder_trains_on_a_fixed_batch():
    encoder = tiny(ffn="glu", positions="alibi", norm="pre", unpad=True)
    head = torch.nn.Linear(32, VOCAB)
    batch = padded_batch()
    real = batch["attention_mask"]
    targets = batch["input_ids"][real]  # (N,)
    corrupted = batch["input_ids"].masked_fill(torch.rand(3, 12) < 0.3, 1)  # id 1 as [MASK]
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        hidden = encoder(corrupted, attention_mask=real)  # (B, T, C)
        loss = torch.nn.functional.cross_entropy(head(hidden[real]), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# Unpadding


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("positions", ["learned", "alibi"])
@pytest.mark.parametrize("ffn,norm", [("mlp", "post"), ("glu", "pre")])
def test_unpadded_equals_padded_outputs_and_gradients(make_batch, positions, ffn, norm):
    batch = make_batch()
    real = real_of(batch)
    padded = tiny(positions=positions, ffn=ffn, norm=norm).train()
    unpadded = tiny(positions=positions, ffn=ffn, norm=norm, unpad=True).train()
    unpadded.load_state_dict(padded.state_dict())
    weights = torch.randn(*real.shape, 32, generator=torch.Generator().manual_seed(3))
    outputs = []
    for encoder in (padded, unpadded):
        hidden = encoder(**batch)  # (B, T, C)
        (hidden[real] * weights[real]).sum().backward()
        outputs.append(hidden)
    torch.testing.assert_close(outputs[1][real], outputs[0][real], atol=1e-5, rtol=1e-5)
    assert torch.all(outputs[1][~real] == 0)
    grads = dict(padded.named_parameters())
    for name, parameter in unpadded.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_sequences_for_flash_are_rows_or_documents():
    padded = padded_batch()
    layout = bert.unpadded_layout(padded["attention_mask"])
    rows = bert.with_sequences(layout, None, None)
    assert rows.cu_seqlens.tolist() == [0, 12, 19, 22] and rows.max_seqlen == 12
    packed = packed_batch()
    layout = bert.unpadded_layout(packed["document_ids"] >= 0)
    documents = bert.with_sequences(layout, packed["document_ids"], alibi_slopes(2))
    assert documents.cu_seqlens.tolist() == [0, 4, 9, 21] and documents.max_seqlen == 12
    assert documents.cu_seqlens.dtype == torch.int32


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, alibi_slopes=None):
    """What ``flash_attn_varlen_func`` computes (non-causal, ALiBi bias -slope * |i - j|), one
    sequence at a time: (N, H, D) in, (N, H, D) out."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    out = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, end - start)
        y = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias)
        out.append(y.transpose(0, 1))  # (L, H, D)
    return torch.cat(out)  # (N, H, D)


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("positions", ["learned", "alibi"])
def test_flash_path_equals_padded(monkeypatch, make_batch, positions):
    """The varlen route (cu_seqlens, slopes) wired to a reference of flash_attn's semantics."""
    monkeypatch.setattr(bert, "flash_applies", lambda x: True)
    monkeypatch.setattr(bert, "flash_varlen", lambda: varlen_reference)
    batch = make_batch()
    real = real_of(batch)
    padded = tiny(positions=positions, ffn="glu", norm="pre").eval()
    unpadded = tiny(positions=positions, ffn="glu", norm="pre", unpad=True).eval()
    unpadded.load_state_dict(padded.state_dict())
    with torch.no_grad():
        expected, got = padded(**batch), unpadded(**batch)  # (B, T, C)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_unpadded_without_any_mask_equals_padded():
    padded, unpadded = tiny(positions="alibi"), tiny(positions="alibi", unpad=True)
    unpadded.load_state_dict(padded.state_dict())
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(unpadded(ids), padded(ids), atol=1e-5, rtol=1e-5)


# Export


def test_native_bert_mapping_refuses_alibi_and_glu_but_not_unpad():
    """No transformers BERT class has them: export carries them as remote code instead."""
    with pytest.raises(ValueError, match="ALiBi.*no transformers BertModel equivalent"):
        bert_config_dict(tiny(positions="alibi"))
    with pytest.raises(ValueError, match="ffn='glu'.*no transformers BertModel equivalent"):
        bert_config_dict(tiny(ffn="glu"))
    assert bert_config_dict(tiny(unpad=True)) == bert_config_dict(tiny())


# The recipe, end to end


def test_mosaicbert_config_fits_and_fills(small_corpus: Path, tmp_path: Path):
    encoder = "--model.init_args.encoder.init_args."
    fillmask(
        "fit", "--config", str(ROOT / "configs" / "mosaicbert.yaml"),
        f"{encoder}hidden_size", "32", f"{encoder}num_layers", "2", f"{encoder}num_heads", "2",
        f"{encoder}intermediate_size", "64", f"{encoder}max_positions", "32",
        "--data.corpus", str(small_corpus), "--data.tokenizer_training.vocab_size", "512",
        "--data.max_length", "32", "--data.batch_size", "8", "--data.num_workers", "0",
        "--trainer.max_steps", "3", "--trainer.precision", "32-true",
        "--trainer.accumulate_grad_batches", "1", "--trainer.devices", "1",
        "--trainer.accelerator", "cpu", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "2", cwd=tmp_path,
    )
    last = tmp_path / "runs" / "mosaicbert" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    args = checkpoint["fillmask"]["encoder"]["init_args"]
    assert (args["positions"], args["ffn"], args["unpad"], args["norm"]) == (
        "alibi", "glu", True, "pre")
    out = fillmask("fill", "--checkpoint", str(last), "--top-k", "3", "--json",
                   "The [MASK] statement exits a function.", cwd=tmp_path).stdout
    candidates = json.loads(out.splitlines()[0])["masks"][0]
    assert len(candidates) == 3 and all(math.isfinite(c["score"]) for c in candidates)
