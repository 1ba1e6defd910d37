"""The `fillmask` command: fit/validate/test/predict (LightningCLI, in fillmask.fit) plus fill,
score, embed, probe, evaluate, export, data, inspect, finetune, plugins and tokenizer.

Nothing heavy is imported here: each command imports what it needs when it runs, so
``fillmask --help`` starts at once and ``fillmask fill`` never imports Lightning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fillmask.errors import PREEMPTED_EXIT_CODE, FillmaskError


def plugins_main(argv: list[str]) -> int:
    from fillmask.registry import GROUPS, registry

    parser = argparse.ArgumentParser(prog="fillmask plugins", description=(
        "List the architectures, objectives and maskings that installed packages register "
        "(fillmask's own included), and plugins that failed to load."))
    parser.add_argument("--json", action="store_true", help="one JSON object per component")
    args = parser.parse_args(argv)
    found = registry()
    rows = [(c.name, c.group, c.distribution, c.version, c.class_path) for c in found]
    if args.json:
        keys = ("name", "group", "distribution", "version", "class_path")
        for row in rows:
            print(json.dumps(dict(zip(keys, row, strict=True))))
        for problem in found.failures:
            print(json.dumps({"skipped": problem}))
        return 0
    header = ("name", "group", "distribution", "version", "class")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    counts = ", ".join(f"{len(found.group(g))} {g}" for g in GROUPS)
    print(f"\n{counts}; use a name as `class_path: NAME` in a config")
    for problem in found.failures:
        print(f"skipped: {problem}")
    return 0


def fill_main(argv: list[str]) -> int:
    from fillmask.inference import FillMaskModel, Inputs, InputTooLongError, check_device

    parser = argparse.ArgumentParser(prog="fillmask fill", description=(
        "Predict the tokens behind the mask token ([MASK] or <mask>) of each input."))
    parser.add_argument("inputs", nargs="*", help="texts with one or more mask tokens")
    parser.add_argument("--file", help="also read inputs from this file, one per line (blank "
                        "lines skipped; - reads standard input)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fillmask "
                        "fit, or a folder written by fillmask export (or a transformers folder)")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per mask (default 5)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="inputs per forward pass (default 32)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="one JSON object per input")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be at least 1")
    inputs = Inputs.collect(args.inputs, args.file)
    if not inputs.texts:
        parser.error("give at least one input text, or --file with one per line")
    model = FillMaskModel.load(args.checkpoint, check_device(args.device))
    mask = model.mask_token()
    missing = next((i for i, text in enumerate(inputs.texts) if mask not in text), None)
    if missing is not None:
        raise FillmaskError(f"{inputs.labels[missing]} ({inputs.texts[missing]!r}) has no {mask} "
                            f"token; write {mask} where a word is missing")
    try:
        filled = model.fill(inputs.texts, args.top_k, args.batch_size)
    except InputTooLongError as error:
        raise error.named(inputs.labels) from None
    for text, masks in zip(inputs.texts, filled, strict=True):
        if args.json:
            print(json.dumps({"input": text, "masks": masks}))
            continue
        print(text)
        for index, candidates in enumerate(masks):
            label = f"  {mask} #{index + 1}:" if len(masks) > 1 else f"  {mask}:"
            print(label, ", ".join(f"{c['token']} ({c['score']:.3f})" for c in candidates))
    return 0


def score_main(argv: list[str]) -> int:
    from fillmask.inference import FillMaskModel, Inputs, InputTooLongError, check_device
    from fillmask.scoring import DEFAULT_BATCH_SIZE, print_pairs, print_scores

    parser = argparse.ArgumentParser(prog="fillmask score", description=(
        "Pseudo-log-likelihood of sentences (each token masked in turn), pseudo-perplexity, "
        "and minimal-pair accuracy (BLiMP)."))
    parser.add_argument("inputs", nargs="*", help="sentences to score")
    parser.add_argument("--file", help="also read sentences from this file, one per line "
                        "(blank lines skipped; - reads standard input)")
    parser.add_argument("--pairs", nargs="+", metavar="FILE.jsonl", help="minimal pairs, one "
                        'JSON object per line: {"good": ..., "bad": ...} (or BLiMP\'s '
                        "sentence_good/sentence_bad); prints the share with PLL(good) > PLL(bad)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by fillmask "
                        "fit, or a folder written by fillmask export (or a transformers folder)")
    parser.add_argument("--whole-word", action="store_true",
                        help="mask all pieces of a word together")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"masked copies per forward pass (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per sentence (or pair), then a summary object")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.pairs and (args.inputs or args.file):
        parser.error("give sentences (positional or --file) or --pairs, not both")
    inputs = None if args.pairs else Inputs.collect(args.inputs, args.file)
    if inputs is not None and not inputs.texts:
        parser.error("give at least one sentence, --file with one per line, or --pairs")
    blank = next((i for i, text in enumerate(inputs.texts if inputs else []) if not text.strip()),
                 None)
    if blank is not None:
        raise FillmaskError(f"{inputs.labels[blank]} is empty: there is no token to score; give "
                            "a sentence of at least one word")
    model = FillMaskModel.load(args.checkpoint, check_device(args.device))
    options = {"whole_word": args.whole_word, "batch_size": args.batch_size, "as_json": args.json}
    if inputs is None:
        print_pairs(model, args.pairs, **options)
        return 0
    try:
        print_scores(model, inputs.texts, **options)
    except InputTooLongError as error:
        raise error.named(inputs.labels) from None
    return 0


def tokenizer_main(argv: list[str]) -> int:
    from fillmask.data.corpus import load_corpus
    from fillmask.data.tokenize import TokenizerTraining, batched, train_tokenizer

    parser = argparse.ArgumentParser(prog="fillmask tokenizer", description="Tokenizer tools.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a tokenizer on a corpus's training split")
    train.add_argument("--corpus", default="python-docs",
                       help="embedded corpus name, files/globs, or a saved datasets folder")
    train.add_argument("--text-column", default="text")
    train.add_argument("--algorithm", choices=["wordpiece", "bpe", "unigram"], default="wordpiece")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--cased", action="store_true", help="keep case and accents")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    args = parser.parse_args(argv)
    options = TokenizerTraining(args.algorithm, args.vocab_size, not args.cased, args.min_frequency)
    corpus = load_corpus(args.corpus.split(",") if "," in args.corpus else args.corpus,
                         args.text_column)
    tok = train_tokenizer(lambda: (t for b in batched(corpus["train"]["text"]) for t in b), options)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    print(f"wrote {output} ({tok.get_vocab_size()} tokens, {args.algorithm})")
    return 0


def inspect_main(argv: list[str]) -> int:
    from fillmask.inspection import inspect_main as run

    return run(argv)


def finetune_main(argv: list[str]) -> int:
    from fillmask.finetune import finetune_main as run

    return run(argv)


def embed_main(argv: list[str]) -> int:
    from fillmask.embedding import embed_main as run

    return run(argv)


def probe_main(argv: list[str]) -> int:
    from fillmask.probing import probe_main as run

    return run(argv)


def evaluate_main(argv: list[str]) -> int:
    from fillmask.evaluation import evaluate_main as run

    return run(argv)


def data_main(argv: list[str]) -> int:
    from fillmask.data.prepare import data_main as run

    return run(argv)


def merge_main(argv: list[str]) -> int:
    from fillmask.merging import merge_main as run

    return run(argv)


def export_main(argv: list[str]) -> int:
    from fillmask.interop.export import export_main as run

    return run(argv)


SUBCOMMANDS = {"fill": fill_main, "tokenizer": tokenizer_main, "plugins": plugins_main,
               "inspect": inspect_main, "finetune": finetune_main, "export": export_main,
               "score": score_main, "data": data_main, "embed": embed_main,
               "probe": probe_main, "evaluate": evaluate_main, "merge": merge_main}
"""Commands of their own; the LightningCLI ones (fit, validate, ...) run in fillmask.fit."""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

HELP = """usage: fillmask COMMAND [options]   (fillmask COMMAND --help for its options)

Train fill-mask (masked-language-model) encoders with Lightning, and use them.

training (LightningCLI: one YAML describes a run, --config FILE, --print_config):
  fit        train: fillmask fit --config configs/quickstart.yaml
  validate   validation metrics of a checkpoint (--ckpt_path)
  test       test metrics of a checkpoint (--ckpt_path)
  predict    run the model's predict step
  finetune   fine-tune a pretrained encoder: classification, NER, sentence
             embeddings, reranking (fit, validate, test)
  evaluate   fine-tune encoders on a suite of tasks (lr sweep x seeds) and print the table

using a model (a checkpoint or a folder written by export):
  fill       predict the tokens behind [MASK] in sentences
  score      pseudo-log-likelihood, pseudo-perplexity, minimal pairs (BLiMP)
  embed      sentence embeddings of a file's lines, as a .npy matrix
  probe      cloze probing of facts (LAMA): precision at 1 and 10 per relation
  export     write a checkpoint as a transformers folder
  merge      average checkpoints (mean) or TIES-merge them into one checkpoint

data and components:
  data       prepare (tokenise, pack and cache) or shard a run's corpus
  tokenizer  train a tokenizer on a corpus
  inspect    show what a config's data and masking produce
  plugins    list the installed architectures, objectives and maskings
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fillmask`` command; ``argv`` defaults to the command line."""
    words = sys.argv[1:] if argv is None else argv
    if not words or words[0] in ("-h", "--help", "help"):
        print(HELP, end="")
        return 0 if words else 2
    command = SUBCOMMANDS.get(words[0])
    if command is None and not (words[0] in LIGHTNING_COMMANDS or words[0].startswith("-")):
        print(f"fillmask: error: unknown command {words[0]!r}; choose one of "
              f"{', '.join([*LIGHTNING_COMMANDS, *SUBCOMMANDS])} (fillmask --help)",
              file=sys.stderr)
        return 2
    try:
        if command is not None:
            return command(words[1:])
        from fillmask.fit import run_lightning

        run_lightning(argv)
    except FillmaskError as error:
        print(f"fillmask: error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:
        if not _preempted(error):
            raise
        print("fillmask: preempted (SIGTERM/SIGUSR1): checkpoint saved; run the same command "
              "with --ckpt_path last to continue", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def _preempted(error: BaseException) -> bool:
    """Whether ``error`` is Lightning's stop on SIGTERM (looked up only if Lightning ran)."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(error, exceptions.SIGTERMException)
