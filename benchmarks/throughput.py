"""Training throughput: fillmask against transformers' Trainer on the same model and samples.

Each configuration trains the same encoder twice per repetition, each run in a fresh process,
the order alternating from one repetition to the next so that machine drift hits both:

* the reference, as transformers' ``run_mlm.py`` does it: ``BertForMaskedLM`` (its default
  attention, SDPA), ``DataCollatorForLanguageModeling`` (15%, 80/10/10) and ``Trainer`` (its
  default fused AdamW), fed the samples as an Arrow dataset of ``input_ids``;
* fillmask: ``MaskedLM`` on ``BertEncoder`` with the same sizes, dropout, optimiser settings
  and batch, through ``MaskedLMDataModule`` and a Lightning ``Trainer``.

Both get the samples fillmask's data module builds from the embedded corpus (WordPiece, at
most ``--length`` tokens): full blocks (``ChunkPacking``), or one padded sample per paragraph
(``LinePacking``, run_mlm's ``--line_by_line``; fillmask runs it unpadded). Loaders collate in
the training process on both sides. Rates are taken after ``--warmup`` steps, from the end of
one optimiser step to the end of another (data, forward, backward, optimiser), and reported
as the median over repetitions.

Useful FLOPs are the encoder's matmul FLOPs on real tokens (attention counted over each
sample's own length) plus the MLM head on masked positions only; utilisation divides their
rate by the FLOP/s of a large square matmul measured in this run (see
:func:`fillmask.callbacks.measure_matmul_peak`). The reference's "executed" utilisation
counts the work it does: every padded position, and the head on every position.

    python benchmarks/throughput.py [--configs mini-8192 mini-30522 mini-lines] [--reps 3]
        [--warmup 3] [--steps 12] [--json out.json] [--markdown out.md]
    python benchmarks/throughput.py --configs base-bf16 --device cuda   # on a GPU
    python benchmarks/throughput.py --memory   # peak memory against corpus size

``--memory`` prepares Parquet shards of a corpus and of 100 times that corpus (shuffled copies)
and reports the peak resident memory of the same short training run on each, streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

Result = dict[str, Any]


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration: the model, the data and the precision."""

    preset: str
    vocab: int
    packing: str  # "chunk": full blocks; "lines": one padded sample per sentence
    batch: int = 32
    length: int = 128
    precision: str = "32"
    tokenizer_vocab: int = 8192


CONFIGS = {
    "mini-8192": Setup("mini", 8192, "chunk"),
    "mini-30522": Setup("mini", 30522, "chunk", tokenizer_vocab=30522),
    "mini-lines": Setup("mini", 8192, "lines"),
    "base-bf16": Setup("base", 30522, "chunk", precision="bf16-mixed", tokenizer_vocab=30522),
}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LEARNING_RATE, WEIGHT_DECAY, BETAS, EPS, DROPOUT = 1e-4, 0.01, (0.9, 0.999), 1e-6, 0.1


# The data: built once by fillmask's data module, read by both sides.


def sentence_corpus(cache_dir: str | None) -> str:
    """The embedded corpus as a text file of one sentence per line (BookCorpus's layout, what
    run_mlm's ``--line_by_line`` reads), written once into fillmask's cache."""
    from fillmask.data.embedded import python_docs_documents
    from fillmask.paths import cache_root

    path = cache_root(cache_dir) / "benchmarks" / "python-docs-sentences.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(s for d in python_docs_documents()
                         for s in SENTENCE_END.split(" ".join(d.text.split())) if s)
        partial = path.with_suffix(".partial")
        partial.write_text(text + "\n", "utf-8")
        partial.replace(path)
    return str(path)


def data_module(setup: Setup, cache_dir: str | None):
    from fillmask.data.datamodule import MaskedLMDataModule
    from fillmask.data.packing import ChunkPacking, LinePacking
    from fillmask.data.tokenize import TokenizerTraining

    lines = setup.packing == "lines"
    return MaskedLMDataModule(
        corpus=sentence_corpus(cache_dir) if lines else "python-docs",
        sample_by="line", packing=LinePacking() if lines else ChunkPacking(),
        tokenizer_training=TokenizerTraining("wordpiece", setup.tokenizer_vocab),
        max_length=setup.length, batch_size=setup.batch, seed=0, cache_dir=cache_dir,
        pad_to_multiple_of=1)


# FLOP counts (matmuls, forward + backward: 6 per weight and token).


@dataclass(frozen=True)
class Flops:
    """FLOPs per token of the parts of the model."""

    weights: float  # every encoder matrix
    attention: float  # scores and mix, per token and attended token
    head: float  # the MLM head's matrices (transform and decoder), per decoded token
    last_tail: float  # the last block's output projection and feed-forward

    @classmethod
    def of(cls, setup: Setup) -> Flops:
        encoder = fillmask_encoder(setup)
        last = encoder.blocks[-1]
        tail = [p for m in (last.attention.out, last.ffn) for p in m.parameters() if p.ndim >= 2]
        hidden = encoder.hidden_size
        return cls(weights=encoder.flops_per_token(0),
                   attention=12.0 * encoder.num_layers * hidden,
                   head=6.0 * (hidden * hidden + setup.vocab * hidden),
                   last_tail=6.0 * sum(p.numel() for p in tail))

    def useful(self, batch: dict[str, Any]) -> float:
        """What the loss needs: the encoder on real tokens, attention within each sample,
        the head on masked tokens."""
        lengths = batch["lengths"].double()
        return float(self.weights * lengths.sum() + self.attention * (lengths**2).sum()
                     + self.head * batch["masked"])

    def executed(self, batch: dict[str, Any], side: str) -> float:
        """What each side computes. Both attend over the padded width (on CPU fillmask's
        unpadded attention re-pads for SDPA). The reference runs every matrix on every
        position, padding included, and decodes all of them; fillmask runs them on real
        tokens, the last block's tail and the head on masked tokens only."""
        rows, width = len(batch["lengths"]), batch["width"]
        attention = self.attention * rows * width**2
        if side == "reference":
            return (self.weights + self.head) * batch["tokens"] + attention
        real, masked = float(batch["lengths"].sum()), batch["masked"]
        return (self.weights * real - self.last_tail * (real - masked) + self.head * masked
                + attention)


class StepClock:
    """Times the end of the warm-up and of the measured steps (synchronising a GPU only
    there) and keeps every batch's token counts."""

    def __init__(self, cuda: bool, warmup: int, steps: int) -> None:
        self.cuda, self.warmup, self.steps = cuda, warmup, steps
        self.ticks = 0
        self.times: dict[int, float] = {}
        self.batches: list[dict[str, Any]] = []

    def tick(self) -> None:
        """An optimiser step ended."""
        self.ticks += 1
        if self.ticks in (self.warmup, self.warmup + self.steps):
            if self.cuda:
                torch.cuda.synchronize()
            self.times[self.ticks] = time.perf_counter()

    def record(self, input_ids: torch.Tensor, real: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep a batch's counts, on its device until the run ends (no host sync per step)."""
        self.batches.append({"tokens": input_ids.numel(), "lengths": real.sum(1),
                             "width": input_ids.shape[1], "masked": (labels != -100).sum()})

    def summary(self, flops: Flops, side: str) -> Result:
        warmup, steps = self.warmup, self.steps
        window = [{**b, "lengths": b["lengths"].cpu(), "masked": int(b["masked"])}
                  for b in self.batches[warmup:warmup + steps]]
        seconds = self.times[warmup + steps] - self.times[warmup]
        tokens = sum(b["tokens"] for b in window)
        real = sum(int(b["lengths"].sum()) for b in window)
        return {"seconds": seconds, "steps": steps, "tokens_per_s": tokens / seconds,
                "real_tokens_per_s": real / seconds, "padding": 1 - real / tokens,
                "useful_flops_per_s": sum(map(flops.useful, window)) / seconds,
                "executed_flops_per_s": sum(flops.executed(b, side) for b in window) / seconds}


def peak_memory_mib(cuda: bool) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory (VmHWM), in MiB."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status", encoding="ascii") as status:
        peak = next(line for line in status if line.startswith("VmHWM:"))
    return int(peak.split()[1]) / 1024


# The two sides, each run in a process of its own.


def run_reference(setup: Setup, args: argparse.Namespace, rep: int) -> Result:
    import transformers
    from collation import hf_collator
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from fillmask.architectures.bert import PRESETS

    transformers.logging.set_verbosity_error()
    dm = data_module(setup, args.cache_dir)
    dm.setup()
    samples = dm.samples["train"].select_columns(["input_ids"])
    collator = hf_collator(dm, whole_word=False)
    cuda = args.device == "cuda"
    clock = StepClock(cuda, args.warmup, args.steps)
    pad = collator.tokenizer.pad_token_id

    def counted(examples):
        batch = collator(examples)
        clock.record(batch["input_ids"], batch["input_ids"] != pad, batch["labels"])
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()

    sizes = PRESETS[setup.preset]
    config = BertConfig(
        vocab_size=setup.vocab, hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_layers"], num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"], max_position_embeddings=512,
        hidden_dropout_prob=DROPOUT, attention_probs_dropout_prob=DROPOUT)
    torch.manual_seed(rep)
    model = BertForMaskedLM(config)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out, per_device_train_batch_size=setup.batch,
            max_steps=args.warmup + args.steps, learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
            adam_epsilon=EPS, warmup_steps=0, save_strategy="no", report_to=[],
            disable_tqdm=True, logging_strategy="no", seed=rep, use_cpu=not cuda,
            bf16=setup.precision.startswith("bf16"), dataloader_num_workers=0)
        Trainer(model=model, args=training, train_dataset=samples, data_collator=counted,
                callbacks=[Clock()]).train()
    result = clock.summary(Flops.of(setup), "reference")
    return {**result, "peak_memory_mib": peak_memory_mib(cuda)}


def fillmask_encoder(setup: Setup, **options: Any):
    from fillmask.architectures.bert import BertEncoder

    return BertEncoder.preset(setup.preset, vocab_size=setup.vocab, max_positions=512,
                              dropout=DROPOUT, attention_dropout=DROPOUT, **options)


def run_fillmask(setup: Setup, args: argparse.Namespace, rep: int) -> Result:
    import lightning as L

    from fillmask.objectives.mlm import MaskedLM

    cuda = args.device == "cuda"
    clock = StepClock(cuda, args.warmup, args.steps)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            ids = batch["input_ids"]
            real = batch.get("attention_mask", torch.ones_like(ids)).bool()
            clock.record(ids, real, batch["labels"])

        def on_train_batch_end(self, *_):
            clock.tick()

    dm = data_module(setup, args.cache_dir)
    L.seed_everything(rep, verbose=False)
    encoder = fillmask_encoder(setup, unpad=setup.packing == "lines")
    model = MaskedLM(encoder, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                     betas=BETAS, eps=EPS, warmup_steps=0, compile=args.compile)
    trainer = L.Trainer(
        max_steps=args.warmup + args.steps, accelerator=args.device, devices=1,
        precision=setup.precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[Clock()])
    trainer.fit(model, datamodule=dm)
    result = clock.summary(Flops.of(setup), "fillmask")
    return {**result, "peak_memory_mib": peak_memory_mib(cuda)}


def worker(args: argparse.Namespace) -> None:
    side, name, rep = args.worker
    setup = CONFIGS[name]
    run = run_reference if side == "reference" else run_fillmask
    result = run(setup, args, int(rep))
    print("RESULT " + json.dumps(result), flush=True)


# The orchestration: alternate the sides in fresh processes, then report.


def spawn(side: str, name: str, rep: int, args: argparse.Namespace) -> Result:
    command = [sys.executable, __file__, "--worker", side, name, str(rep),
               "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--device", args.device]
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    if args.compile:
        command.append("--compile")
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"the {side} run of {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def matmul_peak(device: str, precision: str) -> float:
    from fillmask.callbacks import measure_matmul_peak

    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    size = 8192 if device == "cuda" else 2048
    return measure_matmul_peak(torch.device(device), dtype, size=size, repeats=10)


def compare(name: str, args: argparse.Namespace) -> Result:
    setup = CONFIGS[name]
    data_module(setup, args.cache_dir).setup()  # tokenizer and samples cached for the workers
    runs: dict[str, list[Result]] = {"reference": [], "fillmask": []}
    peaks = []
    for rep in range(args.reps):
        peaks.append(matmul_peak(args.device, setup.precision))
        order = ("reference", "fillmask") if rep % 2 == 0 else ("fillmask", "reference")
        for side in order:
            runs[side].append(spawn(side, name, rep, args))
            print(f"  {name} rep {rep} {side}: {runs[side][-1]['tokens_per_s']:,.0f} tok/s",
                  flush=True)
    peak = statistics.median(peaks)
    row: Result = {"config": name, **asdict(setup), "matmul_peak_flops": peak, "runs": runs}
    for side, results in runs.items():
        for key in ("tokens_per_s", "real_tokens_per_s", "useful_flops_per_s",
                    "executed_flops_per_s", "peak_memory_mib", "padding"):
            row[f"{side}_{key}"] = statistics.median(r[key] for r in results)
        row[f"{side}_useful_utilisation"] = row[f"{side}_useful_flops_per_s"] / peak
        row[f"{side}_executed_utilisation"] = row[f"{side}_executed_flops_per_s"] / peak
    row["ratio"] = row["fillmask_tokens_per_s"] / row["reference_tokens_per_s"]
    row["real_ratio"] = row["fillmask_real_tokens_per_s"] / row["reference_real_tokens_per_s"]
    row["rep_ratios"] = [f["real_tokens_per_s"] / r["real_tokens_per_s"]
                         for f, r in zip(runs["fillmask"], runs["reference"], strict=True)]
    return row


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return f"{names[0] if names else cpu}, {os.cpu_count()} cores"


def markdown(rows: list[Result], args: argparse.Namespace) -> str:
    lines = [f"Machine: {machine()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
             f"{args.reps} repetitions x {args.steps} steps after {args.warmup} warm-up"
             f"{'; fillmask compiled' if args.compile else ''}.", "",
             "| config | reference tok/s (real) | fillmask tok/s (real) | ratio (real) "
             "| useful util. ref / fillmask | executed util. ref / fillmask "
             "| peak MiB ref / fillmask |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['reference_tokens_per_s']:,.0f} "
            f"({r['reference_real_tokens_per_s']:,.0f}) | {r['fillmask_tokens_per_s']:,.0f} "
            f"({r['fillmask_real_tokens_per_s']:,.0f}) | {r['ratio']:.2f}x "
            f"({r['real_ratio']:.2f}x) | {r['reference_useful_utilisation']:.0%} / "
            f"{r['fillmask_useful_utilisation']:.0%} | {r['reference_executed_utilisation']:.0%} "
            f"/ {r['fillmask_executed_utilisation']:.0%} | {r['reference_peak_memory_mib']:,.0f} "
            f"/ {r['fillmask_peak_memory_mib']:,.0f} |")
    peaks = ", ".join(f"{r['config']} {r['matmul_peak_flops'] / 1e9:,.0f}" for r in rows)
    lines += ["", f"Matmul peak measured in the run (GFLOP/s): {peaks}."]
    return "\n".join(lines)


# Memory against corpus size.

MEMORY_RUN = r"""
import sys
import lightning as L
import torch
from fillmask.architectures.bert import BertEncoder
from fillmask.data.streaming import StreamingMaskedLMDataModule
from fillmask.objectives.mlm import MaskedLM

L.seed_everything(0, verbose=False)
dm = StreamingMaskedLMDataModule(sys.argv[1], batch_size=32)
model = MaskedLM(BertEncoder.preset("mini", vocab_size=dm.vocab_size))
L.Trainer(max_steps=int(sys.argv[2]), logger=False, enable_progress_bar=False,
          enable_model_summary=False, enable_checkpointing=False,
          limit_val_batches=0).fit(model, datamodule=dm)
with open("/proc/self/status") as status:
    print("PEAK", next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def corpus_copies(paragraphs: list[str], folder: Path, copies: int) -> str:
    folder.mkdir(parents=True)
    for copy in range(copies):
        shuffled = paragraphs[:]
        random.Random(copy).shuffle(shuffled)
        (folder / f"part{copy:03d}.txt").write_text("\n\n".join(shuffled) + "\n", "utf-8")
    return str(folder / "*.txt")


def memory_growth(args: argparse.Namespace) -> Result:
    from fillmask.data.datamodule import MaskedLMDataModule
    from fillmask.data.embedded import python_docs_documents
    from fillmask.data.prepare import prepare_shards

    paragraphs = [p for d in python_docs_documents() for p in d.text.split("\n\n")]
    paragraphs = paragraphs[: args.memory_paragraphs or None]
    result: Result = {"paragraphs": len(paragraphs)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = None
        for copies in (1, 100):
            text = corpus_copies(paragraphs, root / f"text{copies}", copies)
            dm = MaskedLMDataModule(corpus=text, tokenizer=tokenizer, max_length=128,
                                    cache_dir=str(root / "cache"))
            started = time.perf_counter()
            manifest = prepare_shards(dm, root / f"shards{copies}")
            if tokenizer is None:  # the larger corpus reuses the smaller one's tokenizer
                tokenizer = str(root / "tokenizer.json")
                dm.tokenizer.save(tokenizer)
            run = subprocess.run([sys.executable, "-c", MEMORY_RUN, str(root / f"shards{copies}"),
                                  str(args.memory_steps)], capture_output=True, text=True)
            peak = [line for line in run.stdout.splitlines() if line.startswith("PEAK ")]
            if run.returncode or not peak:
                sys.exit(f"the memory run failed:\n{run.stderr[-4000:]}")
            result[f"x{copies}"] = {
                "tokens": manifest["splits"]["train"]["tokens"],
                "text_mib": sum(f.stat().st_size for f in (root / f"text{copies}").iterdir())
                / 2**20,
                "prepare_s": time.perf_counter() - started,
                "peak_rss_mib": int(peak[-1].split()[1]) / 1024}
            print(f"  corpus x{copies}: {result[f'x{copies}']}", flush=True)
    result["growth"] = result["x100"]["peak_rss_mib"] / result["x1"]["peak_rss_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["mini-8192", "mini-30522", "mini-lines"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="fillmask with torch.compile")
    parser.add_argument("--cache-dir", help="fillmask's cache (default: its usual one)")
    parser.add_argument("--memory", action="store_true", help="measure memory against corpus "
                        "size instead of throughput")
    parser.add_argument("--memory-paragraphs", type=int, default=0,
                        help="paragraphs of the embedded corpus in the 1x corpus (0: all)")
    parser.add_argument("--memory-steps", type=int, default=30)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--markdown", help="write the table to this file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (rates run from the end of a "
                     "warm-up step)")
    if args.worker:
        return worker(args)
    if args.memory:
        result = memory_growth(args)
        print(f"peak resident memory: {result['x1']['peak_rss_mib']:,.0f} MiB on "
              f"{result['x1']['tokens']:,} tokens, {result['x100']['peak_rss_mib']:,.0f} MiB on "
              f"{result['x100']['tokens']:,} tokens: {result['growth']:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2), "utf-8")
        return None
    rows = [compare(name, args) for name in args.configs]
    table = markdown(rows, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), "utf-8")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", "utf-8")
    return None


if __name__ == "__main__":
    main()
