"""Weight mapping between fillmask's BERT and transformers' ``BertModel`` / ``BertForMaskedLM``."""

from __future__ import annotations

import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.heads import MLMHead


def bert_config_dict(encoder: BertEncoder) -> dict[str, object]:
    """The transformers ``BertConfig`` fields that describe ``encoder`` (post-LN only)."""
    args = encoder.spec()["init_args"]
    if args["norm"] != "post" or not args["embedding_norm"]:
        raise ValueError("only post-LN BertEncoders with an embedding LayerNorm have a "
                         "transformers BertModel equivalent")
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
    return {k: v.detach().clone() for k, v in out.items()}


def mlm_head_state_dict_to_hf(head: MLMHead) -> dict[str, torch.Tensor]:
    """The MLM head under ``BertForMaskedLM``'s ``cls.predictions`` names."""
    out: dict[str, torch.Tensor] = {}
    _linear(out, "cls.predictions.transform.dense", head.dense)
    _norm(out, "cls.predictions.transform.LayerNorm", head.norm)
    out["cls.predictions.decoder.weight"] = head.decoder_weight
    out["cls.predictions.bias"] = head.bias
    out["cls.predictions.decoder.bias"] = head.bias
    return {k: v.detach().clone() for k, v in out.items()}


def _linear(out: dict[str, torch.Tensor], name: str, layer: torch.nn.Linear) -> None:
    out[f"{name}.weight"] = layer.weight
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias


def _norm(out: dict[str, torch.Tensor], name: str, norm: torch.nn.LayerNorm) -> None:
    out[f"{name}.weight"] = norm.weight
    out[f"{name}.bias"] = norm.bias
