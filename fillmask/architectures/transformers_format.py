"""The transformers format, at the level architectures describe themselves in it.

An architecture maps itself to transformers in a module of its own, beside its model, named by
the encoder class's ``transformers_mapping`` (``"package.module"``); interop finds that module
through the registry, so the model never imports interop. The module defines:

- ``to_transformers(encoder, head=None) -> TransformersModel``: the transformers class that
  computes what the encoder (and, with ``head``, fillmask's :class:`~fillmask.heads.MLMHead`)
  computes: its base model or its ``...ForMaskedLM``. Raise ``ValueError`` naming the option
  when no transformers class does.
- ``from_transformers(config, weights) -> (encoder, head_weights | None)``: the inverse, for the
  ``model_type`` values the encoder class lists in ``transformers_model_types``; the MLM head's
  weights under MLMHead names (``dense.weight``, ``norm.bias``, ``decoder``, ``bias``, ...).
- optionally ``native_head(encoder, kind, head) -> TransformersModel | None``: a transformers
  class with another fillmask head (``kind``: ``rtd``, ``sequence``, ``token`` or ``qa``),
  or None.
- optionally ``remote_backbone(encoder) -> (spec, weights)``: for encoders no transformers class
  computes, the arguments (``model_type: fillmask-bert``) and weights of the encoder that
  fillmask's remote-code files rebuild.

Anything the module cannot map natively is exported as remote code around its base model.
Torch only: no transformers import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

HeadKind = Literal["base", "mlm", "rtd", "sequence", "token", "qa"]
"""What leaves with an encoder: nothing (``base``), a masked-LM, replaced-token, sequence or
token classification head, or an extractive question answering (start/end) head."""


@dataclass
class TransformersModel:
    """A fillmask model in transformers' terms: what ``fillmask export`` writes."""

    architecture: str
    """The class that loads it, e.g. ``BertForMaskedLM`` (or ``FillmaskForMaskedLM``)."""
    config: dict[str, Any]
    """``config.json`` fields, ``model_type`` included."""
    weights: dict[str, torch.Tensor]
    """The state dict under that class's parameter names."""
    code: dict[str, str] = field(default_factory=dict)
    """Remote-code files (name -> text) the folder ships; empty for transformers classes."""


def linear_tensors(out: dict[str, torch.Tensor], name: str, layer: nn.Linear) -> None:
    """``name.weight`` (and ``name.bias``) of ``layer`` into ``out``."""
    out[f"{name}.weight"] = layer.weight
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias


def norm_tensors(out: dict[str, torch.Tensor], name: str, norm: nn.LayerNorm) -> None:
    """``name.weight`` and ``name.bias`` of a LayerNorm into ``out``."""
    out[f"{name}.weight"] = norm.weight
    out[f"{name}.bias"] = norm.bias


def detached(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``weights``, out of the autograd graph and sharing no memory."""
    return {k: v.detach().clone() for k, v in weights.items()}


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


def check_head_activation(activation: str) -> None:
    """BERT-layout heads apply the config's activation; fillmask's MLMHead applies exact GELU."""
    if activation != "gelu":
        raise ValueError(f"its MLM head applies {activation!r} where fillmask's MLMHead applies "
                         "exact GELU ('gelu'); import the encoder without the head")


def head_tensors(head: nn.Module) -> dict[str, torch.Tensor]:
    """An MLM head's own weights under MLMHead names (``dense.*``, ``norm.*``, ``bias``, and
    ``decoder`` when untied): the tied token embedding is the encoder's, not the head's."""
    out: dict[str, torch.Tensor] = {}
    linear_tensors(out, "dense", head.dense)
    norm_tensors(out, "norm", head.norm)
    out["bias"] = head.bias
    if head.decoder is not None:
        out["decoder"] = head.decoder
    return out
