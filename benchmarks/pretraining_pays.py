"""Does pretraining pay? The quickstart's encoder against the same architecture and tokenizer
trained from scratch, fine-tuned on a real labelled general-English task.

The task, built here from Princeton WordNet 3.0 (Debian's ``wordnet-base`` package, fetched with
``apt-get download`` unless ``--wordnet-deb`` names the .deb): the definition of a noun synset
(its gloss up to the first example, the synset's own words left out), labelled with the synset's
lexicographer file, i.e. its semantic category. Ten categories, the largest except the
abstract ones: act, animal, artifact, communication, food, location, person, plant, state,
substance. The same number of synsets per class, split into train and dev by a hash of the
synset's offset (stable across runs and machines). No one in this project wrote these labels.

Both encoders run through ``fillmask evaluate`` (the same suite, the same learning-rate sweep and
seeds); the script prints the table and the difference at the best learning rate.

    python benchmarks/pretraining_pays.py --checkpoint runs/quickstart/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

CATEGORIES = {4: "act", 5: "animal", 6: "artifact", 10: "communication", 13: "food",
              15: "location", 18: "person", 20: "plant", 26: "state", 27: "substance"}


def wordnet_nouns(deb: Path | None, work: Path) -> Path:
    """The path of WordNet's ``data.noun``, unpacked from the Debian package."""
    if deb is None:
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=work, check=True,
                       capture_output=True)
        deb = next(work.glob("wordnet-base_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    return work / "root" / "usr" / "share" / "wordnet" / "data.noun"


def definition(gloss: str) -> str:
    """A gloss without its examples: the text before the first quoted example."""
    return gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()


def synsets(data_noun: Path) -> list[tuple[str, str, str]]:
    """(offset, category, definition) of every noun synset of the ten categories."""
    rows = []
    for line in data_noun.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:  # the licence header
            continue
        fields, gloss = line.split("|", 1)
        offset, lex_file = fields.split()[:2]
        category = CATEGORIES.get(int(lex_file))
        text = definition(gloss)
        if category and len(text.split()) >= 3:
            rows.append((offset, category, text))
    return rows


def build_task(data_noun: Path, folder: Path, train_per_class: int, dev_per_class: int
               ) -> tuple[Path, Path]:
    """train.csv and dev.csv with ``text`` and ``label``, balanced over the ten categories."""
    by_class: dict[str, list[tuple[str, str]]] = {}
    for offset, category, text in synsets(data_noun):
        key = hashlib.sha256(offset.encode()).hexdigest()
        by_class.setdefault(category, []).append((key, text))
    splits: dict[str, list[dict[str, str]]] = {"train": [], "dev": []}
    for category, items in sorted(by_class.items()):
        items.sort()
        chosen = items[: train_per_class + dev_per_class]
        splits["dev"] += [{"text": t, "label": category} for _, t in chosen[:dev_per_class]]
        splits["train"] += [{"text": t, "label": category} for _, t in chosen[dev_per_class:]]
    paths = []
    for name, rows in splits.items():
        path = folder / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]


def suite(checkpoint: Path, train: Path, dev: Path, args: argparse.Namespace) -> dict:
    model = {"class_path": "fillmask.objectives.classify.SequenceClassification",
             "init_args": {"warmup_steps": 0.1, "dropout": 0.1}}
    model["init_args"].update(json.loads(args.model_options))
    return {
        "output": str(args.output),
        "encoders": [{"name": "pretrained", "pretrained": str(checkpoint)},
                     {"name": "scratch", "pretrained": str(checkpoint), "from_scratch": True}],
        "tasks": [{"name": "wordnet-categories", "metric": "val/accuracy", "model": model,
                   "data": {"train_file": str(train), "validation_file": str(dev),
                            "max_length": args.max_length, "batch_size": args.batch_size}}],
        "seeds": list(range(args.seeds)),
        "learning_rates": args.learning_rates,
        "trainer": {"max_epochs": args.epochs, "accelerator": "cpu"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the quickstart's")
    parser.add_argument("--wordnet-deb", type=Path, help="wordnet-base .deb (else downloaded)")
    parser.add_argument("--output", type=Path, default=Path("runs/pretraining-pays"))
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--dev-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-rates", type=float, nargs="+", help="default: by width")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model-options", default="{}",
                        help="JSON of extra SequenceClassification options")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_noun = wordnet_nouns(args.wordnet_deb, Path(tmp))
        train, dev = build_task(data_noun, args.output, args.train_per_class, args.dev_per_class)
    config = args.output / "suite.yaml"
    config.write_text(yaml.safe_dump(suite(args.checkpoint, train, dev, args), sort_keys=False),
                      encoding="utf-8")
    code = subprocess.call([sys.executable, "-m", "fillmask", "evaluate", "--config",
                            str(config)])
    if code:
        raise SystemExit(code)
    table = json.loads((args.output / "results.json").read_text(encoding="utf-8"))
    cells = {row["encoder"]: row["tasks"]["wordnet-categories"] for row in table["rows"]}
    gain = cells["pretrained"]["mean"] - cells["scratch"]["mean"]
    print(f"\nWordNet categories (10 classes, {args.train_per_class}/{args.dev_per_class} per "
          "class), dev accuracy at each encoder's best learning rate:")
    for name, cell in cells.items():
        rates = ", ".join(f"{r}: {m:.1f}" for r, m in cell["by_learning_rate"].items())
        print(f"  {name:<10} {cell['mean']:.1f} ± {cell['std']:.1f}  (by lr: {rates})")
    print(f"  pretrained - scratch = {gain:+.1f} points")


if __name__ == "__main__":
    main()
