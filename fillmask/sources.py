"""What a pretrained source holds, without building an objective: a transformers folder as a
fillmask encoder with its MLM head, a checkpoint's or folder's tokenizer, and each
architecture's transformers mapping, found through the registry.

Every architecture maps itself in a module of its own (``Encoder.transformers_mapping``, see
:mod:`fillmask.architectures.transformers_format`); this module finds it by encoder class or
by a folder's ``model_type``. Objectives build on this (:mod:`fillmask.objectives.pretrained`);
export lives in :mod:`fillmask.interop.export`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tokenizers import Tokenizer

from fillmask.architectures.base import Encoder
from fillmask.data.tokenize import load_tokenizer
from fillmask.errors import FillmaskError
from fillmask.heads import MaskedLMParts, MLMHead
from fillmask.registry import architectures


def mapping_of(cls: type[Encoder]) -> ModuleType | None:
    """The transformers mapping module an encoder class names, or None when it names none."""
    name = getattr(cls, "transformers_mapping", None)
    return None if name is None else importlib.import_module(name)


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
    classes = [component.cls for component in architectures().values()]
    for cls in classes:
        if model_type in getattr(cls, "transformers_model_types", ()):
            return cls
    known = sorted(t for cls in classes for t in getattr(cls, "transformers_model_types", ()))
    raise HFImportError(f"{source} has model_type {model_type!r}, which no installed "
                        f"architecture imports (known: {', '.join(known)}); install the plugin "
                        "that provides it")


def encoder_and_head(config: dict[str, Any], weights: dict[str, torch.Tensor], folder: Path
                     ) -> tuple[Encoder, dict[str, torch.Tensor] | None]:
    """The encoder a folder's ``config`` and ``weights`` describe, through the mapping of the
    architecture that imports its ``model_type``, and its MLM head's weights (None without).
    fillmask's remote-code folders (``model_type: fillmask``) hold their encoder under
    ``backbone``: a native model's config, or fillmask's own encoder arguments."""
    model_type = config.get("model_type", "bert")
    if model_type == "fillmask":
        inner = {k.removeprefix("backbone."): v for k, v in weights.items()
                 if k.startswith("backbone.")}
        encoder, _ = encoder_and_head(dict(config.get("backbone") or {}), inner, folder)
        masked_lm = "FillmaskForMaskedLM" in config.get("architectures", [])
        head = {k.removeprefix("head."): v for k, v in weights.items() if k.startswith("head.")}
        return encoder, head if masked_lm else None
    cls = architecture_for(model_type, str(folder / "config.json"))
    mapping = mapping_of(cls)
    if mapping is None:
        raise HFImportError(f"{cls.__name__} declares no transformers mapping, so {folder} "
                            "cannot be imported; its plugin must name one "
                            "(Encoder.transformers_mapping)")
    try:
        return mapping.from_transformers(config, weights)
    except (ValueError, KeyError, TypeError) as error:
        raise HFImportError(f"{folder} cannot be imported as {cls.__name__}: {error}") from error


def read_transformers(folder: str | Path) -> tuple[MaskedLMParts, Tokenizer | None]:
    """Load a transformers folder (``config.json``, weights, optionally ``tokenizer.json``) as
    a fillmask encoder with its MLM head, and its tokenizer (``None`` when the folder has none).

    The architecture comes from ``model_type`` (``bert`` built in; plugins add theirs, e.g.
    ``deberta-v2``, ``modernbert``). Weights map one to one (the inverse of the export); a
    folder without an MLM head gets a freshly initialised one. Torch alone: no objective.
    """
    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFImportError(f"{folder} has no config.json; give a transformers model folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    inner = config.get("backbone") or {} if config.get("model_type") == "fillmask" else config
    architecture_for(inner.get("model_type", "bert"), str(config_file))  # before the weights
    encoder, head = encoder_and_head(config, read_hf_weights(folder), folder)
    parts = MaskedLMParts(encoder, tied=config.get("tie_word_embeddings", True))
    decoder = (head or {}).get("decoder")
    if decoder is not None and decoder.shape[1] != parts.head.dense.out_features:
        # a decoder narrower than the token table (a factorised encoder exported folded)
        vocab, width = decoder.shape
        parts.head = MLMHead(torch.nn.Embedding(vocab, width), tied=False,
                             eps=parts.head.norm.eps, hidden_size=encoder.hidden_size)
    if head is not None:
        load_head(parts.head, head)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer, _ = load_tokenizer(str(folder))
    return parts, tokenizer
