"""configs/modernbert-base.yaml and configs/mmbert-base.yaml, shrunk to a tiny preset, run all
their phases through `fillmask fit`: the context extension's RoPE base reaches the checkpoint,
and mmBERT's languages, mask rates and temperatures change phase by phase."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fillmask.cli import main
from fillmask.data.embedded import python_docs_documents

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
TINY = {"hidden_size": 32, "num_layers": 3, "num_heads": 2, "intermediate_size": 48,
        "local_window": 8, "max_positions": 64}


def tiny_phase(phase: dict[str, Any]) -> dict[str, Any]:
    """Two steps of short sequences; every other change of the phase kept."""
    phase = {k: v for k, v in phase.items() if k != "tokens"}
    phase["steps"] = 2
    if "max_length" in phase:
        phase["max_length"] = 64
        phase["batch_size"] = 2
    if "batch_ramp" in phase:
        phase["batch_ramp"] = {**phase["batch_ramp"], "tokens": 128}
    if "lr" in phase and "warmup_tokens" in phase["lr"]:
        phase["lr"] = {**phase["lr"], "warmup_tokens": 256}
    return phase


def tiny_preset(name: str, folder: Path, data: dict[str, Any]) -> tuple[Path, list[dict]]:
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    phases = next(c for c in callbacks if c["class_path"].endswith("Phases"))
    phases["init_args"]["phases"] = [tiny_phase(p) for p in phases["init_args"]["phases"]]
    config["trainer"].update(
        accelerator="cpu", devices=1, precision="32-true", accumulate_grad_batches=2,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        val_check_interval=3, limit_val_batches=1, num_sanity_val_steps=0,
        default_root_dir=str(folder),
        callbacks=[phases, {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"dirpath": str(folder / "checkpoints"),
                                          "save_last": True}}])
    config["model"]["init_args"]["encoder"]["init_args"].update(TINY)
    config["data"].update(max_length=32, batch_size=4, num_workers=0, **data,
                          tokenizer_training={"algorithm": "bpe", "vocab_size": 512})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, phases["init_args"]["phases"]


def fit(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(sys, "argv", ["fillmask"])
    assert main(["fit", "--config", str(path)]) == 0
    return torch.load(path.parent / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


def test_modernbert_base_runs_its_phases(tmp_path, small_corpus, monkeypatch, caplog):
    path, phases = tiny_preset("modernbert-base", tmp_path, {"corpus": str(small_corpus)})
    assert [p["name"] for p in phases] == ["pretrain", "context extension", "decay"]
    with caplog.at_level("INFO"):
        ckpt = fit(path, monkeypatch)
    # pretrain: a ramp part at accumulation 1 (1 step), then 2 steps at 2; then 2 + 2 steps
    assert ckpt["global_step"] == 1 + 2 + 2 + 2
    assert ckpt["fillmask"]["encoder"]["init_args"]["global_rope_theta"] == 160000.0
    assert ckpt["hyper_parameters"]["optimizer"] == "stableadamw"
    log = caplog.text
    assert "global_rope_theta': 10000.0" in log and "global_rope_theta': 160000.0" in log
    assert "context extension (phase 2/3)" in log and "x max_length 64" in log


def test_mmbert_base_runs_its_phases(tmp_path, monkeypatch, caplog):
    docs = python_docs_documents()
    tiers = []
    for index, (first, last) in enumerate([(0, 40), (40, 60), (60, 70)]):
        file = tmp_path / f"tier{index + 1}.txt"
        file.write_text("\n\n".join(d.text for d in docs[first:last]), encoding="utf-8")
        tiers.append({"path": str(file), "name": f"tier-{index + 1}"})
    path, phases = tiny_preset("mmbert-base", tmp_path, {"mixture": tiers})
    assert [p["mask_rate"] for p in phases] == [0.3, 0.15, 0.05]
    assert [p["mixture_alpha"] for p in phases] == [0.7, 0.5, 0.3]
    with caplog.at_level("INFO"):
        ckpt = fit(path, monkeypatch)
    assert ckpt["global_step"] == 6
    assert ckpt["fillmask"]["encoder"]["init_args"]["global_rope_theta"] == 160000.0
    assert "mask rate 0.05" in caplog.text and "decay (phase 3/3)" in caplog.text
