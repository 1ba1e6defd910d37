"""The labelled task that benchmarks/pretraining_pays.py builds from Debian's package index."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pretraining_pays  # noqa: E402

INDEX = """\
Package: chess-engine
Source: chess
Description: strong chess engine for the command line
Section: games

Package: chess
Description: board game of strategy for two players
Section: games
Tag: game::strategy,
 use::gameplaying

Package: tetris-clone
Description: falling blocks puzzle for the terminal
Section: games

Package: copycat
Description: falling blocks puzzle for the terminal
Section: games

Package: synth
Description: software synthesiser with a MIDI keyboard
Section: contrib/sound

Package: pylib
Description: Python 3 module for parsing configuration files
Section: python

Package: tiny
Description: two words
Section: sound
"""


def test_one_description_per_source_and_nothing_shared_or_off_topic():
    items = pretraining_pays.debian_items(INDEX)
    texts = {label: sorted(text for _, text in pairs) for label, pairs in items.items()}
    # chess's own binary speaks for the source; the copied description is dropped from both
    # packages; python is a language section; "two words" is too short.
    assert texts == {"games": ["board game of strategy for two players"],
                     "sound": ["software synthesiser with a MIDI keyboard"]}


def test_the_split_is_by_key_and_balanced(tmp_path):
    items = {label: [(pretraining_pays.sha256(f"{label}{i}"), f"{label} text {i}")
                     for i in range(7)] for label in ("a", "b")}
    train, dev = pretraining_pays.build_task(items, tmp_path, 4, 2)
    rows = {path.stem: list(csv.DictReader(path.open())) for path in (train, dev)}
    assert [len(rows["train"]), len(rows["dev"])] == [8, 4]
    assert not {r["text"] for r in rows["train"]} & {r["text"] for r in rows["dev"]}
    assert sorted(r["label"] for r in rows["dev"]) == ["a", "a", "b", "b"]
    (tmp_path / "again").mkdir()
    _, dev_again = pretraining_pays.build_task(items, tmp_path / "again", 4, 2)
    assert dev_again.read_text() == dev.read_text()


def test_a_class_too_small_for_the_split_names_the_option(tmp_path):
    items = {"a": [("k", "only one")]}
    with pytest.raises(SystemExit, match="'a' has 1 items.*--train-per-class"):
        pretraining_pays.build_task(items, tmp_path, 4, 2)
