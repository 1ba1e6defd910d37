"""Weights both ways between :class:`DebertaEncoder` and transformers' ``DebertaV2Model``.

``hf_config`` gives the ``DebertaV2Config`` fields of an encoder, ``state_dict_to_hf`` its
weights under transformers' names, and ``encoder_from_hf`` builds an encoder from a config and
state dict (``prefix="deberta."`` reads the encoder out of ``DebertaV2ForMaskedLM``).
``to_transformers`` adds fillmask's MLM head as ``DebertaV2ForMaskedLM``'s (legacy BERT-style
``cls.predictions`` layout) for ``fillmask export``. Nothing here imports transformers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from fillmask.architectures.transformers_format import (
    TransformersModel,
    check_head_activation,
    mlm_head_weights,
)
from fillmask.heads import MLMHead
from fillmask_deberta.encoder import DebertaEncoder

# Module names: ours -> transformers'. Per-layer names sit below blocks.{i} / encoder.layer.{i}.
GLOBAL_NAMES = {
    "embeddings.tokens": "embeddings.word_embeddings",
    "embeddings.positions": "embeddings.position_embeddings",
    "embeddings.token_types": "embeddings.token_type_embeddings",
    "embeddings.project": "embeddings.embed_proj",
    "embeddings.norm": "embeddings.LayerNorm",
    "relative": "encoder.rel_embeddings",
    "relative_norm": "encoder.LayerNorm",
}
LAYER_NAMES = {
    "attention.query": "attention.self.query_proj",
    "attention.key": "attention.self.key_proj",
    "attention.value": "attention.self.value_proj",
    "attention.pos_key": "attention.self.pos_key_proj",
    "attention.pos_query": "attention.self.pos_query_proj",
    "attention.out": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
HF_ACTIVATIONS = {**{v: k for k, v in ACTIVATION_NAMES.items()}, "gelu_pytorch_tanh": "gelu_tanh"}
IGNORED = ("embeddings.position_ids",)  # a buffer older checkpoints saved


class UnsupportedConfig(ValueError):
    """A configuration one side has and the other cannot express."""


def _rename(name: str, layer_names: dict[str, str], global_names: dict[str, str],
            ours: str, theirs: str) -> str | None:
    """Map one parameter name between the two layouts (``ours``/``theirs``: the layer list
    prefixes on each side); None when it has no counterpart."""
    module, _, leaf = name.rpartition(".")
    match = re.fullmatch(rf"{re.escape(ours)}\.(\d+)\.(.+)", module)
    if match:
        renamed = layer_names.get(match.group(2))
        return None if renamed is None else f"{theirs}.{match.group(1)}.{renamed}.{leaf}"
    renamed = global_names.get(module)
    return None if renamed is None else f"{renamed}.{leaf}"


def hf_config(encoder: DebertaEncoder) -> dict[str, Any]:
    """``DebertaV2Config`` fields (``model_type: deberta-v2``) describing ``encoder``.

    Raises :class:`UnsupportedConfig` for what ``DebertaV2Model`` cannot run: the enhanced mask
    decoder (an MLM-head-side computation transformers does not have).
    """
    args = encoder.spec()["init_args"]
    if args["enhanced_mask_decoder"]:
        raise UnsupportedConfig("enhanced_mask_decoder=True has no equivalent in transformers' "
                                "DebertaV2Model (it would drop the decoder and its absolute "
                                "positions); export an encoder built without it")
    return {
        "model_type": "deberta-v2",
        "architectures": ["DebertaV2Model"],
        "vocab_size": args["vocab_size"],
        "hidden_size": args["hidden_size"],
        "embedding_size": encoder.embedding_size,
        "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_heads"],
        "intermediate_size": args["intermediate_size"],
        "hidden_act": ACTIVATION_NAMES[args["activation"]],
        "hidden_dropout_prob": args["dropout"],
        "attention_probs_dropout_prob": args["attention_dropout"],
        "max_position_embeddings": args["max_positions"],
        "type_vocab_size": args["type_vocab_size"],
        "initializer_range": args["initializer_range"],
        "layer_norm_eps": args["layer_norm_eps"],
        "relative_attention": True,
        "position_buckets": args["position_buckets"],
        "max_relative_positions": args["max_relative_positions"],
        "pos_att_type": list(args["pos_att_type"]),
        "share_att_key": args["share_att_key"],
        "norm_rel_ebd": "layer_norm" if args["relative_norm"] else "none",
        "position_biased_input": args["position_biased_input"],
        "conv_kernel_size": 0,
    }


def state_dict_to_hf(encoder: DebertaEncoder, prefix: str = "") -> dict[str, torch.Tensor]:
    """The encoder's weights under ``DebertaV2Model`` names, each preceded by ``prefix``.

    A token table that is not a plain embedding (GDES's shared + delta) is materialised.
    """
    hf_config(encoder)  # refuse what transformers cannot run
    tokens = encoder.embedding_tables()["tokens"].weight.detach()
    ours = {k: v for k, v in encoder.state_dict().items() if not k.startswith("embeddings.tokens")}
    ours["embeddings.tokens.weight"] = tokens
    out = {}
    for name, tensor in ours.items():
        renamed = _rename(name, LAYER_NAMES, GLOBAL_NAMES, "blocks", "encoder.layer")
        if renamed is None:
            raise UnsupportedConfig(f"DebertaEncoder weight {name} has no DebertaV2Model name")
        out[prefix + renamed] = tensor
    return out


def to_transformers(encoder: DebertaEncoder, head: nn.Module | None = None
                    ) -> TransformersModel:
    """``DebertaV2Model`` (no head) or ``DebertaV2ForMaskedLM`` (with fillmask's
    :class:`~fillmask.heads.MLMHead`, whose layout is the legacy ``cls.predictions`` one)."""
    config = hf_config(encoder)
    if head is None:
        return TransformersModel("DebertaV2Model", config, state_dict_to_hf(encoder))
    check_exportable_head(encoder, head)
    config.update(architectures=["DebertaV2ForMaskedLM"], legacy=True,
                  tie_word_embeddings=head.decoder is None)
    weights = state_dict_to_hf(encoder, prefix="deberta.")
    for ours, theirs in ((head.dense, "dense"), (head.norm, "LayerNorm")):
        weights[f"cls.predictions.transform.{theirs}.weight"] = ours.weight.detach()
        weights[f"cls.predictions.transform.{theirs}.bias"] = ours.bias.detach()
    weights["cls.predictions.decoder.weight"] = head.decoder_weight.detach()
    weights["cls.predictions.decoder.bias"] = head.bias.detach()
    weights["cls.predictions.bias"] = head.bias.detach()
    return TransformersModel("DebertaV2ForMaskedLM", config, weights)


def check_exportable_head(encoder: DebertaEncoder, head: nn.Module) -> None:
    """Raise :class:`UnsupportedConfig` unless ``head`` computes what the legacy
    ``DebertaV2ForMaskedLM`` head would (its transform uses the encoder's activation and
    LayerNorm epsilon)."""
    if not isinstance(head, MLMHead):
        raise UnsupportedConfig(f"{type(head).__name__} has no DebertaV2ForMaskedLM "
                                "equivalent; only fillmask.heads.MLMHead exports")
    args = encoder.spec()["init_args"]
    if args["activation"] != "gelu":
        raise UnsupportedConfig(f"activation={args['activation']!r}: DebertaV2ForMaskedLM's head "
                                "applies the encoder's activation where fillmask's applies "
                                "exact GELU; only gelu encoders export with their MLM head")
    if head.norm.eps != args["layer_norm_eps"]:
        raise UnsupportedConfig(f"the MLM head's LayerNorm has eps={head.norm.eps} but "
                                f"DebertaV2ForMaskedLM uses layer_norm_eps="
                                f"{args['layer_norm_eps']}; build it with MLMHead(..., eps=...)")


def encoder_args_from_hf(config: dict[str, Any]) -> dict[str, Any]:
    """DebertaEncoder arguments of a ``DebertaV2Config`` dict; :class:`UnsupportedConfig` for
    options the encoder does not implement (convolution layer, no relative attention, ...)."""
    kind = config.get("model_type", "deberta-v2")
    if kind != "deberta-v2":
        raise UnsupportedConfig(f"model_type={kind!r}: only deberta-v2 (v2 and v3) configs map "
                                "onto DebertaEncoder")
    if config.get("conv_kernel_size", 0) > 0:
        raise UnsupportedConfig(f"conv_kernel_size={config['conv_kernel_size']}: DebertaEncoder "
                                "has no convolution layer (DeBERTa-v2-xlarge's); it maps v3 and "
                                "conv-free v2 models only")
    if not config.get("relative_attention", False):
        raise UnsupportedConfig("relative_attention=False: DebertaEncoder always uses "
                                "disentangled relative attention")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("attention_head_size", hidden // heads) * heads != hidden:
        raise UnsupportedConfig(f"attention_head_size={config['attention_head_size']}: "
                                "DebertaEncoder needs heads x head size = hidden_size")
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise UnsupportedConfig(f"hidden_act={act!r} is not one of {sorted(HF_ACTIVATIONS)}")
    terms = config.get("pos_att_type") or []
    terms = [t.strip() for t in terms.lower().split("|")] if isinstance(terms, str) else terms
    norm = [t.strip() for t in str(config.get("norm_rel_ebd", "none")).lower().split("|")]
    embedding_size = config.get("embedding_size") or hidden
    return dict(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        intermediate_size=config["intermediate_size"],
        max_positions=config["max_position_embeddings"],
        embedding_size=None if embedding_size == hidden else embedding_size,
        type_vocab_size=config.get("type_vocab_size", 0),
        position_biased_input=config.get("position_biased_input", True),
        position_buckets=config.get("position_buckets", -1),
        max_relative_positions=config.get("max_relative_positions", -1),
        pos_att_type=tuple(terms),
        share_att_key=config.get("share_att_key", False),
        relative_norm="layer_norm" in norm,
        dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
        activation=HF_ACTIVATIONS[act],
        layer_norm_eps=config.get("layer_norm_eps", 1e-7),
        initializer_range=config.get("initializer_range", 0.02),
    )


def encoder_from_hf(config: dict[str, Any], state_dict: dict[str, torch.Tensor],
                    prefix: str = "") -> DebertaEncoder:
    """A DebertaEncoder with the weights of a ``DebertaV2Model`` (``config``: its
    ``DebertaV2Config`` as a dict; ``state_dict``: keys under ``prefix``; other keys, such as
    a masked-LM head's, are ignored)."""
    encoder = DebertaEncoder(**encoder_args_from_hf(config))
    wanted = set(encoder.state_dict())
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not name.startswith(prefix) or name[len(prefix):] in IGNORED:
            continue
        renamed = _rename(name[len(prefix):], _invert(LAYER_NAMES), _invert(GLOBAL_NAMES),
                          "encoder.layer", "blocks")
        if renamed is None or renamed not in wanted:
            if name.endswith("embeddings.position_embeddings.weight"):
                continue  # v3 checkpoints keep an unused absolute table
            raise UnsupportedConfig(f"{name} has no place in DebertaEncoder built from this "
                                    "config")
        ours[renamed] = tensor
    missing = sorted(wanted - set(ours))
    if missing:
        first = _rename(missing[0], LAYER_NAMES, GLOBAL_NAMES, "blocks", "encoder.layer")
        raise UnsupportedConfig(f"the state dict lacks {len(missing)} weight(s) the config "
                                f"needs, first {prefix}{first}")
    encoder.load_state_dict(ours)
    return encoder


def _invert(names: dict[str, str]) -> dict[str, str]:
    return {theirs: ours for ours, theirs in names.items()}


NEW_HEAD_NAMES = {"dense.weight": "dense.weight", "dense.bias": "dense.bias",
                  "norm.weight": "LayerNorm.weight", "norm.bias": "LayerNorm.bias",
                  "bias": "bias"}
"""MLMHead names -> the non-legacy ``DebertaV2ForMaskedLM`` head's (``lm_predictions.lm_head``,
decoding with the word embeddings)."""


def from_transformers(config: dict[str, Any], weights: dict[str, torch.Tensor]
                      ) -> tuple[DebertaEncoder, dict[str, torch.Tensor] | None]:
    """A ``DebertaV2Model`` / ``DebertaV2ForMaskedLM`` state dict as a DebertaEncoder and its
    MLM head's weights in MLMHead names (legacy ``cls.predictions`` or ``lm_predictions``
    layout; None without a head)."""
    prefix = "deberta." if any(k.startswith("deberta.") for k in weights) else ""
    encoder = encoder_from_hf(config, weights, prefix)
    head = (mlm_head_weights(weights, "cls.predictions.")
            or mlm_head_weights(weights, "lm_predictions.lm_head.", NEW_HEAD_NAMES))
    if head is not None:
        check_head_activation(config.get("hidden_act", "gelu"))
    return encoder, head


def native_head(encoder: DebertaEncoder, kind: str, head: nn.Module) -> TransformersModel | None:
    """``DebertaV2ForSequenceClassification`` (its context pooler with a tanh activation is
    fillmask's Linear -> tanh pooler on the first token) or ``DebertaV2ForTokenClassification``
    for fine-tuned heads; None for others (fillmask's remote code carries them)."""
    if kind not in ("sequence", "token"):
        return None
    config = hf_config(encoder)
    weights = state_dict_to_hf(encoder, prefix="deberta.")
    weights["classifier.weight"] = head.classifier.weight.detach()
    weights["classifier.bias"] = head.classifier.bias.detach()
    config.update(num_labels=head.classifier.out_features, cls_dropout=head.dropout.p)
    if kind == "token":
        return TransformersModel("DebertaV2ForTokenClassification", config, weights)
    weights["pooler.dense.weight"] = head.pooler.weight.detach()
    weights["pooler.dense.bias"] = head.pooler.bias.detach()
    config.update(pooler_hidden_size=encoder.hidden_size, pooler_hidden_act="tanh",
                  pooler_dropout=head.dropout.p)
    return TransformersModel("DebertaV2ForSequenceClassification", config, weights)
