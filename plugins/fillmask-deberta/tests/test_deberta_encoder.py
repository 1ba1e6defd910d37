"""DebertaEncoder against the fillmask Encoder contract, at tiny size."""

from __future__ import annotations

import inspect

import pytest
import torch
from fillmask_deberta import DebertaEncoder
from fillmask_deberta.encoder import log_bucket, relative_index

V2_LIKE = dict(position_biased_input=True, type_vocab_size=2, embedding_size=16,
               share_att_key=False, relative_norm=False)


def tiny(**overrides) -> DebertaEncoder:
    torch.manual_seed(0)
    return DebertaEncoder.preset("tiny", vocab_size=100, max_positions=64, **overrides).eval()


def test_tiny_preset_encodes_to_hidden_states():
    enc = tiny()
    ids = torch.randint(0, 100, (2, 10))
    out = enc(ids, torch.ones_like(ids, dtype=torch.bool))
    assert out.shape == (2, 10, 32) and torch.isfinite(out).all()
    assert (enc.vocab_size, enc.hidden_size, enc.max_positions) == (100, 32, 64)
    assert enc.embedding_size == 32 and enc.num_layers == 2 and len(enc.blocks) == 2


def test_base_preset_is_deberta_v3_base():
    enc = DebertaEncoder.preset("base", vocab_size=8)
    args = enc.spec()["init_args"]
    assert (args["hidden_size"], args["num_layers"], args["num_heads"]) == (768, 12, 12)
    assert (args["position_buckets"], args["max_relative_positions"]) == (256, 512)
    assert args["type_vocab_size"] == 0 and not args["position_biased_input"]
    assert args["layer_norm_eps"] == 1e-7 and args["share_att_key"]
    backbone = sum(p.numel() for p in enc.blocks.parameters())
    assert backbone == 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768)
    assert enc.relative.weight.shape == (512, 768)
    defaults = inspect.signature(DebertaEncoder).parameters
    assert defaults["vocab_size"].default == 128100 and defaults["hidden_size"].default == 768


@pytest.mark.parametrize("options,message", [
    (dict(num_heads=3), "num_heads=3"),
    (dict(activation="swish"), "activation='swish'"),
    (dict(pos_att_type=("c2p", "p2p")), "pos_att_type"),
    (dict(position_buckets=64, max_relative_positions=20), "position_buckets=64"),
    (dict(enhanced_mask_decoder=True, position_biased_input=True), "enhanced_mask_decoder"),
    (dict(num_layers=0), "num_layers=0"),
])
def test_bad_configuration_names_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        DebertaEncoder.preset("tiny", **options)
    with pytest.raises(ValueError, match="preset 'huge'"):
        DebertaEncoder.preset("huge")


def test_log_buckets_are_exact_near_and_logarithmic_far():
    distance = torch.arange(-600, 601)
    buckets = log_bucket(distance, 256, 512)
    near = distance.abs() <= 128
    assert torch.equal(buckets[near], distance[near])
    assert buckets[distance == 511] == 255 and buckets[distance == 129] == 129
    assert torch.equal(buckets, -log_bucket(-distance, 256, 512))
    assert (buckets.diff() >= 0).all()
    index = relative_index(600, 256, 256, 512, torch.device("cpu"))  # (T, T) table rows
    assert index.min() == 0 and index.max() == 511 and index[0, 0] == 256  # clipped to 2 x 256


def test_embedding_tables_by_role_and_replacement():
    assert set(tiny().embedding_tables()) == {"tokens"}
    assert set(tiny(**V2_LIKE).embedding_tables()) == {"tokens", "positions", "token_types"}
    emd = tiny(enhanced_mask_decoder=True)
    assert set(emd.embedding_tables()) == {"tokens", "positions"}
    shared = torch.nn.Embedding(100, 32)
    emd.set_embedding_table("tokens", shared)
    assert emd.token_embedding() is shared
    with pytest.raises(KeyError, match="token_types"):
        emd.set_embedding_table("token_types", torch.nn.Embedding(2, 32))


def test_padding_does_not_change_real_tokens():
    enc = tiny(**V2_LIKE)
    ids = torch.randint(1, 100, (1, 12))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.arange(17)[None] < 12
    with torch.no_grad():
        alone, with_padding = enc(ids), enc(padded, mask)
    torch.testing.assert_close(with_padding[:, :12], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{}, V2_LIKE, dict(enhanced_mask_decoder=True)],
                         ids=["v3", "v2-like", "emd"])
def test_packed_documents_equal_each_document_alone(options):
    enc = tiny(**options)
    first, second = torch.randint(1, 100, (1, 5)), torch.randint(1, 100, (1, 7))
    packed = torch.cat([first, second, torch.zeros(1, 4, dtype=torch.long)], dim=1)  # (1, 16)
    document_ids = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4])
    position_ids = torch.tensor([list(range(5)) + list(range(7)) + [0] * 4])
    with torch.no_grad():
        out = enc(packed, position_ids=position_ids, document_ids=document_ids)
        torch.testing.assert_close(out[:, :5], enc(first), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 5:12], enc(second), atol=1e-5, rtol=0)


def test_enhanced_mask_decoder_uses_absolute_positions_and_trains():
    emd = tiny(enhanced_mask_decoder=True)
    plain = tiny()
    plain.load_state_dict({k: v for k, v in emd.state_dict().items()
                           if not k.startswith("embeddings.positions")})
    ids = torch.randint(1, 100, (2, 9))
    shifted = torch.arange(9)[None] + 3
    with torch.no_grad():
        assert not torch.allclose(emd(ids), plain(ids), atol=1e-3)
        # Without the decoder v3 sees relative positions only: a shift changes nothing.
        torch.testing.assert_close(plain(ids, position_ids=shifted), plain(ids))
        assert not torch.allclose(emd(ids, position_ids=shifted), emd(ids), atol=1e-3)
    emd.train()
    emd(ids).pow(2).mean().backward()
    assert emd.embeddings.positions.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in emd.parameters())


def test_flops_per_token_counts_disentangled_attention():
    enc = tiny()
    attention = enc.flops_per_token(64) - enc.flops_per_token(32)
    assert attention == pytest.approx(12 * 2 * 32 * 32)  # c2c scores and mix, x3 for backward
    no_position_terms = tiny(pos_att_type=())
    terms = enc.flops_per_token(32) - no_position_terms.flops_per_token(32)
    assert terms == pytest.approx(3 * 2 * (2 * 2 * 512 * 32))  # c2p + p2c against 512 rows
    emd = tiny(enhanced_mask_decoder=True)
    assert emd.flops_per_token(32) > enc.flops_per_token(32)


def test_generator_sharing_under_rtd():
    from fillmask.objectives.rtd import DeltaEmbedding, ReplacedTokenDetection

    enc = tiny()
    gdes = ReplacedTokenDetection(enc, generator_size_divisor=1, generator_layers=1,
                                  embedding_sharing="gdes")
    assert isinstance(enc.token_embedding(), DeltaEmbedding)
    assert len(gdes.generator.blocks) == 1 and gdes.generator.hidden_size == 32
    ids = torch.randint(1, 100, (2, 8))
    assert enc(ids).shape == (2, 8, 32)
    tied = ReplacedTokenDetection(tiny(enhanced_mask_decoder=True), generator_size_divisor=2,
                                  embedding_sharing="tied")
    generator = tied.generator
    assert generator.hidden_size == 16 and generator.embedding_size == 32
    assert generator.token_embedding() is tied.encoder.token_embedding()
    assert generator.embedding_tables()["positions"] is tied.encoder.embedding_tables()["positions"]
    assert generator(ids).shape == (2, 8, 16)


def test_bf16_autocast_forward():
    enc = tiny()
    ids = torch.randint(1, 100, (2, 8))
    mask = torch.arange(8)[None] < torch.tensor([[8], [5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(ids, mask)
    assert torch.isfinite(out.float()).all()
