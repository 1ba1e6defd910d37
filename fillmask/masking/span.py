"""Span masking (SpanBERT): mask contiguous spans of whole words until a token budget is met.

Span lengths, in words, follow a geometric distribution (p = 0.2) truncated to [1, 10] and
renormalised (mean 3.8 words). Each span gets one [MASK] / random / keep decision, and the
positions just outside it (``span_left`` = start - 1, ``span_right`` = end + 1) are returned
for the span-boundary objective.

The batch is processed at once, without a per-span loop: each row's words are tiled with
candidate spans separated by random gaps (so candidates never touch or overlap), the candidates
are visited in a random order, and spans are accepted while the tokens accepted before them stay
under the budget (``round(rate x ordinary tokens)``) less the expected overshoot of the last
span, so each row lands on the budget on average and never exceeds it by more than one span.
The random visiting order makes acceptance independent of a span's length and position;
candidates that would run past the last word, or across a special token (the SEP between two
documents of a packed block), are discarded, so short documents get shorter spans.
"""

from __future__ import annotations

import numpy as np

from fillmask.masking.base import MaskedTokens, Masking, VocabInfo
from fillmask.masking.random import SampleRandom
from fillmask.masking.token import REPLACE, Replacement
from fillmask.masking.whole_word import gather, per_word

CANDIDATES = 3  # random stream of span lengths, gaps, visiting order and decisions


def span_length_distribution(p: float, min_length: int, max_length: int) -> np.ndarray:
    """Probabilities of lengths min_length..max_length: geometric(p), truncated, renormalised."""
    lengths = np.arange(min_length, max_length + 1)
    weights = p * (1 - p) ** (lengths - 1)
    return weights / weights.sum()


class SpanMasking(Masking):
    """SpanBERT masking: whole-word spans with geometric lengths, up to a token budget."""

    needs_word_ids = True

    def __init__(
        self,
        rate: float = 0.15,
        geometric_p: float = 0.2,
        min_length: int = 1,
        max_length: int = 10,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        eval_rate: float | None = None,
        replacement: Replacement = "uniform",
    ) -> None:
        """Configure the scheme.

        Args:
            rate: Token budget per row, as a fraction of its ordinary tokens.
            geometric_p: Parameter of the geometric span-length distribution (in words).
            min_length: Shortest span, in words.
            max_length: Longest span, in words (the distribution is truncated and renormalised).
            mask_fraction: Of the spans, the fraction whose tokens all become the mask token.
            random_fraction: Of the spans, the fraction whose tokens become random tokens; the
                rest keep their tokens.
            eval_rate: Budget during validation and testing (defaults to ``rate``).
            replacement: ``uniform`` over the ordinary vocabulary or the corpus ``unigram``.
        """
        self._configure(rate, eval_rate, mask_fraction, random_fraction, replacement)
        if not 0.0 < geometric_p <= 1.0:
            raise ValueError(f"SpanMasking geometric_p={geometric_p} must lie in (0, 1]")
        if not 1 <= min_length <= max_length:
            raise ValueError(f"SpanMasking needs 1 <= min_length ({min_length}) <= max_length "
                             f"({max_length})")
        self.min_length = min_length
        self.probabilities = span_length_distribution(geometric_p, min_length, max_length)
        self.cdf = np.cumsum(self.probabilities)
        self.cdf[-1] = 1.0
        self.mean_length = float(np.arange(min_length, max_length + 1) @ self.probabilities)

    def __call__(
        self,
        input_ids: np.ndarray,
        rng: SampleRandom,
        vocab: VocabInfo,
        train: bool = True,
        word_ids: np.ndarray | None = None,
    ) -> MaskedTokens:
        if word_ids is None:
            raise ValueError("SpanMasking needs word ids; the data module provides them")
        T = input_ids.shape[1]
        rate = self.rate_for(train)
        ordinary = word_ids >= 0  # (B, T): -1 at special tokens and padding
        words = _WordTable(word_ids, ordinary)
        K = T // 2 + 1  # enough candidates to tile any row
        u = rng.uniform64(4 * K, CANDIDATES)  # (B, 4K)
        starts, ends = self._candidates(u[:, :K], u[:, K: 2 * K], rate)  # (B, K) words [s, e)
        valid = ends <= words.count[:, None]
        starts, ends = np.minimum(starts, T), np.minimum(ends, T)
        tokens = words.tokens_before(ends) - words.tokens_before(starts)  # (B, K)
        left = words.first_token(starts) - 1  # (B, K)
        right = words.first_token(ends - 1) + words.tokens_in(ends - 1)  # (B, K)
        valid &= words.no_special_between(left + 1, right)  # spans stay inside a document
        budget = np.rint(rate * ordinary.sum(axis=1))  # (B,)
        limit = budget - _expected_overshoot(tokens, valid)
        accepted = _accept_in_random_order(tokens, valid, limit, u[:, 2 * K: 3 * K])

        span_of_word = _label_words(starts, ends, accepted, T)  # (B, T + 1): span index or -1
        token_span = np.where(ordinary, per_word(span_of_word, word_ids), -1)  # (B, T)
        selected = token_span >= 0
        decide = per_word(u[:, 3 * K: 4 * K], token_span)
        masked = self.corruption.apply(input_ids, selected, decide, rng, REPLACE, vocab)
        masked.extras["span_left"] = np.where(selected, per_word(left, token_span), -1)
        masked.extras["span_right"] = np.where(selected, per_word(right, token_span), -1)
        return masked

    def _candidates(self, u_length: np.ndarray, u_gap: np.ndarray, rate: float
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Non-overlapping candidate spans tiling each row's words, separated by >= 1 word."""
        lengths = self.min_length + np.searchsorted(self.cdf, u_length, side="right")
        coverage = min(0.8, max(3 * rate, rate + 0.2))  # share of words inside candidates
        mean_gap = max(1.0, self.mean_length * (1 - coverage) / coverage)
        extra = mean_gap - 1.0  # gaps are 1 + geometric with this mean
        gaps = 1 + (np.floor(np.log(u_gap) / np.log(extra / (1 + extra))).astype(np.int64)
                    if extra > 0 else np.zeros_like(lengths))
        gaps[:, 0] = (u_gap[:, 0] * (self.mean_length + mean_gap)).astype(np.int64)  # phase
        ends = np.cumsum(gaps + lengths, axis=1)
        return ends - lengths, ends


class _WordTable:
    """Per-row word bookkeeping: how many words, where each starts, how many tokens each has."""

    def __init__(self, word_ids: np.ndarray, ordinary: np.ndarray) -> None:
        B, T = word_ids.shape
        rows = np.broadcast_to(np.arange(B)[:, None], (B, T))
        counts = np.bincount((rows * T + word_ids)[ordinary], minlength=B * T).reshape(B, T)
        self.count = word_ids.max(axis=1) + 1  # (B,)
        self.prefix = np.zeros((B, T + 1), dtype=np.int64)
        np.cumsum(counts, axis=1, out=self.prefix[:, 1:])  # tokens in words before w
        first = np.zeros((B, T), dtype=np.int64)
        begins = ordinary & np.concatenate(
            [np.ones((B, 1), bool), word_ids[:, 1:] != word_ids[:, :-1]], axis=1)
        first[rows[begins], word_ids[begins]] = np.nonzero(begins)[1]
        self.first = first
        self.counts = counts
        self.specials_before = np.zeros((B, T + 1), dtype=np.int64)
        np.cumsum(~ordinary, axis=1, out=self.specials_before[:, 1:])

    def no_special_between(self, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
        """True where token positions [begin, end) hold no special token."""
        begin, end = np.clip(begin, 0, None), np.clip(end, 0, None)
        return gather(self.specials_before, end) == gather(self.specials_before, begin)

    def tokens_before(self, words: np.ndarray) -> np.ndarray:
        return gather(self.prefix, words)

    def first_token(self, words: np.ndarray) -> np.ndarray:
        return gather(self.first, np.clip(words, 0, self.first.shape[1] - 1))

    def tokens_in(self, words: np.ndarray) -> np.ndarray:
        return gather(self.counts, np.clip(words, 0, self.counts.shape[1] - 1))


def _expected_overshoot(tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """How far past a limit the span that crosses it reaches, on average (B,).

    The crossing span is picked in proportion to its size, so the overshoot is the mean
    residual of the size-biased span: (E[X^2] / E[X] - 1) / 2 tokens, X a candidate's tokens.
    """
    x = np.where(valid, tokens, 0).astype(np.float64)
    first, second = x.sum(axis=1), (x * x).sum(axis=1)
    return np.where(first > 0, (second / np.maximum(first, 1) - 1) / 2, 0.0)


def _accept_in_random_order(tokens: np.ndarray, valid: np.ndarray, limit: np.ndarray,
                            priority: np.ndarray) -> np.ndarray:
    """Visit candidates in ``priority`` order; accept while the tokens accepted so far < limit.

    Whether a span is accepted depends only on the spans visited before it, never on its own
    length, so accepted spans keep the candidates' length distribution.
    """
    order = np.argsort(np.where(valid, priority, 2.0), axis=1)
    sorted_tokens = gather(np.where(valid, tokens, 0), order)
    before = np.cumsum(sorted_tokens, axis=1) - sorted_tokens
    accepted_sorted = gather(valid, order) & (before < limit[:, None])
    accepted = np.zeros_like(valid)
    accepted[np.arange(len(order))[:, None], order] = accepted_sorted
    return accepted


def _label_words(starts: np.ndarray, ends: np.ndarray, accepted: np.ndarray, T: int) -> np.ndarray:
    """(B, T + 1): the accepted span index covering each word, -1 outside spans.

    Candidates are separated by at least one word, so starts and ends never collide and a
    running sum of +(k + 1) at each start and -(k + 1) at each end labels the words.
    """
    B, K = starts.shape
    marks = np.zeros((B, T + 2), dtype=np.int64)
    rows, k = np.nonzero(accepted)
    marks[rows, starts[rows, k]] = k + 1
    marks[rows, ends[rows, k]] = -(k + 1)
    return np.cumsum(marks, axis=1)[:, : T + 1] - 1
