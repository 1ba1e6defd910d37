"""Does pretraining pay? The quickstart's encoder against the same architecture and tokenizer
trained from scratch, fine-tuned on a real labelled English task that no one in this project
wrote. Two tasks, chosen with ``--task``:

``wordnet`` (general vocabulary), built from Princeton WordNet 3.0 (Debian's ``wordnet-base``
package, fetched with ``apt-get download`` unless ``--wordnet-deb`` names the .deb): the
definition of a noun synset (its gloss up to the first example, the synset's own words left out),
labelled with the synset's lexicographer file, i.e. its semantic category. Ten categories, the
largest except the abstract ones: act, animal, artifact, communication, food, location, person,
plant, state, substance. Split into train and dev by a hash of the synset's offset.

``debian`` (descriptions of software, nearer the python-docs the quickstart pretrains on), built
from Debian's package index (the ``Packages`` file apt keeps under /var/lib/apt/lists, or
``--packages``): a source package's one-line description, written by its Debian maintainer,
labelled with its archive section. Ten sections that say what a program is for rather than what
language it is written in: admin, fonts, games, graphics, math, net, science, sound, text, web.
One description per source package (the binary named after the source, else the first), text
found under two sources dropped, split into train and dev by a hash of the source's name, so no
source is on both sides.

Both tasks are balanced (the same number of items per class) and stable across runs and
machines. Both encoders run through ``fillmask evaluate`` (the same suite, the same
learning-rate sweep and seeds); the script prints the table and the difference at the best
learning rate. ``--linear-probe`` instead freezes both encoders and fits a logistic regression on
their mean-pooled states (and on the mean of their input token embeddings): how much of the task
the features carry before any fine-tuning.

    python benchmarks/pretraining_pays.py --checkpoint runs/quickstart/checkpoints/last.ckpt \
        --task debian
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from fillmask.embedding import SentenceEncoder

CATEGORIES = {4: "act", 5: "animal", 6: "artifact", 10: "communication", 13: "food",
              15: "location", 18: "person", 20: "plant", 26: "state", 27: "substance"}
SECTIONS = {"admin", "fonts", "games", "graphics", "math", "net", "science", "sound", "text",
            "web"}
TASKS = {"wordnet": ("wordnet-categories", 300), "debian": ("debian-sections", 180)}
"""Per task: its name in the suite, and the default training items per class."""


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


Items = dict[str, list[tuple[str, str]]]
"""Per class, (split key, text): items are ordered, and split, by their key."""


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


def wordnet_items(deb: Path | None) -> Items:
    """Per category, the definitions of its noun synsets."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = synsets(wordnet_nouns(deb, Path(tmp)))
    items: Items = {}
    for offset, category, text in rows:
        items.setdefault(category, []).append((sha256(offset), text))
    return items


def packages_index(path: Path | None) -> str:
    """The text of a Debian ``Packages`` file, compressed or not (apt-helper reads either)."""
    if path is None:
        found = sorted(Path("/var/lib/apt/lists").glob("*_main_binary-amd64_Packages*"))
        if not found:
            raise SystemExit("no Debian package index under /var/lib/apt/lists: run "
                             "`apt-get update` or name a Packages file with --packages")
        path = found[0]
    return subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], check=True,
                          capture_output=True, text=True).stdout


def stanzas(index: str) -> list[dict[str, str]]:
    """The fields of each package in a Packages file (continuation lines left out)."""
    packages = []
    for block in index.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines()
                      if line and not line[0].isspace() and ":" in line)
        if "Package" in fields:
            packages.append({k: v.strip() for k, v in fields.items()})
    return packages


def debian_items(index: str) -> Items:
    """Per section, one description per source package, from a Packages file's text."""
    by_source: dict[str, tuple[str, str]] = {}
    for package in stanzas(index):
        source = package.get("Source", package["Package"]).split()[0]
        if source not in by_source or package["Package"] == source:
            section = package.get("Section", "").rsplit("/", 1)[-1]
            by_source[source] = (section, package.get("Description", ""))
    uses = Counter(text.lower() for _, text in by_source.values())
    items: Items = {}
    for source, (section, text) in by_source.items():
        if section in SECTIONS and uses[text.lower()] == 1 and len(text.split()) >= 3:
            items.setdefault(section, []).append((sha256(source), text))
    return items


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_task(items: Items, folder: Path, train_per_class: int, dev_per_class: int
               ) -> tuple[Path, Path]:
    """train.csv and dev.csv with ``text`` and ``label``, balanced over the classes."""
    splits: dict[str, list[dict[str, str]]] = {"train": [], "dev": []}
    for label, pairs in sorted(items.items()):
        if len(pairs) < train_per_class + dev_per_class:
            raise SystemExit(f"class {label!r} has {len(pairs)} items, fewer than "
                             f"{train_per_class} + {dev_per_class}: lower --train-per-class")
        chosen = sorted(pairs)[: train_per_class + dev_per_class]
        splits["dev"] += [{"text": t, "label": label} for _, t in chosen[:dev_per_class]]
        splits["train"] += [{"text": t, "label": label} for _, t in chosen[dev_per_class:]]
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
        "tasks": [{"name": TASKS[args.task][0], "metric": "val/accuracy", "model": model,
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
    parser.add_argument("--task", choices=sorted(TASKS), default="wordnet")
    parser.add_argument("--wordnet-deb", type=Path, help="wordnet-base .deb (else downloaded)")
    parser.add_argument("--packages", type=Path,
                        help="a Debian Packages file (else apt's, under /var/lib/apt/lists)")
    parser.add_argument("--output", type=Path, help="default: runs/pretraining-pays/TASK")
    parser.add_argument("--train-per-class", type=int, help="default: 300 wordnet, 180 debian")
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
    task, train_per_class = TASKS[args.task]
    args.train_per_class = args.train_per_class or train_per_class
    args.output = args.output or Path("runs/pretraining-pays") / args.task
    args.output.mkdir(parents=True, exist_ok=True)
    items = (wordnet_items(args.wordnet_deb) if args.task == "wordnet"
             else debian_items(packages_index(args.packages)))
    train, dev = build_task(items, args.output, args.train_per_class, args.dev_per_class)
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
    cells = {row["encoder"]: row["tasks"][task] for row in table["rows"]}
    gain = cells["pretrained"]["mean"] - cells["scratch"]["mean"]
    print(f"\n{task} ({len(items)} classes, {args.train_per_class}/{args.dev_per_class} per "
          "class), dev accuracy at each encoder's best learning rate:")
    for name, cell in cells.items():
        rates = ", ".join(f"{r}: {m:.1f}" for r, m in cell["by_learning_rate"].items())
        print(f"  {name:<10} {cell['mean']:.1f} ± {cell['std']:.1f}  (by lr: {rates})")
    print(f"  pretrained - scratch = {gain:+.1f} points")


if __name__ == "__main__":
    main()
