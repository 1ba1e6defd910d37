"""``fillmask embed``: sentence embeddings of a file's lines, written as a float32 ``.npy``
matrix (one row per non-blank line, in input order).

Any fillmask checkpoint embeds (an MLM, ELECTRA or fine-tuned one through its encoder, mean
pooling by default; a :class:`~fillmask.objectives.embedding.SentenceEmbedding` checkpoint with
its own pooling and normalisation), and so does a folder written by ``fillmask export`` (a
sentence-transformers folder brings its pooling along). Loading needs torch alone: no
Lightning, as for ``fillmask fill``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from fillmask.checkpoint_file import (
    CheckpointError,
    build_encoder,
    missing_tokenizer,
    read_checkpoint,
    stored_weights,
)
from fillmask.data.sentences import sentence_tokenizer
from fillmask.data.tokenize import resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.inference import check_device, length_batches, read_lines
from fillmask.metrics.ranking import Qrels, ranking_metrics
from fillmask.objectives.embedding import POOLINGS, check_pooling, pool

__all__ = ["SentenceEncoder", "embed_main", "retrieval_scores"]

ST_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
            "pooling_mode_max_tokens": "max"}
"""sentence-transformers' pooling flags fillmask computes."""


@dataclass
class SentenceEncoder:
    """An encoder, its tokenizer (``CLS ... SEP``, truncating at the model's positions) and a
    pooling: texts in, sentence vectors out. Build one with :meth:`load`."""

    encoder: nn.Module
    tokenizer: Tokenizer
    pooling: str = "mean"
    normalize: bool = False

    @classmethod
    def load(cls, path: str | Path, pooling: str | None = None, normalize: bool | None = None,
             device: str = "cpu", max_length: int | None = None) -> SentenceEncoder:
        """A ``.ckpt`` of any fillmask objective or a folder written by ``fillmask export``.
        ``pooling`` / ``normalize`` left None take the model's own (a SentenceEmbedding
        checkpoint's or a sentence-transformers folder's), else ``mean`` and no normalising.
        Texts are cut at ``max_length`` tokens (default: the encoder's positions)."""
        path = Path(path).expanduser()
        if path.is_dir():
            encoder, tokenizer, own = _from_folder(path)
        elif path.exists():
            encoder, tokenizer, own = _from_checkpoint(path)
        else:
            raise CheckpointError(f"checkpoint {path} does not exist; give a .ckpt written by "
                                  "`fillmask fit` or a folder written by `fillmask export`")
        chosen = check_pooling(pooling or own.get("pooling", "mean"))
        normalise = bool(own.get("normalize", False)) if normalize is None else normalize
        limit = max_length or getattr(encoder, "max_positions", None)
        encoder.to(check_device(device)).eval()
        return cls(encoder, sentence_tokenizer(tokenizer, limit), chosen, normalise)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Vectors (N, C) float32 of ``texts``, in their order; batches group texts of
        similar length so that little padding is computed."""
        encodings = self.tokenizer.encode_batch(list(texts))
        pad_id = resolve_special_tokens(self.tokenizer).pad_id
        out = np.zeros((len(texts), self.encoder.hidden_size), dtype=np.float32)
        for group in length_batches([len(e.ids) for e in encodings], batch_size):
            rows = [encodings[i].ids for i in group]
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)  # (B, T)
            for index, row in enumerate(rows):
                ids[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
                mask[index, : len(row)] = True
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.encoder(ids, attention_mask=mask)  # (B, T, C)
            vectors = pool(hidden.float(), mask, self.pooling)  # (B, C)
            if self.normalize:
                vectors = F.normalize(vectors, dim=-1)
            out[group] = vectors.cpu().numpy()
        return out


def _from_checkpoint(path: Path) -> tuple[nn.Module, Tokenizer, dict[str, object]]:
    """The encoder (trained weights) of any fillmask checkpoint, its tokenizer, and the
    pooling options a SentenceEmbedding checkpoint stored."""
    ckpt = read_checkpoint(path)
    encoder = build_encoder(ckpt)
    weights = {k.removeprefix("encoder."): v for k, v in stored_weights(ckpt, "encoder.").items()}
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its encoder weights do not load ({str(error)[:200]}); "
                              "use the checkpoint as fillmask fit wrote it") from None
    stored = ckpt["fillmask"].get("tokenizer")
    if stored is None:
        raise missing_tokenizer(path)
    hparams = ckpt.get("hyper_parameters") or {}
    own = {key: hparams[key] for key in ("pooling", "normalize") if key in hparams}
    return encoder, Tokenizer.from_str(stored), own


def _from_folder(path: Path) -> tuple[nn.Module, Tokenizer, dict[str, object]]:
    """The encoder of a transformers folder (fillmask's export, or a sentence-transformers
    folder with the encoder at its root) and the folder's pooling, where it names one."""
    from fillmask.sources import read_transformers

    parts, tokenizer = read_transformers(path)
    if tokenizer is None:
        raise missing_tokenizer(path, "tokenizer.json")
    return parts.encoder, tokenizer, sentence_transformers_options(path)


def sentence_transformers_options(folder: Path) -> dict[str, object]:
    """``pooling`` and ``normalize`` of a sentence-transformers folder (``1_Pooling``,
    ``2_Normalize`` in ``modules.json``); empty for other folders."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {}
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = {m["type"].rsplit(".", 1)[-1]: m["path"] for m in modules}
        options: dict[str, object] = {"normalize": "Normalize" in types}
        if "Pooling" in types:
            config = json.loads((folder / types["Pooling"] / "config.json").read_text("utf-8"))
            mode = config.get("pooling_mode") or next(
                (name for flag, name in ST_FLAGS.items() if config.get(flag)), None)
            if mode not in POOLINGS:
                raise CheckpointError(f"{folder}: sentence-transformers pooling {mode!r} is not "
                                      f"one fillmask computes ({', '.join(POOLINGS)}); pass "
                                      "--pooling")
            options["pooling"] = mode
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{modules_file} or its pooling config cannot be read ({error}); "
                              "export the folder again") from error
    return options


def retrieval_scores(model: SentenceEncoder, queries: Mapping[str, str],
                     corpus: Mapping[str, str], qrels: Qrels, k: int = 10,
                     batch_size: int = 32) -> dict[str, float]:
    """Dense retrieval with ``model``: every document of ``corpus`` (id -> text) scored by
    cosine similarity to each query of ``queries`` (id -> text), then MRR@k, nDCG@k and
    recall of :func:`fillmask.metrics.ranking.ranking_metrics` against ``qrels``."""
    query_ids, doc_ids = list(queries), list(corpus)
    q = torch.from_numpy(model.embed([queries[i] for i in query_ids], batch_size))  # (Q, C)
    d = torch.from_numpy(model.embed([corpus[i] for i in doc_ids], batch_size))  # (D, C)
    scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T  # (Q, D)
    run = {query: dict(zip(doc_ids, row, strict=True))
           for query, row in zip(query_ids, scores.tolist(), strict=True)}
    return ranking_metrics(run, qrels, k=k)


def embed_main(argv: list[str]) -> int:
    """Entry point of ``fillmask embed``; a user error is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog="fillmask embed", description=(
        "Sentence embeddings of a text file's non-blank lines, as a float32 (N, C) .npy matrix "
        "in input order."))
    parser.add_argument("--checkpoint", required=True,
                        help="a .ckpt of any objective, or a folder written by fillmask export")
    parser.add_argument("--file", required=True, help="UTF-8 text, one sentence per line "
                        "(- for standard input); blank lines are skipped")
    parser.add_argument("--output", required=True, help="the .npy file to write")
    parser.add_argument("--pooling", choices=POOLINGS, default=None,
                        help="cls, mean or max (default: the model's own, else mean)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="L2-normalise the vectors (default: the model's own, else no)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None,
                        help="cut texts at this many tokens (default: the model's positions)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        summary = run_embed(args)
    except FillmaskError as error:
        print(f"fillmask embed: error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def run_embed(args: argparse.Namespace) -> str:
    """Embed ``args.file`` into ``args.output``; returns the one-line summary."""
    output = Path(args.output).expanduser()
    if output.suffix != ".npy":
        raise FillmaskError(f"--output {output} must end in .npy (numpy's format)")
    if output.is_dir():
        raise FillmaskError(f"--output {output} is a folder; give a .npy file name")
    lines = read_lines(args.file)
    if not lines:
        raise FillmaskError(f"{args.file} holds no sentences (no non-blank line); write one "
                            "sentence per line")
    if args.batch_size < 1:
        raise FillmaskError(f"--batch-size {args.batch_size} must be at least 1")
    start = time.perf_counter()
    model = SentenceEncoder.load(args.checkpoint, args.pooling, args.normalize, args.device,
                                 args.max_length)
    vectors = model.embed([text for _, text in lines], args.batch_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, vectors)
    seconds = time.perf_counter() - start
    norm = ", normalized" if model.normalize else ""
    return (f"embedded {len(lines)} sentences from {args.file} -> {output}: "
            f"{vectors.shape[0]}x{vectors.shape[1]} float32, {model.pooling} pooling{norm}, "
            f"{seconds:.1f}s on {args.device}")
