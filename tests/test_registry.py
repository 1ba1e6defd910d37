"""The plugin registry: entry points of installed distributions (fake ones, written as
``.dist-info`` folders on a temporary path) are discovered, validated and usable from YAML."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_helpers import make_distribution, toy_plugin

from fillmask import registry
from fillmask.registry import PluginError, PluginWarning, discover

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "assets" / "golden" / "tokenizer.json"
CORPUS = ROOT / "tests" / "assets" / "golden" / "corpus.txt"


@pytest.fixture
def on_path(monkeypatch):
    """Put folders on sys.path for this test only; the process-wide registry is rediscovered
    afterwards."""

    def add(folder: Path) -> Path:
        monkeypatch.syspath_prepend(str(folder))
        importlib.invalidate_caches()
        return folder

    registry.registry.cache_clear()
    yield add
    registry.registry.cache_clear()


def run_fillmask(*args: str, plugin_path: Path | None, cwd: Path
                 ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    paths = [str(plugin_path)] if plugin_path else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "fillmask", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_built_ins_are_registered_through_the_same_groups():
    found = discover()
    assert found.failures == []
    assert found.group("architectures")["BertEncoder"].distribution == "fillmask"
    assert {"MaskedLM", "SpanBoundaryLM", "ReplacedTokenDetection",
            "Distillation"} <= set(found.group("objectives"))
    assert {"TokenMasking", "WholeWordMasking", "SpanMasking"} <= set(found.group("maskings"))
    names = [c.name for c in found.group("objectives").values()]
    assert names == sorted(names)


def test_plugin_is_discovered_with_its_distribution_and_version(tmp_path, on_path):
    on_path(toy_plugin(tmp_path / "site"))
    toy = discover().group("architectures")["ToyEncoder"]
    assert (toy.distribution, toy.version) == ("fillmask-toy", "0.3.0")
    assert toy.class_path == "fillmask_toy.ToyEncoder" and toy.target == "fillmask_toy:ToyEncoder"
    from fillmask.architectures.base import Encoder

    assert issubclass(toy.cls, Encoder)


def test_broken_plugin_warns_naming_its_distribution_and_the_rest_work(tmp_path, on_path):
    site = toy_plugin(tmp_path / "site")
    make_distribution(site, "fillmask-broken", "1.2", {"broken_plugin": "import no_such_module\n"},
                      {"fillmask.maskings": {"BrokenMasking": "broken_plugin:BrokenMasking"}})
    make_distribution(site, "fillmask-wrong", "2.0", {"wrong_plugin": "class Thing:\n    pass\n"},
                      {"fillmask.objectives": {"Thing": "wrong_plugin:Thing"}})
    on_path(site)
    with pytest.warns(PluginWarning) as caught:
        found = discover()
    messages = " | ".join(str(w.message) for w in caught)
    assert "fillmask-broken 1.2" in messages and "No module named 'no_such_module'" in messages
    assert "fillmask-wrong 2.0" in messages and "not a subclass of EncoderObjective" in messages
    assert "ToyEncoder" in found.group("architectures")
    assert "TokenMasking" in found.group("maskings") and len(found.failures) == 2


def test_entry_name_must_be_the_class_name(tmp_path, on_path):
    site = make_distribution(tmp_path / "site", "fillmask-alias", "1.0",
                             {"alias_plugin": "from fillmask.masking.token import TokenMasking\n"},
                             {"fillmask.maskings": {"tokens": "alias_plugin:TokenMasking"}})
    on_path(site)
    with pytest.warns(PluginWarning, match="must be the class name 'TokenMasking'"):
        found = discover()
    assert "tokens" not in found.group("maskings")


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path, on_path):
    site = toy_plugin(tmp_path / "site")
    toy_plugin(site, name="other-toy", module="other_toy", version="9.9")
    on_path(site)
    with pytest.raises(PluginError) as error:
        discover()
    message = str(error.value)
    assert "'ToyEncoder'" in message and "fillmask-toy 0.3.0" in message
    assert "other-toy 9.9" in message and "uninstall one" in message
    result = run_fillmask("plugins", plugin_path=site, cwd=tmp_path)
    assert result.returncode == 2 and "other-toy 9.9" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugins_command_lists_components_and_skipped_plugins(tmp_path):
    site = toy_plugin(tmp_path / "site")
    make_distribution(site, "fillmask-broken", "1.2", {"broken_plugin": "raise RuntimeError('x')"},
                      {"fillmask.maskings": {"BrokenMasking": "broken_plugin:BrokenMasking"}})
    result = run_fillmask("plugins", plugin_path=site, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["ToyEncoder"][1:] == ["architectures", "fillmask-toy", "0.3.0",
                                      "fillmask_toy.ToyEncoder"]
    assert rows["MaskedLM"][1:3] == ["objectives", "fillmask"]
    assert "skipped: BrokenMasking" in result.stdout and "fillmask-broken 1.2" in result.stdout
    records = [json.loads(line) for line in run_fillmask(
        "plugins", "--json", plugin_path=site, cwd=tmp_path).stdout.splitlines()]
    toy = next(r for r in records if r.get("name") == "ToyEncoder")
    assert toy == {"name": "ToyEncoder", "group": "architectures", "distribution": "fillmask-toy",
                   "version": "0.3.0", "class_path": "fillmask_toy.ToyEncoder"}
    assert any("skipped" in r for r in records)


def toy_config(folder: Path, encoder_class: str, masking: str = "TokenMasking") -> Path:
    config = folder / "toy.yaml"
    config.write_text(f"""
seed_everything: 0
trainer:
  max_steps: 3
  logger: false
  enable_progress_bar: false
  limit_val_batches: 1
  num_sanity_val_steps: 0
  default_root_dir: {folder}
  callbacks:
    - class_path: ModelCheckpoint
      init_args: {{dirpath: {folder}/checkpoints, save_last: true}}
model:
  class_path: MaskedLM
  init_args:
    encoder:
      class_path: {encoder_class}
      init_args: {{hidden_size: 32, num_layers: 2, max_positions: 32}}
data:
  corpus: {CORPUS}
  tokenizer: {TOKENIZER}
  max_length: 32
  batch_size: 8
  masking: {{class_path: {masking}}}
""", encoding="utf-8")
    return config


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, Path]:
    """A plugin architecture trained by `fillmask fit` from YAML naming it by short name."""
    folder = tmp_path_factory.mktemp("toy-run")
    site = toy_plugin(folder / "site")
    result = run_fillmask("fit", "--config", str(toy_config(folder, "ToyEncoder")),
                          plugin_path=site, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, site


def test_short_name_trains_and_checkpoint_records_the_distribution(toy_run):
    folder, _ = toy_run
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert ckpt["global_step"] == 3
    info = ckpt["fillmask"]
    assert info["encoder"]["class_path"] == "fillmask_toy.ToyEncoder"
    assert info["provenance"]["encoder"] == {"distribution": "fillmask-toy", "version": "0.3.0"}
    assert info["provenance"]["objective"]["distribution"] == "fillmask"


def test_full_class_path_resolves_like_the_short_name(toy_run, tmp_path):
    folder, site = toy_run
    config = toy_config(tmp_path, "fillmask_toy.ToyEncoder", masking="SpanMasking")
    result = run_fillmask("fit", "--config", str(config), "--print_config", plugin_path=site,
                          cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: fillmask_toy.ToyEncoder" in result.stdout
    assert "class_path: fillmask.masking.span.SpanMasking" in result.stdout


def test_plugin_checkpoint_reloads_when_installed(toy_run):
    folder, site = toy_run
    last = str(folder / "checkpoints" / "last.ckpt")
    filled = run_fillmask("fill", "--checkpoint", last, "--json", "the [MASK] of a list",
                          plugin_path=site, cwd=folder)
    assert filled.returncode == 0, filled.stderr
    assert len(json.loads(filled.stdout)["masks"][0]) == 5
    validated = run_fillmask("validate", "--config", str(folder / "toy.yaml"), "--ckpt_path",
                             last, plugin_path=site, cwd=folder)
    assert validated.returncode == 0, validated.stderr[-3000:]


def test_plugin_checkpoint_without_the_plugin_names_the_distribution(toy_run):
    folder, _ = toy_run
    last = str(folder / "checkpoints" / "last.ckpt")
    filled = run_fillmask("fill", "--checkpoint", last, "the [MASK] is", plugin_path=None,
                          cwd=folder)
    assert filled.returncode == 2
    assert "fillmask-toy" in filled.stderr and "pip install fillmask-toy" in filled.stderr
    validated = run_fillmask("validate", "--config", str(folder / "toy.yaml"), "--ckpt_path",
                             last, plugin_path=None, cwd=folder)
    assert validated.returncode == 2 and "pip install fillmask-toy" in validated.stderr
    assert "Traceback" not in filled.stderr + validated.stderr
