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
``--linear-probe`` instead freezes both encoders and fits a logistic regression on their
mean-pooled states (and on the mean of their input token embeddings): how much of the task the
features carry before any fine-tuning.

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
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from fillmask.embedding import SentenceEncoder

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


def read_task(path: Path, labels: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    names = labels or sorted({r["label"] for r in rows})
    return [r["text"] for r in rows], torch.tensor([names.index(r["label"]) for r in rows])


def features(encoder: SentenceEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    """Mean-pooled final states, and the mean of the input token embeddings, of ``texts``."""
    table = encoder.encoder.token_embedding()
    bags = []
    for text in texts:
        ids = torch.tensor(encoder.tokenizer.encode(text).ids)
        with torch.no_grad():
            bags.append(table(ids).mean(0))
    return {"final states": torch.from_numpy(encoder.embed(texts)),
            "token embeddings": torch.stack(bags)}


def logistic_regression(x: torch.Tensor, y: torch.Tensor, strength: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a multinomial logistic regression with an L2 penalty (L-BFGS)."""
    weight = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + strength * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def probe_accuracy(train: torch.Tensor, y_train: torch.Tensor, dev: torch.Tensor,
                   y_dev: torch.Tensor) -> float:
    """Dev accuracy (%) of logistic regression on standardised features, the best of three
    regularisation strengths."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, dev = (train - mean) / std, (dev - mean) / std
    scores = []
    for strength in (1e-4, 1e-3, 1e-2):
        weight, bias = logistic_regression(train, y_train, strength)
        scores.append(100 * ((dev @ weight + bias).argmax(-1) == y_dev).float().mean().item())
    return max(scores)


def linear_probe(checkpoint: Path, train: Path, dev: Path) -> None:
    """Print the frozen-feature probe of the pretrained encoder and of its untrained twin."""
    torch.manual_seed(0)
    pretrained = SentenceEncoder.load(checkpoint, pooling="mean")
    scratch = replace(pretrained, encoder=pretrained.encoder.resized().eval())
    texts, y_train = read_task(train)
    dev_texts, y_dev = read_task(dev, sorted({r["label"] for r in csv.DictReader(train.open())}))
    print("\nLinear probe on frozen features (dev accuracy, %):")
    for name, encoder in (("pretrained", pretrained), ("scratch", scratch)):
        train_x, dev_x = features(encoder, texts), features(encoder, dev_texts)
        cells = ", ".join(f"{kind} {probe_accuracy(train_x[kind], y_train, dev_x[kind], y_dev):.1f}"
                          for kind in train_x)
        print(f"  {name:<10} {cells}")


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
    parser.add_argument("--linear-probe", action="store_true",
                        help="probe frozen features instead of fine-tuning")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_noun = wordnet_nouns(args.wordnet_deb, Path(tmp))
        train, dev = build_task(data_noun, args.output, args.train_per_class, args.dev_per_class)
    if args.linear_probe:
        linear_probe(args.checkpoint, train, dev)
        return
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
