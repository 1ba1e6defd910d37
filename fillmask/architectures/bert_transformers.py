"""BertEncoder in transformers' terms, both ways: its mapping module (see
:mod:`fillmask.architectures.transformers_format` for what a mapping module defines).

Which class computes what a BertEncoder computes:

- post-LN blocks with an embedding LayerNorm, learned positions, an MLP feed-forward with
  biases: with shared layers ``AlbertModel`` (``AlbertForMaskedLM`` for GELU encoders, whose
  head applies the encoder's activation; ``AlbertForSequenceClassification`` and
  ``...ForTokenClassification``), else ``BertModel`` (``BertForMaskedLM`` when the activation
  is exact GELU, as fillmask's MLM head's is; ``ElectraForMaskedLM``, whose head always applies
  GELU, otherwise), and with factorised embeddings ``ElectraModel`` / ``ElectraForMaskedLM``;
  ``ElectraForPreTraining`` for a GELU discriminator; ``BertForSequenceClassification`` and
  ``BertForTokenClassification`` for fine-tuned unfactorised encoders;
- every other option (pre-LN, no embedding norm, ALiBi, GLU, no biases):
  no transformers class, so :func:`remote_backbone` hands the constructor arguments and
  weights to fillmask's remote-code encoder, whose parameter names are these.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fillmask.architectures.bert import BertEncoder
from fillmask.architectures.transformers_format import (
    HeadKind,
    TransformersModel,
    check_head_activation,
    detached,
    linear_tensors,
    mlm_head_weights,
    norm_tensors,
)

ACTIVATIONS_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "relu": "relu"}


def native_blocker(encoder: BertEncoder) -> str | None:
    """Why no transformers BERT/ELECTRA class computes ``encoder``, or None when one does."""
    args = encoder.spec()["init_args"]
    if args.get("positions", "learned") != "learned":
        return f"positions={args['positions']!r} (ALiBi attention biases)"
    if args.get("ffn", "mlp") != "mlp":
        return f"ffn={args['ffn']!r} (a gated-linear-unit feed-forward)"
    if args["norm"] != "post":
        return f"norm={args['norm']!r} (pre-LN blocks)"
    if not args["embedding_norm"]:
        return "embedding_norm=false"
    if not args.get("bias", True):
        return "bias=false"
    return None


def factorised(encoder: BertEncoder) -> bool:
    return encoder.embedding_size != encoder.hidden_size


def shared(encoder: BertEncoder) -> bool:
    return bool(encoder.spec()["init_args"].get("share_layers"))


def bert_config_dict(encoder: BertEncoder) -> dict[str, object]:
    """The ``BertConfig`` / ``ElectraConfig`` fields that describe ``encoder``; ValueError when
    no transformers class computes it (``unpad`` is an execution detail and exports)."""
    blocker = native_blocker(encoder)
    if blocker is not None:
        raise ValueError(f"{blocker} has no transformers BertModel equivalent")
    args = encoder.spec()["init_args"]
    return {
        "vocab_size": args["vocab_size"], "hidden_size": args["hidden_size"],
        "num_hidden_layers": args["num_layers"], "num_attention_heads": args["num_heads"],
        "intermediate_size": args["intermediate_size"],
        "hidden_act": ACTIVATIONS_TO_HF[args["activation"]],
        "hidden_dropout_prob": args["dropout"],
        "attention_probs_dropout_prob": args["attention_dropout"],
        "max_position_embeddings": args["max_positions"],
        "type_vocab_size": args["type_vocab_size"], "layer_norm_eps": args["layer_norm_eps"],
        "initializer_range": args["initializer_range"],
    }


def _config(encoder: BertEncoder, electra: bool) -> dict[str, object]:
    if shared(encoder):
        raise ValueError("share_layers=true: only ALBERT's classes share blocks")
    if not electra:
        if factorised(encoder):
            raise ValueError("factorised embeddings have no transformers BertModel equivalent")
        return {"model_type": "bert", **bert_config_dict(encoder)}
    return {"model_type": "electra", **bert_config_dict(encoder),
            "embedding_size": encoder.embedding_size}


def to_transformers(encoder: BertEncoder, head: nn.Module | None = None) -> TransformersModel:
    """``BertModel`` / ``BertForMaskedLM``, or ELECTRA's or ALBERT's classes where only they
    compute it."""
    if shared(encoder):
        return albert_to_transformers(encoder, head)
    electra = factorised(encoder) or (head is not None and encoder.spec()["init_args"][
        "activation"] != "gelu")
    config = _config(encoder, electra)
    prefix = "electra." if electra else "bert."
    if head is None:
        name = "ElectraModel" if electra else "BertModel"
        return TransformersModel(name, config, detached(_encoder_tensors(encoder, "", electra)))
    weights = _encoder_tensors(encoder, prefix, electra)
    config["tie_word_embeddings"] = head.decoder is None
    if electra:
        linear_tensors(weights, "generator_predictions.dense", head.dense)
        norm_tensors(weights, "generator_predictions.LayerNorm", head.norm)
        weights["generator_lm_head.weight"] = head.decoder_weight
        weights["generator_lm_head.bias"] = head.bias
        return TransformersModel("ElectraForMaskedLM", config, detached(weights))
    linear_tensors(weights, "cls.predictions.transform.dense", head.dense)
    norm_tensors(weights, "cls.predictions.transform.LayerNorm", head.norm)
    weights["cls.predictions.decoder.weight"] = head.decoder_weight
    weights["cls.predictions.bias"] = head.bias
    weights["cls.predictions.decoder.bias"] = head.bias
    return TransformersModel("BertForMaskedLM", config, detached(weights))


def native_head(encoder: BertEncoder, kind: HeadKind, head: nn.Module) -> TransformersModel | None:
    """``ElectraForPreTraining`` for a GELU discriminator's replaced-token head;
    ``BertForSequenceClassification`` / ``BertForTokenClassification`` /
    ``BertForQuestionAnswering`` (ALBERT's for shared layers) for fine-tuned heads of
    unfactorised encoders; None for what only remote code computes."""
    if native_blocker(encoder) is not None:
        return None
    activation = encoder.spec()["init_args"]["activation"]
    if kind == "rtd":
        if activation != "gelu" or shared(encoder):  # the head applies hidden_act
            return None
        weights = _encoder_tensors(encoder, "electra.", True)
        linear_tensors(weights, "discriminator_predictions.dense", head.dense)
        linear_tensors(weights, "discriminator_predictions.dense_prediction", head.score)
        return TransformersModel("ElectraForPreTraining", _config(encoder, True),
                                 detached(weights))
    if kind not in ("sequence", "token", "qa") or (factorised(encoder) and not shared(encoder)):
        return None
    family, prefix = ("Albert", "albert.") if shared(encoder) else ("Bert", "bert.")
    if shared(encoder):
        weights, config = _albert_tensors(encoder, prefix), _albert_config(encoder)
        pooler = "albert.pooler"
    else:
        weights, config = _encoder_tensors(encoder, prefix, False), _config(encoder, False)
        pooler = "bert.pooler.dense"
    if kind == "qa":  # the start/end Linear itself
        linear_tensors(weights, "qa_outputs", head)
        return TransformersModel(f"{family}ForQuestionAnswering", {**config, "num_labels": 2},
                                 detached(weights))
    if kind == "sequence":
        linear_tensors(weights, pooler, head.pooler)
    linear_tensors(weights, "classifier", head.classifier)
    config.update(num_labels=head.classifier.out_features, classifier_dropout=head.dropout.p,
                  classifier_dropout_prob=head.dropout.p)
    name = f"{family}For{'Sequence' if kind == 'sequence' else 'Token'}Classification"
    return TransformersModel(name, config, detached(weights))


def albert_to_transformers(encoder: BertEncoder, head: nn.Module | None) -> TransformersModel:
    """``AlbertModel``, or ``AlbertForMaskedLM`` when the encoder's activation is exact GELU
    (ALBERT's MLM head applies the encoder's activation, fillmask's always GELU)."""
    config = _albert_config(encoder)
    if head is None:
        return TransformersModel("AlbertModel", config, detached(_albert_tensors(encoder, "")))
    if encoder.spec()["init_args"]["activation"] != "gelu":
        raise ValueError("AlbertForMaskedLM's head applies the encoder's activation")
    weights = _albert_tensors(encoder, "albert.")
    linear_tensors(weights, "predictions.dense", head.dense)
    norm_tensors(weights, "predictions.LayerNorm", head.norm)
    weights["predictions.decoder.weight"] = head.decoder_weight
    weights["predictions.decoder.bias"] = head.bias
    weights["predictions.bias"] = head.bias
    config["tie_word_embeddings"] = head.decoder is None
    return TransformersModel("AlbertForMaskedLM", config, detached(weights))


def _albert_config(encoder: BertEncoder) -> dict[str, object]:
    return {"model_type": "albert", **bert_config_dict(encoder),
            "embedding_size": encoder.embedding_size, "num_hidden_groups": 1,
            "inner_group_num": 1}


def _embedding_tensors(encoder: BertEncoder, prefix: str) -> dict[str, torch.Tensor]:
    """The three tables and their LayerNorm, by the names BERT, ELECTRA and ALBERT share."""
    out: dict[str, torch.Tensor] = {}
    emb = encoder.embeddings
    out[f"{prefix}embeddings.word_embeddings.weight"] = encoder.embedding_tables()["tokens"].weight
    out[f"{prefix}embeddings.position_embeddings.weight"] = emb.positions.weight
    out[f"{prefix}embeddings.token_type_embeddings.weight"] = emb.token_types.weight
    norm_tensors(out, f"{prefix}embeddings.LayerNorm", emb.norm)
    return out


def _albert_tensors(encoder: BertEncoder, prefix: str) -> dict[str, torch.Tensor]:
    """ALBERT's names: embeddings in E, the projection to C (the identity when E = C), and
    the one shared block."""
    out = _embedding_tensors(encoder, prefix)
    emb = encoder.embeddings
    mapping = f"{prefix}encoder.embedding_hidden_mapping_in"
    if isinstance(emb.project, nn.Linear):
        linear_tensors(out, mapping, emb.project)
    else:
        out[f"{mapping}.weight"] = torch.eye(encoder.hidden_size)
        out[f"{mapping}.bias"] = torch.zeros(encoder.hidden_size)
    block = encoder.blocks[0]
    layer = f"{prefix}encoder.albert_layer_groups.0.albert_layers.0"
    for name, weight, bias in zip(("query", "key", "value"), block.attention.qkv.weight.chunk(3),
                                  block.attention.qkv.bias.chunk(3), strict=True):
        out[f"{layer}.attention.{name}.weight"], out[f"{layer}.attention.{name}.bias"] = (
            weight, bias)
    linear_tensors(out, f"{layer}.attention.dense", block.attention.out)
    norm_tensors(out, f"{layer}.attention.LayerNorm", block.attention_norm)
    linear_tensors(out, f"{layer}.ffn", block.ffn.up)
    linear_tensors(out, f"{layer}.ffn_output", block.ffn.down)
    norm_tensors(out, f"{layer}.full_layer_layer_norm", block.ffn_norm)
    return out


def remote_backbone(encoder: BertEncoder) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The constructor arguments (``model_type: fillmask-bert``) and weights, under fillmask's
    own names, that the remote-code encoder rebuilds ``encoder`` from."""
    weights = {k: v for k, v in encoder.state_dict().items()
               if not k.startswith("embeddings.tokens.")}
    weights["embeddings.tokens.weight"] = encoder.embedding_tables()["tokens"].weight
    spec = {"model_type": "fillmask-bert", **encoder.spec()["init_args"]}
    return spec, detached(weights)


def _encoder_tensors(encoder: BertEncoder, prefix: str, electra: bool) -> dict[str, torch.Tensor]:
    """The live parameters (query/key/value as views of the fused matrix) by transformers name:
    BERT's, plus ELECTRA's embedding projection."""
    out = _embedding_tensors(encoder, prefix)
    emb = encoder.embeddings
    if electra and isinstance(emb.project, nn.Linear):
        linear_tensors(out, f"{prefix}embeddings_project", emb.project)
    for i, block in enumerate(encoder.blocks):
        layer = f"{prefix}encoder.layer.{i}"
        names = ("query", "key", "value")
        for name, weight in zip(names, block.attention.qkv.weight.chunk(3), strict=True):
            out[f"{layer}.attention.self.{name}.weight"] = weight
        for name, bias in zip(names, block.attention.qkv.bias.chunk(3), strict=True):
            out[f"{layer}.attention.self.{name}.bias"] = bias
        linear_tensors(out, f"{layer}.attention.output.dense", block.attention.out)
        norm_tensors(out, f"{layer}.attention.output.LayerNorm", block.attention_norm)
        linear_tensors(out, f"{layer}.intermediate.dense", block.ffn.up)
        linear_tensors(out, f"{layer}.output.dense", block.ffn.down)
        norm_tensors(out, f"{layer}.output.LayerNorm", block.ffn_norm)
    return out


# Import: the inverse.


def encoder_from_hf_config(config: dict[str, Any], share_layers: bool = False) -> BertEncoder:
    """A post-LN BertEncoder with the shape a ``BertConfig`` / ``ElectraConfig`` (or, with
    ``share_layers``, an ``AlbertConfig``) describes."""
    activation = ACTIVATIONS_FROM_HF.get(config.get("hidden_act", "gelu"))
    if activation is None:
        raise ValueError(f"hidden_act {config['hidden_act']!r} has no fillmask equivalent "
                         f"({sorted(ACTIVATIONS_FROM_HF)})")
    hidden = config["hidden_size"]
    embedding_size = config.get("embedding_size") if config.get("model_type") == "electra" else None
    return BertEncoder(
        vocab_size=config["vocab_size"], hidden_size=hidden,
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_positions=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
        activation=activation, norm="post", layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        initializer_range=config.get("initializer_range", 0.02),
        embedding_size=None if embedding_size in (None, hidden) else embedding_size,
        share_layers=share_layers,
    )


def copy_into(targets: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
              family: str) -> None:
    """Copy ``weights`` into the live ``targets`` by transformers name; every target must be
    there except the token-type table (models without segments keep theirs)."""
    missing = [k for k in targets if k not in weights
               and not k.endswith("token_type_embeddings.weight")]
    if missing:
        raise ValueError(f"the weights lack {missing[0]} (and {len(missing) - 1} more); is it "
                         f"{family} checkpoint?")
    with torch.no_grad():
        for name, target in targets.items():
            if name in weights:
                target.copy_(weights[name])


ELECTRA_HEAD_NAMES = {"dense.weight": "generator_predictions.dense.weight",
                      "dense.bias": "generator_predictions.dense.bias",
                      "norm.weight": "generator_predictions.LayerNorm.weight",
                      "norm.bias": "generator_predictions.LayerNorm.bias",
                      "decoder": "generator_lm_head.weight", "bias": "generator_lm_head.bias"}


def from_transformers(config: dict[str, Any], weights: dict[str, torch.Tensor]
                      ) -> tuple[BertEncoder, dict[str, torch.Tensor] | None]:
    """A BERT or ELECTRA model's state dict (any head), or fillmask's remote-code encoder
    (``model_type: fillmask-bert``), as a BertEncoder, and its MLM head's weights under
    :class:`~fillmask.heads.MLMHead` names (None without one)."""
    if config.get("model_type") == "fillmask-bert":
        return _from_remote(config, weights), None
    if config.get("model_type") == "albert":
        return _from_albert(config, weights)
    electra = config.get("model_type") == "electra"
    encoder = encoder_from_hf_config(config)
    prefix = next((p for p in ("bert.", "electra.") if any(k.startswith(p) for k in weights)), "")
    targets = _encoder_tensors(encoder, prefix, electra)
    copy_into(targets, weights, "an ELECTRA" if electra else "a BERT")
    if electra:
        return encoder, mlm_head_weights(weights, "", ELECTRA_HEAD_NAMES)
    head = mlm_head_weights(weights, "cls.predictions.")
    if head is not None:
        check_head_activation(config.get("hidden_act", "gelu"))
    return encoder, head


def _from_albert(config: dict[str, Any], weights: dict[str, torch.Tensor]
                 ) -> tuple[BertEncoder, dict[str, torch.Tensor] | None]:
    if config.get("num_hidden_groups", 1) != 1 or config.get("inner_group_num", 1) != 1:
        raise ValueError("num_hidden_groups and inner_group_num other than 1 have no fillmask "
                         "equivalent (one shared block)")
    hidden, width = config["hidden_size"], config.get("embedding_size", 128)
    encoder = encoder_from_hf_config({**config, "model_type": "electra"}, share_layers=True)
    prefix = "albert." if any(k.startswith("albert.") for k in weights) else ""
    targets = _albert_tensors(encoder, prefix)
    mapping = f"{prefix}encoder.embedding_hidden_mapping_in"
    if width == hidden:  # fillmask has no projection at E = C: it must be the identity
        identity = (torch.equal(weights[f"{mapping}.weight"], torch.eye(hidden))
                    and not weights[f"{mapping}.bias"].any())
        if not identity:
            raise ValueError("embedding_hidden_mapping_in is not the identity at "
                             "embedding_size = hidden_size; fillmask has no such projection")
        targets = {k: v for k, v in targets.items() if not k.startswith(mapping)}
    copy_into(targets, weights, "an ALBERT")
    head = mlm_head_weights(weights, "predictions.", ALBERT_HEAD_NAMES)
    if head is not None:
        check_head_activation(config.get("hidden_act", "gelu"))
    return encoder, head


ALBERT_HEAD_NAMES = {"dense.weight": "dense.weight", "dense.bias": "dense.bias",
                     "norm.weight": "LayerNorm.weight", "norm.bias": "LayerNorm.bias",
                     "decoder": "decoder.weight", "bias": "bias"}


def _from_remote(spec: dict[str, Any], weights: dict[str, torch.Tensor]) -> BertEncoder:
    args = {k: v for k, v in spec.items() if k != "model_type"}
    encoder = BertEncoder(**args)
    state = encoder.state_dict()
    if set(state) != set(weights):
        extra, lacking = sorted(set(weights) - set(state)), sorted(set(state) - set(weights))
        raise ValueError(f"its weights do not match its configuration (lacking {lacking[:3]}, "
                         f"unexpected {extra[:3]})")
    encoder.load_state_dict(weights)
    return encoder
