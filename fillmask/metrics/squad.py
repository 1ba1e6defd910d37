"""SQuAD's exact match and token F1, defined as the official evaluation scripts define them
(``evaluate-v1.1.py`` and ``evaluate-v2.0.py``).

- Answers are compared after normalisation: lower case, punctuation removed, the articles
  ``a``, ``an``, ``the`` removed, whitespace collapsed to single spaces.
- Exact match is 1 when the normalised prediction equals a normalised gold answer.
- F1 is the harmonic mean of precision and recall of the bag of normalised words shared by
  the prediction and a gold answer; when either side is empty it is 1 if both are, else 0.
- Each question scores its best gold answer (the maximum over them). A question whose gold
  answers all normalise to nothing (SQuAD 2.0's unanswerable questions have none) has the one
  gold answer ``""``: it scores 1 exactly when the prediction is empty.
- Scores are averaged over the questions and reported in percent. For SQuAD 2.0 the averages
  over the answerable (``has_answer_*``) and unanswerable (``no_answer_*``) questions are
  reported too, each when such questions exist.

For a gold answer that normalises to words, this F1 is the v1.1 script's; the v2.0 script only
adds the empty cases. A question without a prediction scores 0 (the v1.1 rule; the v2.0
script, which needs every prediction, would stop there).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["exact_match", "f1", "gold_answers", "normalize_answer", "squad_evaluate",
           "squad_scores"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised prediction equals the normalised gold answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token F1 of the normalised prediction against the normalised gold answer; when either
    has no words, 1.0 if both have none, else 0.0."""
    predicted = normalize_answer(prediction).split()
    expected = normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(predicted)
    recall = shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def gold_answers(texts: Iterable[str]) -> list[str]:
    """The answers a prediction is compared with: those that normalise to words, or ``[""]``
    when none does (an unanswerable question)."""
    kept = [text for text in texts if normalize_answer(text)]
    return kept or [""]


def squad_scores(references: Mapping[str, Sequence[str]], predictions: Mapping[str, str]
                 ) -> dict[str, float]:
    """Exact match and F1 in percent of ``predictions`` {question id: text} against
    ``references`` {question id: gold answer texts (empty for an unanswerable question)}.

    Returns ``exact_match``, ``f1`` and ``total`` (questions), and when the references mix
    answerable and unanswerable questions (or hold only unanswerable ones) also
    ``has_answer_exact_match``, ``has_answer_f1``, ``no_answer_exact_match``,
    ``no_answer_f1`` (each pair only when such questions exist).
    """
    exact: dict[str, float] = {}
    token_f1: dict[str, float] = {}
    for qid, texts in references.items():
        golds = gold_answers(texts)
        guess = predictions.get(qid)
        exact[qid] = max(exact_match(guess, g) for g in golds) if guess is not None else 0.0
        token_f1[qid] = max(f1(guess, g) for g in golds) if guess is not None else 0.0
    scores = _averages(exact, token_f1, list(references), "")
    answerable = [qid for qid, texts in references.items() if gold_answers(texts) != [""]]
    unanswerable = [qid for qid in references if qid not in set(answerable)]
    if unanswerable:
        scores |= _averages(exact, token_f1, answerable, "has_answer_")
        scores |= _averages(exact, token_f1, unanswerable, "no_answer_")
    return scores


def _averages(exact: Mapping[str, float], token_f1: Mapping[str, float], ids: list[str],
              prefix: str) -> dict[str, float]:
    """Percent exact match and F1 over ``ids`` (nothing when there are none; zeros and a total
    of 0 for the whole set when it is empty)."""
    if not ids:
        return {} if prefix else {"exact_match": 0.0, "f1": 0.0, "total": 0.0}
    scores = {f"{prefix}exact_match": 100.0 * sum(exact[q] for q in ids) / len(ids),
              f"{prefix}f1": 100.0 * sum(token_f1[q] for q in ids) / len(ids)}
    if not prefix:
        scores["total"] = float(len(ids))
    return scores


def squad_evaluate(dataset: Sequence[Mapping[str, Any]], predictions: Mapping[str, str]
                   ) -> dict[str, float]:
    """The official evaluation of ``predictions`` {question id: text} over ``dataset``, the
    ``data`` list of a SQuAD JSON file (articles of paragraphs of ``qas``)."""
    references = {qa["id"]: [answer["text"] for answer in qa.get("answers", [])]
                  for article in dataset for paragraph in article["paragraphs"]
                  for qa in paragraph["qas"]}
    return squad_scores(references, predictions)
