"""Use a trained model: load it from a checkpoint or an exported folder, fill masks.

:class:`FillMaskModel` is what ``fillmask fill`` and ``fillmask score`` run on: the objective's
encoder and MLM head, the tokenizer, and batched, padded forward passes that decode the
positions asked for only. Loading needs torch alone: the encoder and head are rebuilt from the
checkpoint's metadata, without the objective's LightningModule (so without importing
Lightning, which would triple the start-up time of a one-sentence ``fillmask fill``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Encoding, Tokenizer

from fillmask.checkpoint_file import (
    CheckpointError,
    build_encoder,
    missing_tokenizer,
    read_checkpoint,
    stored_weights,
)
from fillmask.data.tokenize import SpecialTokens, resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.heads import MaskedLMParts, MLMHead

if TYPE_CHECKING:
    from fillmask.objectives.base import EncoderObjective

__all__ = ["CheckpointError", "FillMaskModel", "InputTooLongError", "Inputs", "check_device",
           "length_batches", "read_lines"]


class InputTooLongError(FillmaskError):
    """An input with more tokens than the model has positions; ``index`` is its 0-based place."""

    def __init__(self, index: int, length: int, limit: int, label: str | None = None) -> None:
        super().__init__(f"{label or f'input {index + 1}'} has {length} tokens, more than the "
                         f"model's {limit} positions; shorten it or split it")
        self.index, self.length, self.limit = index, length, limit

    def named(self, labels: Sequence[str]) -> InputTooLongError:
        """The same error naming the input by ``labels[index]`` (``notes.txt line 7``)."""
        return InputTooLongError(self.index, self.length, self.limit, labels[self.index])


@dataclass(frozen=True)
class Inputs:
    """Texts given on the command line and read from a file, with the name of each for errors:
    ``input 2`` (the second command-line text) or ``notes.txt line 7``."""

    texts: list[str]
    labels: list[str]

    @classmethod
    def collect(cls, texts: Sequence[str], file: str | None = None) -> Inputs:
        """``texts`` followed by the non-blank lines of ``file`` (``-``: standard input)."""
        labels = [f"input {number}" for number in range(1, len(texts) + 1)]
        lines = read_lines(file) if file is not None else []
        source = "stdin" if file == "-" else file
        return cls([*texts, *(text for _, text in lines)],
                   [*labels, *(f"{source} line {number}" for number, _ in lines)])


def check_device(name: str) -> str:
    """``name`` if torch can place a model there, else a :class:`FillmaskError` with the fix."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise FillmaskError(f"device {name!r} is not a torch device ({error}); use cpu or "
                            "cuda") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise FillmaskError(f"device {name!r} is not available on this machine; use cpu")
    return name


@dataclass
class FillMaskModel:
    """A masked LM ready for inference, with its tokenizer.

    Build one with :meth:`load` (a checkpoint or a transformers folder) or, for a model already
    in memory, :meth:`from_objective`.
    """

    model: MaskedLMParts | EncoderObjective  # .encoder and .head (an MLMHead)
    tokenizer: Tokenizer
    special: SpecialTokens

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> FillMaskModel:
        """A ``.ckpt`` written by ``fillmask fit``, or a folder written by ``fillmask export``
        (or any transformers folder an installed architecture imports)."""
        path = Path(path).expanduser()
        if path.is_dir():
            return cls.from_folder(path, map_location)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist; give a .ckpt written by "
                                  "`fillmask fit` or a folder written by `fillmask export`")
        return cls.from_checkpoint(path, map_location)

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str = "cpu") -> FillMaskModel:
        """Rebuild the encoder, MLM head and tokenizer stored in a fillmask checkpoint."""
        ckpt = read_checkpoint(path)
        weights = stored_weights(ckpt, "encoder.", "head.")
        if "head.bias" not in weights or "head.dense.weight" not in weights:
            raise CheckpointError(f"{path} holds no masked-LM head to fill masks with (its "
                                  f"objective {ckpt['fillmask'].get('objective')} has none)")
        parts = MaskedLMParts(build_encoder(ckpt), tied="head.decoder" not in weights)
        try:
            parts.load_state_dict(weights)
        except RuntimeError as error:
            raise CheckpointError(f"{path}: its encoder and MLM head do not load ({error}); "
                                  "was it written by another version of its architecture's "
                                  "package?") from None
        stored = ckpt["fillmask"].get("tokenizer")
        tokenizer = Tokenizer.from_str(stored) if stored is not None else None
        return cls.from_objective(parts, tokenizer, source=str(path), map_location=map_location)

    @classmethod
    def from_folder(cls, path: str | Path, map_location: str = "cpu") -> FillMaskModel:
        """Load a transformers ``...ForMaskedLM`` folder (``fillmask export`` writes them)."""
        from fillmask.sources import read_transformers

        path = Path(path).expanduser()
        _check_masked_lm_folder(path)
        parts, tokenizer = read_transformers(path)
        if tokenizer is None:
            raise missing_tokenizer(path, "tokenizer.json")
        return cls.from_objective(parts, tokenizer, source=str(path), map_location=map_location)

    @classmethod
    def from_objective(cls, model: MaskedLMParts | EncoderObjective, tokenizer: Tokenizer | None,
                       source: str = "the model", map_location: str = "cpu") -> FillMaskModel:
        """Wrap an objective with an MLM head (``head``) and its tokenizer, in eval mode.

        The tokenizer's padding and truncation are turned off: batches are padded here, and an
        input longer than the model is an error rather than silently cut.
        """
        if tokenizer is None or not isinstance(getattr(model, "head", None), MLMHead):
            raise CheckpointError(f"{source} holds no masked-LM head and tokenizer to fill masks "
                                  "with (it was not written by an MLM objective under "
                                  "`fillmask fit`)")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        model.to(map_location).eval()
        special = resolve_special_tokens(tokenizer, source=source)
        return cls(model, tokenizer, special)  # type: ignore[arg-type]

    def mask_token(self) -> str:
        """The literal mask token of the tokenizer (``[MASK]`` or ``<mask>``)."""
        return self.tokenizer.id_to_token(self.special.mask_id)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer can produce; the model's rows past them (its vocabulary is
        rounded up) are never predicted."""
        return min(self.tokenizer.get_vocab_size(), self.model.encoder.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        """Tokenise ``texts`` with the tokenizer's special tokens; an input longer than the
        model's positions raises :class:`InputTooLongError` naming it."""
        encodings = self.tokenizer.encode_batch(list(texts))
        limit = getattr(self.model.encoder, "max_positions", None)
        for index, encoding in enumerate(encodings):
            if limit is not None and len(encoding.ids) > limit:
                raise InputTooLongError(index, len(encoding.ids), limit)
        return encodings

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) padded to the longest row, and the attention mask (B, T)."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.special.pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            attention[index, : len(row)] = True
        return ids, attention

    @torch.inference_mode()
    def log_probs(self, ids: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor,
                  columns: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (N, V) over the tokenizer's vocabulary at the N positions
        ``(rows, columns)`` of a padded batch ``ids`` (B, T); only those are decoded. The
        result stays on the model's device."""
        device = self.device
        hidden = self.model.encoder(ids.to(device), attention.to(device))  # (B, T, C)
        logits = self.model.head(hidden[rows.to(device), columns.to(device)])  # (N, V')
        return logits[:, : self.vocab_size].float().log_softmax(-1)  # (N, V)

    def fill(self, texts: Sequence[str], top_k: int = 5, batch_size: int = 32
             ) -> list[list[list[dict[str, Any]]]]:
        """For each text and each mask in it, the ``top_k`` candidates with probabilities.

        The literal mask token of the tokenizer (``[MASK]`` or ``<mask>``) marks the blanks.
        Texts go through the model ``batch_size`` at a time, grouped by length and padded per
        batch; the results come back in the order of ``texts``.
        """
        encodings = self.encode(texts)
        results: list[list[list[dict[str, Any]]]] = [[] for _ in encodings]
        for group in length_batches([len(e.ids) for e in encodings], batch_size):
            ids, attention = self.pad([encodings[i].ids for i in group])  # (B, T)
            rows, columns = (ids == self.special.mask_id).nonzero(as_tuple=True)  # (N,), (N,)
            if rows.numel() == 0:
                continue
            log_probs = self.log_probs(ids, attention, rows, columns)  # (N, V)
            best, best_ids = log_probs.topk(min(top_k, log_probs.shape[1]), dim=-1)  # (N, k)
            for row, scores, token_ids in zip(rows.tolist(), best.exp().tolist(),
                                              best_ids.tolist(), strict=True):
                results[group[row]].append(self._candidates(scores, token_ids))
        return results

    def _candidates(self, scores: list[float], ids: list[int]) -> list[dict[str, Any]]:
        return [{"token": self.tokenizer.id_to_token(i), "token_id": i, "score": s}
                for s, i in zip(scores, ids, strict=True)]


def _check_masked_lm_folder(path: Path) -> None:
    """A folder whose config names a bare encoder (``BertModel``) has no trained MLM head: its
    predictions would come from a random one."""
    config = path / "config.json"
    if not config.is_file():
        return  # load_pretrained says what is missing
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures")
    except (ValueError, AttributeError) as error:
        raise CheckpointError(f"{config} is not a valid JSON object ({error})") from error
    if architectures and not any(str(a).endswith("ForMaskedLM") for a in architectures):
        raise CheckpointError(f"{path} holds a {architectures[0]} without a masked-LM head; "
                              "give a ...ForMaskedLM folder (`fillmask export` of an MLM "
                              "checkpoint writes one)")


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches of ``batch_size``, shortest first, so that
    each batch pads little; equal lengths keep their order."""
    if batch_size < 1:
        raise FillmaskError(f"batch size {batch_size} must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def read_lines(path: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line of a UTF-8 file (``-``: standard input),
    stripped of surrounding whitespace."""
    if path == "-":
        text = sys.stdin.read()
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FillmaskError(f"input file {path} does not exist; give an existing UTF-8 "
                                "text file, or - for standard input")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            line = file.read_bytes()[: error.start].count(b"\n") + 1
            raise FillmaskError(f"{path} line {line} is not UTF-8 text ({error.reason}); save "
                                "the file as UTF-8") from error
    return [(number, line.strip()) for number, line in enumerate(text.split("\n"), 1)
            if line.strip()]
