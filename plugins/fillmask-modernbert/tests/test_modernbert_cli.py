"""`fillmask fit` trains the ModernBERT encoder under every objective and masking it supports,
through the ordinary CLI, and the checkpoints it writes work with `fill` and `validate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fillmask.cli import main
from fillmask.testing import assert_export_matches

ENCODER = {
    "class_path": "fillmask_modernbert.encoder.ModernBertEncoder",
    "init_args": {"hidden_size": 32, "num_layers": 3, "num_heads": 2, "intermediate_size": 48,
                  "local_window": 8, "max_positions": 32},
}
MLM = "fillmask.objectives.mlm.MaskedLM"
SBO = "fillmask.objectives.span_boundary.SpanBoundaryLM"
RTD = "fillmask.objectives.rtd.ReplacedTokenDetection"
TOKEN = "fillmask.masking.token.TokenMasking"
WHOLE_WORD = "fillmask.masking.whole_word.WholeWordMasking"
SPAN = "fillmask.masking.span.SpanMasking"
DOCUMENTS = "fillmask.data.packing.DocumentPacking"

RUNS: dict[str, tuple[str, dict[str, Any], str, str | None]] = {
    # name: (objective, its options, masking, packing)
    "mlm-token": (MLM, {}, TOKEN, None),
    "mlm-whole-word": (MLM, {}, WHOLE_WORD, None),
    "mlm-span": (MLM, {}, SPAN, None),
    "sbo-span": (SBO, {}, SPAN, None),
    "rtd-tied": (RTD, {"embedding_sharing": "tied"}, TOKEN, None),
    "rtd-gdes": (RTD, {"embedding_sharing": "gdes", "generator_size_divisor": 1,
                       "generator_layers": 2}, TOKEN, None),
    "mlm-document-packing": (MLM, {}, TOKEN, DOCUMENTS),
}


def write_config(folder: Path, corpus: Path, name: str) -> Path:
    """A 2-step CPU run of one grid point, its checkpoints under ``folder``."""
    objective, options, masking, packing = RUNS[name]
    data: dict[str, Any] = {
        "corpus": str(corpus),
        "tokenizer_training": {"algorithm": "wordpiece", "vocab_size": 512},
        "max_length": 32, "batch_size": 8, "num_workers": 0,
        "masking": {"class_path": masking, "init_args": {"rate": 0.3}},
    }
    if packing:
        data["packing"] = {"class_path": packing}
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 2,
            "val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 1,
            "num_sanity_val_steps": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "logger": False, "default_root_dir": str(folder),
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(folder / "checkpoints"),
                                         "save_last": True}}],
        },
        "model": {"class_path": objective,
                  "init_args": {"encoder": ENCODER, "learning_rate": 1e-3,
                                "warmup_steps": 1, **options}},
        "data": data,
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``fillmask ARGS`` in this process (pytest's own arguments hidden from LightningCLI)."""
    monkeypatch.setattr(sys, "argv", ["fillmask"])
    return main(args)


def fit(tmp_path: Path, corpus: Path, name: str, monkeypatch: pytest.MonkeyPatch
        ) -> tuple[Path, Path]:
    config = write_config(tmp_path, corpus, name)
    assert run_cli(["fit", "--config", str(config)], monkeypatch) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    return config, last


@pytest.mark.parametrize("name", [n for n in RUNS if n != "mlm-token"])
def test_fit_runs_every_objective_and_masking(tmp_path, small_corpus, monkeypatch, name):
    _, last = fit(tmp_path, small_corpus, name, monkeypatch)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert ckpt["fillmask"]["encoder"]["class_path"] == ENCODER["class_path"]
    weights = ckpt["state_dict"]
    assert "encoder.blocks.2.attention.qkv.weight" in weights
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    if name == "rtd-gdes":  # the discriminator reads the generator's table through a delta
        assert "encoder.embeddings.tokens.delta" in weights
        assert "generator.embeddings.tokens.weight" in weights


def test_fit_then_fill_and_validate_from_the_checkpoint(tmp_path, small_corpus, monkeypatch,
                                                        capsys):
    config, last = fit(tmp_path, small_corpus, "mlm-token", monkeypatch)
    filled = subprocess.run([sys.executable, "-m", "fillmask", "fill", "--checkpoint",
                             str(last), "--top-k", "3", "--json", "the [MASK] is"],
                            capture_output=True, text=True, timeout=300)
    assert filled.returncode == 0, filled.stderr[-3000:]
    candidates = json.loads(filled.stdout)["masks"][0]
    assert len(candidates) == 3 and all(0 < c["score"] <= 1 for c in candidates)
    capsys.readouterr()
    assert run_cli(["validate", "--config", str(config), "--ckpt_path", str(last)],
                   monkeypatch) == 0
    assert "val/loss" in capsys.readouterr().out
    assert run_cli(["export", "--checkpoint", str(last), "--output", str(tmp_path / "hf")],
                   monkeypatch) == 0
    assert_export_matches(last, tmp_path / "hf", "ModernBertForMaskedLM")
