"""Extractive question answering: the official SQuAD metric, SQuAD files and windows, the
start/end objective and its decoding, and `fillmask finetune` on SQuAD files."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from fillmask.architectures.bert import BertEncoder
from fillmask.data.labelled import LabelledDataError
from fillmask.data.squad import QuestionAnsweringDataModule, read_squad
from fillmask.data.tokenize import TokenizerTraining, train_tokenizer
from fillmask.errors import FillmaskError
from fillmask.finetune import finetune_main
from fillmask.metrics.squad import (
    exact_match,
    f1,
    gold_answers,
    normalize_answer,
    squad_evaluate,
    squad_scores,
)
from fillmask.objectives.qa import QuestionAnswering, best_span, decode_answers

pytestmark = pytest.mark.usefixtures("one_thread")

PEOPLE = "alice bob carol david emma frank grace henry".split()
PLACES = "paris london berlin tokyo madrid rome vienna oslo".split()
COLOURS = "red green blue yellow purple orange black white".split()
KINDS = {"person": PEOPLE, "city": PLACES, "colour": COLOURS}
FILLER = "we saw and then a the near with old new some far".split()


def squad_file(path: Path, paragraphs: list[dict], version: str = "1.1") -> Path:
    """A SQuAD JSON file of one article holding ``paragraphs``."""
    data = {"version": version, "data": [{"title": "Synthetic", "paragraphs": paragraphs}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def qa(qid: str, question: str, context: str, answer: str | None) -> dict:
    """A question whose answer is the first occurrence of ``answer`` (None: unanswerable)."""
    if answer is None:
        return {"id": qid, "question": question, "answers": [], "is_impossible": True,
                "plausible_answers": []}
    return {"id": qid, "question": question,
            "answers": [{"text": answer, "answer_start": context.index(answer)}]}


def residents(count: int, seed: int, impossible: float = 0.0) -> list[dict]:
    """Paragraphs naming three people and where each lives; each asks who lives in a place
    (with probability ``impossible`` a place nobody in it lives in: no answer)."""
    rng = random.Random(seed)
    paragraphs = []
    for n in range(count):
        people, places = rng.sample(PEOPLE, 3), rng.sample(PLACES, 4)
        context = " ".join(f"{p} lives in {c} ." for p, c in zip(people, places, strict=False))
        if rng.random() < impossible:
            question = qa(f"q{seed}-{n}", f"who lives in {places[3]} ?", context, None)
        else:
            k = rng.randrange(3)
            question = qa(f"q{seed}-{n}", f"who lives in {places[k]} ?", context, people[k])
        paragraphs.append({"context": context, "qas": [question]})
    return paragraphs


def mentions(count: int, seed: int) -> list[dict]:
    """Paragraphs naming a person, a city and a colour among filler words, in a random order;
    each asks which one of a kind is named (the answer is that word)."""
    rng = random.Random(seed)
    paragraphs = []
    for n in range(count):
        words = rng.sample(FILLER, 5) + [rng.choice(names) for names in KINDS.values()]
        rng.shuffle(words)
        context = " ".join(words) + " ."
        kind = rng.choice(list(KINDS))
        answer = next(w for w in words if w in KINDS[kind])
        paragraphs.append({"context": context, "qas": [
            qa(f"m{seed}-{n}", f"which {kind} is named ?", context, answer)]})
    return paragraphs


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [p["context"] + " " + p["qas"][0]["question"] for p in residents(50, 99)]
    texts += [p["context"] + " " + p["qas"][0]["question"] for p in mentions(50, 99)]
    texts.append("who lives in " + " ".join(PEOPLE + PLACES + COLOURS + FILLER) + " ? .")
    path = tmp_path_factory.mktemp("qa") / "tokenizer.json"
    train_tokenizer(texts, TokenizerTraining(vocab_size=120, min_frequency=1)).save(str(path))
    return path


# The metric: hand-computed cases of the official definitions.


def test_normalisation_is_the_official_one():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre's-door") == "theatresdoor"  # punctuation, not spaces
    assert normalize_answer("Then the end") == "then end"  # whole words only
    assert normalize_answer(" ,the. ") == ""


def test_exact_match_and_f1_by_hand():
    assert exact_match("The Eiffel Tower", "eiffel tower!") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # cat sat on mat / cat on mat: 3 shared, P = 3/4, R = 1, F1 = 6/7.
    assert f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # Bags, not sets: x x y / x y y share one x and one y: P = R = 2/3.
    assert f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1("dog", "cat") == 0.0
    assert f1("", "") == 1.0 and f1("the", "") == 1.0  # both empty after normalisation
    assert f1("", "cat") == 0.0 and f1("cat", "") == 0.0
    assert gold_answers(["", "An", "B"]) == ["B"] and gold_answers([]) == [""]


def test_scores_take_the_best_gold_and_average_in_percent():
    references = {"q1": ["Denver Broncos", "The Broncos"], "q2": ["Paris"], "q3": ["1990"]}
    predictions = {"q1": "broncos", "q2": "in Paris France"}  # q3 unanswered: scores 0
    scores = squad_scores(references, predictions)
    # q1: EM 1 (the broncos -> broncos); q2: P = 1/3, R = 1 -> F1 1/2; q3: 0.
    assert scores == {"exact_match": pytest.approx(100 / 3), "f1": pytest.approx(50.0),
                      "total": 3.0}
    dataset = [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": k, "question": "?", "answers": [{"text": t, "answer_start": 0} for t in v]}
        for k, v in references.items()]}]}]
    assert squad_evaluate(dataset, predictions) == scores


def test_v2_unanswerable_questions_score_only_the_empty_answer():
    references = {"q1": [], "q2": ["Paris"]}
    assert squad_scores(references, {"q1": "", "q2": "paris"})["exact_match"] == 100.0
    wrong = squad_scores(references, {"q1": "Rome", "q2": ""})
    assert wrong["exact_match"] == 0.0 and wrong["f1"] == 0.0
    mixed = squad_scores(references, {"q1": "", "q2": "in Paris France"})
    assert mixed == {"exact_match": 50.0, "f1": pytest.approx(75.0), "total": 2.0,
                     "has_answer_exact_match": 0.0, "has_answer_f1": pytest.approx(50.0),
                     "no_answer_exact_match": 100.0, "no_answer_f1": 100.0}


# Files and windows.


def test_a_misplaced_answer_is_one_clear_error(tmp_path, tokenizer_file, capsys):
    context = "alice lives in paris ."
    bad = {"id": "q-bad", "question": "who lives in paris ?",
           "answers": [{"text": "alice", "answer_start": 3}]}
    path = squad_file(tmp_path / "bad.json", [{"context": context, "qas": [bad]}])
    with pytest.raises(LabelledDataError) as error:
        read_squad(path, "train")
    message = str(error.value)
    assert str(path) in message and "'q-bad'" in message and "set answer_start to 0" in message
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({
        "trainer": {"max_steps": 1, "logger": False, "default_root_dir": str(tmp_path / "r")},
        "model": {"class_path": "fillmask.objectives.qa.QuestionAnswering",
                  "init_args": {"encoder": {"class_path": "fillmask.architectures.bert."
                                                          "BertEncoder"}}},
        "data": {"class_path": "fillmask.data.squad.QuestionAnsweringDataModule",
                 "init_args": {"train_file": str(path), "tokenizer": str(tokenizer_file)}}}))
    assert finetune_main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fillmask finetune: error: ") and "q-bad" in err[0]


def test_long_contexts_become_overlapping_windows(tmp_path, tokenizer_file):
    rng = random.Random(3)
    sentences = [f"{p} lives in {c} ." for p, c in zip(rng.choices(PEOPLE, k=12),
                                                      rng.choices(PLACES, k=12), strict=True)]
    context = " ".join(sentences + ["zed lives in nowhere ."] + sentences)
    path = squad_file(tmp_path / "long.json", [{"context": context, "qas": [
        qa("long", "who lives in nowhere ?", context, "zed lives in nowhere")]}])
    dm = QuestionAnsweringDataModule(str(path), validation_file=str(path),
                                     tokenizer=str(tokenizer_file), max_length=32, doc_stride=6,
                                     max_query_length=8, pad_to_multiple_of=1)
    dm.setup("fit")
    rows, features = dm.encoded["validation"].rows, dm.features("validation")
    assert len(features) > 4 and {f.example for f in features} == {0}
    assert all(len(ids) <= 32 for ids in rows["input_ids"])
    question = "who lives in " + " ".join(PLACES) + " ?"
    cut = dm._cut_question(question)
    count = len(dm.tokenizer.encode(cut, add_special_tokens=False).ids)
    assert question.startswith(cut) and len(cut) < len(question) and count == 8
    spans = [[o for o in f.offsets if o is not None] for f in features]
    for before, after in zip(spans, spans[1:], strict=False):
        assert before[-6:] == after[:6]  # neighbours share doc_stride context tokens
    assert spans[0][0][0] == 0 and spans[-1][-1][1] == len(context)  # all of it, in order
    answer_start = context.index("zed")
    answer_end = answer_start + len("zed lives in nowhere")
    answered = [i for i, s in enumerate(rows["start_positions"]) if s != 0]
    assert answered  # some window holds the whole answer ...
    for i in answered:
        offsets = features[i].offsets
        start, end = rows["start_positions"][i], rows["end_positions"][i]
        assert context[offsets[start][0]:offsets[end][1]] == "zed lives in nowhere"
    for i in set(range(len(features))) - set(answered):  # ... the others point at CLS
        assert rows["end_positions"][i] == 0
        assert not spans[i][0][0] <= answer_start < answer_end <= spans[i][-1][1]
    batch = dm.collator()([dm.encoded["validation"][i] for i in range(3)])
    assert batch["input_ids"].shape == (3, 32) and batch["feature_index"].tolist() == [0, 1, 2]
    context_tokens = [o is not None for o in features[0].offsets]  # question first, type 0
    assert batch["token_type_ids"][0].tolist()[:len(context_tokens)].count(1) == sum(
        context_tokens) + 1 and not context_tokens[0]  # context and its SEP are type 1


# Decoding.


def test_best_span_respects_the_context_length_and_order():
    context = "alice lives in paris"
    offsets = [None, None, (0, 5), (6, 11), (12, 14), (15, 20), None]
    start = np.array([5.0, 9.0, 1.0, 0.0, 0.0, 4.0, 9.0])  # question/special tokens score high
    end = np.array([5.0, 9.0, 0.0, 2.0, 0.0, 1.0, 9.0])
    text, score, null = best_span([(start, end, offsets)], context)
    assert (text, score, null) == ("paris", 5.0, 10.0)  # (5, 3) has its end before its start
    assert best_span([(start, end, offsets)], context, max_answer_length=1)[0] == "paris"
    end[3] = 6.0  # alice..lives: 1 + 6 = 7 beats paris's 4 + 1 = 5; three tokens with paris
    assert best_span([(start, end, offsets)], context)[0] == "alice lives"
    assert best_span([(start, end, offsets)], context, n_best_size=1)[0] == ""  # 1 start, 1 end


def test_v2_file_decodes_empty_answers_when_the_null_score_wins(tmp_path, tokenizer_file):
    paragraphs = residents(8, 5, impossible=0.5)
    path = squad_file(tmp_path / "dev-v2.json", paragraphs, version="v2.0")
    dm = QuestionAnsweringDataModule(str(path), validation_file=str(path),
                                     tokenizer=str(tokenizer_file), max_length=48,
                                     doc_stride=8, max_query_length=12)
    dm.setup("validate")
    examples, features = dm.examples("validation"), dm.features("validation")
    assert any(e.is_impossible for e in examples) and not all(e.is_impossible for e in examples)
    rows = dm.encoded["validation"].rows
    logits = {}
    for i, feature in enumerate(features):  # an oracle: high at the gold span, else at CLS
        start, end = np.zeros(len(feature.offsets)), np.zeros(len(feature.offsets))
        start[rows["start_positions"][i]] += 3.0
        end[rows["end_positions"][i]] += 3.0
        logits[i] = (start, end)
    for i, e in enumerate(examples):
        assert e.is_impossible == (rows["start_positions"][i] == 0)  # one window each
    predictions = decode_answers(examples, features, logits, version_2_with_negative=True)
    assert {e.id: predictions[e.id] for e in examples if e.is_impossible} == {
        e.id: "" for e in examples if e.is_impossible}
    scores = squad_scores(dm.references("validation"), predictions)
    assert scores["exact_match"] == 100.0 and scores["no_answer_f1"] == 100.0
    # A threshold above the null margin (6) keeps the best spans; v1 decoding never abstains.
    lenient = decode_answers(examples, features, logits, version_2_with_negative=True,
                             null_score_diff_threshold=10.0)
    assert all(lenient[e.id] for e in examples)
    assert all(decode_answers(examples, features, logits).values())


def test_objective_checks_its_options():
    encoder = BertEncoder.preset("tiny", vocab_size=50, max_positions=16)
    with pytest.raises(FillmaskError, match="num_labels=3"):
        QuestionAnswering(encoder=encoder, num_labels=3)
    model = QuestionAnswering(encoder=encoder)
    assert model.qa_outputs.out_features == 2 and model.qa_outputs.in_features == 32


# Learning.


def test_a_tiny_model_learns_which_word_answers(tmp_path, tokenizer_file):
    train = squad_file(tmp_path / "train.json", mentions(300, 1))
    dev = squad_file(tmp_path / "dev.json", mentions(40, 2))
    dm = QuestionAnsweringDataModule(str(train), validation_file=str(dev),
                                     tokenizer=str(tokenizer_file), max_length=32, doc_stride=8,
                                     max_query_length=12, batch_size=16)
    L.seed_everything(0)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    model = QuestionAnswering(encoder=encoder, learning_rate=5e-3, warmup_steps=20)
    trainer = L.Trainer(max_steps=400, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, check_val_every_n_epoch=1000,
                        default_root_dir=tmp_path)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]
    print(f"val loss {before['val/loss']:.2f} -> {after['val/loss']:.2f}, exact match "
          f"{before['val/exact_match']:.1f} -> {after['val/exact_match']:.1f}")
    assert after["val/loss"] < before["val/loss"] - 1.0
    # Each context names one word of each kind: naming one of them at random scores about 33.
    assert after["val/exact_match"] >= 70.0 and after["val/f1"] >= after["val/exact_match"]
    answers = model.predict_answers(dm, "validation")
    assert answers == {}  # the logits are decoded and cleared at the end of each evaluation


# The command.


def test_finetune_two_steps_on_squad_files(tmp_path, hf_bert_folder, caplog):
    train = squad_file(tmp_path / "train.json", residents(12, 1))
    dev = squad_file(tmp_path / "dev.json", residents(6, 2, impossible=0.5), version="v2.0")
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "val_check_interval": 2, "logger": False,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "fillmask.callbacks.FitSummary"}]},
        "model": {"class_path": "fillmask.objectives.qa.QuestionAnswering",
                  "init_args": {"pretrained": str(hf_bert_folder), "learning_rate": 1e-4,
                                "version_2_with_negative": True}},
        "data": {"class_path": "fillmask.data.squad.QuestionAnsweringDataModule",
                 "init_args": {"train_file": str(train), "validation_file": str(dev),
                               "max_length": 48, "doc_stride": 8, "max_query_length": 12,
                               "batch_size": 4}},
    }
    path = tmp_path / "squad.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    with caplog.at_level("INFO"):
        assert finetune_main(["fit", "--config", str(path)]) == 0
    summary = re.search(r"fit done: 2 steps .* validation: .*exact_match ([0-9.]+), f1 "
                        r"([0-9.]+)", caplog.text)
    assert summary is not None, caplog.text[-2000:]
    assert 0 <= float(summary[1]) <= float(summary[2]) <= 100
    assert "no_answer_f1" in caplog.text
    assert next((tmp_path / "run").glob("**/*.ckpt")).is_file()


def test_finetune_squad_config_parses(capsys):
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["fit", "--config", str(root / "configs" / "finetune-squad.yaml"),
                       "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "fillmask.objectives.qa.QuestionAnswering" in out and "doc_stride: 128" in out


def test_task_question_answering_on_labelled_data_points_to_the_squad_module(tmp_path):
    from fillmask.data.labelled import LabelledDataError, LabelledDataModule

    with pytest.raises(LabelledDataError, match=r"class_path: fillmask\.data\.squad\."
                                                r"QuestionAnsweringDataModule"):
        LabelledDataModule(str(tmp_path / "train.json"), task="question_answering")
