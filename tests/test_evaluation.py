"""`fillmask evaluate`: a suite of fine-tuning runs (encoders x tasks x learning rates x seeds),
the table it prints and writes, resuming, and its errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from test_export import save_checkpoint
from tokenizers import Tokenizer

from fillmask.architectures.bert import BertEncoder
from fillmask.cli import main
from fillmask.evaluation import (
    SuiteError,
    default_learning_rates,
    markdown,
    read_suite,
    tabulate,
)
from fillmask.objectives.mlm import MaskedLM

TOKENIZER = Path(__file__).resolve().parent / "assets" / "golden" / "tokenizer.json"
WORDS = {"a": "the function returns a list of values".split(),
         "b": "the module reads files and raises errors".split()}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = MaskedLM(BertEncoder.preset("tiny", vocab_size=512, max_positions=64))
    save_checkpoint(model, Tokenizer.from_file(str(TOKENIZER)), root / "tiny.ckpt")
    rng = random.Random(0)
    for split, count in (("train", 48), ("dev", 16)):
        lines = ["text,label"]
        for _ in range(count):
            label = rng.choice("ab")
            lines.append(" ".join(rng.sample(WORDS[label], 4)) + f",{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_suite(root: Path, **changes) -> Path:
    suite = {
        "output": str(root / "out"),
        "encoders": [{"name": "pretrained", "pretrained": "tiny.ckpt"},
                     {"name": "scratch", "pretrained": "tiny.ckpt", "from_scratch": True}],
        "tasks": [{"name": "words", "metric": "val/accuracy",
                   "model": {"class_path": "SequenceClassification"},
                   "data": {"train_file": "train.csv", "validation_file": "dev.csv",
                            "max_length": 16, "batch_size": 16}}],
        "seeds": [0, 1],
        "learning_rates": [1e-3, 3e-3],
        "trainer": {"max_steps": 3, "accelerator": "cpu"},
        **changes,
    }
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(suite), encoding="utf-8")
    return path


def test_suite_runs_every_run_writes_the_table_and_resumes(assets, capsys):
    config = write_suite(assets)
    assert main(["evaluate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "[1/8] pretrained | words | lr 0.001 | seed 0: running" in out
    assert "[8/8] scratch | words | lr 0.003 | seed 1" in out
    table = json.loads((assets / "out" / "results.json").read_text())
    assert [row["encoder"] for row in table["rows"]] == ["pretrained", "scratch"]
    assert len(table["runs"]) == 8
    for row in table["rows"]:
        cell = row["tasks"]["words"]
        runs = [r for r in table["runs"] if r["encoder"] == row["encoder"]]
        means = {rate: sum(r["metrics"]["val/accuracy"] * 100 for r in runs
                           if r["learning_rate"] == rate) / 2 for rate in (1e-3, 3e-3)}
        assert cell["mean"] == pytest.approx(max(means.values()))
        assert cell["learning_rate"] == max(means, key=means.get)
        assert row["average"] == pytest.approx(cell["mean"])
    assert "| pretrained |" in (assets / "out" / "results.md").read_text()
    # The scratch encoder is the same architecture, untrained: its runs differ.
    first = {r["encoder"]: r["metrics"]["val/loss"] for r in table["runs"]
             if r["learning_rate"] == 1e-3 and r["seed"] == 0}
    assert first["pretrained"] != first["scratch"]
    # Again: every run is read back, nothing is trained.
    assert main(["evaluate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("(done before)") == 8


def test_table_reports_the_best_rate_mean_and_spread(tmp_path):
    suite = read_suite(write_suite(tmp_path))
    runs = [{"encoder": e, "task": "words", "learning_rate": rate, "seed": seed,
             "metrics": {"val/accuracy": value}}
            for e in ("pretrained", "scratch")
            for rate, seed, value in ((1e-3, 0, 0.5), (1e-3, 1, 0.7), (3e-3, 0, 0.9),
                                      (3e-3, 1, 0.3))]
    table = tabulate(suite, runs)
    cell = table["rows"][0]["tasks"]["words"]
    assert cell["learning_rate"] == 1e-3 and cell["mean"] == pytest.approx(60.0)
    assert cell["std"] == pytest.approx(10.0)  # population spread over the seeds
    assert "60.00 ± 10.00 (lr 0.001)" in markdown(table)


def test_default_sweep_follows_the_encoder_width():
    assert default_learning_rates(128) == [3e-4, 1e-3, 3e-3]
    assert default_learning_rates(256) == [1e-4, 3e-4, 1e-3]
    assert default_learning_rates(768) == [2e-5, 3e-5, 5e-5]


@pytest.mark.parametrize(("change", "message"), [
    ({"tasks": [{"name": "words"}]}, r"tasks\[0\] needs a name and a metric"),
    ({"seeds": "0"}, r"seeds must be a list of integers"),
    ({"encoders": [{"name": "x"}]}, r"encoders\[0\] needs pretrained"),
    ({"epochs": 3}, r"unknown key 'epochs'"),
])
def test_bad_suites_are_one_line(tmp_path, change, message):
    with pytest.raises(SuiteError, match=message):
        read_suite(write_suite(tmp_path, **change))


def test_missing_encoder_and_unlogged_metric_are_one_line(assets, tmp_path, capsys):
    (tmp_path / "train.csv").write_text((assets / "train.csv").read_text())
    (tmp_path / "dev.csv").write_text((assets / "dev.csv").read_text())
    config = write_suite(tmp_path, encoders=[{"name": "gone", "pretrained": "absent.ckpt"}])
    assert main(["evaluate", "--config", str(config)]) == 2
    assert "encoder gone: " in capsys.readouterr().err
    (tmp_path / "tiny.ckpt").write_bytes((assets / "tiny.ckpt").read_bytes())
    suite = yaml.safe_load(write_suite(tmp_path).read_text())
    suite["tasks"][0]["metric"] = "val/nothing"
    suite["encoders"] = suite["encoders"][:1]
    suite["learning_rates"], suite["seeds"] = [1e-3], [0]
    config.write_text(yaml.safe_dump(suite))
    assert main(["evaluate", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fillmask evaluate: error: the task's metric 'val/nothing' was not "
                          "logged; the model logs ") and "val/accuracy" in err
