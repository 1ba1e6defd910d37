"""The `fillmask probe` command: LAMA-style cloze probing of factual knowledge (Petroni et
al. 2019, "Language Models as Knowledge Bases?").

Each fact is a template such as ``"[X] is the capital of [Y] ."`` with a subject and an object.
``[X]`` becomes the subject, ``[Y]`` the model's mask token, and the model ranks its whole
vocabulary at the mask. As in LAMA, only facts whose object is one token of the vocabulary
count (after the tokenizer's normaliser: lower-cased for uncased models); the others are
skipped, each with its reason counted. Precision@k of a set of facts is the share whose object
is among the k best-ranked tokens. It is reported per relation, macro-averaged over relations
(the mean of the relations' precisions, LAMA's headline number) and micro-averaged over facts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fillmask.errors import FillmaskError
from fillmask.inference import FillMaskModel, check_device, length_batches, read_lines

__all__ = ["Fact", "ProbeReport", "probe", "probe_main", "read_facts"]

SUBJECT, OBJECT = "[X]", "[Y]"
LAMA_MASK = "[MASK]"  # the blank of LAMA's masked_sentences
FIELD_NAMES = {"subject": ("subject", "sub_label"), "object": ("object", "obj_label"),
               "relation": ("relation", "predicate_id")}
"""This command's field names and LAMA's, by role."""
NO_RELATION = "-"

SKIP_NO_SLOT = "template lacks [X] or [Y]"
SKIP_SLOTS = "template has several [Y]"
SKIP_PIECES = "object is several tokens"
SKIP_UNKNOWN = "object is the unknown token"
SKIP_LONG = "too long"


@dataclass
class Fact:
    """One line of a facts file: where it is, its relation, the template (``[X]`` and
    ``[Y]`` slots), its subject (None when the template has it filled in) and object."""

    line: int
    relation: str
    template: str
    subject: str | None
    object: str


def _field(row: dict[str, Any], role: str) -> Any:
    return next((row[name] for name in FIELD_NAMES[role] if name in row), None)


def _parse(path: Path, number: int, line: str) -> Fact:
    """One fact; a malformed line raises a :class:`FillmaskError` naming it and the fix."""
    where = f"{path} line {number}"
    fix = ('write one JSON object per line, such as {"template": "[X] is the capital of [Y] .", '
           '"subject": "Paris", "object": "France", "relation": "P1376"}')
    try:
        row = json.loads(line)
    except ValueError as error:
        raise FillmaskError(f"{where} is not JSON ({error.args[0]}); {fix}") from None
    if not isinstance(row, dict):
        raise FillmaskError(f"{where} is not a JSON object; {fix}")
    subject, obj, relation = (_field(row, role) for role in ("subject", "object", "relation"))
    template = row.get("template")
    if template is None and isinstance(row.get("masked_sentences"), list) \
            and row["masked_sentences"]:
        template, subject = str(row["masked_sentences"][0]).replace(LAMA_MASK, OBJECT), None
    elif not isinstance(template, str) or not isinstance(subject, str):
        raise FillmaskError(f"{where} lacks a string \"template\" and \"subject\" (or LAMA's "
                            f"\"masked_sentences\"); {fix}")
    if not isinstance(obj, str) or not obj.strip():
        raise FillmaskError(f"{where} lacks a string \"object\" (or LAMA's \"obj_label\"); "
                            f"{fix}")
    return Fact(number, NO_RELATION if relation is None else str(relation), template, subject,
                obj.strip())


def read_facts(path: str | Path) -> list[Fact]:
    """The facts of a JSON-lines file (blank lines skipped)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FillmaskError(f"facts file {path} does not exist; give a JSON-lines file with "
                            "one fact per line")
    return [_parse(file, number, line) for number, line in read_lines(str(file))]


@dataclass
class Query:
    """A fact ready for the model: its token ids, the mask position and the object's id."""

    fact: Fact
    ids: list[int]
    position: int
    object_id: int


def prepare(model: FillMaskModel, fact: Fact) -> Query | str:
    """The fact's query, or the reason it is skipped. The object counts as one token when the
    sentence with the object in the blank tokenises exactly as the masked one except at the
    mask (so the tokenizer's normaliser and word boundaries apply as in running text)."""
    if OBJECT not in fact.template or (fact.subject is not None
                                       and SUBJECT not in fact.template):
        return SKIP_NO_SLOT
    if fact.template.count(OBJECT) > 1:
        return SKIP_SLOTS
    text = fact.template if fact.subject is None else fact.template.replace(SUBJECT,
                                                                            fact.subject)
    masked, filled = model.tokenizer.encode_batch([text.replace(OBJECT, model.mask_token()),
                                                   text.replace(OBJECT, fact.object)])
    positions = [p for p, i in enumerate(masked.ids) if i == model.special.mask_id]
    if len(positions) != 1:
        return SKIP_SLOTS  # the subject or the template brought another mask token
    position = positions[0]
    same_elsewhere = len(filled.ids) == len(masked.ids) and all(
        a == b for p, (a, b) in enumerate(zip(masked.ids, filled.ids, strict=True))
        if p != position)
    if not same_elsewhere:
        return SKIP_PIECES
    if filled.ids[position] == model.special.unk_id or filled.ids[position] >= model.vocab_size:
        return SKIP_UNKNOWN
    limit = getattr(model.model.encoder, "max_positions", None)
    if limit is not None and len(masked.ids) > limit:
        return SKIP_LONG
    return Query(fact, list(masked.ids), position, filled.ids[position])


@dataclass
class ProbeReport:
    """Per relation: ``facts`` evaluated and hits at 1 and at ``top_k``; skipped facts by
    reason."""

    top_k: int
    total: int = 0
    facts: Counter = field(default_factory=Counter)
    hits_1: Counter = field(default_factory=Counter)
    hits_k: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def precision(self, relation: str) -> tuple[float, float]:
        """P@1 and P@k of one relation."""
        count = self.facts[relation]
        return self.hits_1[relation] / count, self.hits_k[relation] / count

    def macro(self) -> tuple[float, float] | None:
        """P@1 and P@k averaged over relations (each relation weighs the same)."""
        if not self.facts:
            return None
        values = [self.precision(r) for r in self.facts]
        return (sum(v[0] for v in values) / len(values), sum(v[1] for v in values) / len(values))

    def micro(self) -> tuple[float, float] | None:
        """P@1 and P@k over all evaluated facts (each fact weighs the same)."""
        count = sum(self.facts.values())
        if not count:
            return None
        return sum(self.hits_1.values()) / count, sum(self.hits_k.values()) / count

    def as_json(self) -> dict[str, Any]:
        k = self.top_k

        def pair(values: tuple[float, float] | None) -> dict[str, float | None]:
            return {"p@1": values and values[0], f"p@{k}": values and values[1]}

        return {
            "relations": {r: {"facts": self.facts[r], **pair(self.precision(r))}
                          for r in sorted(self.facts)},
            "macro": {"relations": len(self.facts), **pair(self.macro())},
            "micro": {"facts": sum(self.facts.values()), **pair(self.micro())},
            "total": self.total, "evaluated": sum(self.facts.values()),
            "skipped": dict(sorted(self.skipped.items())),
        }

    def as_text(self) -> str:
        k = self.top_k
        rows = [(r, str(self.facts[r]), *self.precision(r)) for r in sorted(self.facts)]
        evaluated = sum(self.facts.values())
        for name, values in ((f"macro (mean of {len(self.facts)} relations)", self.macro()),
                             (f"micro (over {evaluated} facts)", self.micro())):
            rows.append((name, str(evaluated), *(values or (None, None))))
        width = max(len("relation"), *(len(r[0]) for r in rows))
        lines = [f"{'relation':<{width}}  {'facts':>5}  {'P@1':>6}  {f'P@{k}':>6}"]
        for name, count, p1, pk in rows:
            lines.append(f"{name:<{width}}  {count:>5}  {_number(p1)}  {_number(pk)}")
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        lines.append(f"evaluated {evaluated} of {self.total} facts; skipped {skipped}"
                     + (f": {reasons}" if reasons else ""))
        return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return f"{value:6.3f}" if value is not None else f"{'-':>6}"


def probe(model: FillMaskModel, facts: list[Fact], top_k: int = 10, batch_size: int = 32
          ) -> ProbeReport:
    """Rank the vocabulary at each usable fact's blank and count hits at 1 and ``top_k``."""
    report = ProbeReport(top_k, total=len(facts))
    queries: list[Query] = []
    for fact in facts:
        prepared = prepare(model, fact)
        if isinstance(prepared, str):
            report.skipped[prepared] += 1
        else:
            queries.append(prepared)
    for group in length_batches([len(q.ids) for q in queries], batch_size):
        batch = [queries[i] for i in group]
        ids, attention = model.pad([q.ids for q in batch])  # (B, T)
        rows = torch.arange(len(batch))  # (B,)
        columns = torch.tensor([q.position for q in batch])  # (B,)
        log_probs = model.log_probs(ids, attention, rows, columns)  # (B, V)
        best = log_probs.topk(min(top_k, log_probs.shape[1]), dim=-1).indices.cpu()  # (B, k)
        targets = torch.tensor([q.object_id for q in batch])  # (B,)
        hit_1 = best[:, 0] == targets  # (B,)
        hit_k = (best == targets[:, None]).any(-1)  # (B,)
        for query, one, some in zip(batch, hit_1.tolist(), hit_k.tolist(), strict=True):
            relation = query.fact.relation
            report.facts[relation] += 1
            report.hits_1[relation] += int(one)
            report.hits_k[relation] += int(some)
    return report


def probe_main(argv: list[str]) -> int:
    """Entry point of ``fillmask probe``; a user error is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(prog="fillmask probe", description=(
        "LAMA-style cloze probing: fill [X] with each fact's subject, mask [Y], and report "
        "precision at 1 and at --top-k of the object per relation, macro-averaged over "
        "relations and micro-averaged over facts."))
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fillmask "
                        "fit, or a folder written by fillmask export (or a transformers folder)")
    parser.add_argument("--file", required=True, help='JSON lines: {"template": "[X] is the '
                        'capital of [Y] .", "subject", "object", "relation"} (LAMA\'s '
                        "sub_label, obj_label, predicate_id and masked_sentences too)")
    parser.add_argument("--top-k", type=int, default=10, help="k of precision@k (default 10)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="facts per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    try:
        facts = read_facts(args.file)
        model = FillMaskModel.load(args.checkpoint, check_device(args.device))
        report = probe(model, facts, args.top_k, args.batch_size)
    except FillmaskError as error:
        print(f"fillmask probe: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_json(), indent=2) if args.json else report.as_text(), end="\n"
          if args.json else "")
    return 0
