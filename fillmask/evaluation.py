"""The `fillmask evaluate` command: fine-tune encoders on a suite of tasks, sweep the learning
rate over several seeds, and tabulate what each encoder scores.

A suite is one YAML file::

    output: runs/evaluate                 # results.json, results.md and one folder per run
    encoders:
      - name: quickstart
        pretrained: runs/quickstart/checkpoints/last.ckpt
      - name: scratch                     # the same architecture and tokenizer, random weights
        pretrained: runs/quickstart/checkpoints/last.ckpt
        from_scratch: true
    tasks:
      - name: topics
        metric: val/accuracy              # what the table reports (higher is better)
        model: {class_path: SequenceClassification, init_args: {pooling: mean}}
        data: {train_file: topics/train.csv, validation_file: topics/dev.csv}
    seeds: [0, 1, 2]
    learning_rates: null                  # null: chosen from each encoder's width
    trainer: {max_epochs: 3}              # shared by every run (a task may add its own)

Each (encoder, task, learning rate, seed) is a ``fillmask finetune`` run with the task's
``model``/``data``/``trainer`` sections (``config:`` may name a fine-tuning YAML they are merged
over), trained without validation and then validated once: the table reports that final
score. Per task it shows, at the learning rate with the best mean over seeds, the mean and the
standard deviation over seeds, and the average over tasks (the GLUE tables of the MosaicBERT and
ModernBERT papers). Finished runs keep their ``result.json``; running the suite again skips them,
so an interrupted suite resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fillmask.errors import FillmaskError

# Learning-rate sweeps by encoder width: BERT's (2e-5 .. 5e-5) is right for base and large
# models; narrow encoders are fine-tuned at higher rates (the quickstart's, width 128, did
# best at 1e-3 to 3e-3 on benchmarks/pretraining_pays.py).
SWEEPS: tuple[tuple[int, tuple[float, ...]], ...] = (
    (128, (3e-4, 1e-3, 3e-3)),
    (256, (1e-4, 3e-4, 1e-3)),
    (512, (5e-5, 1e-4, 3e-4)),
    (sys.maxsize, (2e-5, 3e-5, 5e-5)),
)


class SuiteError(FillmaskError):
    """A suite file fillmask cannot run, with the entry and the fix."""


@dataclass
class EncoderEntry:
    """One encoder of the suite: a pretrained model, or its architecture untrained."""

    name: str
    pretrained: str
    from_scratch: bool = False


@dataclass
class TaskEntry:
    """One task: the fine-tuning config sections and the metric the table reports."""

    name: str
    metric: str
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    scale: float = 100.0
    """Multiplies the logged metric in the table (fractions -> percent; 1 for metrics that
    are percentages already, such as SQuAD's ``val/exact_match``)."""


@dataclass
class Suite:
    """A parsed suite file."""

    source: Path
    output: Path
    encoders: list[EncoderEntry]
    tasks: list[TaskEntry]
    seeds: list[int]
    learning_rates: list[float] | None
    trainer: dict[str, Any]


@dataclass(frozen=True)
class RunKey:
    """One fine-tuning run of the suite."""

    encoder: str
    task: str
    learning_rate: float
    seed: int

    def folder(self, output: Path) -> Path:
        run = f"lr{self.learning_rate:g}-seed{self.seed}"
        return output / "runs" / self.encoder / self.task / run


# Reading the suite.


def read_suite(path: str | Path) -> Suite:
    """Parse and check a suite file; every problem is one line naming the entry."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise SuiteError(f"suite file {source} does not exist; give --config a suite YAML")
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise SuiteError(f"{source} is not valid YAML: {error}".splitlines()[0]) from error
    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: a suite is a mapping with encoders and tasks")
    unknown = sorted(set(raw) - {"output", "encoders", "tasks", "seeds", "learning_rates",
                                 "trainer"})
    if unknown:
        raise SuiteError(f"{source}: unknown key {unknown[0]!r}; a suite has output, encoders, "
                         "tasks, seeds, learning_rates and trainer")
    base = source.parent
    encoders = [_encoder(source, base, i, e) for i, e in enumerate(_listed(source, raw,
                                                                              "encoders"))]
    tasks = [_task(source, base, i, t) for i, t in enumerate(_listed(source, raw, "tasks"))]
    for kind, names in (("encoder", [e.name for e in encoders]), ("task", [t.name for t in tasks])):
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:
            raise SuiteError(f"{source}: two {kind}s are named {twice!r}; give each its own name")
    seeds = raw.get("seeds", [0, 1, 2])
    rates = raw.get("learning_rates")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SuiteError(f"{source}: seeds must be a list of integers, e.g. [0, 1, 2]")
    if rates is not None and (not isinstance(rates, list) or not rates
                              or not all(isinstance(r, int | float) and r > 0 for r in rates)):
        raise SuiteError(f"{source}: learning_rates must be a list of positive numbers or null")
    output = Path(raw.get("output", "runs/evaluate")).expanduser()
    return Suite(source, output, encoders, tasks, seeds,
                 [float(r) for r in rates] if rates else None, dict(raw.get("trainer") or {}))


def _listed(source: Path, raw: dict[str, Any], key: str) -> list[Any]:
    items = raw.get(key)
    if not isinstance(items, list) or not items:
        raise SuiteError(f"{source}: {key} must be a non-empty list")
    return items


def _encoder(source: Path, base: Path, index: int, entry: Any) -> EncoderEntry:
    if not isinstance(entry, dict) or "pretrained" not in entry:
        raise SuiteError(f"{source}: encoders[{index}] needs pretrained: a checkpoint or a "
                         "transformers folder")
    pretrained = _relative(base, entry["pretrained"])
    name = str(entry.get("name") or Path(pretrained).stem)
    extra = sorted(set(entry) - {"name", "pretrained", "from_scratch"})
    if extra:
        raise SuiteError(f"{source}: encoders[{index}] ({name}) has unknown key {extra[0]!r}; "
                         "use name, pretrained and from_scratch")
    return EncoderEntry(name, pretrained, bool(entry.get("from_scratch", False)))


def _task(source: Path, base: Path, index: int, entry: Any) -> TaskEntry:
    if not isinstance(entry, dict) or "name" not in entry or "metric" not in entry:
        raise SuiteError(f"{source}: tasks[{index}] needs a name and a metric (e.g. metric: "
                         "val/accuracy)")
    extra = sorted(set(entry) - {"name", "metric", "config", "model", "data", "trainer",
                                 "scale"})
    if extra:
        raise SuiteError(f"{source}: tasks[{index}] ({entry['name']}) has unknown key "
                         f"{extra[0]!r}; use name, metric, config, model, data, trainer, scale")
    sections: dict[str, dict[str, Any]] = {"model": {}, "data": {}, "trainer": {}}
    if entry.get("config"):
        config_path = Path(_relative(base, entry["config"]))
        if not config_path.is_file():
            raise SuiteError(f"{source}: tasks[{index}] ({entry['name']}) config {config_path} "
                             "does not exist")
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        for key in sections:
            sections[key] = dict(loaded.get(key) or {})
    for key in sections:
        sections[key] = merge(sections[key], entry.get(key) or {})
    sections["data"] = _data_paths(base, sections["data"])
    return TaskEntry(str(entry["name"]), str(entry["metric"]), sections["model"],
                     sections["data"], sections["trainer"], float(entry.get("scale", 100.0)))


def _relative(base: Path, value: Any) -> str:
    """A path of the suite, read relative to the suite file's folder unless absolute."""
    path = Path(str(value)).expanduser()
    return str(path if path.is_absolute() or path.exists() else base / path)


def _data_paths(base: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``*_file`` options relative to the suite file (where they do not resolve as given)."""
    args = data.get("init_args", data)
    for key, value in list(args.items()):
        if key.endswith("_file") and isinstance(value, str):
            args[key] = _relative(base, value)
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, nested mappings merged key by key (lists replaced)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Running it.


def default_learning_rates(hidden_size: int) -> list[float]:
    """The sweep for an encoder of this width (see :data:`SWEEPS`)."""
    return list(next(rates for width, rates in SWEEPS if hidden_size <= width))


def encoder_settings(entry: EncoderEntry) -> tuple[dict[str, Any] | None, int]:
    """For a from-scratch entry, the encoder's ``class_path``/``init_args`` (its checkpoint's
    architecture, untrained); and the encoder's width, which picks the default sweep."""
    from fillmask.checkpoint_file import read_checkpoint

    path = Path(entry.pretrained)
    if path.is_dir():
        if entry.from_scratch:
            raise SuiteError(f"encoder {entry.name}: from_scratch needs a fillmask checkpoint "
                             f"(a .ckpt file), not the folder {path}")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return None, int(config.get("hidden_size", 768))
    if not path.is_file():
        raise SuiteError(f"encoder {entry.name}: {path} does not exist; give pretrained a "
                         "checkpoint written by fillmask fit or a transformers folder")
    info = read_checkpoint(path)["fillmask"]["encoder"]
    width = int(info["init_args"].get("hidden_size", 768))
    if not entry.from_scratch:
        return None, width
    return {"class_path": info["class_path"], "init_args": dict(info["init_args"])}, width


def run_config(suite: Suite, task: TaskEntry, encoder: EncoderEntry,
               scratch: dict[str, Any] | None, key: RunKey) -> dict[str, Any]:
    """The ``fillmask finetune`` configuration of one run."""
    model = merge(task.model, {"init_args": {"pretrained": encoder.pretrained,
                                             "learning_rate": key.learning_rate}})
    if scratch is not None:  # encoder wins over pretrained; pretrained still gives the tokenizer
        model["init_args"]["encoder"] = scratch
    trainer = merge(merge({"max_epochs": 3, "logger": False, "enable_checkpointing": False,
                           "enable_progress_bar": False, "enable_model_summary": False,
                           "num_sanity_val_steps": 0, "limit_val_batches": 0},
                          suite.trainer), task.trainer)
    trainer["default_root_dir"] = str(key.folder(suite.output))
    data = copy.deepcopy(task.data)
    if "class_path" in data:
        data.setdefault("init_args", {})["seed"] = key.seed
    else:
        data["seed"] = key.seed
    return {"seed_everything": key.seed, "trainer": trainer, "model": model, "data": data}


def run_one(config: dict[str, Any], metric: str) -> dict[str, float]:
    """Fine-tune once, validate once at the end, and return the validation metrics."""
    from fillmask.finetune import run_finetune

    with warnings.catch_warnings():  # a dict of options, not the command line, on purpose
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = run_finetune(config, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.limit_val_batches = 1.0
    results = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    if metric not in metrics:
        raise SuiteError(f"the task's metric {metric!r} was not logged; the model logs "
                         f"{', '.join(sorted(metrics)) or 'nothing'}")
    return metrics


def evaluate(suite: Suite, log: Any = print) -> dict[str, Any]:
    """Run every missing run of the suite, then tabulate all of them."""
    import datasets

    datasets.disable_progress_bars()  # one line per run is the progress view
    plans = []
    for encoder in suite.encoders:
        scratch, width = encoder_settings(encoder)
        rates = suite.learning_rates or default_learning_rates(width)
        for task in suite.tasks:
            for rate in rates:
                for seed in suite.seeds:
                    plans.append((encoder, scratch, task, RunKey(encoder.name, task.name, rate,
                                                                 seed)))
    results: list[dict[str, Any]] = []
    for number, (encoder, scratch, task, key) in enumerate(plans, start=1):
        results.append(run_or_reuse(suite, encoder, scratch, task, key,
                                    f"[{number}/{len(plans)}]", log))
    table = tabulate(suite, results)
    write_outputs(suite, table)
    return table


def run_or_reuse(suite: Suite, encoder: EncoderEntry, scratch: dict[str, Any] | None,
                 task: TaskEntry, key: RunKey, counter: str, log: Any) -> dict[str, Any]:
    """One run's result: read back when it finished before, else run it now."""
    folder = key.folder(suite.output)
    done = folder / "result.json"
    label = f"{counter} {key.encoder} | {key.task} | lr {key.learning_rate:g} | seed {key.seed}"
    if done.is_file():
        result = json.loads(done.read_text(encoding="utf-8"))
        log(f"{label}: {task.metric} {result['metrics'][task.metric]:.4f} (done before)")
        return result
    if folder.exists():  # an interrupted run: start it again from nothing
        shutil.rmtree(folder)
    log(f"{label}: running")
    start = time.perf_counter()
    metrics = run_one(run_config(suite, task, encoder, scratch, key), task.metric)
    result = {"encoder": key.encoder, "task": key.task, "learning_rate": key.learning_rate,
              "seed": key.seed, "metrics": metrics, "seconds": time.perf_counter() - start}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(done)
    log(f"{label}: {task.metric} {metrics[task.metric]:.4f} ({result['seconds']:.0f} s)")
    return result


# The table.


def tabulate(suite: Suite, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per encoder and task: the best learning rate by mean over seeds, its mean and standard
    deviation (scaled), every rate's mean, and the encoder's average over tasks."""
    rows = []
    for encoder in suite.encoders:
        cells = {}
        for task in suite.tasks:
            by_rate: dict[float, list[float]] = {}
            for r in results:
                if r["encoder"] == encoder.name and r["task"] == task.name:
                    by_rate.setdefault(r["learning_rate"], []).append(
                        r["metrics"][task.metric] * task.scale)
            means = {rate: statistics.fmean(values) for rate, values in by_rate.items()}
            best = max(means, key=lambda rate: means[rate])
            values = by_rate[best]
            cells[task.name] = {"mean": means[best], "std": statistics.pstdev(values)
                                if len(values) > 1 else 0.0, "learning_rate": best,
                                "seeds": len(values), "values": values,
                                "by_learning_rate": {f"{r:g}": m for r, m in sorted(means.items())}}
        average = statistics.fmean(cell["mean"] for cell in cells.values())
        rows.append({"encoder": encoder.name, "tasks": cells, "average": average})
    return {"suite": str(suite.source), "metrics": {t.name: t.metric for t in suite.tasks},
            "rows": rows, "runs": results}


def markdown(table: dict[str, Any]) -> str:
    """The table as Markdown: mean ± std over seeds at the best learning rate, and the average."""
    tasks = list(table["metrics"])
    header = "| encoder | " + " | ".join(f"{t} ({table['metrics'][t]})" for t in tasks)
    lines = [header + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for row in table["rows"]:
        cells = [f"{row['tasks'][t]['mean']:.2f} ± {row['tasks'][t]['std']:.2f} "
                 f"(lr {row['tasks'][t]['learning_rate']:g})" for t in tasks]
        lines.append(f"| {row['encoder']} | " + " | ".join(cells) + f" | {row['average']:.2f} |")
    seeds = {row["tasks"][t]["seeds"] for row in table["rows"] for t in tasks}
    lines.append("")
    lines.append(f"Mean ± standard deviation over {', '.join(map(str, sorted(seeds)))} seeds at "
                 "the learning rate with the best mean; the final validation score of each run.")
    return "\n".join(lines) + "\n"


def write_outputs(suite: Suite, table: dict[str, Any]) -> None:
    suite.output.mkdir(parents=True, exist_ok=True)
    (suite.output / "results.json").write_text(json.dumps(table, indent=1), encoding="utf-8")
    (suite.output / "results.md").write_text(markdown(table), encoding="utf-8")


def evaluate_main(argv: list[str]) -> int:
    """Entry point of ``fillmask evaluate``."""
    parser = argparse.ArgumentParser(prog="fillmask evaluate", description=(
        "Fine-tune encoders on a suite of tasks with a learning-rate sweep and several seeds; "
        "print the table and write it as JSON and Markdown."))
    parser.add_argument("--config", required=True, help="the suite YAML (see fillmask.evaluation)")
    parser.add_argument("--output", help="where results and runs go (overrides the suite's)")
    args = parser.parse_args(argv)
    try:
        suite = read_suite(args.config)
        if args.output:
            suite.output = Path(args.output)
        table = evaluate(suite)
    except FillmaskError as error:
        print(f"fillmask evaluate: error: {error}", file=sys.stderr)
        return 2
    print()
    print(markdown(table), end="")
    print(f"wrote {suite.output / 'results.json'} and {suite.output / 'results.md'}")
    return 0
