"""Score sentences with a masked LM: pseudo-log-likelihood and minimal-pair accuracy.

The pseudo-log-likelihood (PLL, Salazar et al. 2020, "Masked Language Model Scoring") of a
sentence masks each of its tokens in turn and adds up the log-probability the model gives the
original token at the mask. Special tokens (CLS, SEP, UNK, ...) are not scored: fillmask never
masks them in training. With ``whole_word`` every piece of a word is masked at once and the
pieces' log-probabilities are added, so no piece of a word helps predict another (token by
token, the later pieces of a long word are nearly free, which favours sentences of rare
words). The pseudo-perplexity of a set of sentences is ``exp(-sum PLL / sum scored tokens)``.

Minimal pairs (BLiMP, Warstadt et al. 2020) ask whether the model prefers the acceptable
sentence of each pair: the share of pairs with PLL(good) > PLL(bad).

All masked copies of all sentences go through the model ``batch_size`` rows at a time, copies of
sentences of similar length together (a thousand sentences of about 20 tokens take about ten
seconds with the quickstart-size model on two CPU cores)::

    from fillmask.inference import FillMaskModel
    from fillmask.scoring import pseudo_log_likelihoods, pseudo_perplexity

    model = FillMaskModel.load("runs/quickstart/checkpoints/last.ckpt")
    scores = pseudo_log_likelihoods(model, ["The import statement loads a module."])
    scores[0].pll, scores[0].tokens, pseudo_perplexity(scores)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tokenizers import Encoding

from fillmask.errors import FillmaskError
from fillmask.inference import FillMaskModel, InputTooLongError, length_batches, read_lines

__all__ = ["MinimalPair", "MinimalPairResult", "PairScore", "SentenceScore",
           "minimal_pair_accuracy", "pseudo_log_likelihoods", "pseudo_perplexity", "read_pairs"]

DEFAULT_BATCH_SIZE = 64
"""Masked copies per forward pass. With the quickstart-size model on a 2-core CPU, 16 to 64
take the same time and 128 or more are slower (more padding, larger activations)."""

PAIR_KEYS = (("good", "bad"), ("sentence_good", "sentence_bad"))
"""Accepted key names of a minimal pair: short ones, or BLiMP's own."""


@dataclass(frozen=True)
class SentenceScore:
    """The pseudo-log-likelihood of one sentence, token by token."""

    text: str
    scored_tokens: tuple[str, ...]
    """The tokens that were masked and scored, in order (special tokens are left out)."""
    token_log_probs: tuple[float, ...]
    """Natural-log probability of each scored token with it (or its word) masked."""

    @property
    def pll(self) -> float:
        """The pseudo-log-likelihood: the sum of :attr:`token_log_probs`."""
        return math.fsum(self.token_log_probs)

    @property
    def tokens(self) -> int:
        """How many tokens were scored."""
        return len(self.token_log_probs)


class MinimalPair(NamedTuple):
    """An acceptable sentence, an unacceptable one, and where the pair was read from."""

    good: str
    bad: str
    line: int | None = None


@dataclass(frozen=True)
class PairScore:
    """Both sentences of a minimal pair, scored."""

    good: SentenceScore
    bad: SentenceScore

    @property
    def correct(self) -> bool:
        """Whether the model prefers the acceptable sentence (ties count as wrong)."""
        return self.good.pll > self.bad.pll


@dataclass(frozen=True)
class MinimalPairResult:
    """Every pair's scores, and the accuracy over them."""

    pairs: list[PairScore]

    @property
    def correct(self) -> int:
        return sum(pair.correct for pair in self.pairs)

    @property
    def total(self) -> int:
        return len(self.pairs)

    @property
    def accuracy(self) -> float:
        """Share of pairs with PLL(good) > PLL(bad); NaN without pairs."""
        return self.correct / self.total if self.pairs else math.nan


def pseudo_log_likelihoods(model: FillMaskModel, sentences: Sequence[str],
                           whole_word: bool = False,
                           batch_size: int = DEFAULT_BATCH_SIZE) -> list[SentenceScore]:
    """Score each sentence by masking its tokens (or words) one at a time.

    Args:
        model: The masked LM (see :meth:`FillMaskModel.load`).
        sentences: Plain text; an input longer than the model's positions raises
            :class:`~fillmask.inference.InputTooLongError` naming it.
        whole_word: Mask all pieces of a word together (words from the tokenizer's word ids,
            or, for a tokenizer without a pre-tokenizer, from pieces that touch).
        batch_size: Masked copies per forward pass.
    """
    encodings = model.encode(sentences)
    queries = [(index, group) for index, encoding in enumerate(encodings)
               for group in mask_groups(model, sentences[index], encoding, whole_word)]
    found: list[dict[int, float]] = [{} for _ in encodings]
    rows = [e.ids for e in encodings]
    for batch in length_batches([len(rows[s]) for s, _ in queries], batch_size):
        chosen = [queries[i] for i in batch]
        values = _score_copies(model, [rows[s] for s, _ in chosen], [g for _, g in chosen])
        for (sentence, group), logs in zip(chosen, values, strict=True):
            found[sentence].update(zip(group, logs, strict=True))
    return [_sentence_score(text, encoding.tokens, logs)
            for text, encoding, logs in zip(sentences, encodings, found, strict=True)]


def _sentence_score(text: str, tokens: list[str], logs: dict[int, float]) -> SentenceScore:
    positions = sorted(logs)
    return SentenceScore(text, tuple(tokens[p] for p in positions),
                         tuple(logs[p] for p in positions))


def _score_copies(model: FillMaskModel, rows: list[list[int]],
                  groups: list[tuple[int, ...]]) -> list[list[float]]:
    """For each row with its ``group`` of positions masked: the log-probability of the original
    token at each of those positions."""
    ids, attention = model.pad(rows)  # (B, T)
    row_index = torch.tensor([r for r, group in enumerate(groups) for _ in group])  # (N,)
    column = torch.tensor([p for group in groups for p in group])  # (N,)
    targets = ids[row_index, column]  # (N,)
    ids[row_index, column] = model.special.mask_id
    log_probs = model.log_probs(ids, attention, row_index, column)  # (N, V)
    picked = log_probs.gather(1, targets[:, None]).squeeze(1).tolist()  # (N,)
    out, start = [], 0
    for group in groups:
        out.append(picked[start: start + len(group)])
        start += len(group)
    return out


def mask_groups(model: FillMaskModel, text: str, encoding: Encoding, whole_word: bool
                ) -> list[tuple[int, ...]]:
    """The positions masked together in each copy of ``text`` (tokenised as ``encoding``):
    every non-special token alone, or (``whole_word``) all pieces of each word."""
    special = set(model.special.special_ids)
    flags = encoding.special_tokens_mask
    scored = [p for p, token in enumerate(encoding.ids) if not flags[p] and token not in special]
    if not whole_word:
        return [(p,) for p in scored]
    starts = word_starts(text, encoding, by_offsets=model.tokenizer.pre_tokenizer is None)
    groups: list[list[int]] = []
    for p in scored:
        if groups and groups[-1][-1] == p - 1 and not starts[p]:
            groups[-1].append(p)
        else:
            groups.append([p])
    return [tuple(group) for group in groups]


def word_starts(text: str, encoding: Encoding, by_offsets: bool) -> list[bool]:
    """Per token, whether it begins a word: a new word id, or, for a tokenizer without a
    pre-tokenizer (``by_offsets``: one word id for everything), a piece whose text does not
    touch the previous piece's (as :func:`fillmask.data.packing.encode_with_word_starts`
    derives words) or that starts on whitespace (a SentencePiece ``▁`` made from a space)."""
    if by_offsets:
        offsets = encoding.offsets
        return [p == 0 or start != offsets[p - 1][1] or text[start: start + 1].isspace()
                for p, (start, _) in enumerate(offsets)]
    words = encoding.word_ids
    return [p == 0 or word is None or word != words[p - 1] for p, word in enumerate(words)]


def pseudo_perplexity(scores: Iterable[SentenceScore]) -> float:
    """``exp(-sum PLL / sum scored tokens)`` over ``scores``; NaN when no token was scored."""
    scores = list(scores)
    tokens = sum(score.tokens for score in scores)
    if tokens == 0:
        return math.nan
    return math.exp(-math.fsum(score.pll for score in scores) / tokens)


def minimal_pair_accuracy(model: FillMaskModel, pairs: Sequence[tuple[str, str] | MinimalPair],
                          whole_word: bool = False,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> MinimalPairResult:
    """Score both sentences of each ``(good, bad)`` pair (one batched pass over all of them)
    and count the pairs where PLL(good) > PLL(bad)."""
    sentences = [text for pair in pairs for text in (pair[0], pair[1])]
    scores = pseudo_log_likelihoods(model, sentences, whole_word, batch_size)
    return MinimalPairResult([PairScore(scores[i], scores[i + 1])
                              for i in range(0, len(scores), 2)])


def read_pairs(path: str) -> list[MinimalPair]:
    """The minimal pairs of a JSON-lines file (``-``: standard input), one object per line with
    ``good`` and ``bad`` (or BLiMP's ``sentence_good`` and ``sentence_bad``); other keys are
    ignored. A line that is not such an object is an error naming the file and line."""
    pairs = [_pair(path, number, line) for number, line in read_lines(path)]
    if not pairs:
        raise FillmaskError(f"{path} holds no minimal pairs; write one JSON object per line, "
                            'e.g. {"good": "The cat sleeps.", "bad": "The cat sleep."}')
    return pairs


def _pair(path: str, number: int, line: str) -> MinimalPair:
    where = f"{path} line {number}"
    fix = 'each line must be a JSON object such as {"good": "...", "bad": "..."}'
    try:
        item = json.loads(line)
    except ValueError as error:
        raise FillmaskError(f"{where} is not valid JSON ({error}); {fix}") from None
    if not isinstance(item, dict):
        raise FillmaskError(f"{where} is not a JSON object; {fix}")
    keys = next((k for k in PAIR_KEYS if k[0] in item or k[1] in item), PAIR_KEYS[0])
    missing = [key for key in keys if key not in item]
    if missing:
        raise FillmaskError(f"{where} lacks the key {missing[0]!r}; {fix} (BLiMP's "
                            "sentence_good and sentence_bad work too)")
    good, bad = item[keys[0]], item[keys[1]]
    if not isinstance(good, str) or not isinstance(bad, str):
        raise FillmaskError(f"{where}: {keys[0]!r} and {keys[1]!r} must be strings; {fix}")
    return MinimalPair(good, bad, number)


# What `fillmask score` prints.

def print_scores(model: FillMaskModel, sentences: Sequence[str], whole_word: bool = False,
                 batch_size: int = DEFAULT_BATCH_SIZE, as_json: bool = False) -> None:
    """Print each sentence's PLL and scored tokens, then the pseudo-perplexity of them all
    (``as_json``: one object per sentence, then ``{"summary": {...}}``)."""
    scores = pseudo_log_likelihoods(model, sentences, whole_word, batch_size)
    perplexity = pseudo_perplexity(scores)
    total = sum(score.tokens for score in scores)
    if as_json:
        for score in scores:
            print(json.dumps({"input": score.text, "pll": score.pll, "tokens": score.tokens}))
        summary = {"sentences": len(scores), "tokens": total,
                   "pll": math.fsum(score.pll for score in scores),
                   "pseudo_perplexity": None if math.isnan(perplexity) else perplexity,
                   "whole_word": whole_word}
        print(json.dumps({"summary": summary}))
        return
    print(f"{'PLL':>10}  {'tokens':>6}  sentence")
    for score in scores:
        print(f"{score.pll:10.4f}  {score.tokens:6d}  {score.text}")
    print(f"pseudo-perplexity {perplexity:.4f} over {total} tokens of {len(scores)} sentences"
          + (" (whole words masked)" if whole_word else ""))


def print_pairs(model: FillMaskModel, paths: Sequence[str], whole_word: bool = False,
                batch_size: int = DEFAULT_BATCH_SIZE, as_json: bool = False) -> None:
    """Print the minimal-pair accuracy of each file of ``paths`` (and of all, when several);
    ``as_json``: one object per pair, then ``{"summary": {...}}``."""
    files = {path: read_pairs(path) for path in paths}  # every file checked before scoring
    pairs = [(path, pair) for path, found in files.items() for pair in found]
    try:
        result = minimal_pair_accuracy(model, [pair for _, pair in pairs], whole_word, batch_size)
    except InputTooLongError as error:
        path, pair = pairs[error.index // 2]
        side = "bad" if error.index % 2 else "good"
        label = f"the {side} sentence of {path} line {pair.line}"
        raise InputTooLongError(error.index, error.length, error.limit, label) from None
    by_file: dict[str, list[PairScore]] = {path: [] for path in files}
    for (path, pair), scored in zip(pairs, result.pairs, strict=True):
        by_file[path].append(scored)
        if as_json:
            print(json.dumps({"file": path, "line": pair.line, "good": pair.good,
                              "bad": pair.bad, "pll_good": scored.good.pll,
                              "pll_bad": scored.bad.pll, "correct": scored.correct}))
    counts = {path: MinimalPairResult(found) for path, found in by_file.items()}
    if as_json:
        summary = {**_counts(result), "whole_word": whole_word,
                   "files": {path: _counts(found) for path, found in counts.items()}}
        print(json.dumps({"summary": summary}))
        return
    for path, found in counts.items():
        print(f"{path}: {_accuracy_line(found)}")
    if len(counts) > 1:
        print(f"all: {_accuracy_line(result)}")


def _counts(result: MinimalPairResult) -> dict[str, float | int]:
    return {"pairs": result.total, "correct": result.correct, "accuracy": result.accuracy}


def _accuracy_line(result: MinimalPairResult) -> str:
    return (f"{result.correct} of {result.total} pairs correct ({100 * result.accuracy:.1f}%): "
            "PLL(good) > PLL(bad)")
