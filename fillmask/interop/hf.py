"""Weight mapping between fillmask's BERT and transformers' ``BertModel`` / ``BertForMaskedLM``:
export names, and import of a transformers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from fillmask.architectures.base import Encoder
from fillmask.architectures.bert import BertEncoder
from fillmask.errors import FillmaskError
from fillmask.heads import MaskedLMParts, MLMHead

if TYPE_CHECKING:
    from fillmask.objectives.mlm import MaskedLM
    from fillmask.objectives.rtd import ReplacedTokenDetection


@dataclass
class TransformersModel:
    """A fillmask model in transformers' terms: what ``fillmask export`` writes."""

    architecture: str
    """The transformers class that loads it, e.g. ``BertForMaskedLM``."""
    config: dict[str, Any]
    """``config.json`` fields, ``model_type`` included."""
    weights: dict[str, torch.Tensor]
    """The state dict under the transformers class's parameter names."""


def bert_to_transformers(encoder: BertEncoder, head: MLMHead | None) -> TransformersModel:
    """``BertForMaskedLM`` (with ``head``) or ``BertModel`` (without)."""
    config = {"model_type": "bert", **bert_config_dict(encoder)}
    if head is None:
        return TransformersModel("BertModel", config, bert_state_dict_to_hf(encoder))
    weights = {**bert_state_dict_to_hf(encoder, "bert."), **mlm_head_state_dict_to_hf(head)}
    config["tie_word_embeddings"] = head.decoder is None
    return TransformersModel("BertForMaskedLM", config, weights)


def bert_config_dict(encoder: BertEncoder, factorised: bool = False) -> dict[str, object]:
    """The transformers ``BertConfig`` fields that describe ``encoder`` (post-LN, learned
    positions and an MLP feed-forward only; ``unpad`` is an execution detail and exports).
    ``factorised``: allow ELECTRA's embedding size (``ElectraConfig`` has one)."""
    args = encoder.spec()["init_args"]
    if factorised:
        args = {**args, "embedding_size": None}
    if args.get("positions", "learned") != "learned":
        raise ValueError(f"positions={args['positions']!r} (MosaicBERT's ALiBi attention biases) "
                         "has no transformers BertModel equivalent, which only has learned "
                         "absolute positions; export encoders with positions='learned'")
    if args.get("ffn", "mlp") != "mlp":
        raise ValueError(f"ffn={args['ffn']!r} (a gated-linear-unit feed-forward) has no "
                         "transformers BertModel equivalent; export encoders with ffn='mlp'")
    if args["norm"] != "post" or not args["embedding_norm"]:
        raise ValueError("only post-LN BertEncoders with an embedding LayerNorm have a "
                         "transformers BertModel equivalent")
    if args.get("embedding_size") not in (None, args["hidden_size"]) or args.get("share_layers"):
        raise ValueError("factorised embeddings and shared layers (ALBERT) have no transformers "
                         "BertModel equivalent")
    activation = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[args["activation"]]
    return {
        "vocab_size": args["vocab_size"], "hidden_size": args["hidden_size"],
        "num_hidden_layers": args["num_layers"], "num_attention_heads": args["num_heads"],
        "intermediate_size": args["intermediate_size"], "hidden_act": activation,
        "hidden_dropout_prob": args["dropout"],
        "attention_probs_dropout_prob": args["attention_dropout"],
        "max_position_embeddings": args["max_positions"],
        "type_vocab_size": args["type_vocab_size"], "layer_norm_eps": args["layer_norm_eps"],
        "initializer_range": args["initializer_range"],
    }


def electra_to_transformers(model: ReplacedTokenDetection) -> dict[str, TransformersModel]:
    """An ELECTRA run with BERT encoders as ``ElectraForPreTraining`` (the discriminator and
    its replaced-token head, GDES deltas merged) and ``ElectraForMaskedLM`` (the generator)."""
    discriminator, generator = model.discriminator(), model.generator
    disc_weights = _electra_tensors(discriminator)
    head = model.discriminator_head
    _linear(disc_weights, "discriminator_predictions.dense", head.dense)
    _linear(disc_weights, "discriminator_predictions.dense_prediction", head.score)
    gen_weights = _electra_tensors(generator)
    gen_head = model.generator_head
    _linear(gen_weights, "generator_predictions.dense", gen_head.dense)
    _norm(gen_weights, "generator_predictions.LayerNorm", gen_head.norm)
    gen_weights["generator_lm_head.weight"] = gen_head.decoder_weight
    gen_weights["generator_lm_head.bias"] = gen_head.bias
    return {
        "discriminator": TransformersModel("ElectraForPreTraining",
                                           _electra_config(discriminator), _detached(disc_weights)),
        "generator": TransformersModel(
            "ElectraForMaskedLM",
            {**_electra_config(generator), "tie_word_embeddings": gen_head.decoder is None},
            _detached(gen_weights)),
    }


def _electra_config(encoder: BertEncoder) -> dict[str, object]:
    return {"model_type": "electra", **bert_config_dict(encoder, factorised=True),
            "embedding_size": encoder.embedding_size}


def _electra_tensors(encoder: BertEncoder) -> dict[str, torch.Tensor]:
    """ElectraModel names: BERT's under ``electra.``, plus the embedding projection."""
    out = _bert_tensors(encoder, "electra.")
    project = encoder.embeddings.project
    if isinstance(project, torch.nn.Linear):
        _linear(out, "electra.embeddings_project", project)
    return out


def _detached(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}


def bert_state_dict_to_hf(encoder: BertEncoder, prefix: str = "") -> dict[str, torch.Tensor]:
    """``encoder``'s weights under ``BertModel``'s names (``prefix`` e.g. ``"bert."``)."""
    return {k: v.detach().clone() for k, v in _bert_tensors(encoder, prefix).items()}


def _bert_tensors(encoder: BertEncoder, prefix: str) -> dict[str, torch.Tensor]:
    """The live parameters (query/key/value as views of the fused matrix) by transformers name."""
    out: dict[str, torch.Tensor] = {}
    emb = encoder.embeddings
    for ours, theirs in ((emb.tokens, "word"), (emb.positions, "position"),
                         (emb.token_types, "token_type")):
        out[f"{prefix}embeddings.{theirs}_embeddings.weight"] = ours.weight
    _norm(out, f"{prefix}embeddings.LayerNorm", emb.norm)
    for i, block in enumerate(encoder.blocks):
        layer = f"{prefix}encoder.layer.{i}"
        for name, weight in zip(("query", "key", "value"),
                                block.attention.qkv.weight.chunk(3), strict=True):
            out[f"{layer}.attention.self.{name}.weight"] = weight
        if block.attention.qkv.bias is not None:
            for name, bias in zip(("query", "key", "value"),
                                  block.attention.qkv.bias.chunk(3), strict=True):
                out[f"{layer}.attention.self.{name}.bias"] = bias
        _linear(out, f"{layer}.attention.output.dense", block.attention.out)
        _norm(out, f"{layer}.attention.output.LayerNorm", block.attention_norm)
        _linear(out, f"{layer}.intermediate.dense", block.ffn.up)
        _linear(out, f"{layer}.output.dense", block.ffn.down)
        _norm(out, f"{layer}.output.LayerNorm", block.ffn_norm)
    return out


def mlm_head_state_dict_to_hf(head: MLMHead) -> dict[str, torch.Tensor]:
    """The MLM head under ``BertForMaskedLM``'s ``cls.predictions`` names."""
    return {k: v.detach().clone() for k, v in _mlm_head_tensors(head).items()}


def _mlm_head_tensors(head: MLMHead) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    _linear(out, "cls.predictions.transform.dense", head.dense)
    _norm(out, "cls.predictions.transform.LayerNorm", head.norm)
    out["cls.predictions.decoder.weight"] = head.decoder_weight
    out["cls.predictions.bias"] = head.bias
    out["cls.predictions.decoder.bias"] = head.bias
    return out


def _linear(out: dict[str, torch.Tensor], name: str, layer: torch.nn.Linear) -> None:
    out[f"{name}.weight"] = layer.weight
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias


def _norm(out: dict[str, torch.Tensor], name: str, norm: torch.nn.LayerNorm) -> None:
    out[f"{name}.weight"] = norm.weight
    out[f"{name}.bias"] = norm.bias


# Import: a transformers folder (config.json + weights + tokenizer) as fillmask modules.

ACTIVATIONS_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "relu": "relu"}


class HFImportError(FillmaskError):
    """A transformers folder fillmask cannot import, with the file and the reason."""


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Weights of a transformers folder (``model.safetensors`` or ``pytorch_model.bin``), with
    legacy LayerNorm names (``gamma``/``beta``) renamed to ``weight``/``bias``."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise HFImportError(f"{folder} has no model.safetensors or pytorch_model.bin")
    renamed = {}
    for name, value in weights.items():
        name = name.removesuffix(".gamma") + ".weight" if name.endswith(".gamma") else name
        name = name.removesuffix(".beta") + ".bias" if name.endswith(".beta") else name
        renamed[name] = value
    return renamed


def encoder_from_hf_config(config: dict[str, Any]) -> BertEncoder:
    """A post-LN BertEncoder with the shape a transformers ``BertConfig`` describes."""
    activation = ACTIVATIONS_FROM_HF.get(config.get("hidden_act", "gelu"))
    if activation is None:
        raise ValueError(f"hidden_act {config['hidden_act']!r} has no fillmask equivalent "
                         f"({sorted(ACTIVATIONS_FROM_HF)})")
    return BertEncoder(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_positions=config.get("max_position_embeddings", 512),
        type_vocab_size=config.get("type_vocab_size", 2),
        dropout=config.get("hidden_dropout_prob", 0.1),
        attention_dropout=config.get("attention_probs_dropout_prob", 0.1),
        activation=activation, norm="post", layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        initializer_range=config.get("initializer_range", 0.02),
    )


def bert_from_transformers(config: dict[str, Any], weights: dict[str, torch.Tensor]
                           ) -> tuple[BertEncoder, dict[str, torch.Tensor] | None]:
    """A ``BertModel`` / ``BertForMaskedLM`` state dict as a BertEncoder, and its MLM head's
    weights under :class:`~fillmask.heads.MLMHead` names (None without a head)."""
    encoder = encoder_from_hf_config(config)
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    targets = _bert_tensors(encoder, prefix)
    missing = [k for k in targets if k not in weights
               and not k.endswith("token_type_embeddings.weight")]
    if missing:
        raise ValueError(f"the weights lack {missing[0]} (and {len(missing) - 1} more); is it "
                         "a BERT checkpoint?")
    with torch.no_grad():
        for name, target in targets.items():
            if name in weights:
                target.copy_(weights[name])
    head = mlm_head_weights(weights, "cls.predictions.")
    if head is not None:
        check_head_activation(config.get("hidden_act", "gelu"))
    return encoder, head


def check_head_activation(activation: str) -> None:
    """BERT-layout heads apply the config's activation; fillmask's MLMHead applies exact GELU."""
    if activation != "gelu":
        raise ValueError(f"its MLM head applies {activation!r} where fillmask's MLMHead applies "
                         "exact GELU ('gelu'); import the encoder without the head")


def mlm_head_weights(weights: dict[str, torch.Tensor], prefix: str,
                     names: dict[str, str] | None = None) -> dict[str, torch.Tensor] | None:
    """The BERT-layout MLM head under ``prefix`` (``transform.dense``, ``transform.LayerNorm``,
    ``decoder``, ``bias``) in MLMHead names; None when the weights have no head. ``names``
    (MLMHead name -> transformers name below ``prefix``) describes other layouts."""
    names = names or {"dense.weight": "transform.dense.weight",
                      "dense.bias": "transform.dense.bias",
                      "norm.weight": "transform.LayerNorm.weight",
                      "norm.bias": "transform.LayerNorm.bias",
                      "decoder": "decoder.weight", "bias": "bias"}
    found = {ours: weights[prefix + theirs] for ours, theirs in names.items()
             if prefix + theirs in weights}
    return found if "dense.weight" in found else None


def load_head(head: MLMHead, weights: dict[str, torch.Tensor]) -> None:
    """Copy MLMHead-named ``weights`` into ``head``; a missing bias stays zero (heads without
    one), the decoder is copied only when the head has its own."""
    with torch.no_grad():
        for name, target in (("dense.weight", head.dense.weight), ("norm.weight", head.norm.weight),
                             ("dense.bias", head.dense.bias), ("norm.bias", head.norm.bias),
                             ("bias", head.bias)):
            if name in weights:
                target.copy_(weights[name])
            elif name.endswith("bias"):
                target.zero_()
        if head.decoder is not None and "decoder" in weights:
            head.decoder.copy_(weights["decoder"])


def architecture_for(model_type: str, source: str = "the folder") -> type[Encoder]:
    """The registered architecture whose ``transformers_model_types`` has ``model_type``
    (``source``, e.g. the config file, names where it was read in the error)."""
    from fillmask.registry import architectures

    classes = [component.cls for component in architectures().values()]
    for cls in classes:
        if model_type in getattr(cls, "transformers_model_types", ()):
            return cls
    known = sorted(t for cls in classes for t in getattr(cls, "transformers_model_types", ()))
    raise HFImportError(f"{source} has model_type {model_type!r}, which no installed "
                        f"architecture imports (known: {', '.join(known)}); install the plugin "
                        "that provides it")


def read_transformers(folder: str | Path) -> tuple[MaskedLMParts, Tokenizer | None]:
    """Load a transformers folder (``config.json``, weights, optionally ``tokenizer.json``) as
    a fillmask encoder with its MLM head, and its tokenizer (``None`` when the folder has none).

    The architecture comes from ``model_type`` (``bert`` built in; plugins add theirs, e.g.
    ``deberta-v2``, ``modernbert``). Weights map one to one (the inverse of the export); a
    folder without an MLM head gets a freshly initialised one. Torch alone: no objective.
    """
    from fillmask.data.tokenize import load_tokenizer

    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFImportError(f"{folder} has no config.json; give a transformers model folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    cls = architecture_for(config.get("model_type", "bert"), str(config_file))
    try:
        encoder, head = cls.from_transformers(config, read_hf_weights(folder))
    except (ValueError, KeyError) as error:
        raise HFImportError(f"{folder} cannot be imported as {cls.__name__}: {error}") from error
    parts = MaskedLMParts(encoder, tied=config.get("tie_word_embeddings", True))
    if head is not None:
        load_head(parts.head, head)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer, _ = load_tokenizer(str(folder))
    return parts, tokenizer


def import_transformers(folder: str | Path) -> tuple[MaskedLM, Tokenizer | None]:
    """A transformers folder as a fillmask :class:`MaskedLM` (encoder and MLM head, see
    :func:`read_transformers`) and its tokenizer, ready to train further or distil from."""
    from fillmask.objectives.mlm import MaskedLM

    parts, tokenizer = read_transformers(folder)
    model = MaskedLM(parts.encoder, tie_embeddings=parts.head.decoder is None)
    model.head.load_state_dict(parts.head.state_dict())
    return model, tokenizer


import_bert = import_transformers  # the name earlier releases used
