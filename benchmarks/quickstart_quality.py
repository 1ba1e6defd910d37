"""Does the quickstart model really learn language? Fill masks in held-out prose.

Held-out text is the cleaned docstring prose of an installed third-party package (a source the
model never saw: it trained on CPython's own documentation). 15% of its tokens are replaced by
the mask token; the script reports top-1 accuracy at those positions against the majority
baseline (always guessing the most frequent masked token, which is an upper bound of any constant
guess), and how varied the predictions are.

    python benchmarks/quickstart_quality.py --checkpoint runs/quickstart/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections import Counter
from pathlib import Path

import datasets
import torch

from fillmask.data.embedded import docstring_documents
from fillmask.data.packing import ChunkPacking
from fillmask.inference import FillMaskModel
from fillmask.masking.random import SampleRandom
from fillmask.masking.token import TokenMasking


def package_root(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; pass --package with another one")
    return Path(next(iter(spec.submodule_search_locations)))


def held_out_blocks(fm: FillMaskModel, package: str, max_tokens: int) -> torch.Tensor:
    docs = docstring_documents(package_root(package), package)
    length = min(fm.model.encoder.max_positions, 128)
    texts = [d.text for d in docs]
    blocks = ChunkPacking().pack(texts, list(range(len(texts))), fm.tokenizer, fm.special,
                                 length, seed=0)["input_ids"]
    rows = torch.tensor([list(b) for b in blocks[: max_tokens // length]], dtype=torch.long)
    return rows  # (N, T)


@torch.no_grad()
def evaluate(fm: FillMaskModel, blocks: torch.Tensor, batch_size: int = 64) -> dict:
    masking = TokenMasking(rate=0.15, mask_fraction=1.0, random_fraction=0.0)
    vocab = fm.special.vocab_info(fm.tokenizer.get_vocab_size())
    predictions, targets = [], []
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]
        rng = SampleRandom(seed=1234, epoch=0, sample_ids=range(start, start + len(ids)))
        masked = masking(ids.numpy(), rng, vocab)
        labels = torch.from_numpy(masked.labels)
        hidden = fm.model.encoder(torch.from_numpy(masked.input_ids))
        selected = labels != -100
        logits = fm.model.head(hidden[selected])[:, : vocab.vocab_size]
        predictions.append(logits.argmax(-1))
        targets.append(labels[selected])
    pred, gold = torch.cat(predictions), torch.cat(targets)
    majority_id, majority_count = Counter(gold.tolist()).most_common(1)[0]
    accuracy = (pred == gold).float().mean().item()
    majority = majority_count / len(gold)
    top = Counter(pred.tolist()).most_common(10)
    return {
        "masked_tokens": len(gold),
        "top1_accuracy": accuracy,
        "majority_token": fm.tokenizer.id_to_token(majority_id),
        "majority_accuracy": majority,
        "ratio_to_majority": accuracy / majority,
        "distinct_predictions": len(set(pred.tolist())),
        "most_predicted": [[fm.tokenizer.id_to_token(i), n / len(pred)] for i, n in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--package", default="pandas", help="installed package to read prose from")
    parser.add_argument("--max-tokens", type=int, default=200_000)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    fm = FillMaskModel.from_checkpoint(args.checkpoint)
    blocks = held_out_blocks(fm, args.package, args.max_tokens)
    report = {"package": args.package, "checkpoint": args.checkpoint, **evaluate(fm, blocks)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
