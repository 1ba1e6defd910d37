"""Fine-tuning: labelled data (sequence and token classification), the objectives, and the
`fillmask finetune` command."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.data.labelled import LabelledDataError, LabelledDataModule
from fillmask.data.tokenize import TokenizerTraining, train_tokenizer
from fillmask.finetune import finetune_main
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import load_objective
from fillmask.objectives.classify import SequenceClassification, TokenClassification
from fillmask.objectives.pretrained import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
FILLER = ("the movie was a story about people in this old town and its plot felt "
          "rather long yet the actors played their parts with some care").split()
POSITIVE = ["great", "wonderful", "excellent", "delightful"]
NEGATIVE = ["terrible", "awful", "boring", "dull"]
PEOPLE = ["alice", "bob", "carol", "david", "emma"]
PLACES = ["paris", "london", "berlin", "tokyo", "madrid"]


def sentiment_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Sentences that are positive exactly when they contain a positive word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(FILLER, rng.randint(4, 9))
        label = rng.choice(["positive", "negative"])
        cue = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words.insert(rng.randint(0, len(words)), cue)
        rows.append({"sentence": " ".join(words), "other": rng.choice(FILLER), "label": label})
    return rows


def tagged_rows(count: int, seed: int) -> list[dict[str, list[str]]]:
    """Word lists whose tag is decided by the word: PER for people, LOC for places, else O."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(FILLER, rng.randint(3, 7))
        for name in rng.sample(PEOPLE, 1) + rng.sample(PLACES, rng.randint(0, 2)):
            words.insert(rng.randint(0, len(words)), name)
        tags = ["PER" if w in PEOPLE else "LOC" if w in PLACES else "O" for w in words]
        rows.append({"tokens": words, "tags": tags})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("labelled")
    write_csv(folder / "train.csv", sentiment_rows(320, seed=1))
    write_csv(folder / "dev.csv", sentiment_rows(100, seed=2))
    write_jsonl(folder / "train.jsonl", sentiment_rows(240, seed=3))
    write_jsonl(folder / "tags-train.jsonl", tagged_rows(240, seed=4))
    write_jsonl(folder / "tags-dev.jsonl", tagged_rows(60, seed=5))
    texts = [r["sentence"] for r in sentiment_rows(300, seed=6)]
    texts += [" ".join(r["tokens"]) for r in tagged_rows(300, seed=7)]
    # A small vocabulary, so that some words split into several sub-tokens.
    tok = train_tokenizer(texts, TokenizerTraining(vocab_size=120, min_frequency=1))
    tok.save(str(folder / "tokenizer.json"))
    return folder


def trainer(tmp_path: Path, steps: int, **kwargs) -> L.Trainer:
    # Without inference mode: metric states reset in `validate` stay usable in `fit`.
    return L.Trainer(inference_mode=False, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, **kwargs)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


# Data.


def test_sentence_pairs_are_cls_a_sep_b_sep_with_type_ids(data_dir):
    dm = LabelledDataModule(str(data_dir / "train.csv"), str(data_dir / "dev.csv"),
                            text_column="sentence", text_pair_column="other",
                            tokenizer=str(data_dir / "tokenizer.json"), batch_size=8)
    assert dm.label_names == ["negative", "positive"] and dm.num_labels == 2
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["attention_mask"].dtype == torch.bool and batch["labels"].shape == (8,)
    special = dm.special_tokens
    row = dm.raw["validation"][0]
    length = int(batch["attention_mask"][0].sum())
    ids, types = batch["input_ids"][0, :length], batch["token_type_ids"][0, :length]
    seps = (ids == special.sep_id).nonzero().flatten().tolist()
    assert ids[0] == special.cls_id and seps[-1] == length - 1 and len(seps) == 2
    assert types[: seps[0] + 1].eq(0).all() and types[seps[0] + 1:].eq(1).all()
    second = dm.tokenizer.encode(row["other"], add_special_tokens=False).ids
    assert ids[seps[0] + 1: seps[1]].tolist() == second
    assert (batch["input_ids"][0, length:] == special.pad_id).all()
    assert batch["labels"][0] == dm.label_ids[row["label"]]


def test_token_labels_sit_on_first_subtokens_only(data_dir):
    dm = LabelledDataModule(str(data_dir / "tags-train.jsonl"), task="token",
                            tokenizer=str(data_dir / "tokenizer.json"), batch_size=4)
    assert dm.label_names == ["LOC", "O", "PER"]
    encoded = dm.encode_split("train")
    split_words = 0
    for index in range(20):
        words, tags = dm.raw["train"][index]["tokens"], dm.raw["train"][index]["tags"]
        encoding = dm.tokenizer.encode(words, is_pretokenized=True)
        labels = encoded["labels"][index].tolist()
        assert labels[0] == labels[-1] == IGNORE_INDEX  # CLS and SEP
        firsts = [labels[p] for p, w in enumerate(encoding.word_ids)
                  if w is not None and (p == 0 or encoding.word_ids[p - 1] != w)]
        assert firsts == [dm.label_ids[t] for t in tags]
        assert sum(label != IGNORE_INDEX for label in labels) == len(words)
        split_words += len(encoding.ids) - 2 - len(words)
    assert split_words > 0  # some words have several sub-tokens: the rule was exercised
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][~batch["attention_mask"]] == IGNORE_INDEX).all()


def test_validation_is_held_out_of_train_by_seed(data_dir):
    def split(seed: int) -> list[str]:
        dm = LabelledDataModule(str(data_dir / "train.jsonl"), text_column="sentence",
                                tokenizer=str(data_dir / "tokenizer.json"),
                                validation_fraction=0.25, seed=seed)
        assert len(dm.raw["train"]) == 180 and len(dm.raw["validation"]) == 60
        return dm.raw["validation"]["sentence"]

    assert split(0) == split(0) and split(0) != split(1)


def test_missing_file_names_the_path(data_dir, tmp_path):
    dm = LabelledDataModule(str(tmp_path / "absent.csv"),
                            tokenizer=str(data_dir / "tokenizer.json"))
    with pytest.raises(LabelledDataError, match=r"train file .*absent\.csv does not exist"):
        dm.setup("fit")


def test_missing_column_lists_the_columns(data_dir):
    dm = LabelledDataModule(str(data_dir / "train.csv"), text_column="text",
                            tokenizer=str(data_dir / "tokenizer.json"))
    with pytest.raises(LabelledDataError, match=r"train\.csv has no column 'text' \(columns: "
                                                r"sentence, other, label\)"):
        dm.setup("fit")


def test_validation_label_unseen_in_training(data_dir, tmp_path):
    dev = write_csv(tmp_path / "dev.csv", [{"sentence": "a plot", "label": "neutral"}])
    dm = LabelledDataModule(str(data_dir / "train.csv"), str(dev), text_column="sentence",
                            tokenizer=str(data_dir / "tokenizer.json"))
    with pytest.raises(LabelledDataError, match=r"validation label 'neutral' .* never occurs in "
                                                r"the training file"):
        dm.setup("validate")


# Learning.


def test_sequence_classification_learns_from_pretrained_bert(data_dir, hf_bert_folder, tmp_path):
    torch.manual_seed(0)
    model = SequenceClassification(pretrained=str(hf_bert_folder), num_labels=2,
                                   learning_rate=3e-4, warmup_steps=0.1)
    dm = LabelledDataModule(str(data_dir / "train.csv"), str(data_dir / "dev.csv"),
                            text_column="sentence", max_length=32, batch_size=16)
    dm.use_tokenizer(load_pretrained(hf_bert_folder)[1])
    assert dm.vocab_size == 30522
    recorder = LossRecorder()
    fit = trainer(tmp_path, steps=40, callbacks=[recorder])
    before = fit.validate(model, datamodule=dm, verbose=False)[0]
    fit.fit(model, datamodule=dm)
    after = fit.validate(model, datamodule=dm, verbose=False)[0]
    print(f"sequence: val accuracy {before['val/accuracy']:.3f} -> {after['val/accuracy']:.3f}")
    assert after["val/accuracy"] > 0.9 and after["val/f1"] > 0.9
    assert after["val/loss"] < before["val/loss"] - 0.3
    assert sum(recorder.losses[-10:]) / 10 < sum(recorder.losses[:10]) / 10 - 0.3


def test_token_classification_learns_from_scratch(data_dir, tmp_path):
    torch.manual_seed(0)
    dm = LabelledDataModule(str(data_dir / "tags-train.jsonl"), str(data_dir / "tags-dev.jsonl"),
                            task="token", tokenizer=str(data_dir / "tokenizer.json"),
                            max_length=32, batch_size=16)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    model = TokenClassification(encoder=encoder, num_labels=dm.num_labels, dropout=0.0,
                                learning_rate=3e-3, warmup_steps=5)
    recorder = LossRecorder()
    fit = trainer(tmp_path, steps=80, callbacks=[recorder])
    fit.fit(model, datamodule=dm)
    metrics = fit.validate(model, datamodule=dm, verbose=False)[0]
    print(f"token: val accuracy {metrics['val/accuracy']:.3f}, f1 {metrics['val/f1']:.3f}")
    assert metrics["val/accuracy"] > 0.9 and metrics["val/f1"] > 0.8
    assert sum(recorder.losses[-10:]) / 10 < sum(recorder.losses[:10]) / 10 - 0.5


def test_vocabulary_larger_than_encoder_fails_before_training(data_dir, tmp_path):
    dm = LabelledDataModule(str(data_dir / "train.csv"), text_column="sentence",
                            tokenizer=str(data_dir / "tokenizer.json"))
    model = SequenceClassification(encoder=BertEncoder.preset("tiny", vocab_size=16))
    with pytest.raises(ValueError, match=r"has only 16 rows"):
        trainer(tmp_path, steps=1).fit(model, datamodule=dm)


# The command.


def finetune_config(path: Path, data_dir: Path, pretrained: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 2, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(path.parent / "run"),
                    "callbacks": [{"class_path": "fillmask.callbacks.FitSummary"}]},
        "model": {"class_path": "fillmask.objectives.classify.SequenceClassification",
                  "init_args": {"pretrained": str(pretrained), "learning_rate": 3e-4}},
        "data": {"train_file": str(data_dir / "train.jsonl"), "text_column": "sentence",
                 "max_length": 32, "batch_size": 16},
    }
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def test_finetune_command_trains_and_writes_a_loadable_checkpoint(data_dir, hf_bert_folder,
                                                                   tmp_path):
    config = finetune_config(tmp_path / "finetune.yaml", data_dir, hf_bert_folder)
    result = subprocess.run([sys.executable, "-m", "fillmask", "finetune", "fit", "--config",
                             str(config), "--trainer.max_steps", "28"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # 240 rows, 10% held out: 14 batches of 16 an epoch, so 28 steps are two epochs.
    summary = re.search(r"fit done: 28 steps .* validation: accuracy ([0-9.]+), f1 ([0-9.]+)",
                        result.stdout + result.stderr)
    assert summary is not None, result.stderr[-3000:]
    assert float(summary[1]) > 0.8 and float(summary[2]) > 0.8
    assert "LightningCLI's args" not in result.stderr
    last = next((tmp_path / "run").glob("**/*.ckpt"))
    model, tokenizer = load_objective(last)
    assert isinstance(model, SequenceClassification) and model.num_labels == 2
    assert tokenizer is not None and tokenizer.get_vocab_size() == 30522
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    torch.testing.assert_close(model.head.classifier.weight,
                               ckpt["state_dict"]["head.classifier.weight"])


def test_finetune_missing_file_is_one_clear_line(data_dir, hf_bert_folder, tmp_path, capsys):
    config = finetune_config(tmp_path / "finetune.yaml", data_dir, hf_bert_folder)
    code = finetune_main(["fit", "--config", str(config), "--data.train_file",
                          str(tmp_path / "nothing.jsonl")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fillmask finetune: error: train file ") and "nothing.jsonl" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["finetune-sst2", "finetune-conll"])
def test_finetune_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                       "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    kind = "SequenceClassification" if name == "finetune-sst2" else "TokenClassification"
    assert f"fillmask.objectives.classify.{kind}" in out and "train_file:" in out


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_sequence_pooling_reads_real_tokens_only(pooling):
    torch.manual_seed(0)
    model = SequenceClassification(encoder=BertEncoder.preset("tiny", vocab_size=64,
                                                              max_positions=16),
                                   num_labels=3, pooling=pooling).eval()
    ids = torch.randint(5, 64, (1, 6))
    alone = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([1])}
    padded = {"input_ids": torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long(),
              "labels": torch.tensor([1])}
    with torch.no_grad():
        logits, _ = model.logits_and_targets(alone)
        padded_logits, _ = model.logits_and_targets(padded)
        states = model.encoder(ids)
    torch.testing.assert_close(padded_logits, logits, atol=1e-5, rtol=1e-5)
    pooled = {"cls": states[:, 0], "mean": states.mean(1), "max": states.amax(1)}[pooling]
    head = model.head
    torch.testing.assert_close(logits, head.classifier(torch.tanh(head.pooler(pooled))))
    assert model.hparams.pooling == pooling


def test_unknown_pooling_or_layer_decay_is_one_line():
    encoder = BertEncoder.preset("tiny", vocab_size=64)
    with pytest.raises(Exception, match=r"pooling 'first' is unknown; use one of cls, mean, max"):
        SequenceClassification(encoder=encoder, pooling="first")
    with pytest.raises(Exception, match=r"layer_decay=1.5: give a factor in \(0, 1\]"):
        SequenceClassification(encoder=encoder, layer_decay=1.5)


def test_layer_decay_gives_each_depth_its_rate():
    encoder = BertEncoder.preset("tiny", vocab_size=64, norm="pre")  # pre-LN: a final norm
    layers = len(encoder.blocks)
    model = SequenceClassification(encoder=encoder, num_labels=3, learning_rate=1e-3,
                                   layer_decay=0.5)
    rate = {id(p): g["lr"] for g in model._parameter_groups() for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in model._parameter_groups() for p in g["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["head.classifier.weight"])] == pytest.approx(1e-3)
    assert rate[id(named["encoder.final_norm.weight"])] == pytest.approx(1e-3)
    for i in range(layers):
        want = 1e-3 * 0.5 ** (layers - i)
        assert rate[id(named[f"encoder.blocks.{i}.ffn.up.weight"])] == pytest.approx(want)
    assert rate[id(named["encoder.embeddings.tokens.weight"])] == pytest.approx(
        1e-3 * 0.5 ** (layers + 1))
    assert decay[id(named["encoder.blocks.0.ffn.up.weight"])] == 0.01
    assert decay[id(named["encoder.blocks.0.ffn.up.bias"])] == 0.0
    assert len(rate) == len(named)  # every parameter in exactly one group
    plain = SequenceClassification(encoder=encoder, num_labels=3, learning_rate=1e-3)
    assert all("lr" not in g for g in plain._parameter_groups())


def test_datasets_folder_with_class_labels_fine_tunes_like_files(data_dir, tmp_path):
    import datasets

    rows = list(csv.DictReader((data_dir / "train.csv").open()))
    names = sorted({r["label"] for r in rows})
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names)})
    columns = {"sentence": [r["sentence"] for r in rows],
               "label": [names.index(r["label"]) for r in rows]}
    saved = tmp_path / "sentiment"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns, features=features)}
                         ).save_to_disk(str(saved))
    dm = LabelledDataModule(dataset=str(saved), text_column="sentence",
                            tokenizer=str(data_dir / "tokenizer.json"), max_length=32)
    assert dm.label_names == names  # class-label names, not ids
    assert len(dm.raw["validation"]) == round(0.1 * len(rows))  # no validation split: held out
    files = LabelledDataModule(str(data_dir / "train.csv"), text_column="sentence",
                               tokenizer=str(data_dir / "tokenizer.json"), max_length=32)
    assert files.label_names == names
    with pytest.raises(LabelledDataError, match=r"has no split 'test' \(splits: train\); "
                                                r"set data.test_split"):
        _ = LabelledDataModule(dataset=str(saved), text_column="sentence",
                               test_split="test").raw
    with pytest.raises(LabelledDataError, match=r"could not load dataset .*no-such-dataset"):
        _ = LabelledDataModule(dataset=str(tmp_path / "no-such-dataset")).raw
    with pytest.raises(LabelledDataError, match=r"data.train_file .* or as data.dataset"):
        LabelledDataModule(str(data_dir / "train.csv"), dataset=str(saved))
