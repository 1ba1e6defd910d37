"""Weights and configuration both ways between :class:`ModernBertEncoder` and transformers'
``ModernBertModel`` (``model_type: modernbert``).

The layouts match one to one: the fused QKV matrix is (3 x H x D, C) in both, and the GeGLU
input matrix holds the value half first and the gate half second in both. Only names differ.
transformers is not imported here: these functions work on plain dicts and tensors.

``fillmask export`` calls :func:`to_transformers`: ``ModernBertModel`` for a bare encoder,
``ModernBertForMaskedLM`` with fillmask's MLM head (Linear -> GELU -> LayerNorm -> tied decoder,
with biases). transformers gives all of a model's norms one ``norm_bias`` and one ``norm_eps``,
so the encoder's norms are written with zero biases, and the head's norm must have the
encoder's epsilon for the two models to compute the same logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fillmask.architectures.transformers_format import TransformersModel, mlm_head_weights
from fillmask.heads import MLMHead
from fillmask_modernbert.encoder import ModernBertEncoder

# Our state-dict names -> transformers' (inside ``layers.i.`` for the block entries).
TOP_LEVEL = {
    "embeddings.tokens.weight": "embeddings.tok_embeddings.weight",
    "embeddings.norm.weight": "embeddings.norm.weight",
    "final_norm.weight": "final_norm.weight",
}
IN_BLOCK = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.qkv.weight": "attn.Wqkv.weight",
    "attention.out.weight": "attn.Wo.weight",
    "mlp_norm.weight": "mlp_norm.weight",
    "mlp.wi.weight": "mlp.Wi.weight",
    "mlp.wo.weight": "mlp.Wo.weight",
}
# transformers activation names -> ours.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "silu": "silu", "swish": "silu", "relu": "relu"}
OUR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu",
                   "relu": "relu"}
TOKEN_ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")


def hf_config(encoder: ModernBertEncoder, token_ids: Mapping[str, int] | None = None
              ) -> dict[str, Any]:
    """``ModernBertConfig`` fields describing ``encoder``.

    Args:
        encoder: The encoder to describe.
        token_ids: Optional special-token ids (``pad_token_id``, ``cls_token_id``, ...); the
            others are None (transformers' defaults index a 50k vocabulary).

    Both the current fields (``layer_types``, ``rope_parameters``) and the earlier ones
    (``global_attn_every_n_layers``, ``global_rope_theta``, ``local_rope_theta``) are written,
    so transformers 4.44 and later read the same model.
    """
    args = encoder.spec()["init_args"]
    unknown = sorted(set(token_ids or {}) - set(TOKEN_ID_KEYS))
    if unknown:
        raise ValueError(f"token_ids has unknown keys {unknown}; use {list(TOKEN_ID_KEYS)}")
    global_theta, local_theta = args["global_rope_theta"], args["local_rope_theta"]
    return {
        "model_type": "modernbert",
        "architectures": ["ModernBertModel"],
        "vocab_size": args["vocab_size"],
        "hidden_size": args["hidden_size"],
        "intermediate_size": args["intermediate_size"],
        "num_hidden_layers": args["num_layers"],
        "num_attention_heads": args["num_heads"],
        "hidden_activation": OUR_ACTIVATIONS[args["activation"]],
        "max_position_embeddings": args["max_positions"],
        "initializer_range": args["initializer_range"],
        "initializer_cutoff_factor": args["initializer_cutoff_factor"],
        "norm_eps": args["norm_eps"],
        "norm_bias": False,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": args["attention_dropout"],
        "embedding_dropout": args["embedding_dropout"],
        "mlp_dropout": args["mlp_dropout"],
        "local_attention": args["local_window"],
        "global_attn_every_n_layers": args["global_every"],
        "layer_types": [("sliding_attention" if kind == "local" else "full_attention")
                        for kind in encoder.layer_kinds()],
        "global_rope_theta": global_theta,
        "local_rope_theta": local_theta,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": global_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        **{key: (token_ids or {}).get(key) for key in TOKEN_ID_KEYS},
    }


def hf_name(name: str) -> str:
    """Our state-dict name -> transformers' ``ModernBertModel`` name."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    parts = name.split(".", 2)
    if parts[0] == "blocks" and len(parts) == 3 and parts[2] in IN_BLOCK:
        return f"layers.{parts[1]}.{IN_BLOCK[parts[2]]}"
    raise KeyError(name)


def our_name(name: str) -> str:
    """A transformers ``ModernBertModel`` state-dict name -> ours."""
    top = {hf: ours for ours, hf in TOP_LEVEL.items()}
    if name in top:
        return top[name]
    block = {hf: ours for ours, hf in IN_BLOCK.items()}
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in block:
        return f"blocks.{parts[1]}.{block[parts[2]]}"
    raise KeyError(name)


def state_dict_to_hf(encoder: ModernBertEncoder, prefix: str = "", norm_bias: bool = False
                     ) -> dict[str, torch.Tensor]:
    """``encoder``'s weights under transformers' names, each preceded by ``prefix``
    (``"model."`` for ``ModernBertForMaskedLM``). A token table shared through a wrapper
    (ELECTRA's gradient-disentangled sharing) is written as the table it reads. With
    ``norm_bias`` every norm also gets a zero bias (for a config with ``norm_bias: true``)."""
    hf_config(encoder)  # refuses what transformers cannot hold
    tokens = encoder.embedding_tables()["tokens"].weight.detach()
    project = encoder.embeddings.project
    if isinstance(project, nn.Linear):  # factorised: the bias-free projection folds in
        tokens = tokens @ project.weight.detach().T  # (V, C)
    out = {f"{prefix}{TOP_LEVEL['embeddings.tokens.weight']}": tokens.clone()}
    for name, tensor in encoder.state_dict().items():
        if name.startswith(("embeddings.tokens.", "embeddings.project.")):
            continue
        out[f"{prefix}{hf_name(name)}"] = tensor.detach().clone()
        if norm_bias and name.endswith("norm.weight"):
            out[f"{prefix}{hf_name(name)[: -len('weight')]}bias"] = torch.zeros_like(tensor)
    return out


def to_transformers(encoder: ModernBertEncoder, head: nn.Module | None = None
                    ) -> TransformersModel:
    """``ModernBertModel`` (no head) or ``ModernBertForMaskedLM`` (fillmask's
    :class:`~fillmask.heads.MLMHead`): what ``fillmask export`` writes."""
    config = hf_config(encoder)
    if head is None:
        return TransformersModel("ModernBertModel", config, state_dict_to_hf(encoder))
    if encoder.embedding_size != encoder.hidden_size:
        raise ValueError(f"embedding_size={encoder.embedding_size}: ModernBertForMaskedLM's "
                         "decoder is as wide as the hidden states")
    check_exportable_head(encoder, head)
    config.update(norm_bias=True, classifier_bias=True, classifier_activation="gelu",
                  decoder_bias=True, tie_word_embeddings=head.decoder is None,
                  architectures=["ModernBertForMaskedLM"])
    weights = state_dict_to_hf(encoder, prefix="model.", norm_bias=True)
    for ours, theirs in ((head.dense, "head.dense"), (head.norm, "head.norm")):
        weights[f"{theirs}.weight"] = ours.weight.detach().clone()
        weights[f"{theirs}.bias"] = ours.bias.detach().clone()
    weights["decoder.weight"] = head.decoder_weight.detach().clone()
    weights["decoder.bias"] = head.bias.detach().clone()
    return TransformersModel("ModernBertForMaskedLM", config, weights)


def check_exportable_head(encoder: ModernBertEncoder, head: nn.Module) -> None:
    """Raise a ``ValueError`` unless ``head`` computes what ModernBertForMaskedLM's would."""
    if not isinstance(head, MLMHead):
        raise ValueError(f"{type(head).__name__} has no ModernBertForMaskedLM equivalent; "
                         "only fillmask.heads.MLMHead exports")
    eps = encoder.spec()["init_args"]["norm_eps"]
    if head.norm.eps != eps:
        raise ValueError(f"the MLM head's LayerNorm has eps={head.norm.eps} but "
                         f"ModernBertForMaskedLM uses the encoder's norm_eps={eps} for it; "
                         "build the head with MLMHead(..., eps=norm_eps) to export it exactly")


def encoder_from_hf(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                    prefix: str = "", **overrides: Any) -> ModernBertEncoder:
    """Build a :class:`ModernBertEncoder` from a ``ModernBertConfig`` dict (``config.json`` or
    ``config.to_dict()``) and a state dict whose encoder entries start with ``prefix``
    (``"model."`` for ``ModernBertForMaskedLM``; other entries are ignored). ``overrides``
    set options transformers does not store (``unpad``, ...)."""
    encoder = ModernBertEncoder(**{**encoder_args(config), **overrides})
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not name.startswith(prefix):
            continue
        if name.endswith("norm.bias") and not tensor.any():  # norm_bias: true, all zero
            continue
        try:
            ours[our_name(name[len(prefix):])] = tensor
        except KeyError:
            if name.endswith("norm.bias"):
                raise ValueError(f"{name} is not zero: ModernBertEncoder's norms have no "
                                 "bias") from None
            hint = " (a ModernBertForMaskedLM state dict needs prefix='model.')" if (
                name.startswith("model.") and not prefix) else ""
            raise ValueError(f"{name} is not a ModernBertModel weight{hint}") from None
    missing = sorted(set(encoder.state_dict()) - set(ours))
    if missing:
        raise ValueError(f"the state dict lacks {len(missing)} weight(s), e.g. "
                         f"{prefix}{hf_name(missing[0])}; check prefix={prefix!r}")
    encoder.load_state_dict(ours)
    return encoder


def encoder_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`ModernBertEncoder` arguments from a ``ModernBertConfig`` dict."""
    model_type = config.get("model_type", "modernbert")
    if model_type != "modernbert":
        raise ValueError(f"model_type={model_type!r}: expected a modernbert config")
    for flag in ("attention_bias", "mlp_bias"):  # norm biases are checked in the weights
        if config.get(flag):
            raise ValueError(f"{flag}=true: ModernBertEncoder has no biases")
    heads, hidden = config.get("num_attention_heads", 12), config.get("hidden_size", 768)
    if config.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"head_dim={config['head_dim']} differs from hidden_size / "
                         "num_attention_heads, which ModernBertEncoder needs")
    activation = config.get("hidden_activation", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_activation={activation!r} is not supported; use one of "
                         f"{sorted(HF_ACTIVATIONS)}")
    global_theta, local_theta = rope_thetas(config)
    return dict(
        vocab_size=config.get("vocab_size", 50368),
        hidden_size=hidden,
        num_layers=config.get("num_hidden_layers", 22),
        num_heads=heads,
        intermediate_size=config.get("intermediate_size", 1152),
        max_positions=config.get("max_position_embeddings", 8192),
        global_rope_theta=float(global_theta),
        local_rope_theta=float(local_theta),
        global_every=global_every(config),
        local_window=config.get("local_attention", 128),
        norm_eps=config.get("norm_eps", 1e-5),
        embedding_dropout=float(config.get("embedding_dropout", 0.0)),
        attention_dropout=float(config.get("attention_dropout", 0.0)),
        mlp_dropout=float(config.get("mlp_dropout", 0.0)),
        activation=HF_ACTIVATIONS[activation],
        initializer_range=config.get("initializer_range", 0.02),
        initializer_cutoff_factor=config.get("initializer_cutoff_factor", 2.0),
    )


def global_every(config: Mapping[str, Any]) -> int:
    """The period of global layers, from ``layer_types`` (0, n, 2n, ... global) or
    ``global_attn_every_n_layers``."""
    kinds = config.get("layer_types")
    if not kinds:
        return int(config.get("global_attn_every_n_layers", 3))
    globals_ = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    period = globals_[1] - globals_[0] if len(globals_) > 1 else len(kinds)
    if not globals_ or [i for i in range(len(kinds)) if i % period == 0] != globals_:
        raise ValueError(f"layer_types={kinds} is not 'full_attention' every n layers from "
                         "layer 0, the only pattern ModernBertEncoder builds")
    return period


def rope_thetas(config: Mapping[str, Any]) -> tuple[float, float]:
    """(global, local) rotary bases from ``rope_parameters`` or the earlier fields."""
    rope = config.get("rope_parameters") or {}
    thetas = []
    for kind, old_key, default in (("full_attention", "global_rope_theta", 160_000.0),
                                   ("sliding_attention", "local_rope_theta", 10_000.0)):
        params = rope.get(kind) or {}
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters[{kind!r}] has rope_type={params['rope_type']!r}; "
                             "ModernBertEncoder implements the default rotary embedding only")
        thetas.append(params.get("rope_theta", config.get(old_key, default)))
    return thetas[0], thetas[1]


HEAD_NAMES = {"dense.weight": "head.dense.weight", "dense.bias": "head.dense.bias",
              "norm.weight": "head.norm.weight", "norm.bias": "head.norm.bias",
              "decoder": "decoder.weight", "bias": "decoder.bias"}
"""MLMHead names -> ``ModernBertForMaskedLM``'s head and decoder."""


def from_transformers(config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]
                      ) -> tuple[ModernBertEncoder, dict[str, torch.Tensor] | None]:
    """A ``ModernBertModel`` / ``ModernBertForMaskedLM`` state dict as a ModernBertEncoder and
    its MLM head's weights in MLMHead names (None without a head). A head without biases
    (ModernBERT's released models) imports with zero biases."""
    prefix = "model." if any(k.startswith("model.") for k in weights) else ""
    encoder = encoder_from_hf(config, weights, prefix)
    head = mlm_head_weights(dict(weights), "", HEAD_NAMES)
    if head is not None and config.get("classifier_activation", "gelu") != "gelu":
        raise ValueError(f"its MLM head applies {config['classifier_activation']!r} where "
                         "fillmask's MLMHead applies exact GELU; import the encoder alone")
    return encoder, head
