"""The ModernBERT encoder: numerics equal transformers' ModernBertModel, unpadded execution equals
padded execution, packed documents are independent, and the Encoder contract holds."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
import transformers
from fillmask_modernbert import ModernBertEncoder
from fillmask_modernbert.hf import encoder_from_hf, hf_config, state_dict_to_hf, to_transformers

from fillmask.heads import mlm_head

VOCAB = 101
T = 24  # longer than the local window below, so the window matters


def tiny(**overrides) -> ModernBertEncoder:
    """4 layers: global 0 and 3, local 1 and 2, with an 8-token window (4 either side)."""
    torch.manual_seed(0)
    options = dict(vocab_size=VOCAB, num_layers=4, local_window=8, max_positions=64)
    return ModernBertEncoder.preset("tiny", **{**options, **overrides}).eval()


def hf_model(encoder: ModernBertEncoder, implementation: str, **config_overrides):
    config = transformers.ModernBertConfig(**{**hf_config(encoder), **config_overrides},
                                           attn_implementation=implementation)
    model = transformers.ModernBertModel(config).eval()
    model.load_state_dict(state_dict_to_hf(encoder), strict=True)
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (3, T), generator=torch.Generator().manual_seed(1))
    attention = torch.ones(3, T, dtype=torch.bool)
    attention[1, 17:] = False
    attention[2, 6:] = False
    return ids, attention


def packed_batch() -> dict[str, torch.Tensor]:
    """Row 0: documents of 10 and 9 tokens, then padding; row 1: 4, 12 and 8 tokens."""
    ids = torch.randint(5, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    documents = torch.full((2, T), -1)
    documents[0, :10], documents[0, 10:19] = 0, 1
    documents[1, :4], documents[1, 4:16], documents[1, 16:] = 0, 1, 2
    positions = torch.zeros_like(ids)
    for row in range(2):
        for doc in documents[row].unique():
            where = documents[row] == doc
            positions[row, where] = torch.arange(int(where.sum()))
    return {"input_ids": ids, "attention_mask": documents >= 0, "document_ids": documents,
            "position_ids": positions}


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_matches_transformers_modernbert_model(implementation, unpad):
    encoder = tiny(unpad=unpad)
    reference = hf_model(encoder, implementation)
    ids, attention = padded_batch()
    with torch.no_grad():
        ours = encoder(ids, attention)
        theirs = reference(input_ids=ids, attention_mask=attention.long()).last_hidden_state
        wider = hf_model(encoder, implementation, local_attention=16)
        other_window = wider(input_ids=ids, attention_mask=attention.long()).last_hidden_state
    real = attention[..., None].expand_as(ours)
    print(f"max |ours - transformers| ({implementation}, unpad={unpad}):",
          (ours - theirs)[real].abs().max().item())
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
    assert (ours - other_window)[real].abs().max() > 1e-3  # the window is exercised
    if unpad:
        assert ours[~attention].abs().max() == 0


def test_layer_kinds_and_window_follow_transformers():
    encoder = ModernBertEncoder.preset("tiny", num_layers=7, global_every=3)
    config = transformers.ModernBertConfig(**hf_config(encoder))
    kinds = ["local" if kind == "sliding_attention" else "global" for kind in config.layer_types]
    assert encoder.layer_kinds() == kinds == ["global", "local", "local"] * 2 + ["global"]
    default = transformers.ModernBertConfig(num_hidden_layers=7)
    assert default.layer_types == config.layer_types
    assert config.sliding_window == encoder.local_window // 2


def test_round_trip_through_transformers_is_bitwise():
    encoder = tiny()
    reference = hf_model(encoder, "sdpa")
    back = encoder_from_hf(reference.config.to_dict(), reference.state_dict())
    assert back.spec() == encoder.spec()
    mine, theirs = encoder.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)


def test_masked_lm_prefix_and_clear_errors():
    encoder = tiny()
    config = transformers.ModernBertConfig(**hf_config(encoder))
    masked_lm = transformers.ModernBertForMaskedLM(config)
    missing, unexpected = masked_lm.load_state_dict(state_dict_to_hf(encoder, prefix="model."),
                                                    strict=False)
    assert not unexpected and all(not k.startswith("model.") for k in missing)
    weights = masked_lm.state_dict()
    back = encoder_from_hf(config.to_dict(), weights, prefix="model.")
    assert torch.equal(back.blocks[1].mlp.wi.weight, encoder.blocks[1].mlp.wi.weight)
    with pytest.raises(ValueError, match="prefix='model.'"):
        encoder_from_hf(config.to_dict(), weights)
    with pytest.raises(ValueError, match="attention_bias"):
        encoder_from_hf({**config.to_dict(), "attention_bias": True}, weights, prefix="model.")
    biased = {**weights, "model.final_norm.bias": torch.ones(32)}
    with pytest.raises(ValueError, match="final_norm.bias is not zero"):
        encoder_from_hf(config.to_dict(), biased, prefix="model.")
    factorised = tiny(embedding_size=16)  # the bias-free projection folds into the table
    table = to_transformers(factorised).weights["embeddings.tok_embeddings.weight"]
    projected = factorised.embeddings.project(factorised.embeddings.tokens.weight)
    torch.testing.assert_close(table, projected.detach())
    with pytest.raises(ValueError, match="embedding_size=16"):  # the decoder is 16 wide
        to_transformers(factorised, mlm_head(factorised))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_export_with_mlm_head_matches_modernbert_for_masked_lm(tied):
    from fillmask.heads import MLMHead

    encoder = tiny()
    head = MLMHead(encoder.token_embedding(), tied=tied, eps=1e-5, hidden_size=32)
    torch.nn.init.normal_(head.bias)
    torch.nn.init.normal_(head.norm.bias)
    exported = to_transformers(encoder, head)
    assert exported.architecture == "ModernBertForMaskedLM"
    config = transformers.ModernBertConfig(**exported.config, attn_implementation="sdpa")
    reference = transformers.ModernBertForMaskedLM(config).eval()
    reference.load_state_dict(exported.weights, strict=True)
    ids, attention = padded_batch()
    with torch.no_grad():
        ours = head(encoder(ids, attention)[attention])  # (N, V)
        theirs = reference(input_ids=ids, attention_mask=attention.long()).logits[attention]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    back = encoder_from_hf(exported.config, exported.weights, prefix="model.")
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in back.state_dict().items())
    bare = to_transformers(encoder)
    assert bare.architecture == "ModernBertModel" and "decoder.weight" not in bare.weights
    with pytest.raises(ValueError, match="eps"):
        to_transformers(encoder, MLMHead(encoder.token_embedding()))  # fillmask's 1e-12


def loss_and_grads(encoder: ModernBertEncoder, batch: dict[str, torch.Tensor]):
    encoder.zero_grad()
    out = encoder(**batch)  # (B, T, C)
    real = batch["attention_mask"]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights)[real].sum().backward()
    return out, {name: p.grad.clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize("kind", ["padding", "documents"])
def test_unpadded_equals_padded_outputs_and_gradients(kind):
    if kind == "padding":
        ids, attention = padded_batch()
        batch = {"input_ids": ids, "attention_mask": attention}
    else:
        batch = packed_batch()
    unpadded, padded = tiny(unpad=True), tiny(unpad=False)
    padded.load_state_dict(unpadded.state_dict())
    out_u, grads_u = loss_and_grads(unpadded, batch)
    out_p, grads_p = loss_and_grads(padded, batch)
    real = batch["attention_mask"]
    torch.testing.assert_close(out_u[real], out_p[real], atol=1e-5, rtol=1e-5)
    assert grads_u.keys() == grads_p.keys()
    for name in grads_u:
        torch.testing.assert_close(grads_u[name], grads_p[name], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("unpad", [True, False], ids=["unpadded", "padded"])
def test_packed_documents_equal_each_document_alone(unpad):
    encoder = tiny(unpad=unpad)
    batch = packed_batch()
    with torch.no_grad():
        packed = encoder(**batch)
        implied = encoder(batch["input_ids"], document_ids=batch["document_ids"])
        for row in range(2):
            for doc in batch["document_ids"][row].unique().tolist():
                if doc < 0:
                    continue
                where = batch["document_ids"][row] == doc
                alone = encoder(batch["input_ids"][row, where][None])[0]
                torch.testing.assert_close(packed[row, where], alone, atol=1e-5, rtol=1e-5)
    # positions restart per document when only document ids are given
    real = batch["attention_mask"]
    torch.testing.assert_close(implied[real], packed[real], atol=1e-6, rtol=1e-6)


def test_training_mode_with_dropout_runs_and_differs():
    encoder = tiny(embedding_dropout=0.1, attention_dropout=0.1, mlp_dropout=0.1).train()
    ids, attention = padded_batch()
    first, second = encoder(ids, attention), encoder(ids, attention)
    assert torch.isfinite(first).all() and not torch.equal(first, second)


def test_replaced_token_table_is_called():
    """ELECTRA's sharing swaps the token table, possibly for a module that is not an
    nn.Embedding (DeBERTa-v3's shared table + delta): the encoder must call it."""
    from fillmask.objectives.rtd import DeltaEmbedding, generator_from

    encoder = tiny()
    shared = torch.nn.Embedding(VOCAB, 32)
    encoder.set_embedding_table("tokens", DeltaEmbedding(shared))
    with torch.no_grad():
        encoder.embedding_tables()["tokens"].delta.normal_()
    reference = tiny()
    reference.embeddings.tokens.weight.data.copy_(encoder.embedding_tables()["tokens"].weight)
    ids, attention = padded_batch()
    real = attention[..., None].expand(-1, -1, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, attention)[real],
                                   reference(ids, attention)[real])
    exported = state_dict_to_hf(encoder)["embeddings.tok_embeddings.weight"]
    assert torch.equal(exported, encoder.embedding_tables()["tokens"].weight)
    with pytest.raises(KeyError, match="positions"):
        encoder.set_embedding_table("positions", shared)
    generator = generator_from(tiny(), size_divisor=4, num_layers=None)
    assert (generator.hidden_size, generator.embedding_size) == (8, 32)
    assert generator(ids, attention).shape == (3, T, 8)


def test_presets_match_transformers_parameter_counts():
    for name, hf_sizes in [("base", {}), ("large", dict(hidden_size=1024, num_hidden_layers=28,
                                                        num_attention_heads=16,
                                                        intermediate_size=2624))]:
        with torch.device("meta"):
            ours = ModernBertEncoder.preset(name)
            theirs = transformers.ModernBertModel(transformers.ModernBertConfig(**hf_sizes))
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in theirs.parameters())
    assert ours.num_layers == 28 and ours.hidden_size == 1024
    tiny_preset = ModernBertEncoder.preset("tiny")
    assert (tiny_preset.hidden_size, len(tiny_preset.blocks)) == (32, 3)
    with pytest.raises(ValueError, match="preset 'huge'"):
        ModernBertEncoder.preset("huge")


def test_flops_per_token_counts_global_and_local_attention():
    with torch.device("meta"):
        encoder = ModernBertEncoder.preset("base", vocab_size=50368)
    C = 768
    weights = 6.0 * sum(p.numel() for p in encoder.blocks.parameters() if p.ndim >= 2)
    global_layers, local_layers = 8, 14  # layers 0, 3, ..., 21 are global
    assert encoder.layer_kinds().count("global") == global_layers
    expected = weights + 12.0 * C * (global_layers * 1024 + local_layers * 128)
    assert encoder.flops_per_token(1024) == pytest.approx(expected)
    short = weights + 12.0 * C * 22 * 64  # the window covers a 64-token sequence
    assert encoder.flops_per_token(64) == pytest.approx(short)


@pytest.mark.parametrize("options,option", [
    (dict(num_heads=5), "num_heads"),
    (dict(hidden_size=36, num_heads=4), "num_heads"),  # head size 9 is odd
    (dict(local_window=7), "local_window"),
    (dict(global_every=0), "global_every"),
    (dict(activation="swishy"), "activation"),
    (dict(mlp_dropout=1.5), "mlp_dropout"),
    (dict(embedding_size=0), "embedding_size"),
])
def test_bad_options_name_the_option(options, option):
    with pytest.raises(ValueError, match=option):
        ModernBertEncoder.preset("tiny", **options)


def test_too_long_batch_is_a_clear_error():
    encoder = tiny(max_positions=16)
    with pytest.raises(ValueError, match="max_positions=16"):
        encoder(torch.zeros(1, 17, dtype=torch.long))


def test_registered_as_a_fillmask_architecture():
    found = {ep.name: ep for ep in entry_points(group="fillmask.architectures")}
    assert found["ModernBertEncoder"].load() is ModernBertEncoder


def test_import_a_transformers_masked_lm_folder(tmp_path):
    """A ModernBertForMaskedLM folder as released (no norm or head-dense biases) becomes a
    fillmask MaskedLM with transformers' logits."""
    from fillmask.interop.hf import import_transformers

    torch.manual_seed(0)
    config = transformers.ModernBertConfig(**hf_config(tiny()), attn_implementation="sdpa")
    assert not config.norm_bias and not config.classifier_bias and config.decoder_bias
    reference = transformers.ModernBertForMaskedLM(config).eval()
    with torch.no_grad():
        reference.decoder.bias.normal_()
    reference.save_pretrained(tmp_path)
    model, tokenizer = import_transformers(tmp_path)
    assert tokenizer is None and type(model.encoder).__name__ == "ModernBertEncoder"
    ids, attention = padded_batch()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=attention.long()).logits[attention]
        ours = model.eval().head(model.encoder(ids, attention)[attention])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
