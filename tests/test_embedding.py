"""Sentence embeddings: pooling, the InfoNCE loss, Spearman, SimCSE training on sentence data,
the `fillmask embed` command and the sentence-transformers export."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fillmask.architectures.bert import BertEncoder
from fillmask.data.labelled import LabelledDataError
from fillmask.data.sentences import SentenceDataModule
from fillmask.data.tokenize import TokenizerTraining, train_tokenizer
from fillmask.embedding import SentenceEncoder, embed_main, retrieval_scores
from fillmask.interop.export import export_main
from fillmask.interop.sentence_transformers import export_sentence_transformer
from fillmask.objectives.base import load_objective
from fillmask.objectives.embedding import SentenceEmbedding, average_ranks, info_nce, pool, spearman

pytestmark = pytest.mark.usefixtures("one_thread")

TOPICS = {name: [f"{name}{suffix}" for suffix in ("ax", "be", "ci", "do", "eu", "fo", "gu", "hi")]
          for name in ("kiv", "lom", "pud", "ras", "sel", "tob")}
FILLER = [f"{a}{b}" for a in ("ma", "ne", "po", "qu", "ri") for b in ("n", "s", "t", "l", "k")]


def sentence(rng: random.Random, topic: str) -> str:
    """Two words of ``topic`` among four shared filler words: same-topic sentences often share
    no word at all, so only training teaches that they belong together."""
    words = rng.sample(TOPICS[topic], 2) + rng.sample(FILLER, 4)
    rng.shuffle(words)
    return " ".join(words)


def pair_rows(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic, other = rng.sample(sorted(TOPICS), 2)
        rows.append({"anchor": sentence(rng, topic), "positive": sentence(rng, topic),
                     "negative": sentence(rng, other)})
    return rows


def sts_rows(count: int, seed: int) -> list[dict[str, object]]:
    """Pairs scored 5 when they share their topic, else 0."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        first, second = rng.sample(sorted(TOPICS), 2)
        same = index % 2 == 0
        rows.append({"sentence1": sentence(rng, first),
                     "sentence2": sentence(rng, first if same else second),
                     "score": 5.0 if same else 0.0})
    return rows


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sentences")
    pairs = pair_rows(320, seed=1)
    write_csv(folder / "pairs.csv", pairs)
    (folder / "triplets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:64]))
    write_csv(folder / "sts.tsv", sts_rows(80, seed=2), delimiter="\t")
    (folder / "sentences.txt").write_text("\n".join(r["anchor"] for r in pairs[:64]) + "\n")
    texts = [r[k] for r in pairs for k in ("anchor", "positive", "negative")]
    tok = train_tokenizer(texts, TokenizerTraining(vocab_size=120, min_frequency=1))
    tok.save(str(folder / "tokenizer.json"))
    return folder


def data_module(data_dir: Path, **kwargs) -> SentenceDataModule:
    options = {"train_file": str(data_dir / "pairs.csv"), "mode": "pairs",
               "validation_file": str(data_dir / "sts.tsv"),
               "tokenizer": str(data_dir / "tokenizer.json"), "batch_size": 16, **kwargs}
    return SentenceDataModule(**options)


def trainer(tmp_path: Path, steps: int) -> L.Trainer:
    return L.Trainer(inference_mode=False, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=tmp_path)


@pytest.fixture(scope="module")
def checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SentenceEmbedding checkpoint (max pooling, normalised) after a few steps."""
    torch.manual_seed(0)
    dm = data_module(data_dir)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64)
    model = SentenceEmbedding(encoder=encoder, pooling="max", normalize=True,
                              learning_rate=1e-3)
    folder = tmp_path_factory.mktemp("ckpt")
    fit = trainer(folder, steps=3)
    fit.fit(model, datamodule=dm)
    fit.save_checkpoint(folder / "emb.ckpt")
    return folder / "emb.ckpt"


# Pooling, loss and correlation.


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_pooling_a_padded_batch_equals_each_row_alone(pooling):
    torch.manual_seed(0)
    lengths = [5, 2, 7]
    hidden = torch.randn(3, 8, 4) - 3.0  # all negative: padding zeros would win a max
    mask = torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]
    hidden = hidden.masked_fill(~mask[..., None], 100.0)  # padding garbage must not leak
    pooled = pool(hidden, mask, pooling)
    for row, length in enumerate(lengths):
        alone = hidden[row: row + 1, :length]
        expected = pool(alone, torch.ones(1, length, dtype=torch.bool), pooling)[0]
        torch.testing.assert_close(pooled[row], expected)
    expected_mean = hidden[1, :2].mean(0)
    torch.testing.assert_close(pool(hidden, mask, "mean")[1], expected_mean)
    torch.testing.assert_close(pool(hidden, mask, "max")[1], hidden[1, :2].amax(0))
    torch.testing.assert_close(pool(hidden, mask, "cls")[1], hidden[1, 0])


def test_info_nce_equals_a_hand_computation():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positives = torch.tensor([[3.0, 4.0], [0.0, -1.0]])
    negatives = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    t = 0.5
    # cosines: anchor 0 = (1, 0): vs (.6, .8) .6, (0, -1) 0, (1,1)/sqrt2 .7071, (-1, 0) -1
    #          anchor 1 = (0, 1): .8, -1, .7071, 0
    rows = [[0.6, 0.0, 1 / math.sqrt(2), -1.0], [0.8, -1.0, 1 / math.sqrt(2), 0.0]]
    by_hand = 0.0
    for i, row in enumerate(rows):
        by_hand += -row[i] / t + math.log(sum(math.exp(c / t) for c in row))
    loss = info_nce(anchors, positives, t, negatives)
    assert loss.item() == pytest.approx(by_hand / 2, rel=1e-6)
    no_negatives = sum(-r[i] / t + math.log(sum(math.exp(c / t) for c in r[:2]))
                       for i, r in enumerate(rows)) / 2
    assert info_nce(anchors, positives, t).item() == pytest.approx(no_negatives, rel=1e-6)


def test_spearman_uses_average_ranks_for_ties():
    assert average_ranks(torch.tensor([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    y = torch.tensor([2.0, 1.0, 4.0, 4.0, 6.0])
    # ranks x: 1, 2.5, 2.5, 4, 5; y: 2, 1, 3.5, 3.5, 5; Pearson of the ranks by hand:
    rx, ry = [1, 2.5, 2.5, 4, 5], [2, 1, 3.5, 3.5, 5]
    dx, dy = [v - 3 for v in rx], [v - 3 for v in ry]
    by_hand = sum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(
        sum(a * a for a in dx) * sum(b * b for b in dy))
    assert spearman(x, y) == pytest.approx(by_hand, rel=1e-12)
    from scipy.stats import spearmanr

    assert spearman(x, y) == pytest.approx(spearmanr(x.numpy(), y.numpy()).statistic)
    assert math.isnan(spearman(x, torch.ones(5)))


# Data.


def test_modes_give_the_roles_as_padded_cls_sep_batches(data_dir):
    dm = data_module(data_dir, train_file=str(data_dir / "triplets.jsonl"), mode="triplets")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"anchor", "positive", "negative"}
    cls_id, sep_id = dm.special_tokens.cls_id, dm.special_tokens.sep_id
    for role in batch.values():
        assert role["input_ids"].shape == role["attention_mask"].shape
        assert (role["input_ids"][:, 0] == cls_id).all()
        lengths = role["attention_mask"].sum(1)
        assert (role["input_ids"][torch.arange(len(lengths)), lengths - 1] == sep_id).all()
    val = next(iter(dm.val_dataloader()))
    assert set(val) == {"sentence1", "sentence2", "scores"} and val["scores"].dtype == torch.float32
    plain = data_module(data_dir, train_file=str(data_dir / "sentences.txt"), mode="unsupervised")
    assert set(next(iter(plain.train_dataloader()))) == {"anchor"}
    assert len(plain.encoded["train"]) == 64


def test_data_errors_are_one_line_naming_file_and_row(data_dir, tmp_path):
    two = write_csv(tmp_path / "two.csv", [{k: r[k] for k in ("anchor", "positive")}
                                           for r in pair_rows(4, seed=5)])
    missing = data_module(data_dir, train_file=str(two), mode="triplets")
    with pytest.raises(LabelledDataError, match=r"two.csv has no column 'negative'"):
        missing.setup("fit")
    rows = sts_rows(4, seed=3)
    rows[2]["score"] = "high"
    bad = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(LabelledDataError, match=r"bad.csv line 4: score 'high' .* not a number"):
        data_module(data_dir, validation_file=str(bad)).setup("validate")
    text = tmp_path / "gaps.txt"
    text.write_text("one sentence\n\nanother\n")
    with pytest.raises(LabelledDataError, match=r"gaps.txt line 2 is empty"):
        data_module(data_dir, train_file=str(text), mode="unsupervised").setup("fit")
    pairs = pair_rows(3, seed=4)
    pairs[1]["positive"] = ""
    empty = write_csv(tmp_path / "empty.csv", pairs)
    with pytest.raises(LabelledDataError, match=r"empty.csv line 3: column 'positive' is empty"):
        data_module(data_dir, train_file=str(empty)).setup("fit")


# Training.


def test_supervised_pairs_improve_spearman(data_dir, tmp_path):
    torch.manual_seed(0)
    dm = data_module(data_dir)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64)
    model = SentenceEmbedding(encoder=encoder, learning_rate=1e-3, temperature=0.05)
    fit = trainer(tmp_path, steps=40)
    before = fit.validate(model, datamodule=dm, verbose=False)[0]["val/spearman"]
    fit.fit(model, datamodule=dm)
    after = fit.validate(model, datamodule=dm, verbose=False)[0]["val/spearman"]
    print(f"val/spearman {before:.3f} -> {after:.3f}")
    assert after > before + 0.2 and after > 0.6


def test_unsupervised_simcse_encodes_the_anchors_twice_with_dropout(data_dir):
    torch.manual_seed(0)
    dm = data_module(data_dir, train_file=str(data_dir / "sentences.txt"), mode="unsupervised")
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64)
    model = SentenceEmbedding(encoder=encoder).train()
    batch = next(iter(dm.train_dataloader()))
    first, second = model.embed(batch["anchor"]), model.embed(batch["anchor"])
    assert not torch.allclose(first, second)  # two dropout views
    loss = model(batch)
    assert 0 < loss.item() < math.log(len(first)) + 1 and loss.requires_grad


def test_checkpoint_keeps_pooling_and_retrieval_scores(checkpoint, data_dir):
    model, tokenizer = load_objective(checkpoint)
    assert isinstance(model, SentenceEmbedding) and model.pooling == "max"
    assert model.pooler.normalize and tokenizer is not None
    encoder = SentenceEncoder.load(checkpoint)
    assert encoder.pooling == "max" and encoder.normalize
    queries = {"q1": "kivax kivbe", "q2": "lomax lombe"}
    corpus = {"d1": "kivax kivbe", "d2": "lomax lombe", "d3": "pudax"}
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 2}}
    scores = retrieval_scores(encoder, queries, corpus, qrels, k=10)
    assert scores["mrr@10"] == 1.0 and scores["ndcg@10"] == 1.0  # identical texts rank first


# The embed command.


def test_embed_writes_vectors_in_input_order(checkpoint, data_dir, tmp_path, capsys):
    texts = [r["anchor"] for r in pair_rows(7, seed=9)]
    texts[3] = texts[3] + " " + " ".join(FILLER)  # a long one: sorting by length reorders
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")
    out = tmp_path / "vectors.npy"
    code = embed_main(["--checkpoint", str(checkpoint), "--file", str(tmp_path / "in.txt"),
                       "--output", str(out), "--batch-size", "3", "--pooling", "mean",
                       "--no-normalize"])
    line = capsys.readouterr().out.strip()
    assert code == 0 and "\n" not in line and line.startswith("embedded 7 sentences")
    vectors = np.load(out)
    assert vectors.shape == (7, 32) and vectors.dtype == np.float32
    alone = SentenceEncoder.load(checkpoint, pooling="mean", normalize=False)
    for index, text in enumerate(texts):
        np.testing.assert_allclose(vectors[index], alone.embed([text])[0], atol=1e-5)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    code = embed_main(["--checkpoint", str(checkpoint), "--file", str(tmp_path / "in.txt"),
                       "--output", str(out)])
    normalised = np.load(out)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)


def test_embed_errors_are_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "in.txt").write_text("a sentence\n")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    cases = [
        (["--checkpoint", str(checkpoint), "--file", str(tmp_path / "none.txt")],
         "none.txt does not exist"),
        (["--checkpoint", str(checkpoint), "--file", str(tmp_path / "empty.txt")],
         "holds no sentences"),
        (["--checkpoint", str(tmp_path / "bad.ckpt"), "--file", str(tmp_path / "in.txt")],
         "bad.ckpt cannot be read"),
        (["--checkpoint", str(tmp_path / "gone.ckpt"), "--file", str(tmp_path / "in.txt")],
         "gone.ckpt does not exist"),
    ]
    for args, message in cases:
        code = embed_main([*args, "--output", str(tmp_path / "v.npy")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("fillmask embed: error: ") and message in err
        assert err.count("\n") == 1 and "Traceback" not in err


# The sentence-transformers export.


@pytest.mark.parametrize(("pooling", "normalize"), [("cls", False), ("mean", True),
                                                    ("max", False), ("max", True)])
def test_sentence_transformers_folder_encodes_as_embed(checkpoint, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "st"
    export_sentence_transformer(checkpoint, folder, pooling=pooling, normalize=normalize)
    texts = [r["anchor"] for r in pair_rows(5, seed=11)] + ["kivax"]
    theirs = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(
        texts, batch_size=4, convert_to_numpy=True)
    ours = SentenceEncoder.load(checkpoint, pooling=pooling, normalize=normalize).embed(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    # The folder alone brings its pooling back to fillmask embed.
    again = SentenceEncoder.load(folder)
    assert (again.pooling, again.normalize) == (pooling, normalize)
    np.testing.assert_allclose(again.embed(texts), ours, atol=1e-5, rtol=0)


def test_fillmask_export_of_an_embedding_checkpoint_is_a_sentence_transformers_folder(
        checkpoint, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "export"
    assert export_main(["--checkpoint", str(checkpoint), "--output", str(folder)]) == 0
    assert "BertModel" in capsys.readouterr().out
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())[
        "pooling_mode_max_tokens"] is True
    texts = ["kivax lomax", "pudbe ras selci tobdo"]
    theirs = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(texts)
    np.testing.assert_allclose(theirs, SentenceEncoder.load(checkpoint).embed(texts), atol=1e-5)


def test_remote_code_encoder_exports_for_trust_remote_code(data_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    dm = data_module(data_dir)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=64,
                                 norm="pre")  # pre-LN: no transformers BERT class computes it
    model = SentenceEmbedding(encoder=encoder, pooling="mean").eval()
    target = export_sentence_transformer(model, tmp_path / "remote", tokenizer=dm.tokenizer)
    assert target.architecture == "FillmaskModel" and target.code
    texts = ["kivax lomax", "pudbe ras"]
    theirs = SentenceTransformer(str(tmp_path / "remote"), device="cpu", trust_remote_code=True,
                                 local_files_only=True).encode(texts)
    ours = SentenceEncoder.load(tmp_path / "remote").embed(texts)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    direct = F.normalize(torch.from_numpy(ours), dim=-1)
    assert direct.shape == (2, 32)


# The fine-tuning command.


def test_simcse_config_parses(capsys):
    from fillmask.finetune import finetune_main

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["fit", "--config", str(root / "configs" / "finetune-simcse.yaml"),
                       "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "fillmask.objectives.embedding.SentenceEmbedding" in out
    assert "fillmask.data.sentences.SentenceDataModule" in out and "mode: unsupervised" in out


def test_finetune_command_trains_unsupervised_simcse(checkpoint, data_dir, tmp_path, capsys,
                                                     caplog):
    from fillmask.finetune import finetune_main

    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 4, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "fillmask.callbacks.FitSummary"}]},
        "model": {"class_path": "fillmask.objectives.embedding.SentenceEmbedding",
                  "init_args": {"pretrained": str(checkpoint), "pooling": "cls",
                                "learning_rate": 1e-4}},
        "data": {"class_path": "fillmask.data.sentences.SentenceDataModule",
                 "init_args": {"train_file": str(data_dir / "sentences.txt"),
                               "validation_file": str(data_dir / "sts.tsv"),
                               "max_length": 32, "batch_size": 16}},
    }
    path = tmp_path / "simcse.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    assert finetune_main(["fit", "--config", str(path)]) == 0
    assert re.search(r"fit done: 4 steps .* validation: spearman -?[0-9.]+", caplog.text)
    last = next((tmp_path / "run").glob("**/*.ckpt"))
    model, _ = load_objective(last)
    assert isinstance(model, SentenceEmbedding) and model.pooling == "cls"
    code = finetune_main(["fit", "--config", str(path), "--data.init_args.train_file",
                          str(tmp_path / "nothing.txt"), "--trainer.default_root_dir",
                          str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fillmask finetune: error: train file ")
    assert "nothing.txt" in err and "Traceback" not in err
