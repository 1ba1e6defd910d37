"""``fillmask export``: a checkpoint as a transformers folder (``config.json``,
``model.safetensors``, tokenizer files) that ``AutoModelForMaskedLM``, ``AutoTokenizer`` and
``pipeline("fill-mask")`` load."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from fillmask.data.tokenize import resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.heads import MLMHead
from fillmask.interop.hf import TransformersModel
from fillmask.objectives.base import CheckpointError, EncoderObjective, load_objective

if TYPE_CHECKING:
    from fillmask.objectives.rtd import ReplacedTokenDetection


class ExportError(FillmaskError):
    """A checkpoint or output folder ``fillmask export`` cannot use, and why."""


def transformers_models(model: EncoderObjective) -> dict[str, TransformersModel]:
    """The transformers equivalents of a trained objective, by subfolder ("" = the output
    folder itself): the encoder with its MLM head when it has one (``...ForMaskedLM``), else the
    bare encoder; an ELECTRA run gives ``discriminator`` and ``generator``."""
    from fillmask.objectives.rtd import ReplacedTokenDetection

    try:
        if isinstance(model, ReplacedTokenDetection):
            return rtd_models(model)
        head = getattr(model, "head", None)
        return {"": model.encoder.to_transformers(head if isinstance(head, MLMHead) else None)}
    except ValueError as error:
        raise ExportError(f"cannot export: {error}") from error


def rtd_models(model: ReplacedTokenDetection) -> dict[str, TransformersModel]:
    """ELECTRA's classes for BERT encoders; other encoders export the discriminator as their
    base model and the generator with its MLM head."""
    from fillmask.architectures.bert import BertEncoder
    from fillmask.interop.hf import electra_to_transformers

    if isinstance(model.encoder, BertEncoder):
        return electra_to_transformers(model)
    return {"discriminator": model.discriminator().to_transformers(None),
            "generator": model.generator.to_transformers(model.generator_head)}


def tokenizer_files(tokenizer: Tokenizer, max_length: int) -> dict[str, str]:
    """``tokenizer.json`` plus the configs that make transformers' ``AutoTokenizer`` load it
    as a fast tokenizer with the special tokens fillmask trained with."""
    special = resolve_special_tokens(tokenizer)
    roles = {"mask_token": special.mask_id, "pad_token": special.pad_id,
             "cls_token": special.cls_id, "sep_token": special.sep_id, "unk_token": special.unk_id}
    names = {role: tokenizer.id_to_token(i) for role, i in roles.items() if i is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, **names}
    return {"tokenizer.json": tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(names, indent=2)}


def write_folder(target: TransformersModel, tokenizer: Tokenizer | None, max_length: int,
                 output: Path) -> None:
    """Write the folder into a temporary sibling, then move it into place: an interrupted
    export never leaves a half-written ``output``."""
    from safetensors.torch import save_file

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        config = {"architectures": [target.architecture], "torch_dtype": "float32",
                  **target.config}
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        # safetensors refuses tensors that share memory (tied decoders): store copies.
        weights = {k: v.detach().to("cpu").contiguous().clone()
                   for k, v in target.weights.items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        for name, text in (tokenizer_files(tokenizer, max_length) if tokenizer else {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_checkpoint(checkpoint: str | Path, output: str | Path, overwrite: bool = False
                      ) -> dict[str, TransformersModel]:
    """Export ``checkpoint`` (written by ``fillmask fit``) to the transformers folder
    ``output`` (ELECTRA runs: ``output/discriminator`` and ``output/generator``); an existing
    non-empty folder is replaced only with ``overwrite``. Returns what was written, by
    subfolder."""
    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file; give a folder to write")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"--output {output} exists and is not empty; choose another folder "
                          "or pass --overwrite to replace it")
    model, tokenizer = load_objective(checkpoint)
    targets = transformers_models(model)
    if list(targets) == [""]:
        write_folder(targets[""], tokenizer, model.encoder.max_positions, output)
        return targets
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        for name, target in targets.items():
            write_folder(target, tokenizer, model.encoder.max_positions, staging / name)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fillmask export", description=(
        "Write a checkpoint as a transformers folder (config.json, model.safetensors, "
        "tokenizer files) for AutoModelForMaskedLM, AutoTokenizer and pipeline('fill-mask')."))
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fillmask fit")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        parser.error("export needs the hf extra: pip install 'fillmask[hf]'")
    try:
        targets = export_checkpoint(args.checkpoint, args.output, args.overwrite)
    except (ExportError, CheckpointError) as error:
        parser.error(str(error))
    for name, target in targets.items():
        count = sum(t.numel() for t in target.weights.values())
        print(f"wrote {Path(args.output) / name}: {target.architecture} ({count / 1e6:.1f}M "
              f"parameters, model_type {target.config['model_type']})")
    return 0


__all__ = ["ExportError", "export_checkpoint", "export_main", "transformers_models"]
