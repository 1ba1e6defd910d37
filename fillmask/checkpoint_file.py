"""What a checkpoint written by ``fillmask fit`` holds, read without Lightning.

Next to Lightning's keys (``state_dict``, loops, optimiser states) a fillmask checkpoint has a
``fillmask`` entry: the encoder's class path and arguments, the objective's class path, which
installed distributions provided them, and the tokenizer. That is enough to rebuild the encoder
(and its heads) with torch alone, which is all that inference and scoring need.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from fillmask.errors import FillmaskError


class CheckpointError(FillmaskError):
    """A checkpoint fillmask cannot use, with its path and the reason."""


def missing_tokenizer(path: str | Path, looked_for: str = "") -> CheckpointError:
    """The error for a model at ``path`` stored without its tokenizer (``looked_for``: the
    file that is not there)."""
    where = f" ({looked_for})" if looked_for else ""
    return CheckpointError(f"{path} carries no tokenizer{where}; fillmask needs the tokenizer "
                           "the model was trained with")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a fillmask checkpoint's dictionary, with a clear error for a missing or bad file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Memory-mapped: callers that want the metadata alone never read the weights.
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error}); it may be "
                              "truncated: use an earlier checkpoint") from error
    if not isinstance(ckpt, dict) or not ckpt.get("fillmask"):
        raise CheckpointError(f"{path} is not a fillmask checkpoint (it was not written by "
                              "`fillmask fit`)")
    return ckpt


def import_class(path: str, origin: dict[str, str] | None = None) -> type:
    """Import ``package.module.Class``; ``origin`` (``{"distribution", "version"}``, from a
    checkpoint's provenance) names the package to install when the import fails."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        if origin and origin.get("distribution"):
            dist, version = origin["distribution"], origin.get("version", "")
            hint = (f"it comes from the distribution {dist} (version {version} wrote this "
                    f"checkpoint): pip install {dist}")
        else:
            hint = "install the package that provides it"
        raise CheckpointError(f"cannot import {path} ({error}); {hint}") from error


def encoder_class(ckpt: dict[str, Any]) -> type:
    """The encoder class a checkpoint's metadata names, imported (a :class:`CheckpointError`
    names the distribution to install when it is missing)."""
    info = ckpt["fillmask"]
    origin = info.get("provenance", {}).get("encoder")
    return import_class(info["encoder"]["class_path"], origin)


def objective_class(ckpt: dict[str, Any]) -> type:
    """The objective class (the LightningModule) a checkpoint's metadata names, imported."""
    info = ckpt["fillmask"]
    origin = info.get("provenance", {}).get("objective")
    return import_class(info.get("objective", "fillmask.objectives.mlm.MaskedLM"), origin)


def build_encoder(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint's encoder, freshly initialised (its weights are in ``state_dict``)."""
    return encoder_class(ckpt)(**ckpt["fillmask"]["encoder"]["init_args"])


def stored_weights(ckpt: dict[str, Any], *prefixes: str) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint's ``state_dict`` under the given module prefixes
    (``"encoder."``, ``"head."``), names kept."""
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(prefixes)}
