"""Tokenizers: load a tokenizer.json or transformers folder, or train one; resolve special
roles; cut very long texts into pieces the tokenizer sees as the same words."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from fillmask.errors import FillmaskError
from fillmask.masking.base import VocabInfo

Algorithm = Literal["wordpiece", "bpe", "unigram"]

# Names each role goes by in the common tokenizer families (BERT, RoBERTa/XLM-R, T5-like).
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "unk": ("[UNK]", "<unk>"),
}
HF_ROLE_KEYS = {"mask": "mask_token", "pad": "pad_token", "cls": "cls_token",
                "sep": "sep_token", "unk": "unk_token"}


class TokenizerError(FillmaskError):
    """A tokenizer that fillmask cannot use, with the reason and the fix."""


@dataclass(frozen=True)
class TokenizerTraining:
    """How to train a tokenizer on the training corpus when none is given."""

    algorithm: Algorithm = "wordpiece"
    """``wordpiece`` (BERT), ``bpe`` (byte-level, RoBERTa) or ``unigram`` (SentencePiece-style)."""
    vocab_size: int = 8192
    """Target vocabulary size, special tokens included."""
    lowercase: bool = True
    """Lower-case and strip accents before tokenising (uncased BERT); ignored by byte-level BPE."""
    min_frequency: int = 2
    """Ignore merges and pieces seen fewer times than this."""

    def fingerprint(self) -> str:
        options = asdict(self)
        if self.algorithm == "wordpiece":  # caches from before the fixed piece order are retrained
            options["ids"] = "canonical, pieces numbered before training"
        return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SpecialTokens:
    """The special-token roles of a tokenizer, resolved once."""

    mask_id: int
    pad_id: int
    cls_id: int
    sep_id: int
    unk_id: int | None
    special_ids: tuple[int, ...]

    def vocab_info(self, vocab_size: int) -> VocabInfo:
        return VocabInfo(vocab_size, self.mask_id, self.pad_id, self.special_ids)


def _special_names(algorithm: Algorithm) -> list[str]:
    if algorithm == "wordpiece":
        return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]


def _untrained(
    options: TokenizerTraining, numbered_first: Sequence[str] = ()
) -> tuple[Tokenizer, trainers.Trainer]:
    """The tokenizer pipeline and its trainer; ``numbered_first`` pieces get ids right after
    the special tokens (the trainer takes them as special tokens: see ``train_tokenizer``)."""
    specials = _special_names(options.algorithm) + list(numbered_first)
    common = dict(vocab_size=options.vocab_size, special_tokens=specials, show_progress=False)
    lower = [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    if options.algorithm == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence(lower if options.lowercase else [normalizers.NFC()])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(min_frequency=options.min_frequency, **common)
    elif options.algorithm == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            min_frequency=options.min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common,
        )
    else:
        tok = Tokenizer(models.Unigram())
        norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if options.lowercase else [])
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(unk_token="<unk>", **common)
    return tok, trainer


Texts = Iterable[str] | Callable[[], Iterable[str]]

LONG_TEXT = 1 << 16  # characters: longer texts are tokenised in pieces


def split_long_text(text: str, size: int = LONG_TEXT) -> list[str]:
    """Cut ``text`` just before spaces (U+0020) into pieces of at most ``size`` characters where
    it has spaces (a stretch without any stays whole); each piece after the first starts with
    the space, so whitespace-splitting pre-tokenizers see the same words."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        cut = cut if cut > 0 else text.find(" ", start + size)
        if cut < 0:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _passes(texts: Texts, reread: bool) -> Callable[[], Iterator[str]]:
    """A way to read ``texts`` (more than once if ``reread``): a factory is called again, a
    one-shot iterator is kept in a list, anything else (a list, a column) is iterated again.

    Very long texts come in pieces cut before spaces (the same words, a fraction of the
    memory: one 8 MB document needed 0.5 GB in one piece).
    """
    if reread and not callable(texts) and iter(texts) is texts:
        texts = list(texts)
    source = texts if callable(texts) else lambda: texts
    return lambda: (piece for text in source() for piece in split_long_text(text))


def continuation_pieces(texts: Iterable[str], options: TokenizerTraining) -> list[str]:
    """The one-character continuation pieces (``##a``) a WordPiece training on ``texts`` makes,
    in spelling order: one pass that counts words and makes no merges."""
    probe, trainer = _untrained(replace(options, vocab_size=1))
    probe.train_from_iterator(texts, trainer=trainer)
    return sorted(t for t in probe.get_vocab() if t.startswith("##"))


def train_tokenizer(texts: Texts, options: TokenizerTraining) -> Tokenizer:
    """Train a tokenizer on ``texts`` and give it BERT-style ``CLS text SEP`` templates.

    ``texts`` may be a factory of iterables: WordPiece reads the corpus twice. The library's
    WordPiece trainer numbers continuation characters (``##a``) in hash-map order and breaks
    ties between equally frequent merges by those numbers (huggingface/tokenizers issue 1794,
    diagnosed in its pull request 2066), so 3 processes in 30 chose another last merge on the
    quickstart corpus. Numbering them first, in spelling order, makes the merges the same in
    every process; ``canonical_wordpiece`` then makes the ids the same.
    """
    wordpiece = options.algorithm == "wordpiece"
    passes = _passes(texts, reread=wordpiece)
    first = continuation_pieces(passes(), options) if wordpiece else []
    tok, trainer = _untrained(options, numbered_first=first)
    tok.train_from_iterator(passes(), trainer=trainer)
    if wordpiece:
        tok = _rebuilt(options, canonical_wordpiece(tok))
    _, _, cls, sep, _ = _special_names(options.algorithm)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
    )
    return tok


def _rebuilt(options: TokenizerTraining, model: models.Model) -> Tokenizer:
    """A fresh pipeline around a trained ``model``, whose special tokens are only the five
    roles (the pieces numbered first are ordinary pieces, not tokens matched in raw text)."""
    tok, _ = _untrained(options)
    tok.model = model
    tok.add_special_tokens(_special_names(options.algorithm))
    return tok


def canonical_wordpiece(tok: Tokenizer) -> models.WordPiece:
    """The trained WordPiece model of ``tok`` with its ids put in a canonical order: the
    special tokens first, then every other piece by length and spelling.

    The tokenizers library's WordPiece trainer numbers pieces in hash-map order
    (huggingface/tokenizers issue 1794), so two runs would give two embedding layouts.
    WordPiece encodes by longest match, whatever the ids, so renumbering changes nothing but
    the ids.
    """
    vocab = tok.get_vocab()
    specials = _special_names("wordpiece")
    rest = sorted((t for t in vocab if t not in specials),
                  key=lambda t: (len(t.removeprefix("##")), t.startswith("##"), t))
    order = [t for t in specials if t in vocab] + rest
    return models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]")


def load_tokenizer(path: str | Path) -> tuple[Tokenizer, dict[str, str]]:
    """Load ``tokenizer.json`` (a file, or a transformers folder holding one).

    Returns the tokenizer and the role names a transformers folder declares (may be empty).
    """
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        hint = " (a transformers folder needs a fast tokenizer's tokenizer.json)"
        hint = hint if path.is_dir() else ""
        raise TokenizerError(f"tokenizer file {file} does not exist{hint}; pass a tokenizer.json "
                             "path or folder, or leave `tokenizer` empty to train one")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as error:  # the tokenizers library raises bare Exceptions
        raise TokenizerError(f"{file} is not a valid tokenizer.json: {error}") from error
    # A tokenizer.json saved by transformers may carry padding (to the longest text of a batch)
    # and truncation settings: they would fill packed samples with padding and cut documents.
    # fillmask packs and pads itself.
    tok.no_padding()
    tok.no_truncation()
    return tok, _declared_roles(file.parent) if path.is_dir() else {}


def _declared_roles(folder: Path) -> dict[str, str]:
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text(encoding="utf-8"))
        for role, key in HF_ROLE_KEYS.items():
            value = data.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                roles.setdefault(role, value)
    return roles


def resolve_special_tokens(
    tok: Tokenizer, declared: dict[str, str] | None = None, source: str = "the tokenizer"
) -> SpecialTokens:
    """Find the id of each special role; a missing mask, pad, cls or sep token is an error."""
    declared = declared or {}
    ids: dict[str, int | None] = {}
    for role, names in ROLE_NAMES.items():
        candidates = ((declared[role],) if role in declared else ()) + names
        ids[role] = next((i for n in candidates if (i := tok.token_to_id(n)) is not None), None)
    for role in ("mask", "pad", "cls", "sep"):
        if ids[role] is None:
            raise TokenizerError(
                f"{source} has no {role} token (looked for {', '.join(ROLE_NAMES[role])}); "
                "add one as a special token, e.g. tokenizer.add_special_tokens("
                f"['{ROLE_NAMES[role][0]}']), or train a tokenizer with `fillmask tokenizer train`"
            )
    added = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    special = sorted({i for n in added if (i := tok.token_to_id(n)) is not None}
                     | {v for v in ids.values() if v is not None})
    return SpecialTokens(ids["mask"], ids["pad"], ids["cls"], ids["sep"], ids["unk"],
                         tuple(special))


def batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    """Group ``texts`` into lists of ``size`` (the trainer's preferred input)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
