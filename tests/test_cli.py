"""The two commands a user runs: `fillmask fit` on the quickstart, then `fillmask fill`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))


def fillmask(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fillmask", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"fillmask {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def short_quickstart(steps: int) -> list[str]:
    """The README's quickstart command, shortened; it writes below runs/quickstart of the cwd."""
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "10"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("quickstart")
    result = fillmask(*short_quickstart(20), cwd=cwd)
    (cwd / "output.txt").write_text(result.stdout + result.stderr)
    return cwd


@pytest.fixture(scope="module")
def quickstart_run(workdir: Path) -> Path:
    return workdir / "runs" / "quickstart"


def test_quickstart_trains_and_writes_checkpoint_and_logs(quickstart_run):
    last = quickstart_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 20
    assert "tokenizer" in ckpt["fillmask"]
    assert ckpt["fillmask"]["encoder"]["init_args"]["vocab_size"] % 64 == 0
    assert list((quickstart_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (quickstart_run / "tensorboard" / "config.yaml").is_file()
    output = (quickstart_run.parents[1] / "output.txt").read_text()
    assert "fit done: 20 steps" in output and "accuracy" in output


def test_fill_prints_top_k_candidates_as_json(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    out = fillmask("fill", "--checkpoint", last, "--top-k", "4", "--json",
                   "The [MASK] statement exits a function.", "A [MASK] is a [MASK].",
                   cwd=quickstart_run).stdout.splitlines()
    first, second = (json.loads(line) for line in out)
    assert len(first["masks"]) == 1 and len(second["masks"]) == 2
    candidates = first["masks"][0]
    assert len(candidates) == 4
    assert set(candidates[0]) == {"token", "token_id", "score"}
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_fill_plain_text_and_input_without_mask(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    text = fillmask("fill", "--checkpoint", last, "Use the [MASK] module.", cwd=quickstart_run)
    assert "[MASK]:" in text.stdout
    bad = fillmask("fill", "--checkpoint", last, "no blank here", cwd=quickstart_run, check=False)
    assert bad.returncode == 2 and "has no [MASK] token" in bad.stderr


def test_fill_input_longer_than_the_model_is_one_clear_line(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    long = "word " * 200 + "[MASK]"
    result = fillmask("fill", "--checkpoint", last, long, cwd=quickstart_run, check=False)
    assert result.returncode == 2 and "more than the model's 64 positions" in result.stderr
    assert "Traceback" not in result.stderr


def test_fit_again_with_ckpt_path_last_resumes(quickstart_run):
    fillmask(*short_quickstart(30), "--ckpt_path", "last", cwd=quickstart_run.parents[1])
    ckpt = torch.load(quickstart_run / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == 30


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, tmp_path):
    command = ["finetune", "fit"] if config.stem.startswith("finetune-") else ["fit"]
    out = fillmask(*command, "--config", str(config), "--print_config", cwd=tmp_path).stdout
    assert "class_path" in out and ("encoder:" in out or "pretrained:" in out)


def test_unknown_corpus_is_one_clear_line(tmp_path):
    result = fillmask("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                      "--data.corpus", str(tmp_path / "missing.txt"), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "missing.txt" in result.stderr and "matches no file" in result.stderr
    assert "Traceback" not in result.stderr


def test_fill_with_missing_checkpoint(tmp_path):
    result = fillmask("fill", "--checkpoint", str(tmp_path / "none.ckpt"), "a [MASK]",
                      cwd=tmp_path, check=False)
    assert result.returncode == 2 and "none.ckpt does not exist" in result.stderr


def test_tokenizer_without_mask_token_is_one_clear_line(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "nomask.json"
    Tokenizer(models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3},
                               unk_token="[UNK]")).save(str(path))
    result = fillmask("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                      "--data.tokenizer", str(path), cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "nomask.json has no mask token" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("algorithm,mask", [("wordpiece", "[MASK]"), ("bpe", "<mask>"),
                                            ("unigram", "<mask>")])
def test_tokenizer_train_writes_a_usable_tokenizer(small_corpus, tmp_path, algorithm, mask):
    output = tmp_path / "tok.json"
    result = fillmask("tokenizer", "train", "--corpus", str(small_corpus), "--algorithm",
                      algorithm, "--vocab-size", "500", "--output", str(output), cwd=tmp_path)
    assert f"wrote {output}" in result.stdout
    from fillmask.data.tokenize import load_tokenizer, resolve_special_tokens

    tok, _ = load_tokenizer(output)
    special = resolve_special_tokens(tok)
    assert tok.id_to_token(special.mask_id) == mask
    assert tok.get_vocab_size() <= 500
