"""`fillmask inspect`: the batches a config produces, decoded with masks marked, or as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fillmask.inspection import inspect_main


def write_config(tmp_path: Path, corpus: Path, masking: str, packing: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(f"""
model:
  encoder: {{class_path: BertEncoder}}
trainer: {{max_steps: 1}}
data:
  corpus: {corpus}
  tokenizer_training: {{algorithm: bpe, vocab_size: 600}}
  max_length: 48
  batch_size: 4
  packing: {{class_path: {packing}}}
  masking: {{class_path: {masking}}}
""", encoding="utf-8")
    return path


def test_text_view_marks_masks_and_prints_statistics(small_corpus, tmp_path, capsys):
    config = write_config(tmp_path, small_corpus, "WholeWordMasking", "DocumentPacking")
    assert inspect_main(["--config", str(config), "--batches", "2", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "DocumentPacking (efficiency" in out and "WholeWordMasking (dynamic)" in out
    assert out.count("\nbatch ") == 2 and "documents per sample" in out
    assert "masked " in out and "mask " in out and "padding " in out
    sample_lines = [line for line in out.splitlines() if line.startswith("  [")]
    assert len(sample_lines) == 4 and any("{" in line for line in sample_lines)


def test_json_has_ids_labels_word_ids_and_spans(small_corpus, tmp_path):
    config = write_config(tmp_path, small_corpus, "SpanMasking", "ChunkPacking")
    out = tmp_path / "samples.jsonl"
    assert inspect_main(["--config", str(config), "--batches", "2", "--json", str(out),
                         "--data.batch_size", "3"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and sum(bool(r["spans"]) for r in records) >= 4
    for record in records:
        assert len(record["input_ids"]) == len(record["labels"]) == len(record["word_ids"]) == 48
        masked = {i for i, label in enumerate(record["labels"]) if label != -100}
        in_spans = {i for start, end in record["spans"] for i in range(start, end)}
        assert masked == in_spans
        for start, end in record["spans"]:
            assert all(record["labels"][i] == record["original_ids"][i] for i in range(start, end))


@pytest.mark.parametrize("args,message", [
    (["--trainer.max_steps", "3"], "inspect takes --data.* overrides only"),
])
def test_bad_options_are_one_clear_line(small_corpus, tmp_path, args, message, capsys):
    config = write_config(tmp_path, small_corpus, "TokenMasking", "ChunkPacking")
    with pytest.raises(SystemExit):
        inspect_main(["--config", str(config), *args])
    assert message in capsys.readouterr().err


def test_missing_config_and_bad_data_option(tmp_path, capsys):
    assert inspect_main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml does not exist" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  max_length: many\n", encoding="utf-8")
    assert inspect_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "max_length" in err and "Traceback" not in err
