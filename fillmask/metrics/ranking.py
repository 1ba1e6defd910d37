"""Ranking metrics over a run (query -> document -> score) and graded relevance judgements
(qrels: query -> document -> grade), defined as the reference evaluators define them.

- MRR@k is MS MARCO's: the reciprocal rank of the first relevant document among the top k
  (0 when none is), averaged over every judged query, including queries the run lacks.
- nDCG@k is trec_eval's ``ndcg_cut.k`` (BEIR reports it): gains are the grades, discounted by
  ``log2(rank + 1)``; the ideal ranking is built from all the query's judgements, not only the
  documents the run retrieved.
- Recall@k: the share of a query's relevant documents found in its top k.

A document is relevant when its grade is positive. Queries without any relevant document are
left out of the averages (they have no first relevant rank and no ideal gain). Ties in score are
broken as trec_eval breaks them: by document id, in descending order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]


def ranked(scores: Mapping[str, float]) -> list[str]:
    """Document ids from the highest score to the lowest (ties: larger id first)."""
    return [doc for doc, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]),
                                     reverse=True)]


def reciprocal_rank(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    """1 / rank of the first relevant document in the top ``k`` of ``ranking``, else 0."""
    for rank, doc in enumerate(ranking[:k], start=1):
        if grades.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    """Normalised discounted cumulative gain of the top ``k`` (linear gains, trec_eval)."""
    gains = [grades.get(doc, 0) for doc in ranking[:k]]
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    best = _dcg(ideal)
    return _dcg([max(g, 0) for g in gains]) / best if best > 0 else 0.0


def recall(ranking: list[str], grades: Mapping[str, int], k: int) -> float:
    """Share of the relevant documents that the top ``k`` holds."""
    relevant = {doc for doc, grade in grades.items() if grade > 0}
    return len(relevant.intersection(ranking[:k])) / len(relevant) if relevant else 0.0


def _dcg(gains: list[int]) -> float:
    return sum(gain / math.log2(rank + 1) for rank, gain in enumerate(gains, start=1))


def ranking_metrics(run: Run, qrels: Qrels, k: int = 10, recall_k: int = 100
                    ) -> dict[str, float]:
    """``mrr@k``, ``ndcg@k`` and ``recall@recall_k`` averaged over the judged queries that
    have a relevant document, and ``queries``, how many those are."""
    judged = [q for q, grades in qrels.items() if any(g > 0 for g in grades.values())]
    totals = {f"mrr@{k}": 0.0, f"ndcg@{k}": 0.0, f"recall@{recall_k}": 0.0}
    for query in judged:
        ranking = ranked(run.get(query, {}))
        grades = qrels[query]
        totals[f"mrr@{k}"] += reciprocal_rank(ranking, grades, k)
        totals[f"ndcg@{k}"] += ndcg(ranking, grades, k)
        totals[f"recall@{recall_k}"] += recall(ranking, grades, recall_k)
    count = max(len(judged), 1)
    return {**{name: value / count for name, value in totals.items()},
            "queries": float(len(judged))}
