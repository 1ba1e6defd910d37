"""`fillmask probe`: LAMA-style cloze probing against the shipped real BERT (uncased, 2 layers),
checked against precision computed directly from transformers' logits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from fillmask.cli import main
from fillmask.inference import FillMaskModel
from fillmask.probing import probe, read_facts

pytestmark = pytest.mark.usefixtures("one_thread")

CAPITAL_OF = "[X] is the capital of [Y] ."
CAPITAL = "the capital of [X] is [Y] ."
USABLE = [  # (relation, template, subject, object): objects of one uncased token
    ("P1376", CAPITAL_OF, "Paris", "France"), ("P1376", CAPITAL_OF, "Berlin", "Germany"),
    ("P1376", CAPITAL_OF, "Rome", "Italy"), ("P1376", CAPITAL_OF, "Tokyo", "Japan"),
    ("P1376", CAPITAL_OF, "Paris", "city"),  # the small model's top-1 guess: a hit at 1
    ("P36", CAPITAL, "France", "Paris"), ("P36", CAPITAL, "Spain", "Madrid"),
    ("P36", CAPITAL, "Egypt", "Cairo"),
    ("P19", "[X] was born in [Y] .", "Dante", "Florence"),
]
SKIPPED = [  # a fact of each skipping rule, with its reason
    ({"template": CAPITAL_OF, "subject": "Ouagadougou", "object": "Burkina Faso",
      "relation": "P1376"}, "object is several tokens"),
    ({"template": CAPITAL, "subject": "Burkina Faso", "object": "Ouagadougou",
      "relation": "P36"}, "object is several tokens"),
    ({"template": "[X] was born in .", "subject": "Mozart", "object": "Salzburg",
      "relation": "P19"}, "template lacks [X] or [Y]"),
    ({"template": "he was born in [Y] .", "subject": "Mozart", "object": "Salzburg",
      "relation": "P19"}, "template lacks [X] or [Y]"),
    ({"template": "[X] met [Y] in [Y] .", "subject": "Ann", "object": "Bob",
      "relation": "P19"}, "template has several [Y]"),
    ({"template": "[X] was born in [Y] .", "subject": "Mozart", "object": "\u2603",
      "relation": "P19"}, "object is the unknown token"),
    ({"template": "[X] " + "very " * 600 + "is in [Y] .", "subject": "Mozart",
      "object": "Austria", "relation": "P19"}, "too long"),
]


def write_facts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture()
def facts_file(tmp_path) -> Path:
    rows = [{"template": t, "subject": s, "object": o, "relation": r} for r, t, s, o in USABLE]
    rows.insert(3, SKIPPED[0][0])
    rows += [row for row, _ in SKIPPED[1:]]
    return write_facts(tmp_path / "facts.jsonl", rows)


def direct_precision(folder: Path, k: int) -> dict[str, tuple[int, int, int]]:
    """Per relation: (facts, hits at 1, hits at k) from transformers' BertForMaskedLM logits,
    the usable facts tokenised by hand with the folder's tokenizer."""
    import transformers

    model = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    mask_id = tokenizer.token_to_id("[MASK]")
    counts: dict[str, list[int]] = {}
    for relation, template, subject, obj in USABLE:
        text = template.replace("[X]", subject).replace("[Y]", "[MASK]")
        ids = tokenizer.encode(text).ids
        target = tokenizer.encode(obj.lower(), add_special_tokens=False).ids
        assert len(target) == 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, ids.index(mask_id)]  # (V,)
        best = logits.topk(k).indices.tolist()
        row = counts.setdefault(relation, [0, 0, 0])
        row[0] += 1
        row[1] += best[0] == target[0]
        row[2] += target[0] in best
    return {relation: tuple(row) for relation, row in counts.items()}


def test_precision_equals_a_direct_computation_from_logits(facts_file, hf_bert_folder, capsys):
    k = 50
    expected = direct_precision(hf_bert_folder, k)
    hits_1 = sum(row[1] for row in expected.values())
    hits_k = sum(row[2] for row in expected.values())
    print(f"direct: {expected}")
    capsys.readouterr()
    assert 0 < hits_1 < hits_k < len(USABLE)  # hits and misses at both cut-offs
    code = main(["probe", "--checkpoint", str(hf_bert_folder), "--file", str(facts_file),
                 "--top-k", str(k), "--batch-size", "3", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for relation, (facts, one, some) in expected.items():
        assert report["relations"][relation] == {"facts": facts, "p@1": one / facts,
                                                 f"p@{k}": some / facts}
    macro = [sum(row[i] / row[0] for row in expected.values()) / len(expected) for i in (1, 2)]
    assert report["macro"] == pytest.approx({"relations": 3, "p@1": macro[0],
                                             f"p@{k}": macro[1]})
    assert report["micro"] == pytest.approx({"facts": len(USABLE), "p@1": hits_1 / len(USABLE),
                                             f"p@{k}": hits_k / len(USABLE)})
    reasons: dict[str, int] = {}
    for _, reason in SKIPPED:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert report["skipped"] == reasons
    assert report["evaluated"] == len(USABLE) and report["total"] == len(USABLE) + len(SKIPPED)


def test_text_table_names_macro_and_micro(facts_file, hf_bert_folder, capsys):
    assert main(["probe", "--checkpoint", str(hf_bert_folder), "--file", str(facts_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["relation", "facts", "P@1", "P@10"]
    assert [line.split()[0] for line in out[1:4]] == ["P1376", "P19", "P36"]
    assert out[4].startswith("macro (mean of 3 relations)")
    assert out[5].startswith("micro (over 9 facts)")
    assert out[6] == ("evaluated 9 of 16 facts; skipped 7: object is several tokens 2, object "
                      "is the unknown token 1, template has several [Y] 1, template lacks [X] "
                      "or [Y] 2, too long 1")


def test_lama_field_names_and_masked_sentences(hf_bert_folder, tmp_path):
    rows = [{"sub_label": "Paris", "obj_label": "city", "predicate_id": "P1376",
             "template": CAPITAL_OF},
            {"masked_sentences": ["paris is the capital of [MASK] ."], "sub_label": "Paris",
             "obj_label": "city", "predicate_id": "P1376"},
            {"template": CAPITAL_OF, "subject": "Paris", "object": "City", "relation": "P1376"}]
    facts = read_facts(write_facts(tmp_path / "lama.jsonl", rows))
    assert [f.relation for f in facts] == ["P1376"] * 3 and facts[1].subject is None
    report = probe(FillMaskModel.load(hf_bert_folder), facts, top_k=1)
    # "City" counts for the uncased model: its normaliser lower-cases it to "city".
    assert report.facts["P1376"] == 3 and report.hits_1["P1376"] == 3


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"bad\.jsonl line 2 is not JSON"),
    ('["a list"]', r"bad\.jsonl line 2 is not a JSON object"),
    ('{"template": "[X] in [Y]", "subject": "a"}', r"bad\.jsonl line 2 lacks a string "
                                                   r"\"object\""),
    ('{"subject": "a", "object": "b"}', r"bad\.jsonl line 2 lacks a string \"template\""),
])
def test_malformed_line_is_one_error_naming_the_line(line, message, hf_bert_folder, tmp_path,
                                                     capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"template": CAPITAL_OF, "subject": "a", "object": "b"})
                   + "\n" + line + "\n", encoding="utf-8")
    assert main(["probe", "--checkpoint", str(hf_bert_folder), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fillmask probe: error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err) and "write one JSON object per line" in err


def test_missing_facts_file(hf_bert_folder, tmp_path, capsys):
    assert main(["probe", "--checkpoint", str(hf_bert_folder), "--file",
                 str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fillmask probe: error: facts file ") and "does not exist" in err
