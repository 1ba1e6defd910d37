"""Entity (chunk) precision, recall and F1 as conlleval, the Perl script of the CoNLL-2000 and
CoNLL-2003 shared tasks, defines them.

A tag is ``O`` or ``PREFIX-TYPE`` (``B-PER``). conlleval decides between each pair of
neighbouring words whether a chunk ends after the first and whether one starts at the second
(its ``endOfChunk`` and ``startOfChunk``); a sentence starts and ends as if ``O`` stood beside
it. Its rules, which :func:`entity_spans` follows:

- a chunk starts at ``B-`` (after ``B-``, ``I-`` or ``O``), at ``I-`` after ``O``, at ``E-``
  after ``E-`` or ``O``, at ``I-`` after ``E-``, and at any tag whose type differs from the
  previous word's (so an ill-formed ``I-PER`` after ``O`` or after ``B-LOC`` starts a chunk);
- a chunk ends before ``B-`` or ``O`` when it was at ``B-`` or ``I-``, before ``E-``, ``I-`` or
  ``O`` when it was at ``E-``, and before any change of type.

conlleval has one rule set, not one per scheme: IOB1 (``I-`` everywhere, ``B-`` only between
two adjacent chunks of one type) and IOB2 (``B-`` opens every chunk) are decoded alike, so
``iob1`` and ``iob2`` give the same spans and differ only in name (both accept the prefixes ``B``
and ``I``). conlleval knows no ``S-``; ``iobes`` extends the rules as the IOBES
versions of conlleval do: ``S-`` always starts and always ends a chunk, and a chunk always ends
after ``E-`` (so ``E-PER B-PER`` are two chunks; plain conlleval would join them).

A chunk is correct when the gold and the predicted sequence have a chunk of the same type with
the same first and last word, which is what conlleval's parallel scan counts. Scores are
fractions (conlleval prints percentages): precision = correct / predicted chunks, recall =
correct / gold chunks, F1 their harmonic mean, each 0 when its denominator is.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

Scheme = Literal["iob1", "iob2", "iobes"]
SchemeOrAuto = Literal["iob1", "iob2", "iobes", "auto"]
OUTSIDE = "O"

PREFIXES: dict[str, frozenset[str]] = {
    "iob1": frozenset("BI"),
    "iob2": frozenset("BI"),
    "iobes": frozenset("BIES"),
}

# (previous prefix, prefix) pairs after which conlleval ends / starts a chunk, besides a
# change of type. "O" is the outside tag.
_ENDS = frozenset({("B", "B"), ("B", "O"), ("I", "B"), ("I", "O"),
                   ("E", "E"), ("E", "I"), ("E", "O")})
_STARTS = frozenset({("B", "B"), ("I", "B"), ("O", "B"), ("O", "I"),
                     ("E", "E"), ("E", "I"), ("O", "E")})
# What the IOBES versions of conlleval add for S- and for B- after E-.
_IOBES_ENDS = _ENDS | {("B", "S"), ("I", "S"), ("E", "S"), ("E", "B")} | {
    ("S", tag) for tag in "BIOES"}
_IOBES_STARTS = _STARTS | {("S", "B"), ("E", "B"), ("S", "I"), ("S", "E")} | {
    (prev, "S") for prev in "BIOES"}


class Span(NamedTuple):
    """One chunk: its type and its first and last word (inclusive)."""

    type: str
    start: int
    end: int


def split_tag(tag: str, scheme: Scheme) -> tuple[str, str]:
    """``(prefix, type)`` of a tag (``("O", "")`` for the outside tag); raises ``ValueError``
    for a tag that is not ``O`` or ``PREFIX-TYPE`` with a prefix of ``scheme``."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, dash, kind = tag.partition("-")
    if not dash or not kind or prefix not in PREFIXES[scheme]:
        allowed = ", ".join(f"{p}-TYPE" for p in sorted(PREFIXES[scheme]))
        raise ValueError(f"tag {tag!r} is not O or one of {allowed} ({scheme} tags)")
    return prefix, kind


def detect_scheme(tags: Iterable[str]) -> Scheme:
    """``iobes`` when any tag begins ``S-`` or ``E-``, else ``iob2`` (conlleval decodes IOB1
    exactly as IOB2, so the choice between them changes no span)."""
    return "iobes" if any(t.startswith(("S-", "E-")) for t in tags) else "iob2"


def _resolve(scheme: SchemeOrAuto, tags: Iterable[str]) -> Scheme:
    if scheme == "auto":
        return detect_scheme(tags)
    if scheme not in PREFIXES:
        raise ValueError(f"scheme={scheme!r} is unknown; use iob1, iob2, iobes or auto")
    return scheme


def entity_spans(tags: Sequence[str], scheme: SchemeOrAuto = "auto") -> list[Span]:
    """The chunks of one sentence's tags, in order, as conlleval finds them."""
    resolved = _resolve(scheme, tags)
    ends, starts = (_IOBES_ENDS, _IOBES_STARTS) if resolved == "iobes" else (_ENDS, _STARTS)
    spans: list[Span] = []
    open_at: int | None = None
    prev_prefix, prev_type = OUTSIDE, ""
    for position, tag in enumerate([*tags, OUTSIDE]):  # a trailing O closes the last chunk
        prefix, kind = split_tag(tag, resolved)
        type_changed = kind != prev_type
        if open_at is not None and ((prev_prefix, prefix) in ends or type_changed):
            spans.append(Span(prev_type, open_at, position - 1))
            open_at = None
        if prefix != OUTSIDE and ((prev_prefix, prefix) in starts or type_changed):
            open_at = position  # a non-O tag that starts nothing continues the open chunk
        prev_prefix, prev_type = prefix, kind
    return spans


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def scores_from_counts(correct: int, gold: int, predicted: int) -> dict[str, float | int]:
    """Precision, recall and F1 (fractions) of chunk counts, with the counts."""
    precision, recall = _ratio(correct, predicted), _ratio(correct, gold)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "correct": correct, "gold": gold, "predicted": predicted}


def entity_counts(gold_sequences: Iterable[Sequence[str]],
                  predicted_sequences: Iterable[Sequence[str]], scheme: SchemeOrAuto = "auto"
                  ) -> dict[str, Counter[str]]:
    """Per type, the ``correct``, ``gold`` and ``predicted`` chunk counts over sentences (what
    :func:`entity_scores` divides; sums of them over data shards give the same scores)."""
    gold_list = [list(s) for s in gold_sequences]
    predicted_list = [list(s) for s in predicted_sequences]
    if len(gold_list) != len(predicted_list):
        raise ValueError(f"{len(gold_list)} gold sentences but {len(predicted_list)} predicted")
    if scheme == "auto":  # one scheme for the whole data, from every tag seen
        scheme = detect_scheme(t for s in gold_list + predicted_list for t in s)
    counts: dict[str, Counter[str]] = {"correct": Counter(), "gold": Counter(),
                                       "predicted": Counter()}
    for row, (gold, predicted) in enumerate(zip(gold_list, predicted_list, strict=True)):
        if len(gold) != len(predicted):
            raise ValueError(f"sentence {row} has {len(gold)} gold tags but {len(predicted)} "
                             "predicted tags")
        gold_spans, predicted_spans = entity_spans(gold, scheme), entity_spans(predicted, scheme)
        counts["gold"].update(s.type for s in gold_spans)
        counts["predicted"].update(s.type for s in predicted_spans)
        counts["correct"].update(s.type for s in set(gold_spans) & set(predicted_spans))
    return counts


def entity_scores(gold_sequences: Iterable[Sequence[str]],
                  predicted_sequences: Iterable[Sequence[str]], scheme: SchemeOrAuto = "auto"
                  ) -> dict:
    """conlleval's scores of predicted against gold tag sequences (one per sentence).

    Returns ``precision``, ``recall``, ``f1`` (micro over all chunks, fractions 0..1), the
    counts ``correct``, ``gold`` and ``predicted``, and ``per_type``: the same six entries for
    each chunk type seen in either side.
    """
    counts = entity_counts(gold_sequences, predicted_sequences, scheme)
    types = sorted(set(counts["gold"]) | set(counts["predicted"]))
    totals = {name: sum(counter.values()) for name, counter in counts.items()}
    result: dict = scores_from_counts(totals["correct"], totals["gold"], totals["predicted"])
    result["per_type"] = {t: scores_from_counts(counts["correct"][t], counts["gold"][t],
                                                counts["predicted"][t]) for t in types}
    return result
