"""The two commands a user runs: `fillmask fit` on the quickstart, then `fillmask fill`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))


def fillmask(*args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "fillmask", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600,
                            env=None if env is None else {**os.environ, **env})
    if check and result.returncode != 0:
        raise AssertionError(f"fillmask {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result


def short_quickstart(steps: int) -> list[str]:
    """The README's quickstart command, shortened; it writes below runs/quickstart of the cwd."""
    return ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "10"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("quickstart")
    result = fillmask(*short_quickstart(20), cwd=cwd)
    (cwd / "output.txt").write_text(result.stdout + result.stderr)
    return cwd


@pytest.fixture(scope="module")
def quickstart_run(workdir: Path) -> Path:
    return workdir / "runs" / "quickstart"


def test_quickstart_trains_and_writes_checkpoint_and_logs(quickstart_run):
    last = quickstart_run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 20
    assert "tokenizer" in ckpt["fillmask"]
    assert ckpt["fillmask"]["encoder"]["init_args"]["vocab_size"] % 64 == 0
    assert list((quickstart_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (quickstart_run / "tensorboard" / "config.yaml").is_file()
    output = (quickstart_run.parents[1] / "output.txt").read_text()
    assert "fit done: 20 steps" in output and "accuracy" in output


def test_fill_prints_top_k_candidates_as_json(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    out = fillmask("fill", "--checkpoint", last, "--top-k", "4", "--json",
                   "The [MASK] statement exits a function.", "A [MASK] is a [MASK].",
                   cwd=quickstart_run).stdout.splitlines()
    first, second = (json.loads(line) for line in out)
    assert len(first["masks"]) == 1 and len(second["masks"]) == 2
    candidates = first["masks"][0]
    assert len(candidates) == 4
    assert set(candidates[0]) == {"token", "token_id", "score"}
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_fill_plain_text_and_input_without_mask(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    text = fillmask("fill", "--checkpoint", last, "Use the [MASK] module.", cwd=quickstart_run)
    assert "[MASK]:" in text.stdout
    bad = fillmask("fill", "--checkpoint", last, "no blank here", cwd=quickstart_run, check=False)
    assert bad.returncode == 2 and "has no [MASK] token" in bad.stderr


def test_fill_input_longer_than_the_model_is_one_clear_line(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    long = "word " * 200 + "[MASK]"
    result = fillmask("fill", "--checkpoint", last, long, cwd=quickstart_run, check=False)
    assert result.returncode == 2 and "more than the model's 64 positions" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_quickstart_model_leaves_fillmask_and_fills_masks_the_same(quickstart_run, tmp_path):
    """The README's model, exported, in a process where fillmask cannot be imported."""
    from fillmask.inference import FillMaskModel

    last = quickstart_run / "checkpoints" / "last.ckpt"
    out = fillmask("export", "--checkpoint", str(last), "--output", str(tmp_path / "hf"),
                   cwd=tmp_path).stdout
    assert "FillmaskForMaskedLM" in out and "trust_remote_code=True" in out
    text = "The [MASK] statement exits a function."
    jobs, results = tmp_path / "jobs.pt", tmp_path / "results.pt"
    torch.save({"cases": [], "pipeline": [{"folder": str(tmp_path / "hf"), "text": text,
                                           "top_k": 5}]}, jobs)
    env = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    side = subprocess.run([sys.executable, "-I", str(ROOT / "tests" / "transformers_side.py"),
                           str(jobs), str(results)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert side.returncode == 0, side.stderr[-3000:]
    theirs = torch.load(results, weights_only=False)["pipeline"][0]
    ours = FillMaskModel.load(last).fill([text], top_k=5)[0][0]
    assert theirs["ids"] == [c["token_id"] for c in ours]
    assert theirs["model_max_length"] == 64 and theirs["mask"] == "[MASK]"


def test_a_preempted_quickstart_resumes_in_its_phase_with_ckpt_path_last(tmp_path):
    """The phases split 12 steps 9 + 3; SIGTERM after step 10 stops the run in its decay."""
    stop = '{"class_path": "reliability_helpers.SignalAt", "init_args": {"step": 10}}'
    env = {"PYTHONPATH": str(ROOT / "tests")}
    first = fillmask(*short_quickstart(12), f"--trainer.callbacks+={stop}", cwd=tmp_path,
                     env=env, check=False)
    assert first.returncode == 75, first.stderr[-3000:]
    assert "stable (phase 1/2) from step 0: 9 steps" in first.stderr
    second = fillmask(*short_quickstart(12), "--ckpt_path", "last", cwd=tmp_path, env=env)
    assert "decay (phase 2/2) from step 9: 3 steps" in second.stderr
    assert "stable (phase 1/2)" not in second.stderr
    ckpt = torch.load(tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt",
                      map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12


def test_resuming_with_another_max_steps_is_refused_and_nothing_is_lost(quickstart_run):
    checkpoints = quickstart_run / "checkpoints"
    before = {f.name: f.read_bytes() for f in checkpoints.glob("*.ckpt")}
    result = fillmask(*short_quickstart(30), "--ckpt_path", "last",
                      cwd=quickstart_run.parents[1], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "phases of [15, 5] steps, this run plans [22, 8]" in result.stderr
    assert "trainer.max_steps" in result.stderr
    assert {f.name: f.read_bytes() for f in checkpoints.glob("*.ckpt")} == before


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, tmp_path, monkeypatch, capsys):
    # In this process, not a fresh one: the parse is what is tested, and one import of Lightning
    # for all the configs saves a few seconds each.
    from fillmask.cli import main

    monkeypatch.chdir(tmp_path)
    command = ["finetune", "fit"] if config.stem.startswith("finetune-") else ["fit"]
    with pytest.raises(SystemExit) as printed:
        main([*command, "--config", str(config), "--print_config"])
    out = capsys.readouterr().out
    assert printed.value.code in (0, None)
    assert "class_path" in out and ("encoder:" in out or "pretrained:" in out)


def test_unknown_corpus_is_one_clear_line(tmp_path):
    result = fillmask("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                      "--data.corpus", str(tmp_path / "missing.txt"), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "missing.txt" in result.stderr and "matches no file" in result.stderr
    assert "Traceback" not in result.stderr


def test_fill_with_missing_checkpoint(tmp_path):
    result = fillmask("fill", "--checkpoint", str(tmp_path / "none.ckpt"), "a [MASK]",
                      cwd=tmp_path, check=False)
    assert result.returncode == 2 and "none.ckpt does not exist" in result.stderr


def test_tokenizer_without_mask_token_is_one_clear_line(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "nomask.json"
    Tokenizer(models.WordLevel({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3},
                               unk_token="[UNK]")).save(str(path))
    result = fillmask("fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                      "--data.tokenizer", str(path), cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "nomask.json has no mask token" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("algorithm,mask", [("wordpiece", "[MASK]"), ("bpe", "<mask>"),
                                            ("unigram", "<mask>")])
def test_tokenizer_train_writes_a_usable_tokenizer(small_corpus, tmp_path, algorithm, mask):
    output = tmp_path / "tok.json"
    result = fillmask("tokenizer", "train", "--corpus", str(small_corpus), "--algorithm",
                      algorithm, "--vocab-size", "500", "--output", str(output), cwd=tmp_path)
    assert f"wrote {output}" in result.stdout
    from fillmask.data.tokenize import load_tokenizer, resolve_special_tokens

    tok, _ = load_tokenizer(output)
    special = resolve_special_tokens(tok)
    assert tok.id_to_token(special.mask_id) == mask
    assert tok.get_vocab_size() <= 500


# What a newcomer sees first.


def test_progress_bar_and_model_summary_read_right_under_max_steps(quickstart_run):
    output = (quickstart_run.parents[1] / "output.txt").read_text()
    assert "decay (2/2)" in output  # a phased run's bar names the phase, not "Epoch 1"
    assert "/-" not in output  # Lightning's bar said "Epoch 0/-2" under max_steps
    assert "Total params" in output
    assert "FLOPs" not in output  # a column of zeros and "Total FLOPs: 0" without measurement


def test_a_bar_without_phases_counts_epochs_without_a_negative_total():
    from types import SimpleNamespace

    from fillmask.callbacks import ProgressBar

    bar = ProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, lightning_module=SimpleNamespace())
    assert bar._get_train_description(3).split() == ["Epoch", "3"]
    bar._trainer.lightning_module.phase_label = "decay (2/2)"
    assert bar._get_train_description(1).strip() == "decay (2/2)"


def test_help_lists_the_commands_without_starting_lightning(tmp_path):
    result = fillmask("--help", cwd=tmp_path)
    for command in ("fit", "fill", "score", "export", "finetune", "tokenizer"):
        assert f"  {command} " in result.stdout
    probe = subprocess.run([sys.executable, "-c", (
        "import sys; from fillmask.cli import main; main(['--help']); "
        "print(sorted(m for m in ('lightning', 'torch', 'transformers') if m in sys.modules))")],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip().endswith("[]")
    unknown = fillmask("fitt", cwd=tmp_path, check=False)
    assert unknown.returncode == 2 and "unknown command 'fitt'" in unknown.stderr


def test_fill_and_score_never_import_lightning(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    code = ("import sys; from fillmask.cli import main; "
            f"main(['fill', '--checkpoint', {last!r}, 'The [MASK] statement.']); "
            f"main(['score', '--checkpoint', {last!r}, 'The import statement.']); "
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'transformers', 'datasets') "
            "if m in sys.modules))")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    assert probe.stdout.strip().splitlines()[-1] == "[]"


def test_score_of_an_empty_input_is_one_clear_line(quickstart_run):
    last = str(quickstart_run / "checkpoints" / "last.ckpt")
    result = fillmask("score", "--checkpoint", last, "A sentence.", "", cwd=quickstart_run,
                      check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "fillmask: error: input 2 is empty: there is no token to score; give a sentence of at "
        "least one word"]


@pytest.mark.parametrize(("override", "option", "reason"), [
    (("--data.masking.init_args.rate", "-0.1"), "masking.init_args.rate", "must lie in [0, 1]"),
    (("--model.init_args.encoder.init_args.num_heads", "3"), "encoder.init_args.",
     "is not divisible by num_heads=3"),
])
def test_a_value_a_constructor_rejects_is_one_line_naming_the_option(tmp_path, override,
                                                                      option, reason):
    result = fillmask(*short_quickstart(2), *override, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fillmask:")]
    assert len(errors) == 1 and option in errors[0] and reason in errors[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_second_run_in_the_same_folder_is_refused_and_nothing_is_lost(quickstart_run):
    checkpoints = quickstart_run / "checkpoints"
    before = {f.name: f.read_bytes() for f in checkpoints.glob("*.ckpt")}
    result = fillmask(*short_quickstart(20), cwd=quickstart_run.parents[1], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds a run" in result.stderr and "--ckpt_path last" in result.stderr
    assert {f.name: f.read_bytes() for f in checkpoints.glob("*.ckpt")} == before


def test_one_option_moves_the_whole_run(tmp_path):
    fillmask(*short_quickstart(12), "--trainer.default_root_dir", "elsewhere/run", cwd=tmp_path)
    run = tmp_path / "elsewhere" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "tensorboard" / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()
    # 12 steps is off the checkpoint schedule (every 500): the final state is saved anyway,
    # as a step checkpoint and as last.ckpt.
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 12 and (run / "checkpoints" / "step12.ckpt").is_file()


def logged_losses(run: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_two_fresh_processes_train_the_same_quickstart_bit_for_bit(tmp_path):
    """Each process builds the corpus and trains the WordPiece tokenizer itself (own cache)."""
    runs = []
    for name in ("first", "second"):
        cwd = tmp_path / name
        cwd.mkdir()
        fillmask(*short_quickstart(8), "--trainer.log_every_n_steps", "1", cwd=cwd,
                 env={"FILLMASK_CACHE": str(cwd / "cache")})
        runs.append(cwd / "runs" / "quickstart")
    first, second = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=False) for run in runs)
    assert first["fillmask"]["tokenizer"] == second["fillmask"]["tokenizer"]
    assert first["state_dict"].keys() == second["state_dict"].keys()
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k])
               for k in first["state_dict"])
    losses = logged_losses(runs[0])
    assert len(losses) == 8 and losses == logged_losses(runs[1])
