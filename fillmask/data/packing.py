"""Tokenise documents and pack them into samples: four packing modes, one interface.

Every mode keeps, next to the token ids, a ``word_starts`` flag per token (1 where a word
begins, from the tokenizer's word ids or, without a pre-tokenizer, its offsets), so that
whole-word and span masking work for any tokenizer family.

- :class:`ChunkPacking`: concatenate documents (joined by SEP) and cut ``CLS ... SEP`` blocks of
  exactly ``max_length`` (RoBERTa's FULL-SENTENCES); each map batch drops a tail shorter than
  one block.
- :class:`LinePacking`: one sample per document (long ones split into several), padded per batch.
- :class:`DocumentPacking`: documents packed whole into ``max_length`` samples by greedy best-fit,
  with their lengths recorded so attention never crosses a document boundary.
- :class:`SentencePairs`: ``CLS A SEP B SEP`` with token types, for next-sentence prediction
  (NSP, BERT) or sentence-order prediction (SOP, ALBERT).
"""

from __future__ import annotations

import bisect
import hashlib
import re
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow.compute as pc
from tokenizers import Tokenizer

from fillmask.data.tokenize import LONG_TEXT, SpecialTokens, split_long_text

PACKING_VERSION = "3"

ENCODE_GROUP = 1 << 20  # characters encoded by one encode_batch call


def encode_with_word_starts(tokenizer: Tokenizer, texts: list[str], piece_size: int = LONG_TEXT
                            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int32) and word-start flags (uint8) of each text, without special tokens.

    A text longer than ``piece_size`` characters (a book on one line, say) is encoded in pieces
    cut before spaces (:func:`split_long_text`), a few at a time: memory stays bounded (an
    encoding costs about 100 bytes per character) and pieces are encoded in parallel. With the
    whitespace-splitting pre-tokenizers (BERT, byte-level, Metaspace) the tokens are the same as
    for the whole text; a tokenizer without a pre-tokenizer always gets whole texts.
    """
    cut = tokenizer.pre_tokenizer is not None
    pieces, owners = [], []
    for index, text in enumerate(texts):
        for piece in split_long_text(text, piece_size) if cut else [text]:
            pieces.append(piece)
            owners.append(index)
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in texts]
    for lo, hi in _groups([len(p) for p in pieces], ENCODE_GROUP):
        for owner, encoded in zip(owners[lo:hi], _encode(tokenizer, pieces[lo:hi]), strict=True):
            parts[owner].append(encoded)
    return [p[0] if len(p) == 1 else (np.concatenate([ids for ids, _ in p]),
                                      np.concatenate([starts for _, starts in p]))
            for p in parts]


def _groups(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of consecutive items whose sizes add up to about ``limit``."""
    ranges, lo, total = [], 0, 0
    for hi, size in enumerate(sizes, 1):
        total += size
        if total >= limit or hi == len(sizes):
            ranges.append((lo, hi))
            lo, total = hi, 0
    return ranges


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    # encode_batch, not encode_batch_fast: the fast variant leaves word ids and offsets empty.
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    by_offsets = tokenizer.pre_tokenizer is None
    out = []
    for text, encoding in zip(texts, encodings, strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int32)
        starts = np.ones(len(ids), dtype=np.uint8)
        if len(ids) > 1:
            if by_offsets:  # a piece continues a word when it touches the previous one and
                # does not begin on a space (a normaliser may turn spaces into "▁" pieces)
                offsets = np.asarray(encoding.offsets, dtype=np.int64)
                spaced = [text[i:i + 1].isspace() for i in offsets[1:, 0].tolist()]
                starts[1:] = (offsets[1:, 0] != offsets[:-1, 1]) | np.asarray(spaced, dtype=bool)
            else:
                words = np.asarray([-1 if w is None else w for w in encoding.word_ids])
                starts[1:] = (words[1:] != words[:-1]) | (words[1:] < 0)
        out.append((ids, starts))
    return out


class Packing:
    """How tokenised documents become samples. Subclasses implement :meth:`pack`."""

    variable_length = True

    def fingerprint(self) -> str:
        """Everything that changes the packed output (part of the cache key)."""
        return f"{type(self).__name__}{sorted(vars(self).items())}"

    def features(self, id_dtype: str) -> datasets.Features:
        return datasets.Features({
            "input_ids": datasets.Sequence(datasets.Value(id_dtype)),
            "word_starts": datasets.Sequence(datasets.Value("uint8")),
        })

    def pack(self, texts: list[str], indices: list[int], tokenizer: Tokenizer,
             special: SpecialTokens, max_length: int, seed: int) -> dict[str, list[Any]]:
        raise NotImplementedError


def _segments(ids: np.ndarray, starts: np.ndarray, body: int
              ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut a document into pieces of at most ``body`` tokens."""
    return [(ids[i: i + body], starts[i: i + body]) for i in range(0, len(ids), body)]


def _framed(special: SpecialTokens, ids: np.ndarray, starts: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """``CLS ids SEP``, with word starts (specials count as word starts)."""
    ids = np.concatenate([[special.cls_id], ids, [special.sep_id]]).astype(np.int32)
    starts = np.concatenate([[1], starts, [1]]).astype(np.uint8)
    starts[1] = 1  # a piece cut from the middle of a word starts a (partial) word
    return ids, starts


class ChunkPacking(Packing):
    """Concatenate documents, joined by SEP, into ``CLS ... SEP`` blocks of exactly max_length."""

    variable_length = False

    def pack(self, texts, indices, tokenizer, special, max_length, seed):
        docs = encode_with_word_starts(tokenizer, texts)
        sep, one = np.array([special.sep_id], np.int32), np.ones(1, np.uint8)
        ids = [part for d, _ in docs if len(d) for part in (d, sep)]
        starts = [part for d, s in docs if len(d) for part in (s, one)]
        if not ids:
            return {"input_ids": [], "word_starts": []}
        ids, starts = np.concatenate(ids), np.concatenate(starts)
        body = max_length - 2
        n = len(ids) // body
        blocks = [_framed(special, ids[i * body:(i + 1) * body], starts[i * body:(i + 1) * body])
                  for i in range(n)]
        return {"input_ids": [b[0] for b in blocks], "word_starts": [b[1] for b in blocks]}


class LinePacking(Packing):
    """One ``CLS document SEP`` sample per document; longer documents become several samples."""

    def pack(self, texts, indices, tokenizer, special, max_length, seed):
        out: dict[str, list[Any]] = {"input_ids": [], "word_starts": []}
        for ids, starts in encode_with_word_starts(tokenizer, texts):
            for piece, flags in _segments(ids, starts, max_length - 2):
                framed = _framed(special, piece, flags)
                out["input_ids"].append(framed[0])
                out["word_starts"].append(framed[1])
        return out


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy best-fit decreasing: place each item (longest first) into the open bin it fills
    most tightly, opening a bin when none has room. Returns item indices per bin."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[item]
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            bins.append([item])
            bisect.insort(free, (capacity - size, len(bins) - 1))
            continue
        room, index = free.pop(slot)
        bins[index].append(item)
        bisect.insort(free, (room - size, index))
    return bins


class DocumentPacking(Packing):
    """Pack whole ``CLS document SEP`` segments into samples of at most max_length tokens.

    Segments are placed by greedy best-fit decreasing within each map batch of documents;
    ``doc_lengths`` records each sample's segments so the collator can build the block-diagonal
    attention mask, restart positions, and cumulative sequence lengths (``cu_seqlens``).
    """

    def features(self, id_dtype):
        features = super().features(id_dtype)
        features["doc_lengths"] = datasets.Sequence(datasets.Value("int32"))
        return features

    def pack(self, texts, indices, tokenizer, special, max_length, seed):
        segments = [_framed(special, piece, flags)
                    for ids, starts in encode_with_word_starts(tokenizer, texts) if len(ids)
                    for piece, flags in _segments(ids, starts, max_length - 2)]
        out: dict[str, list[Any]] = {"input_ids": [], "word_starts": [], "doc_lengths": []}
        for members in best_fit([len(s[0]) for s in segments], max_length):
            members.sort()  # keep corpus order inside a sample
            out["input_ids"].append(np.concatenate([segments[m][0] for m in members]))
            out["word_starts"].append(np.concatenate([segments[m][1] for m in members]))
            out["doc_lengths"].append(np.array([len(segments[m][0]) for m in members], np.int32))
        return out


PairTask = Literal["nsp", "sop"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class SentencePairs(Packing):
    """``CLS A SEP B SEP`` samples with token types and a pair label, built per document.

    Sentences are accumulated up to a target length (``max_length - 3``, or with probability
    ``short_seq_prob`` a random shorter one, as BERT did), then cut at a random sentence into A
    and B. ``nsp``: half the time B is replaced by text from another document of the same map
    batch (``pair_label`` 1 = random, 0 = actual next). ``sop``: half the time A and B swap
    (``pair_label`` 1 = swapped). Decisions come from a generator seeded by (seed, document).
    """

    def __init__(self, task: PairTask = "nsp", short_seq_prob: float = 0.1) -> None:
        """Args:
            task: ``nsp`` (next-sentence prediction) or ``sop`` (sentence-order prediction).
            short_seq_prob: Probability of a shorter target length, so the model also sees
                short inputs.
        """
        if task not in ("nsp", "sop"):
            raise ValueError(f"SentencePairs task={task!r}: choose 'nsp' or 'sop'")
        self.task = task
        self.short_seq_prob = short_seq_prob

    def features(self, id_dtype):
        features = super().features(id_dtype)
        features["token_type_ids"] = datasets.Sequence(datasets.Value("uint8"))
        features["pair_label"] = datasets.Value("int8")
        return features

    def pack(self, texts, indices, tokenizer, special, max_length, seed):
        documents = [[s for s in _SENTENCE_END.split(t) if s.strip()] for t in texts]
        flat = encode_with_word_starts(tokenizer, [s for d in documents for s in d])
        encoded, at = [], 0
        for sentences in documents:
            encoded.append([x for x in flat[at: at + len(sentences)] if len(x[0])])
            at += len(sentences)
        out: dict[str, list[Any]] = {"input_ids": [], "word_starts": [], "token_type_ids": [],
                                     "pair_label": []}
        for d, index in enumerate(indices):
            rng = np.random.default_rng([seed, index])
            for a, b, label in self._pairs(encoded, d, rng, max_length - 3):
                self._emit(out, special, a, b, label)
        return out

    def _pairs(self, encoded, d, rng, budget):
        """BERT's pair construction for document ``d`` of the batch."""
        sentences = encoded[d]
        target = budget if rng.random() >= self.short_seq_prob else int(rng.integers(2, budget + 1))
        chunk, size, i = [], 0, 0
        while i < len(sentences):
            chunk.append(sentences[i])
            size += len(sentences[i][0])
            if i == len(sentences) - 1 or size >= target:
                pair, unused = self._split(chunk, encoded, d, rng, budget)
                if pair is not None:
                    yield pair
                i -= unused  # sentences not used by a random-next pair are reused
                chunk, size = [], 0
                target = budget if rng.random() >= self.short_seq_prob else int(
                    rng.integers(2, budget + 1))
            i += 1

    def _split(self, chunk, encoded, d, rng, budget):
        join = _join_sentences
        if len(chunk) == 1:  # one sentence: split it at a word start, when it has two words
            ids, starts = chunk[0]
            cuts = np.flatnonzero(starts[1:]) + 1
            if not len(cuts):
                return None, 0
            cut = int(rng.choice(cuts))
            a, b = (ids[:cut], starts[:cut]), (ids[cut:], starts[cut:])
            cut_at = None
        else:
            cut_at = int(rng.integers(1, len(chunk)))
            a, b = join(chunk[:cut_at]), join(chunk[cut_at:])
        label, unused = 0, 0
        if self.task == "nsp" and rng.random() < 0.5 and len(encoded) > 1:
            other = int(rng.integers(0, len(encoded) - 1))
            other += other >= d
            if encoded[other]:
                start = int(rng.integers(0, len(encoded[other])))
                b = join(encoded[other][start:])
                label = 1
                unused = len(chunk) - cut_at if cut_at is not None else 0
        elif self.task == "sop" and rng.random() < 0.5:
            a, b, label = b, a, 1
        a, b = _truncate_pair(a, b, budget, rng)
        return (a, b, label), unused

    @staticmethod
    def _emit(out, special, a, b, label):
        ids = np.concatenate([[special.cls_id], a[0], [special.sep_id], b[0], [special.sep_id]])
        starts = np.concatenate([[1], a[1], [1], b[1], [1]])
        starts[1] = starts[len(a[0]) + 2] = 1
        types = np.zeros(len(ids), np.uint8)
        types[len(a[0]) + 2:] = 1
        out["input_ids"].append(ids.astype(np.int32))
        out["word_starts"].append(starts.astype(np.uint8))
        out["token_type_ids"].append(types)
        out["pair_label"].append(label)


def _join_sentences(sentences):
    return (np.concatenate([s[0] for s in sentences]), np.concatenate([s[1] for s in sentences]))


def _truncate_pair(a, b, budget, rng):
    """Trim the longer side, one token at a time from a random end, until both fit."""
    a_ids, a_starts = a
    b_ids, b_starts = b
    a_lo, a_hi, b_lo, b_hi = 0, len(a_ids), 0, len(b_ids)
    while (a_hi - a_lo) + (b_hi - b_lo) > budget:
        front = rng.random() < 0.5
        if a_hi - a_lo >= b_hi - b_lo:
            a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
        else:
            b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
    return (a_ids[a_lo:a_hi], a_starts[a_lo:a_hi]), (b_ids[b_lo:b_hi], b_starts[b_lo:b_hi])


def pack_corpus(
    corpus: datasets.DatasetDict,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    max_length: int,
    packing: Packing | None = None,
    seed: int = 0,
    map_batch_size: int = 1000,
) -> datasets.DatasetDict:
    """Tokenise and pack every split; results are cached by `datasets` under a fingerprint of
    (corpus, tokenizer, max_length, packing), so a second run reuses them."""
    if max_length < 8:
        raise ValueError(f"max_length={max_length} is too short; use at least 8 tokens")
    packing = packing or ChunkPacking()
    dtype = "uint16" if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max else "int32"
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    def pack(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        texts = [t if t and not t.isspace() else "" for t in batch["text"]]
        return packing.pack(texts, indices, tokenizer, special, max_length, seed)

    packed = {}
    for name, split in corpus.items():
        key = (f"{split._fingerprint}-{tok_hash}-{max_length}-{packing.fingerprint()}-{seed}-"
               f"{PACKING_VERSION}")
        packed[name] = split.map(
            pack, batched=True, with_indices=True, batch_size=map_batch_size,
            remove_columns=split.column_names, features=packing.features(dtype),
            new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16],
            desc=f"packing {name}",
        )
    return datasets.DatasetDict(packed)


def packing_efficiency(samples: datasets.Dataset, max_length: int) -> float:
    """Share of the ``len(samples) x max_length`` slots that hold tokens (not padding)."""
    if len(samples) == 0:
        return 0.0
    lengths = pc.list_value_length(samples.data.column("input_ids"))
    return float(pc.sum(lengths).as_py()) / (len(samples) * max_length)
