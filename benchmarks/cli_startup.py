"""Start-up time of the `fillmask` command against the floor every torch program pays.

The reference is `python -c "import torch"`: a command that uses a model cannot start faster
than the library it runs on. Each measured command runs in a fresh process, `--repeats` times,
the three kinds alternating so that machine drift hits them all; the median wall time of each
and its ratio to the torch import are printed:

- `fillmask --help` (target: at most 1.3x the torch import),
- `fillmask fill --checkpoint CKPT "The [MASK] statement exits a function."` (target: 1.8x),
  on the quickstart's model (a checkpoint of `configs/quickstart.yaml`: hidden 128, 4 layers,
  2,048-token WordPiece). Without `--checkpoint` the script trains that model for 2 steps in a
  temporary folder first (the weights do not change the time).

    python benchmarks/cli_startup.py [--checkpoint runs/quickstart/checkpoints/last.ckpt]
                                     [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCE = "The [MASK] statement exits a function."
TARGETS = {"fillmask --help": 1.3, "fillmask fill": 1.8}


def fillmask_command() -> list[str]:
    """The installed console script next to this interpreter (what users type), else -m."""
    script = Path(sys.executable).with_name("fillmask")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fillmask"]


def quickstart_checkpoint(folder: Path) -> Path:
    """Train the quickstart model for 2 steps in ``folder``; its ``last.ckpt``."""
    subprocess.run([*fillmask_command(), "fit", "--config", str(ROOT / "configs" /
                    "quickstart.yaml"), "--trainer.max_steps", "2", "--trainer.default_root_dir",
                    str(folder / "run"), "--trainer.enable_progress_bar", "false"],
                   check=True, capture_output=True)
    return folder / "run" / "checkpoints" / "last.ckpt"


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(checkpoint: Path, repeats: int) -> dict[str, list[float]]:
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "fillmask --help": [*fillmask_command(), "--help"],
        "fillmask fill": [*fillmask_command(), "fill", "--checkpoint", str(checkpoint), SENTENCE],
    }
    for command in commands.values():  # warm the file cache: every process reads the same files
        wall_time(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            times[name].append(wall_time(command))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a fillmask checkpoint of the "
                        "quickstart model (default: train one for 2 steps)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="fillmask-startup-"))
    try:
        checkpoint = args.checkpoint or quickstart_checkpoint(scratch)
        times = measure(checkpoint, args.repeats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    floor = medians["python -c 'import torch'"]
    print(f"{'command':28} {'median s':>9} {'ratio':>6} {'target':>7}   ({args.repeats} runs)")
    report = {}
    for name, median in medians.items():
        ratio = median / floor
        target = TARGETS.get(name)
        met = "" if target is None else ("ok" if ratio <= target else "MISSED")
        verdict = "" if target is None else f"{target:6.1f}x {met}"
        print(f"{name:28} {median:9.2f} {ratio:5.2f}x {verdict}")
        report[name] = {"median_s": median, "ratio": ratio, "target": target,
                        "times_s": times[name]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
