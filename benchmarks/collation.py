"""Collation with masking: fillmask against transformers' DataCollatorForLanguageModeling.

Both collators get the same packed token blocks (from the embedded corpus, WordPiece 8192) in
their native input: transformers a list of examples (`input_ids` lists, plus `offset_mapping`
for whole-word masking, built so its word boundaries are exactly fillmask's), fillmask the
rows the data module's Arrow reader returns. Each scheme runs in the same process, one thread
(as in a loader worker), alternating between the two collators so that machine noise hits
both. Whole-word and span masking are compared with transformers' whole-word mode, the
closest it has.

    python benchmarks/collation.py [--batches 64] [--batch-size 32] [--length 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerTraining
from fillmask.masking.span import SpanMasking
from fillmask.masking.token import TokenMasking
from fillmask.masking.whole_word import WholeWordMasking


def load_blocks(count: int, length: int) -> tuple[MaskedLMDataModule, dict[str, np.ndarray]]:
    dm = MaskedLMDataModule(tokenizer_training=TokenizerTraining("wordpiece", 8192),
                            max_length=length)
    dm.setup()
    rows = dm.samples["train"].with_format("numpy")[:count]
    if len(rows["input_ids"]) < count:
        raise SystemExit(f"the corpus gives only {len(rows['input_ids'])} blocks; lower --batches")
    return dm, {"input_ids": rows["input_ids"], "word_starts": rows["word_starts"]}


def synthetic_offsets(starts: np.ndarray) -> list[list[tuple[int, int]]]:
    """Character offsets whose gaps fall exactly at fillmask's word starts (one char per piece)."""
    out = []
    for row in starts:
        position, offsets = 0, []
        for flag in row:
            position += int(flag)  # a one-character gap before each word start
            offsets.append((position, position + 1))
            position += 1
        out.append(offsets)
    return out


def hf_collator(dm: MaskedLMDataModule, whole_word: bool):
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    names = {role: dm.tokenizer.id_to_token(getattr(dm.special_tokens, f"{role}_id"))
             for role in ("mask", "pad", "cls", "sep")}
    tok = PreTrainedTokenizerFast(tokenizer_object=dm.tokenizer, mask_token=names["mask"],
                                  pad_token=names["pad"], cls_token=names["cls"],
                                  sep_token=names["sep"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DataCollatorForLanguageModeling(tok, mlm_probability=0.15,
                                               whole_word_mask=whole_word, seed=0)


def time_per_batch(run: Callable[[int], object], batches: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for b in range(batches):
            run(b)
        best = min(best, (time.perf_counter() - start) / batches)
    return best


def run_each(collate: Callable, inputs: list, b: int) -> object:
    return collate(inputs[b])


def compare(ours: Callable[[int], object], theirs: Callable[[int], object], batches: int,
            rounds: int) -> tuple[float, float]:
    """Seconds per batch of each, alternating twice so that machine noise hits both."""
    ours_s = theirs_s = float("inf")
    for _ in range(2):
        ours_s = min(ours_s, time_per_batch(ours, batches, rounds))
        theirs_s = min(theirs_s, time_per_batch(theirs, batches, rounds))
    return ours_s, theirs_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; the best is kept")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    B = args.batch_size
    dm, blocks = load_blocks(args.batches * B, args.length)
    ids, starts = blocks["input_ids"], blocks["word_starts"]
    offsets = synthetic_offsets(starts)
    hf_examples = {
        False: [[{"input_ids": ids[i].tolist()} for i in range(b * B, (b + 1) * B)]
                for b in range(args.batches)],
        True: [[{"input_ids": ids[i].tolist(), "offset_mapping": offsets[i]}
                for i in range(b * B, (b + 1) * B)] for b in range(args.batches)],
    }
    schemes = {"token": (TokenMasking(), False), "whole_word": (WholeWordMasking(), True),
               "span": (SpanMasking(), True)}
    results = []
    for name, (masking, whole_word) in schemes.items():
        dm.masking = masking
        ours = dm.collator(train=True)
        theirs = hf_collator(dm, whole_word)
        fetched = [{"input_ids": ids[b * B:(b + 1) * B], "word_starts": starts[b * B:(b + 1) * B],
                    "sample_id": np.arange(b * B, (b + 1) * B), "epoch": np.zeros(B, np.int64)}
                   for b in range(args.batches)]
        ours_s, theirs_s = compare(partial(run_each, ours, fetched),
                                   partial(run_each, theirs, hf_examples[whole_word]),
                                   args.batches, args.rounds)
        tokens = B * args.length
        row = {"scheme": name, "reference": "transformers " + ("whole-word" if whole_word
                                                              else "token"),
               "fillmask_tokens_per_s": tokens / ours_s,
               "reference_tokens_per_s": tokens / theirs_s, "ratio": theirs_s / ours_s}
        results.append(row)
    print(f"collation, batch {B} x {args.length}, one thread, best of {args.rounds} x "
          f"{args.batches} batches")
    print(f"{'scheme':<11} {'reference':<25} {'fillmask Mtok/s':>16} {'reference Mtok/s':>17} "
          f"{'ratio':>7}")
    for r in results:
        print(f"{r['scheme']:<11} {r['reference']:<25} {r['fillmask_tokens_per_s'] / 1e6:>16.2f} "
              f"{r['reference_tokens_per_s'] / 1e6:>17.2f} {r['ratio']:>6.1f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"batch_size": B, "length": args.length, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
