"""Weight mapping between fillmask's BERT and transformers' ``BertModel`` / ``BertForMaskedLM``:
export names, and import of a transformers folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from fillmask.architectures.bert import BertEncoder
from fillmask.errors import FillmaskError
from fillmask.heads import MLMHead

if TYPE_CHECKING:
    from fillmask.objectives.mlm import MaskedLM


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


def bert_config_dict(encoder: BertEncoder) -> dict[str, object]:
    """The transformers ``BertConfig`` fields that describe ``encoder`` (post-LN, learned
    positions and an MLP feed-forward only; ``unpad`` is an execution detail and exports)."""
    args = encoder.spec()["init_args"]
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


# Import: a transformers BERT folder (config.json + weights + tokenizer) as fillmask modules.

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


def encoder_from_hf_config(config: dict[str, Any], folder: Path) -> BertEncoder:
    """A post-LN BertEncoder with the shape a transformers ``BertConfig`` describes."""
    if config.get("model_type") not in (None, "bert"):
        raise HFImportError(f"{folder / 'config.json'} describes a {config.get('model_type')!r} "
                           "model; fillmask imports BERT (model_type 'bert') folders")
    activation = ACTIVATIONS_FROM_HF.get(config.get("hidden_act", "gelu"))
    if activation is None:
        raise HFImportError(f"{folder / 'config.json'}: hidden_act {config['hidden_act']!r} has "
                           f"no fillmask equivalent ({sorted(ACTIVATIONS_FROM_HF)})")
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


def import_bert(folder: str | Path) -> tuple[MaskedLM, Tokenizer | None]:
    """Load a transformers ``BertForMaskedLM`` (or ``BertModel``) folder as a fillmask
    :class:`MaskedLM` and its tokenizer (``None`` when the folder has none).

    Weights map one to one (the inverse of the export mapping); a folder without an MLM head
    gets a freshly initialised one.
    """
    from fillmask.data.tokenize import load_tokenizer
    from fillmask.objectives.mlm import MaskedLM

    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFImportError(f"{folder} has no config.json; give a transformers model folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    encoder = encoder_from_hf_config(config, folder)
    model = MaskedLM(encoder, tie_embeddings=config.get("tie_word_embeddings", True))
    weights = read_hf_weights(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
    missing = [k for k in _bert_tensors(encoder, prefix) if k not in weights
               and not k.endswith("token_type_embeddings.weight")]
    if missing:
        raise HFImportError(f"{folder}: the weights lack {missing[0]} (and {len(missing) - 1} "
                           "more); is it a BERT checkpoint?")
    _copy_into(encoder, model.head, weights, prefix)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer, _ = load_tokenizer(str(folder))
    return model, tokenizer


def _copy_into(encoder: BertEncoder, head: MLMHead, weights: dict[str, torch.Tensor],
               prefix: str) -> None:
    """Copy transformers-named ``weights`` into ``encoder`` and ``head`` (in place)."""
    targets = {**_bert_tensors(encoder, prefix), **_mlm_head_tensors(head)}
    tied = head.decoder is None
    with torch.no_grad():
        for name, target in targets.items():
            if name in weights and not (tied and name == "cls.predictions.decoder.weight"):
                target.copy_(weights[name])
