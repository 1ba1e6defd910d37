"""``fillmask export``: a checkpoint as a transformers folder (``config.json``,
``model.safetensors``, tokenizer files) that ``AutoModelForMaskedLM``, ``AutoTokenizer`` and
``pipeline("fill-mask")`` load."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch
from tokenizers import Tokenizer

from fillmask.architectures.base import Encoder
from fillmask.architectures.transformers_format import TransformersModel, detached
from fillmask.data.tokenize import resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.objectives.base import CheckpointError, Deliverable, EncoderObjective, load_objective
from fillmask.sources import mapping_of

REMOTE_CLASSES = {"base": "FillmaskModel", "mlm": "FillmaskForMaskedLM",
                  "rtd": "FillmaskForPreTraining",
                  "sequence": "FillmaskForSequenceClassification",
                  "token": "FillmaskForTokenClassification",
                  "qa": "FillmaskForQuestionAnswering"}
"""fillmask's remote-code class by deliverable kind."""
AUTO_CLASSES = {"AutoModel": "base", "AutoModelForMaskedLM": "mlm",
                "AutoModelForPreTraining": "rtd", "AutoModelForSequenceClassification": "sequence",
                "AutoModelForTokenClassification": "token",
                "AutoModelForQuestionAnswering": "qa"}
"""The transformers Auto class that loads each kind."""
REMOTE_FILES = ("configuration_fillmask.py", "modeling_fillmask.py")


class ExportError(FillmaskError):
    """A checkpoint or output folder ``fillmask export`` cannot use, and why."""


def transformers_models(model: EncoderObjective) -> dict[str, TransformersModel]:
    """The transformers equivalents of a trained objective's deliverables, by subfolder
    ("" = the output folder itself): an MLM model as ``...ForMaskedLM``, a fine-tuned one as
    ``...ForSequenceClassification`` / ``...ForTokenClassification``, an ELECTRA run as
    ``discriminator`` (``...ForPreTraining``) and ``generator``."""
    deliverables = model.deliverables()
    if not deliverables:
        raise ExportError(f"cannot export: {type(model).__name__} has no deliverable head (an "
                          "MLM, replaced-token or classification head); define its "
                          "deliverables() or export a checkpoint of such an objective")
    return {name: transformers_model(d) for name, d in deliverables.items()}


def transformers_model(deliverable: Deliverable) -> TransformersModel:
    """The transformers class that computes ``deliverable`` where one exists, else fillmask's
    remote-code model around the encoder (native base model or fillmask's own encoder)."""
    mapping = _mapping(deliverable.encoder)
    native = _native(mapping, deliverable)
    if native is not None:
        return native
    spec, weights = backbone(mapping, deliverable.encoder)
    return remote_model(spec, weights, deliverable)


def _mapping(encoder: Encoder) -> ModuleType:
    mapping = mapping_of(type(encoder))
    if mapping is None:
        raise ExportError(f"cannot export: {type(encoder).__name__} declares no transformers "
                          "mapping (Encoder.transformers_mapping); see the plugin guide in "
                          "the README")
    return mapping


def _native(mapping: ModuleType, d: Deliverable) -> TransformersModel | None:
    """The mapping's transformers class for the deliverable, or None."""
    try:
        if d.kind == "mlm":
            return mapping.to_transformers(d.encoder, d.head)
        if d.kind == "base":  # the encoder alone (sentence embeddings)
            return mapping.to_transformers(d.encoder, None)
        native_head = getattr(mapping, "native_head", None)
        if native_head is None or getattr(d.head, "pooling", "cls") != "cls":
            return None  # transformers' sequence classifiers read the first token only
        return native_head(d.encoder, d.kind, d.head)
    except ValueError:
        return None


def backbone(mapping: ModuleType, encoder: Encoder
             ) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """The encoder as remote code carries it: a transformers base model's config and weights,
    else the mapping's ``remote_backbone``; ExportError when it has neither."""
    try:
        base = mapping.to_transformers(encoder, None)
        return {**base.config, "architectures": [base.architecture]}, base.weights
    except ValueError as error:
        remote = getattr(mapping, "remote_backbone", None)
        if remote is None:
            raise ExportError(f"cannot export: {error}") from error
        return remote(encoder)


def remote_model(spec: dict[str, object], weights: dict[str, torch.Tensor], d: Deliverable
                 ) -> TransformersModel:
    """fillmask's remote-code class for ``d.kind`` around the encoder ``spec`` describes."""
    head = {k: v for k, v in d.head.state_dict().items() if not k.startswith("embedding.")}
    tied = d.kind == "mlm" and d.head.decoder is None
    if tied and not any(_same(d.head.decoder_weight, w) for w in weights.values()):
        tied = False  # the backbone's table is not the decoder (a folded projection)
        head["decoder"] = d.head.decoder_weight
    config: dict[str, object] = {
        "model_type": "fillmask", "backbone": spec, "auto_map": remote_auto_map(),
        "tie_word_embeddings": tied,
    }
    if d.kind == "mlm":
        config.update(head_norm_eps=d.head.norm.eps, head_width=d.head.dense.out_features)
    if d.kind in ("sequence", "token"):
        config.update(num_labels=d.head.classifier.out_features,
                      classifier_dropout=d.head.dropout.p)
    if d.kind == "qa":
        config.update(num_labels=2)
    if d.kind == "sequence":
        config.update(classifier_pooling=getattr(d.head, "pooling", "cls"))
    tensors = {**{f"backbone.{k}": v for k, v in weights.items()},
               **{f"head.{k}": v for k, v in head.items()}}
    return TransformersModel(REMOTE_CLASSES[d.kind], config, detached(tensors), remote_code())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.detach(), b)


def remote_auto_map() -> dict[str, str]:
    return {"AutoConfig": "configuration_fillmask.FillmaskConfig",
            **{auto: f"modeling_fillmask.{REMOTE_CLASSES[kind]}"
               for auto, kind in AUTO_CLASSES.items()}}


def remote_code() -> dict[str, str]:
    """The remote-code files a folder ships (see :mod:`fillmask.interop.remote`)."""
    package = resources.files("fillmask.interop.remote")
    return {name: package.joinpath(name).read_text(encoding="utf-8") for name in REMOTE_FILES}


def tokenizer_files(tokenizer: Tokenizer, max_length: int, token_types: bool = True
                    ) -> dict[str, str]:
    """``tokenizer.json`` plus the configs that make transformers' ``AutoTokenizer`` load it
    as a fast tokenizer with the special tokens fillmask trained with, truncating and padding
    on the right at ``max_length`` (the encoder's positions), and giving ``token_type_ids``
    only to encoders with token types (``token_types``)."""
    special = resolve_special_tokens(tokenizer)
    roles = {"mask_token": special.mask_id, "pad_token": special.pad_id,
             "cls_token": special.cls_id, "sep_token": special.sep_id, "unk_token": special.unk_id}
    names = {role: tokenizer.id_to_token(i) for role, i in roles.items() if i is not None}
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if token_types else [
        "input_ids", "attention_mask"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "padding_side": "right", "truncation_side": "right",
              "model_input_names": inputs, "clean_up_tokenization_spaces": False, **names}
    return {"tokenizer.json": tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(names, indent=2)}


def write_folder(target: TransformersModel, tokenizer: Tokenizer | None, encoder: Encoder,
                 output: Path, extra_files: dict[str, str] | None = None) -> None:
    """Write the folder into a temporary sibling, then move it into place: an interrupted
    export never leaves a half-written ``output``. ``extra_files`` (relative path -> text) are
    written too (an objective's ``folder_files()``, e.g. the sentence-transformers layout)."""
    from safetensors.torch import save_file

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        config = {"torch_dtype": "float32", **target.config,
                  "architectures": [target.architecture]}
        (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        # safetensors refuses tensors that share memory (tied decoders): store copies.
        weights = {k: v.detach().to("cpu").contiguous().clone()
                   for k, v in target.weights.items()}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        files = dict(target.code)
        if tokenizer is not None:
            token_types = "token_types" in encoder.embedding_tables()
            files.update(tokenizer_files(tokenizer, encoder.max_positions, token_types))
        files.update(extra_files or {})
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
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
    encoder = model.encoder
    if list(targets) == [""]:
        extra = getattr(model, "folder_files", dict)()  # SentenceEmbedding: sentence-transformers
        write_folder(targets[""], tokenizer, encoder, output, extra)
        return targets
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        for name, target in targets.items():
            write_folder(target, tokenizer, encoder, staging / name)
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
        remote = "; remote code: load with trust_remote_code=True" if target.code else ""
        print(f"wrote {Path(args.output) / name}: {target.architecture} ({count / 1e6:.1f}M "
              f"parameters, model_type {target.config['model_type']}{remote})")
    return 0


__all__ = ["ExportError", "export_checkpoint", "export_main", "transformers_models"]
