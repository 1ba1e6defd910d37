"""Cross-encoder reranking: BEIR / MS MARCO / TREC readers, the losses, learning a synthetic
task, and `fillmask finetune` with export."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from fillmask.architectures.bert import BertEncoder
from fillmask.data.labelled import LabelledDataError
from fillmask.data.ranking import RerankingDataModule, read_qrels, read_run, read_texts
from fillmask.data.tokenize import TokenizerTraining, train_tokenizer
from fillmask.finetune import finetune_main
from fillmask.metrics.ranking import ranking_metrics
from fillmask.objectives.rerank import CrossEncoder, listwise_loss, pointwise_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TOPICS = ("apple river castle dragon engine forest garden harbor island jungle kettle lemon "
          "meadow needle ocean piano quartz rocket saddle tiger violin wagon yacht zebra "
          "anchor bridge candle desert falcon glacier").split()
FILLER = "the a of and in on with for is was by some old new small big near far".split()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def synthetic_collection(folder: Path, seed: int = 0, topics: int = 12,
                         train: int = 120) -> dict[str, Path]:
    """Two passages per topic word; each query names one topic, its passages are relevant.
    Runs list 6 candidates (both relevant ones among them) in a random order."""
    rng = random.Random(seed)
    docs, lines = [], {"train": ([], []), "dev": ([], [])}
    for t, topic in enumerate(TOPICS[:topics]):
        for k in range(2):
            words = rng.sample(FILLER, 5)
            words.insert(rng.randint(0, 5), topic)
            docs.append({"_id": f"d{t}-{k}", "title": "", "text": " ".join(words)})
    queries = []
    for split, count in (("train", train), ("dev", 20)):
        qrels, run = lines[split]
        for n in range(count):
            qid, t = f"{split}{n}", rng.randrange(topics)
            queries.append({"_id": qid, "text": f"{rng.choice(FILLER)} {TOPICS[t]}"})
            relevant = [f"d{t}-0", f"d{t}-1"]
            others = [f"d{o}-{rng.randrange(2)}" for o in rng.sample(
                [o for o in range(topics) if o != t], 4)]
            candidates = relevant + others
            rng.shuffle(candidates)
            qrels += [f"{qid}\t{d}\t1" for d in relevant]
            run += [f"{qid} Q0 {d} {r + 1} {10.0 - r} bm25" for r, d in enumerate(candidates)]
    files = {"corpus_file": write(folder / "corpus.jsonl",
                                  "".join(json.dumps(d) + "\n" for d in docs)),
             "queries_file": write(folder / "queries.jsonl",
                                   "".join(json.dumps(q) + "\n" for q in queries))}
    for split, name in (("train", "train"), ("dev", "validation")):
        qrels, run = lines[split]
        files[f"{name}_qrels"] = write(folder / f"{split}-qrels.tsv",
                                       "query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
        files[f"{name}_run"] = write(folder / f"{split}.run", "\n".join(run) + "\n")
    return files


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ranking")
    files = synthetic_collection(folder)
    texts = [json.loads(line)["text"] for name in ("corpus_file", "queries_file")
             for line in files[name].read_text().splitlines()]
    tok = train_tokenizer(texts, TokenizerTraining(vocab_size=200, min_frequency=1))
    tok.save(str(folder / "tokenizer.json"))
    return {**files, "tokenizer": folder / "tokenizer.json"}


def module(collection: dict[str, Path], **kwargs) -> RerankingDataModule:
    options = {key: str(value) for key, value in collection.items()}
    return RerankingDataModule(**{**options, **kwargs})


# Readers.


def test_beir_and_msmarco_texts(tmp_path):
    beir = write(tmp_path / "corpus.jsonl", '{"_id": "7", "title": "Paris", "text": "a city"}\n'
                 '{"_id": "8", "title": "", "text": "no title"}\n')
    assert read_texts(beir) == {"7": "Paris a city", "8": "no title"}
    assert read_texts(beir, keep={"8"}) == {"8": "no title"}
    tsv = write(tmp_path / "collection.tsv", "0\tthe first passage\n\n1\tsecond\n")
    assert read_texts(tsv) == {"0": "the first passage", "1": "second"}
    queries = write(tmp_path / "queries.jsonl", '{"_id": "q", "title": "x", "text": "what"}\n')
    assert read_texts(queries, passages=False) == {"q": "what"}


def test_qrels_formats_are_detected(tmp_path):
    beir = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0\n"
                 "q2\td3\t2\n")
    trec = write(tmp_path / "qrels.txt", "q1 0 d1 1\nq1 0 d2 0\nq2 0 d3 2\n")
    for path in (beir, trec):
        qrels, queries, docs = read_qrels(path)
        assert qrels == {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 2}}
        assert docs["d3"] == f"{path} line {3 if path is trec else 4}"


def test_run_is_ordered_by_score(tmp_path):
    run = write(tmp_path / "x.run", "q1 Q0 a 1 1.5 t\nq1 Q0 b 2 3.0 t\nq1 Q0 c 3 1.5 t\n"
                "q2 Q0 a 1 -1 t\n")
    candidates, queries, _ = read_run(run)
    assert candidates == {"q1": ["b", "a", "c"], "q2": ["a"]}
    assert queries["q2"] == f"{run} line 4"


def test_run_with_five_columns_names_the_line(tmp_path):
    run = write(tmp_path / "bad.run", "q1 Q0 a 1 1.5 t\nq1 a 2 1.0 t\n")
    with pytest.raises(LabelledDataError, match=r"bad\.run line 2 has 5 columns, a TREC run has "
                                                r"6; write qid Q0 docid rank score tag"):
        read_run(run)


def test_qrels_naming_an_unknown_document(collection, tmp_path):
    qrels = write(tmp_path / "qrels.tsv", "query-id\tcorpus-id\tscore\ndev0\td0-0\t1\n"
                  "dev0\tnowhere\t1\n")
    dm = module(collection, validation_qrels=qrels)
    with pytest.raises(LabelledDataError, match=r"qrels\.tsv line 3 names document id 'nowhere', "
                                                r"which .*corpus\.jsonl does not hold"):
        dm.setup("validate")


def test_missing_run_file_names_the_option(collection, tmp_path):
    dm = module(collection, validation_run=tmp_path / "absent.run")
    with pytest.raises(LabelledDataError, match=r"validation_run file .*absent\.run does not "
                                                r"exist; set data\.init_args\.validation_run"):
        dm.setup("validate")


# Pairs and groups.


def test_pairs_are_cls_query_sep_passage_sep(collection):
    dm = module(collection, group_size=3, batch_size=2)
    assert dm.num_labels == 1
    batch = next(iter(dm.val_dataloader()))
    special = dm.special_tokens
    q, d = batch["query_index"][0].item(), batch["doc_index"][0].item()
    query = dm.tokenizer.encode(dm.query_texts[q], add_special_tokens=False).ids
    passage = dm.tokenizer.encode(dm.doc_texts[d], add_special_tokens=False).ids
    length = int(batch["attention_mask"][0].sum())
    expected = [special.cls_id, *query, special.sep_id, *passage, special.sep_id]
    assert batch["input_ids"][0, :length].tolist() == expected
    assert batch["token_type_ids"][0, :length].tolist() == [0] * (len(query) + 2) + [1] * (
        len(passage) + 1)
    assert dm.eval_batch_size == 6 and batch["input_ids"].shape[0] == 6


def test_training_groups_put_a_positive_first_and_vary_by_epoch(collection):
    dm = module(collection, group_size=4, batch_size=5)
    dm.setup("fit")
    groups = dm.datasets["train"]
    qrels, run = dm.qrels("train"), dm.splits["train"].run
    for position in range(len(groups)):
        item = groups[position, 0]
        qid = dm.query_ids[item["query"]]
        docs = [dm.doc_ids[d] for d in item["docs"]]
        assert len(docs) == 4 and qrels[qid].get(docs[0], 0) > 0
        assert all(d in run[qid] and qrels[qid].get(d, 0) <= 0 for d in docs[1:])
    assert groups[3, 0] == groups[3, 0]  # deterministic from (seed, epoch, query)
    assert any(groups[p, 0] != groups[p, 1] for p in range(10))
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].tolist() == [[1.0, 0.0, 0.0, 0.0]] * 5
    assert batch["input_ids"].shape[0] == 20


# Losses and metrics.


def test_listwise_loss_is_softmax_cross_entropy_with_the_positive_first():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    hand = [-(2.0 - math.log(math.exp(2) + math.exp(1) + 1)),
            -(0.0 - math.log(1 + math.exp(3) + math.exp(-1)))]
    assert listwise_loss(scores).item() == pytest.approx(sum(hand) / 2, rel=1e-6)


def test_pointwise_loss_is_binary_cross_entropy():
    scores, labels = torch.tensor([[1.0, -2.0]]), torch.tensor([[1.0, 0.0]])
    sigmoid = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0))]
    hand = -(math.log(sigmoid[0]) + math.log(1 - sigmoid[1])) / 2
    assert pointwise_loss(scores, labels).item() == pytest.approx(hand, rel=1e-6)


def test_ranking_metrics_by_hand():
    run = {"q1": {"a": 3.0, "b": 2.0, "c": 1.0}, "q2": {"x": 1.0, "y": 2.0}}
    qrels = {"q1": {"b": 1, "c": 2}, "q2": {"z": 1}, "q3": {"n": 0}}
    metrics = ranking_metrics(run, qrels, k=10)
    assert metrics["queries"] == 2  # q3 has no relevant document
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 0) / 2)
    dcg = 1 / math.log2(3) + 2 / math.log2(4)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert metrics["ndcg@10"] == pytest.approx(dcg / ideal / 2)


def test_num_labels_other_than_one_is_refused():
    with pytest.raises(ValueError, match=r"num_labels=2: a cross-encoder has one relevance"):
        CrossEncoder(encoder=BertEncoder.preset("tiny", vocab_size=64), num_labels=2)


# Learning.


@pytest.mark.parametrize("loss", ["listwise", "pointwise"])
def test_cross_encoder_learns_shared_word_reranking(collection, loss, tmp_path):
    torch.manual_seed(0)
    dm = module(collection, group_size=4, batch_size=8, max_length=32)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    model = CrossEncoder(encoder=encoder, loss=loss, dropout=0.0, learning_rate=1e-3,
                         warmup_steps=10)
    fit = L.Trainer(max_steps=600, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, check_val_every_n_epoch=1000,
                    default_root_dir=tmp_path, inference_mode=False)
    fit.fit(model, datamodule=dm)
    after = fit.validate(model, datamodule=dm, verbose=False)[0]
    first_stage = ranking_metrics(dm.first_stage("validation"), dm.qrels("validation"))
    print(f"{loss}: val mrr@10 {first_stage['mrr@10']:.3f} (run order) -> "
          f"{after['val/mrr@10']:.3f}, ndcg@10 {after['val/ndcg@10']:.3f}")
    # The run's order is random: its MRR@10 is what chance gives (about 0.58 here).
    assert after["val/mrr@10"] > max(0.85, first_stage["mrr@10"] + 0.25)
    assert after["val/ndcg@10"] > first_stage["ndcg@10"] + 0.2


# The command and export.


def test_finetune_two_steps_then_export(collection, hf_bert_folder, tmp_path, caplog):
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 2, "val_check_interval": 2, "logger": False,
                    "enable_progress_bar": False, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "fillmask.callbacks.FitSummary"}]},
        "model": {"class_path": "fillmask.objectives.rerank.CrossEncoder",
                  "init_args": {"pretrained": str(hf_bert_folder), "learning_rate": 1e-4}},
        "data": {"class_path": "fillmask.data.ranking.RerankingDataModule",
                 "init_args": {**{k: str(v) for k, v in collection.items()
                                  if k != "tokenizer"},
                               "group_size": 2, "batch_size": 4, "max_length": 32,
                               "rerank_depth": 3}},
    }
    path = write(tmp_path / "rerank.yaml", json.dumps(config))
    with caplog.at_level("INFO"):
        assert finetune_main(["fit", "--config", str(path)]) == 0
    summary = re.search(r"fit done: 2 steps .* validation: mrr@10 ([0-9.]+), ndcg@10 ([0-9.]+)",
                        caplog.text)
    assert summary is not None, caplog.text[-2000:]
    assert 0 < float(summary[1]) <= 1 and 0 < float(summary[2]) <= 1
    last = next((tmp_path / "run").glob("**/*.ckpt"))
    from fillmask.interop.export import export_checkpoint
    from fillmask.objectives.base import load_objective

    ours, tokenizer = load_objective(last)
    assert isinstance(ours, CrossEncoder) and ours.head.classifier.out_features == 1
    targets = export_checkpoint(last, tmp_path / "exported")
    assert targets[""].architecture == "BertForSequenceClassification"
    assert targets[""].config["num_labels"] == 1
    import transformers

    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "exported").eval()
    encoding = tokenizer.encode("old apple", "the apple was near")
    ids = torch.tensor([encoding.ids])
    types = torch.tensor([encoding.type_ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
             "token_type_ids": types}
    ours.eval()
    with torch.no_grad():
        expected = ours.scores(batch)  # (1,)
        logits = theirs(input_ids=ids, token_type_ids=types).logits  # (1, 1)
    torch.testing.assert_close(logits[:, 0], expected, atol=1e-4, rtol=1e-4)


def test_finetune_config_parses(capsys):
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["fit", "--config", str(root / "configs" / "finetune-rerank.yaml"),
                       "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "fillmask.objectives.rerank.CrossEncoder" in out and "validation_run:" in out


def test_group_sampler_under_lightnings_distributed_wrapper_follows_the_epoch():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from fillmask.data.ranking import GroupSampler

    def shard(rank: int, epoch: int) -> list[tuple[int, int]]:
        wrapper = DistributedSamplerWrapper(GroupSampler(10, seed=3), num_replicas=2,
                                            rank=rank, shuffle=False)
        wrapper.set_epoch(epoch)  # what Lightning's fit loop calls before each epoch
        return list(wrapper)

    for epoch in (0, 1):
        zero, one = shard(0, epoch), shard(1, epoch)
        assert {e for _, e in zero + one} == {epoch}  # negatives are drawn for this epoch
        assert sorted(p for p, _ in zero + one) == list(range(10))  # each query once
        assert not {p for p, _ in zero} & {p for p, _ in one}
    assert [p for p, _ in shard(0, 0)] != [p for p, _ in shard(0, 1)]  # reshuffled per epoch
