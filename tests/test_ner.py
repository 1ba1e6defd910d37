"""Named-entity recognition: conlleval's chunk rules and scores, CoNLL column files, and entity
F1 logged by TokenClassification."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.data.labelled import LabelledDataError, LabelledDataModule
from fillmask.data.tokenize import TokenizerTraining, train_tokenizer
from fillmask.finetune import finetune_main
from fillmask.masking.base import IGNORE_INDEX
from fillmask.metrics.conll import Span, entity_scores, entity_spans
from fillmask.objectives.base import load_objective
from fillmask.objectives.classify import TokenClassification

pytestmark = pytest.mark.usefixtures("one_thread")


def spans(text: str, scheme: str) -> list[tuple[str, int, int]]:
    return [tuple(s) for s in entity_spans(text.split(), scheme)]


# conlleval's chunks, hand-decoded.


def test_iob2_chunks_and_ill_formed_starts():
    assert spans("B-PER I-PER O B-LOC", "iob2") == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O, and I- of another type, start chunks, as conlleval counts them.
    assert spans("I-PER I-PER O I-LOC B-LOC I-ORG", "iob2") == [
        ("PER", 0, 1), ("LOC", 3, 3), ("LOC", 4, 4), ("ORG", 5, 5)]
    assert spans("B-PER I-LOC I-LOC B-LOC", "iob2") == [
        ("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]
    assert spans("O O", "iob2") == [] and spans("", "iob2") == []


def test_iob1_chunks_start_at_i_and_split_at_b():
    assert spans("I-PER I-PER B-PER O I-LOC", "iob1") == [
        ("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4)]
    # IOB1 and IOB2 follow one rule set in conlleval.
    for text in ("I-PER B-PER I-PER I-LOC O B-ORG", "B-MISC I-MISC I-MISC B-MISC"):
        assert spans(text, "iob1") == spans(text, "iob2")


def test_iobes_chunks():
    assert spans("S-PER B-LOC I-LOC E-LOC O B-ORG E-ORG S-ORG", "iobes") == [
        ("PER", 0, 0), ("LOC", 1, 3), ("ORG", 5, 6), ("ORG", 7, 7)]
    # Ill-formed: E- always closes a chunk, I- without B- opens one, S- is alone.
    assert spans("E-PER B-PER I-PER", "iobes") == [("PER", 0, 0), ("PER", 1, 2)]
    assert spans("I-PER E-PER S-PER I-PER", "iobes") == [
        ("PER", 0, 1), ("PER", 2, 2), ("PER", 3, 3)]
    assert spans("B-PER S-PER E-PER", "iobes") == [("PER", 0, 0), ("PER", 1, 1),
                                                    ("PER", 2, 2)]


def test_auto_scheme_and_bad_tags():
    assert entity_spans(["B-PER", "E-PER"], "auto") == [Span("PER", 0, 1)]
    assert entity_spans(["B-PER", "I-PER"], "auto") == [Span("PER", 0, 1)]
    with pytest.raises(ValueError, match=r"tag 'S-PER' is not O or one of B-TYPE, I-TYPE"):
        entity_spans(["S-PER"], "iob2")
    with pytest.raises(ValueError, match=r"tag 'PER' is not O"):
        entity_spans(["PER"], "iob2")


def test_scores_are_micro_over_exact_chunks():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"], ["O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-PER"], ["O", "B-LOC", "O"]]
    # gold: PER(0,1) LOC(3) | ORG(0) PER(2) | LOC(1,2): 5 chunks
    # pred: PER(0,1) ORG(3) | ORG(0) PER(2) | LOC(1,1): 5 chunks; 3 correct (a short LOC is not)
    scores = entity_scores(gold, pred, "iob2")
    assert (scores["correct"], scores["gold"], scores["predicted"]) == (3, 5, 5)
    assert scores["precision"] == pytest.approx(0.6) and scores["recall"] == pytest.approx(0.6)
    assert scores["f1"] == pytest.approx(0.6)
    per = scores["per_type"]
    assert per["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "correct": 2, "gold": 2,
                          "predicted": 2}
    assert per["LOC"]["gold"] == 2 and per["LOC"]["predicted"] == 1
    assert per["LOC"]["precision"] == 0.0 and per["LOC"]["f1"] == 0.0
    assert per["ORG"]["precision"] == pytest.approx(0.5) and per["ORG"]["recall"] == 1.0
    assert per["ORG"]["f1"] == pytest.approx(2 / 3)


def test_scores_with_unequal_counts_and_empty_sides():
    gold = [["B-PER", "O", "B-LOC", "O", "B-ORG", "B-ORG"]]  # 4 chunks
    # PER(0) LOC(1) LOC(2) MISC(3) ORG(4,5): 5 chunks; PER(0) and LOC(2) are correct.
    pred = [["B-PER", "I-LOC", "B-LOC", "I-MISC", "B-ORG", "I-ORG"]]
    scores = entity_scores(gold, pred)
    assert (scores["correct"], scores["gold"], scores["predicted"]) == (2, 4, 5)
    assert scores["precision"] == pytest.approx(0.4) and scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    nothing = entity_scores([["B-PER", "O"]], [["O", "O"]])
    assert nothing["precision"] == nothing["recall"] == nothing["f1"] == 0.0
    with pytest.raises(ValueError, match=r"sentence 0 has 2 gold tags but 1 predicted"):
        entity_scores([["O", "O"]], [["O"]])


# An independent check: conlleval's own procedure, a parallel scan that counts a chunk correct
# when both sides start it at the same word with the same type and end it at the same word.


def _parts(tag: str) -> tuple[str, str]:
    return ("O", "") if tag == "O" else tuple(tag.split("-", 1))


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev in ("B", "I") and tag in ("B", "O"):
        return True
    if prev == "E" and tag in ("E", "I", "O"):
        return True
    return prev != "O" and prev_type != kind


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag == "B" and prev in ("B", "I", "O"):
        return True
    if (prev, tag) in {("O", "I"), ("E", "E"), ("E", "I"), ("O", "E")}:
        return True
    return tag != "O" and prev_type != kind


def conlleval_scan(gold: list[list[str]], pred: list[list[str]]) -> tuple[int, int, int]:
    correct = found_gold = found_pred = 0
    for gold_row, pred_row in zip(gold, pred, strict=True):
        in_correct = False
        last_g, last_g_type, last_p, last_p_type = "O", "", "O", ""
        for g_tag, p_tag in zip([*gold_row, "O"], [*pred_row, "O"], strict=True):
            g, g_type = _parts(g_tag)
            p, p_type = _parts(p_tag)
            g_end, p_end = _ends(last_g, g, last_g_type, g_type), _ends(last_p, p, last_p_type,
                                                                        p_type)
            if in_correct:
                if g_end and p_end and last_g_type == last_p_type:
                    in_correct = False
                    correct += 1
                elif g_end != p_end or g_type != p_type:
                    in_correct = False
            g_start, p_start = _starts(last_g, g, last_g_type, g_type), _starts(
                last_p, p, last_p_type, p_type)
            if g_start and p_start and g_type == p_type:
                in_correct = True
            found_gold += g_start
            found_pred += p_start
            last_g, last_g_type, last_p, last_p_type = g, g_type, p, p_type
    return correct, found_gold, found_pred


def test_counts_match_conllevals_parallel_scan_on_random_tags():
    rng = random.Random(0)
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(300):
        length = rng.randint(0, 9)
        gold = [[rng.choice(tags) for _ in range(length)]]
        # Predictions near the gold, so that some chunks are right.
        pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in gold[0]]]
        scores = entity_scores(gold, pred, "iob2")
        assert (scores["correct"], scores["gold"], scores["predicted"]) == conlleval_scan(
            gold, pred), (gold, pred)


# CoNLL column files.

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O


Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC
"""


def tokenizer_file(folder: Path, texts: list[str]) -> Path:
    tok = train_tokenizer(texts, TokenizerTraining(vocab_size=120, min_frequency=1))
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_conll_file_reads_words_and_last_column(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL, encoding="utf-8")
    tok = tokenizer_file(tmp_path, ["EU rejects German call Peter Blackburn BRUSSELS"] * 4)
    dm = LabelledDataModule(str(path), str(path), task="token", tokenizer=str(tok))
    rows = dm.raw["train"]
    assert rows["tokens"] == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"],
                              ["BRUSSELS"]]
    assert rows["tags"] == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert dm.label_names == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
    encoded = dm.encode_split("validation")
    assert [int((row != IGNORE_INDEX).sum()) for row in encoded["labels"]] == [4, 2, 1]
    short = LabelledDataModule(str(path), str(path), task="token", tokenizer=str(tok),
                               max_length=4)
    with pytest.warns(UserWarning, match=r"validation: 1 of 3 sentences are longer than "
                                         r"max_length=4 tokens; their last 2 words"):
        short.encode_split("validation")
    chunks = LabelledDataModule(str(path), str(path), task="token", tokenizer=str(tok),
                                tags_column_index=2)
    assert chunks.raw["train"]["tags"][0] == ["B-NP", "B-VP", "B-NP", "I-NP"]


def test_conll_bad_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("EU NNP B-NP B-ORG\nrejects B-VP O\n", encoding="utf-8")
    dm = LabelledDataModule(str(path), str(path), task="token", tokenizer="unused")
    with pytest.raises(LabelledDataError, match=r"train\.txt line 2 has 3 columns but line 1 "
                                                r"has 4; give every word line the same"):
        dm.setup("fit")
    path.write_text("EU B-ORG\n", encoding="utf-8")
    dm = LabelledDataModule(str(path), str(path), task="token", tags_column_index=2)
    with pytest.raises(LabelledDataError, match=r"line 1 has 2 columns, so "
                                                r"data\.tags_column_index=2 names no tag column"):
        dm.setup("fit")


# Entity scores logged by the objective.

PEOPLE = [("alice", "smith"), ("bob", "jones"), ("carol",), ("david", "brown", "lee")]
PLACES = [("paris",), ("new", "york"), ("berlin",), ("los", "angeles")]
FILLER = "the a story about people in this old town and its plot was long yet fine".split()


def entity_rows(count: int, seed: int) -> list[dict[str, list[str]]]:
    """Sentences with multi-word PER and LOC entities tagged in IOB2."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        pieces: list[list[tuple[str, str]]] = [[(w, "O")] for w in rng.sample(FILLER, 4)]
        for kind, names in (("PER", PEOPLE), ("LOC", PLACES)):
            name = rng.choice(names)
            entity = [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(name)]
            pieces.insert(rng.randint(0, len(pieces)), entity)
        pairs = [pair for piece in pieces for pair in piece]
        rows.append({"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_conll(path: Path, rows: list[dict]) -> Path:
    lines = ["-DOCSTART- -X- O", ""]
    for row in rows:
        lines += [f"{w} X {t}" for w, t in zip(row["tokens"], row["tags"], strict=True)] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def entity_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ner")
    write_jsonl(folder / "train.jsonl", entity_rows(160, seed=1))
    write_jsonl(folder / "dev.jsonl", entity_rows(40, seed=2))
    write_conll(folder / "train.conll", entity_rows(64, seed=3))
    tokenizer_file(folder, [" ".join(r["tokens"]) for r in entity_rows(200, seed=4)])
    return folder


def quiet_trainer(tmp_path: Path, steps: int) -> L.Trainer:
    return L.Trainer(inference_mode=False, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


def predicted_scores(model: TokenClassification, dm: LabelledDataModule) -> dict:
    """conlleval's scores of the model's predictions on the validation split, computed here
    from the raw gold tags and the argmax at each word's first sub-token."""
    model.eval()
    predictions = []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits = model.head(model.encode(batch))  # (B, T, K)
            for row_logits, row_labels in zip(logits, batch["labels"], strict=True):
                ids = row_logits[row_labels != IGNORE_INDEX].argmax(-1).tolist()
                predictions.append([dm.label_names[i] for i in ids])
    return entity_scores(dm.raw["validation"]["tags"], predictions, "iob2")


def test_logged_entity_scores_match_the_predictions(entity_dir, tmp_path):
    torch.manual_seed(0)
    dm = LabelledDataModule(str(entity_dir / "train.jsonl"), str(entity_dir / "dev.jsonl"),
                            task="token", tokenizer=str(entity_dir / "tokenizer.json"),
                            max_length=32, batch_size=16, eval_batch_size=7)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    model = TokenClassification(encoder=encoder, num_labels=dm.num_labels, dropout=0.0,
                                label_names=dm.label_names, learning_rate=3e-3,
                                warmup_steps=5)
    assert model.entity_scheme == "iob2" and model._entity_types == ["LOC", "PER"]
    checks = []
    for steps in (8, 40):  # part-trained (some chunks wrong, some ill-formed), then trained
        fit = quiet_trainer(tmp_path, steps=steps)
        fit.fit(model, datamodule=dm)
        logged = fit.validate(model, datamodule=dm, verbose=False)[0]
        expected = predicted_scores(model, dm)
        print(f"{steps} steps: entity f1 {logged['val/entity_f1']:.3f} ({expected['correct']} "
              f"of {expected['gold']} gold, {expected['predicted']} predicted)")
        for name in ("precision", "recall", "f1"):
            assert logged[f"val/entity_{name}"] == pytest.approx(expected[name], abs=1e-6)
        for kind in ("PER", "LOC"):
            assert logged[f"val/entity_f1/{kind}"] == pytest.approx(
                expected["per_type"][kind]["f1"], abs=1e-6)
        assert expected["gold"] == 80  # two entities a sentence
        checks.append(logged["val/entity_f1"])
    assert 0.0 < checks[0] < 0.9 and checks[1] > 0.9
    assert "val/accuracy" in logged and "val/f1" in logged


def test_tags_without_chunk_prefixes_log_token_metrics_only(entity_dir, tmp_path):
    encoder = BertEncoder.preset("tiny", vocab_size=120, max_positions=32)
    model = TokenClassification(encoder=encoder, num_labels=3, label_names=["LOC", "O", "PER"])
    assert model.entity_scheme is None
    dm = LabelledDataModule(str(entity_dir / "train.jsonl"), str(entity_dir / "dev.jsonl"),
                            task="token", tokenizer=str(entity_dir / "tokenizer.json"),
                            max_length=32, batch_size=40)
    model = TokenClassification(encoder=BertEncoder.preset("tiny", vocab_size=dm.vocab_size,
                                                           max_positions=32),
                                num_labels=dm.num_labels)  # no label_names: token metrics
    logged = quiet_trainer(tmp_path, steps=1).validate(model, datamodule=dm, verbose=False)[0]
    assert "val/accuracy" in logged and not any("entity" in key for key in logged)
    with pytest.raises(Exception, match=r"tag 'LOC' is not O .* set model\.init_args\."
                                        r"tag_scheme"):
        TokenClassification(encoder=encoder, num_labels=3, label_names=["LOC", "O", "PER"],
                            tag_scheme="iob2")


def test_finetune_command_reads_conll_and_logs_entity_f1(entity_dir, hf_bert_folder, tmp_path,
                                                         caplog):
    caplog.set_level(logging.INFO)
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"), "num_sanity_val_steps": 0,
                    "limit_val_batches": 2, "val_check_interval": 2,
                    "callbacks": [{"class_path": "fillmask.callbacks.FitSummary"},
                                  {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"monitor": "val/entity_f1", "mode": "max"}}]},
        "model": {"class_path": "fillmask.objectives.classify.TokenClassification",
                  "init_args": {"pretrained": str(hf_bert_folder), "learning_rate": 1e-3}},
        "data": {"train_file": str(entity_dir / "train.conll"), "task": "token",
                 "max_length": 32, "batch_size": 16, "validation_fraction": 0.25},
    }
    path = tmp_path / "ner.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert finetune_main(["fit", "--config", str(path)]) == 0
    summary = re.search(r"fit done: 2 steps .* entity_f1 ([0-9.]+), .*entity_precision "
                        r"([0-9.]+), entity_recall ([0-9.]+)", caplog.text)
    assert summary is not None, caplog.text[-3000:]
    assert all(0.0 <= float(value) <= 1.0 for value in summary.groups())
    model, _ = load_objective(next((tmp_path / "run").glob("**/*.ckpt")))
    assert isinstance(model, TokenClassification)
    assert model.label_names == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]  # linked from data
    assert model.entity_scheme == "iob2"
