"""`fillmask fit` with DebertaEncoder through the ordinary CLI, under every objective it
supports, then `fillmask fill` and `fillmask validate` from the last checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml

from fillmask.cli import main
from fillmask.testing import assert_export_matches

ENCODER = "fillmask_deberta.encoder.DebertaEncoder"
MLM = "fillmask.objectives.mlm.MaskedLM"
SBO = "fillmask.objectives.span_boundary.SpanBoundaryLM"
RTD = "fillmask.objectives.rtd.ReplacedTokenDetection"
TOKEN = "fillmask.masking.token.TokenMasking"
WHOLE_WORD = "fillmask.masking.whole_word.WholeWordMasking"
SPAN = "fillmask.masking.span.SpanMasking"
STEPS = 2

RUNS: dict[str, dict[str, Any]] = {
    "mlm-token": dict(objective=MLM, masking=TOKEN),
    "mlm-whole-word-emd": dict(objective=MLM, masking=WHOLE_WORD,
                               encoder=dict(enhanced_mask_decoder=True)),
    "mlm-span-packed-documents": dict(objective=MLM, masking=SPAN,
                                      packing="fillmask.data.packing.DocumentPacking"),
    "sbo-span": dict(objective=SBO, masking=SPAN),
    "rtd-tied": dict(objective=RTD, masking=TOKEN,
                     model=dict(embedding_sharing="tied", generator_size_divisor=2,
                                rtd_weight=50.0)),
    "rtd-gdes": dict(objective=RTD, masking=TOKEN,
                     masking_args=dict(mask_fraction=1.0, random_fraction=0.0),
                     model=dict(embedding_sharing="gdes", generator_size_divisor=1,
                                generator_layers=1, rtd_weight=10.0,
                                generator_overrides={"enhanced_mask_decoder": True})),
}


def write_config(root: Path, corpus: Path, tokenizer: Path, run: dict[str, Any]) -> Path:
    """A tiny run: 2 steps of batch 8 at length 32, one validation batch, last.ckpt only."""
    data: dict[str, Any] = {
        "corpus": str(corpus), "tokenizer": str(tokenizer), "max_length": 32, "batch_size": 8,
        "num_workers": 0, "vocab_multiple": 8,
        "masking": {"class_path": run["masking"], "init_args": run.get("masking_args", {})},
    }
    if "packing" in run:
        data["packing"] = {"class_path": run["packing"]}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": STEPS, "val_check_interval": STEPS,
            "check_val_every_n_epoch": None, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
            "default_root_dir": str(root),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"),
                                         "save_last": True, "save_top_k": 0}}],
        },
        "model": {"class_path": run["objective"], "init_args": {
            "encoder": {"class_path": ENCODER, "init_args": {
                "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                "max_positions": 32, "dropout": 0.0, "attention_dropout": 0.0,
                **run.get("encoder", {})}},
            "learning_rate": 1.0e-3, "warmup_steps": 1, **run.get("model", {})}},
        "data": data,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def fillmask(*args: str) -> int:
    """Run the `fillmask` command in-process (pytest's own arguments hidden from it)."""
    with mock.patch.object(sys, "argv", ["fillmask"]):
        return main(list(args))


def fit(root: Path, corpus: Path, tokenizer: Path, run: dict[str, Any]) -> tuple[Path, Path]:
    """Fit in-process; returns (config, last checkpoint)."""
    config = write_config(root, corpus, tokenizer, run)
    assert fillmask("fit", "--config", str(config)) == 0
    return config, root / "checkpoints" / "last.ckpt"


class Runs:
    """Each run fitted once per test session, on first use."""

    def __init__(self, root: Path, corpus: Path, tokenizer: Path) -> None:
        self.root, self.corpus, self.tokenizer = root, corpus, tokenizer
        self.done: dict[str, tuple[Path, Path]] = {}

    def __call__(self, name: str) -> tuple[Path, Path]:
        if name not in self.done:
            root = self.root / name
            root.mkdir()
            self.done[name] = fit(root, self.corpus, self.tokenizer, RUNS[name])
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus, tokenizer_file) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), small_corpus, tokenizer_file)


@pytest.mark.parametrize("name", list(RUNS))
def test_fit_under_every_objective(name, runs):
    _, last = runs(name)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == STEPS
    assert ckpt["fillmask"]["encoder"]["class_path"] == ENCODER
    assert any(k.startswith("encoder.blocks.1.attention.") for k in ckpt["state_dict"])
    broken = [k for k, v in ckpt["state_dict"].items() if not torch.isfinite(v).all()]
    assert not broken, f"non-finite weights after training: {broken[:3]}"


def test_fill_from_the_last_checkpoint(runs):
    """`python -m fillmask fill` in a fresh interpreter: the plugin is found from the
    checkpoint's class path alone."""
    _, last = runs("mlm-token")
    result = subprocess.run([sys.executable, "-m", "fillmask", "fill", "--checkpoint", str(last),
                             "--top-k", "3", "--json", "the [MASK] is"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (candidates,) = json.loads(result.stdout)["masks"]
    assert len(candidates) == 3 and all(0 <= c["score"] <= 1 for c in candidates)


@pytest.mark.parametrize("name", ["mlm-token", "rtd-gdes"])
def test_validate_from_the_last_checkpoint(name, runs, capsys):
    config, last = runs(name)
    capsys.readouterr()
    assert fillmask("validate", "--config", str(config), "--ckpt_path", str(last)) == 0
    assert "val/loss" in capsys.readouterr().out


def test_export_loads_in_transformers_with_our_logits(runs, tmp_path):
    """`fillmask export` writes DebertaV2ForMaskedLM; transformers computes our logits."""
    _, last = runs("mlm-token")
    assert fillmask("export", "--checkpoint", str(last), "--output", str(tmp_path / "hf")) == 0
    assert_export_matches(last, tmp_path / "hf", "DebertaV2ForMaskedLM")


def test_export_of_the_enhanced_mask_decoder_is_one_clear_line(runs, tmp_path, capsys):
    _, last = runs("mlm-whole-word-emd")
    with pytest.raises(SystemExit) as exit_code:
        fillmask("export", "--checkpoint", str(last), "--output", str(tmp_path / "hf"))
    assert exit_code.value.code == 2
    assert "enhanced_mask_decoder" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
