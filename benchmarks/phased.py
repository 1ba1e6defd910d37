"""A flat recipe (the quickstart's first) against phased ones at equal training tokens.

Flat: the quickstart's model and data (4,000 steps of 32 x 64 tokens, 30% masking) with one
200-step warm-up then a linear decay, as ``configs/quickstart.yaml`` was before ``wsd`` won.
Phased, the same 8.2M token slots in two phases of one ``fillmask fit``:

1. 3,000 steps at 64 tokens, 30% masking, the peak rate held after the same 200-step warm-up;
2. 1,000 steps of 16 x 128 tokens (the same tokens per step), 15% masking, a linear decay to 0;

then ``fillmask merge`` of its last two checkpoints (steps 3,500 and 4,000). The phased encoder
has ``max_positions`` 128 for its second phase (positions 64-127 start from their sinusoid
initialisation). ``--recipe wsd`` keeps the quickstart's 64 tokens and 30% masking in phase 2:
the schedule's change alone. Every model is scored by ``fillmask validate`` on the
quickstart's held-out split: masked-token accuracy and loss at 15% masking, 64-token blocks,
the same samples.
With ``--wordnet-deb`` (Debian's wordnet-base package) the three encoders are also fine-tuned on
the WordNet noun-category task of ``pretraining_pays.py`` through ``fillmask evaluate`` (the
same suite, learning-rate sweep and seeds for each).

    python benchmarks/phased.py --output runs/phased-benchmark [--wordnet-deb wordnet-base_*.deb]
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pretraining_pays import build_task, wordnet_nouns  # beside this script

ROOT = Path(__file__).resolve().parents[1]
STABLE = {"name": "stable", "steps": 3000, "mask_rate": 0.3,
          "lr": {"warmup_steps": 200, "start": 1.0}}
RECIPES = {
    # the issue's: a longer-context final phase at 15% masking
    "long-decay": [STABLE, {"name": "decay, 128 tokens", "steps": 1000, "max_length": 128,
                            "batch_size": 16, "mask_rate": 0.15,
                            "lr": {"shape": "linear", "end": 0.0}}],
    # the schedule alone: the same decay at the quickstart's 64 tokens and 30% masking
    "wsd": [STABLE, {"name": "decay", "steps": 1000, "lr": {"shape": "linear", "end": 0.0}}],
}


def configs(folder: Path, recipe: str) -> dict[str, Path]:
    """The flat and the phased YAML, each writing under its own folder."""
    base = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    base["trainer"]["callbacks"] = [c for c in base["trainer"]["callbacks"]
                                    if c["class_path"] != "fillmask.phases.Phases"]
    out = {}
    for name in ("flat", "phased"):
        config = copy.deepcopy(base)
        config["trainer"]["default_root_dir"] = str(folder / name)
        if name == "flat":  # one warm-up and linear decay: the quickstart before it was phased
            config["model"]["init_args"].update(warmup_steps=200, schedule="linear")
        else:
            config["trainer"]["callbacks"].insert(0, {
                "class_path": "fillmask.phases.Phases", "init_args": {"phases": RECIPES[recipe]}})
            longest = max(phase.get("max_length", 64) for phase in RECIPES[recipe])
            config["model"]["init_args"]["encoder"]["init_args"]["max_positions"] = longest
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        out[name] = path
    return out


def fillmask(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "fillmask", *args], capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"fillmask {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def validate(config: Path, checkpoint: Path) -> dict[str, float]:
    output = fillmask("validate", "--config", str(config), "--ckpt_path", str(checkpoint))
    metrics = {}
    for name in ("val/accuracy", "val/loss"):
        match = re.search(re.escape(name) + r"\s*[│|]\s*([0-9.]+)", output)
        if match is None:
            sys.exit(f"no {name} in the output of fillmask validate:\n{output[-2000:]}")
        metrics[name] = float(match.group(1))
    return metrics


def downstream(encoders: dict[str, Path], deb: Path, folder: Path, seeds: int) -> None:
    """Fine-tune each encoder on the WordNet categories and print the suite's table."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        train, dev = build_task(wordnet_nouns(deb, Path(tmp)), folder, 300, 100)
    suite = {
        "output": str(folder / "downstream"),
        "encoders": [{"name": n, "pretrained": str(p)} for n, p in encoders.items()],
        "tasks": [{"name": "wordnet-categories", "metric": "val/accuracy",
                   "model": {"class_path": "fillmask.objectives.classify.SequenceClassification",
                             "init_args": {"warmup_steps": 0.1, "dropout": 0.1}},
                   "data": {"train_file": str(train), "validation_file": str(dev),
                            "max_length": 64, "batch_size": 32}}],
        "seeds": list(range(seeds)),
        "trainer": {"max_epochs": 3, "accelerator": "cpu"},
    }
    config = folder / "downstream.yaml"
    config.write_text(yaml.safe_dump(suite, sort_keys=False))
    fillmask("evaluate", "--config", str(config))
    print((folder / "downstream" / "results.md").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/phased-benchmark")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="long-decay",
                        help="the phased side (default: long-decay, the docstring's)")
    parser.add_argument("--wordnet-deb", type=Path, help="also fine-tune on WordNet categories")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds (downstream)")
    args = parser.parse_args(argv)
    folder = Path(args.output).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    paths = configs(folder, args.recipe)
    minutes: dict[str, Any] = {}
    for name, path in paths.items():
        last = folder / name / "checkpoints" / "last.ckpt"
        if not last.is_file():  # finished runs are kept: a rerun only scores
            begin = time.perf_counter()
            fillmask("fit", "--config", str(path))
            minutes[name] = (time.perf_counter() - begin) / 60
    phased = folder / "phased" / "checkpoints"
    merged = folder / "merged.ckpt"
    if not merged.is_file():
        fillmask("merge", "--checkpoints", str(phased / "step3500.ckpt"),
                 str(phased / "step4000.ckpt"), "--output", str(merged))
    rows = {"flat": validate(paths["flat"], folder / "flat" / "checkpoints" /
                                          "last.ckpt"),
            "phased": validate(paths["phased"], phased / "last.ckpt"),
            "phased, merged 3500+4000": validate(paths["phased"], merged)}
    print(f"{'run':28s} {'val accuracy':>12s} {'val loss':>9s}")
    for name, metrics in rows.items():
        print(f"{name:28s} {metrics['val/accuracy']:12.4f} {metrics['val/loss']:9.4f}")
    flat = rows["flat"]["val/accuracy"]
    for name in ("phased", "phased, merged 3500+4000"):
        print(f"{name} - flat: {rows[name]['val/accuracy'] - flat:+.4f} accuracy")
    for name, value in minutes.items():
        print(f"fit {name}: {value:.1f} min")
    if args.wordnet_deb:
        downstream({"flat": folder / "flat" / "checkpoints" / "last.ckpt",
                    "phased": phased / "last.ckpt", "merged": merged}, args.wordnet_deb,
                   folder, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
