"""Numerical parity with transformers' DebertaV2Model at tiny size, and the weight mapping."""

from __future__ import annotations

import pytest
import torch
import transformers
from fillmask_deberta import DebertaEncoder
from fillmask_deberta.hf import (
    UnsupportedConfig,
    encoder_from_hf,
    hf_config,
    state_dict_to_hf,
)

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=192, hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1)
V3 = dict(relative_attention=True, position_buckets=256, max_relative_positions=-1,
          pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
          position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7)
SETTINGS = {
    # DeBERTa-v3 (buckets 256 over 512 distances: sequences past 128 reach the log buckets).
    "v3": (dict(V3, max_relative_positions=512), 160),
    # v3 with few buckets, so that 40 tokens cover the exact, log and clipped regions.
    "v3-8-buckets": (dict(V3, position_buckets=8, max_relative_positions=24), 40),
    # v2-like: absolute positions in the input, segments, factorised embeddings, own position
    # projections, exact relative distances, no LayerNorm on the relative table.
    "v2-like": (dict(relative_attention=True, position_buckets=-1, max_relative_positions=-1,
                     pos_att_type="p2c|c2p", share_att_key=False, norm_rel_ebd="none",
                     position_biased_input=True, type_vocab_size=2, embedding_size=16,
                     hidden_act="gelu_new"), 48),
    "c2p-only": (dict(V3, pos_att_type=["c2p"], share_att_key=False, position_buckets=16,
                      max_relative_positions=64), 40),
}


def hf_model(settings: dict) -> transformers.DebertaV2Model:
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(**TINY, **settings)
    return transformers.DebertaV2Model(config).eval()


def padded_batch(length: int, types: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (3, length), generator=generator)
    lengths = torch.tensor([length, length - 7, length // 3])
    mask = torch.arange(length)[None] < lengths[:, None]  # (B, T)
    ids[~mask] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if types:
        batch["token_type_ids"] = (torch.arange(length)[None] >= lengths[:, None] // 2).long()
    return batch


def max_difference(hf, enc, batch) -> float:
    """Largest |transformers - ours| over real tokens (padding states are undefined)."""
    mask = batch["attention_mask"]
    with torch.no_grad():
        theirs = hf(batch["input_ids"], attention_mask=mask.long(),
                    token_type_ids=batch.get("token_type_ids")).last_hidden_state
        ours = enc(batch["input_ids"], mask, batch.get("token_type_ids"))
    return (theirs - ours)[mask].abs().max().item()


@pytest.mark.parametrize("name", list(SETTINGS))
def test_parity_with_transformers_from_hf(name):
    settings, length = SETTINGS[name]
    hf = hf_model(settings)
    enc = encoder_from_hf(hf.config.to_dict(), hf.state_dict()).eval()
    batch = padded_batch(length, settings["type_vocab_size"] > 0)
    difference = max_difference(hf, enc, batch)
    print(f"parity {name} (transformers -> fillmask): max |diff| = {difference:.2e}")
    assert difference < 1e-5


@pytest.mark.parametrize("name", ["v3", "v2-like"])
def test_parity_with_transformers_to_hf(name):
    settings, length = SETTINGS[name]
    torch.manual_seed(2)
    enc = DebertaEncoder(**_args(settings)).eval()
    hf = transformers.DebertaV2Model(transformers.DebertaV2Config.from_dict(hf_config(enc)))
    hf.load_state_dict(state_dict_to_hf(enc), strict=True)
    hf.eval()
    difference = max_difference(hf, enc, padded_batch(length, settings["type_vocab_size"] > 0))
    print(f"parity {name} (fillmask -> transformers): max |diff| = {difference:.2e}")
    assert difference < 1e-5


def _args(settings: dict) -> dict:
    from fillmask_deberta.hf import encoder_args_from_hf

    return encoder_args_from_hf(transformers.DebertaV2Config(**TINY, **settings).to_dict())


@pytest.mark.parametrize("options", [{}, dict(position_biased_input=True, type_vocab_size=2,
                                              embedding_size=16, share_att_key=False)])
def test_round_trip_is_bitwise(options):
    torch.manual_seed(3)
    enc = DebertaEncoder.preset("tiny", vocab_size=50, max_positions=32, **options)
    back = encoder_from_hf(hf_config(enc), state_dict_to_hf(enc, prefix="deberta."),
                           prefix="deberta.")
    assert back.spec() == enc.spec()
    mine, theirs = enc.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_import_from_masked_lm_checkpoint_ignores_the_head():
    settings, length = SETTINGS["v3-8-buckets"]
    torch.manual_seed(0)
    mlm = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**TINY, **settings))
    enc = encoder_from_hf(mlm.config.to_dict(), mlm.state_dict(), prefix="deberta.").eval()
    assert max_difference(mlm.deberta.eval(), enc, padded_batch(length, False)) < 1e-5


def test_gdes_token_table_is_materialised_on_export():
    from fillmask.objectives.rtd import ReplacedTokenDetection

    enc = DebertaEncoder.preset("tiny", vocab_size=50, max_positions=32)
    ReplacedTokenDetection(enc, generator_size_divisor=1, generator_layers=1,
                           embedding_sharing="gdes")
    with torch.no_grad():
        enc.token_embedding().delta.add_(1.0)
    exported = state_dict_to_hf(enc)["embeddings.word_embeddings.weight"]
    assert torch.equal(exported, enc.token_embedding().weight)


def test_configurations_transformers_cannot_express_are_refused():
    emd = DebertaEncoder.preset("tiny", vocab_size=50, enhanced_mask_decoder=True)
    with pytest.raises(UnsupportedConfig, match="enhanced_mask_decoder"):
        hf_config(emd)
    with pytest.raises(UnsupportedConfig, match="enhanced_mask_decoder"):
        state_dict_to_hf(emd)
    config = hf_model(SETTINGS["v3-8-buckets"][0]).config.to_dict()
    with pytest.raises(UnsupportedConfig, match="conv_kernel_size=3"):
        encoder_from_hf({**config, "conv_kernel_size": 3}, {})
    with pytest.raises(UnsupportedConfig, match="relative_attention=False"):
        encoder_from_hf({**config, "relative_attention": False}, {})
    with pytest.raises(UnsupportedConfig, match="model_type='deberta'"):
        encoder_from_hf({**config, "model_type": "deberta"}, {})
    with pytest.raises(UnsupportedConfig, match="lacks"):
        encoder_from_hf(config, {})


@pytest.mark.parametrize("legacy", [True, False], ids=["cls-predictions", "lm-predictions"])
def test_import_a_transformers_masked_lm_folder(tmp_path, legacy):
    """A DebertaV2ForMaskedLM folder (either head layout) becomes a fillmask MaskedLM with
    transformers' logits."""
    from fillmask.interop.hf import import_transformers

    torch.manual_seed(0)
    config = transformers.DebertaV2Config(**TINY, **dict(V3, max_relative_positions=512),
                                          legacy=legacy)
    reference = transformers.DebertaV2ForMaskedLM(config).eval()
    with torch.no_grad():  # trained-looking head: non-zero biases
        for name, parameter in reference.named_parameters():
            if "predictions" in name and name.endswith("bias"):
                parameter.normal_()
    reference.save_pretrained(tmp_path)
    model, tokenizer = import_transformers(tmp_path)
    assert tokenizer is None and type(model.encoder).__name__ == "DebertaEncoder"
    batch = padded_batch(40, types=False)
    mask = batch["attention_mask"]
    with torch.no_grad():
        theirs = reference(batch["input_ids"], attention_mask=mask.long()).logits
        ours = model.eval().head(model.encoder(batch["input_ids"], mask))
    assert (theirs - ours)[mask].abs().max() < 1e-5
