"""The BERT encoder: numerics equal transformers' BertModel; pre-LN and presets work."""

from __future__ import annotations

import pytest
import torch
import transformers

from fillmask.architectures.bert import BertEncoder
from fillmask.architectures.bert_transformers import bert_config_dict, to_transformers
from fillmask.heads import MLMHead


def tiny(**overrides) -> BertEncoder:
    torch.manual_seed(0)
    return BertEncoder.preset("tiny", vocab_size=101, max_positions=64, **overrides).eval()


def hf_bert(encoder: BertEncoder):
    config = transformers.BertConfig(**bert_config_dict(encoder), attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    missing, unexpected = model.load_state_dict(to_transformers(encoder).weights, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


def test_encoder_matches_transformers_bert_model():
    encoder = tiny()
    reference = hf_bert(encoder)
    ids = torch.randint(5, 101, (3, 20), generator=torch.Generator().manual_seed(1))
    types = torch.zeros_like(ids)
    types[:, 10:] = 1
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, 15:] = False
    with torch.no_grad():
        ours = encoder(ids, attention, types)
        theirs = reference(input_ids=ids, attention_mask=attention.long(),
                           token_type_ids=types).last_hidden_state
    real = attention[..., None].expand_as(ours)
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_mlm_head_matches_bert_for_masked_lm():
    encoder = tiny()
    head = MLMHead(encoder.token_embedding())
    torch.nn.init.normal_(head.bias)
    config = transformers.BertConfig(**bert_config_dict(encoder), attn_implementation="eager")
    reference = transformers.BertForMaskedLM(config).eval()
    weights = to_transformers(encoder, head).weights
    missing, _ = reference.load_state_dict(weights, strict=False)
    assert all("position_ids" in k for k in missing)
    ids = torch.randint(5, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = head(encoder(ids))
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_pre_norm_has_final_norm_and_trains():
    encoder = tiny(norm="pre").train()
    assert encoder.final_norm is not None
    out = encoder(torch.randint(0, 101, (2, 8)))
    assert out.shape == (2, 8, 32)
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_spec_rebuilds_the_same_encoder():
    encoder = tiny(norm="pre", activation="gelu_tanh")
    spec = encoder.spec()
    assert spec["class_path"] == "fillmask.architectures.bert.BertEncoder"
    rebuilt = BertEncoder(**spec["init_args"])
    rebuilt.load_state_dict(encoder.state_dict())
    ids = torch.randint(0, 101, (1, 9))
    torch.testing.assert_close(rebuilt.eval()(ids), encoder(ids))


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_size=30, num_heads=4), "num_heads"),
    (dict(norm="middle"), "norm"),
    (dict(activation="swish"), "activation"),
])
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BertEncoder.preset("tiny", vocab_size=50, **kwargs)


def test_sinusoidal_position_init_keeps_the_scale_and_encodes_distance():
    encoder = BertEncoder.preset("tiny", vocab_size=50, max_positions=64,
                                 position_init="sinusoidal")
    table = encoder.embeddings.positions.weight.detach()
    assert abs(table.std().item() - 0.02) < 0.004
    similarity = table @ table.T  # (P, P): depends on the offset between positions only
    torch.testing.assert_close(similarity.diagonal(3)[:10], similarity.diagonal(3)[20:30],
                               atol=1e-6, rtol=1e-3)
    assert similarity[10, 11] > similarity[10, 40]


def test_embedding_norm_can_be_dropped_for_pre_ln():
    encoder = BertEncoder.preset("tiny", vocab_size=50, norm="pre", embedding_norm=False)
    assert isinstance(encoder.embeddings.norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="no transformers BertModel equivalent"):
        bert_config_dict(encoder)
