"""`fillmask inspect`: show what the model will see, batch by batch.

Prints a few batches of a config's data pipeline with the masked positions marked, and per-batch
statistics (masked share, the [MASK]/random/keep split, padding, documents per sample); or, with
``--json``, one JSON object per sample with its ids, labels, word ids and spans.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np
import torch

from fillmask.data.config import datamodule_from_config, parse_with_data_overrides
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.errors import FillmaskError
from fillmask.masking.base import IGNORE_INDEX

LEGEND = "{word} = [MASK] predicts `word`;  {word>other} = replaced by `other`;  {=word} = kept"


def batch_statistics(batch: dict[str, torch.Tensor], original: torch.Tensor, pad_id: int,
                     max_length: int) -> dict[str, Any]:
    """Masked share of real tokens, the corruption split, padding and packing."""
    real = original != pad_id
    selected = batch["labels"] != IGNORE_INDEX
    stats = {
        "samples": len(original),
        "width": original.shape[1],
        "masked_share": float(selected.sum()) / max(int(real.sum()), 1),
        "padding_share": float((~real).sum()) / real.numel(),
        "fill_of_max_length": float(real.sum()) / (len(original) * max_length),
    }
    if "document_ids" in batch:
        stats["documents_per_sample"] = float(
            (batch["document_ids"].amax(dim=1) + 1).float().mean())
    if "pair_label" in batch:
        stats["pair_label_1_share"] = float(batch["pair_label"].float().mean())
    return stats


def corruption_split(batch: dict[str, torch.Tensor], original: torch.Tensor, mask_id: int
                     ) -> dict[str, float]:
    selected = batch["labels"] != IGNORE_INDEX
    n = max(int(selected.sum()), 1)
    as_mask = selected & (batch["input_ids"] == mask_id)
    kept = selected & (batch["input_ids"] == original)
    random = selected & ~as_mask & ~kept
    return {"mask": float(as_mask.sum()) / n, "random": float(random.sum()) / n,
            "keep": float(kept.sum()) / n}


def render_sample(tokens: list[str], shown: list[int], labels: list[int], id_to_token,
                  mask_id: int, pad_id: int, original: list[int]) -> str:
    """The sample as tokens, with every position to predict marked (see LEGEND)."""
    parts = []
    for position, token in enumerate(tokens):
        if original[position] == pad_id:
            break
        if labels[position] == IGNORE_INDEX:
            parts.append(token)
        elif shown[position] == mask_id:
            parts.append(f"{{{token}}}")
        elif shown[position] == original[position]:
            parts.append(f"{{={token}}}")
        else:
            parts.append(f"{{{token}>{id_to_token(shown[position])}}}")
    return " ".join(parts)


def sample_records(batch: dict[str, torch.Tensor], original: torch.Tensor) -> Iterator[dict]:
    """One JSON-ready dict per sample of the batch (padding left out)."""
    mask = batch.get("attention_mask")
    for row in range(len(original)):
        length = int(mask[row].sum()) if mask is not None else original.shape[1]
        record: dict[str, Any] = {"sample_id": int(batch["sample_id"][row])}
        for key in ("input_ids", "labels", "word_ids", "token_type_ids", "position_ids",
                    "document_ids"):
            if key in batch:
                record[key] = batch[key][row, :length].tolist()
        record["original_ids"] = original[row, :length].tolist()
        if "pair_label" in batch:
            record["pair_label"] = int(batch["pair_label"][row])
        if "span_left" in batch:
            left, right = batch["span_left"][row], batch["span_right"][row]
            bounds = sorted({(int(a) + 1, int(b)) for a, b in zip(left, right, strict=True)
                             if a >= -1 and b >= 0})
            record["spans"] = [list(b) for b in bounds]
        yield record


def run(dm: MaskedLMDataModule, batches: int, samples: int, split: str, out: TextIO,
        as_json: bool) -> None:
    dm.setup()
    train = split == "train"
    loader = dm._loader(split, train=train, keep_word_ids=True)
    tok, special = dm.tokenizer, dm.special_tokens
    rows = dm.samples[split].with_format("numpy")
    if not as_json:
        print(f"{split}: {len(rows)} samples of at most {dm.max_length} tokens, packing "
              f"{type(dm.packing).__name__} (efficiency {dm.packing_efficiency(split):.1%}), "
              f"masking {type(dm.masking).__name__} ({dm.masking_mode})", file=out)
        print(LEGEND, file=out)
    for index, batch in enumerate(loader):
        if index >= batches:
            break
        original = _original_ids(batch, rows, special.pad_id)
        if as_json:
            for record in sample_records(batch, original):
                out.write(json.dumps(record) + "\n")
            continue
        stats = batch_statistics(batch, original, special.pad_id, dm.max_length)
        split_ = corruption_split(batch, original, special.mask_id)
        extra = "".join(f", {k.replace('_', ' ')} {v:.2f}" for k, v in stats.items()
                        if k in ("documents_per_sample", "pair_label_1_share"))
        print(f"\nbatch {index}: {stats['samples']} x {stats['width']} tokens, masked "
              f"{stats['masked_share']:.1%} of real tokens (mask {split_['mask']:.0%} / random "
              f"{split_['random']:.0%} / keep {split_['keep']:.0%}), padding "
              f"{stats['padding_share']:.1%}, fill {stats['fill_of_max_length']:.1%}{extra}",
              file=out)
        for row in range(min(samples, len(original))):
            ids = original[row].tolist()
            tokens = [tok.id_to_token(i) or "?" for i in ids]
            text = render_sample(tokens, batch["input_ids"][row].tolist(),
                                 batch["labels"][row].tolist(), tok.id_to_token,
                                 special.mask_id, special.pad_id, ids)
            print(f"  [{int(batch['sample_id'][row])}] {text}", file=out)


def _original_ids(batch: dict[str, torch.Tensor], rows, pad_id: int) -> torch.Tensor:
    """The unmasked ids of the batch's samples, padded like the batch."""
    width = batch["input_ids"].shape[1]
    ids = np.full((len(batch["sample_id"]), width), pad_id, dtype=np.int64)
    for row, sample in enumerate(batch["sample_id"].tolist()):
        values = rows[sample % len(rows)]["input_ids"]
        ids[row, : len(values)] = values
    return torch.from_numpy(ids)


def inspect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fillmask inspect", description=(
        "Show what the model will see: batches of a config's data pipeline, masked positions "
        "marked, with statistics. Extra --data.* options override the config."))
    parser.add_argument("--config", required=True, help="the YAML given to fillmask fit")
    parser.add_argument("--batches", type=int, default=2, help="batches to show (default 2)")
    parser.add_argument("--samples", type=int, default=3, help="samples printed per batch")
    parser.add_argument("--split", choices=["train", "validation"], default="train")
    parser.add_argument("--json", metavar="FILE", help="write one JSON object per sample to "
                        "FILE (- for standard output) instead of the text view")
    args, overrides = parse_with_data_overrides(parser, argv,
                                                "inspect takes --data.* overrides only")
    try:
        dm = datamodule_from_config(args.config, overrides)
        if args.json and args.json != "-":
            with open(args.json, "w", encoding="utf-8") as out:
                run(dm, args.batches, args.samples, args.split, out, as_json=True)
            print(f"wrote {args.json}")
        else:
            run(dm, args.batches, args.samples, args.split, sys.stdout, as_json=bool(args.json))
    except (FillmaskError, ValueError) as error:
        print(f"fillmask inspect: error: {error}", file=sys.stderr)
        return 2
    return 0
