"""`fillmask fill` on many inputs: a file of inputs, an exported or transformers folder instead
of a checkpoint, batching that changes nothing, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import save_checkpoint
from tokenizers import Tokenizer

from fillmask.architectures.bert import BertEncoder
from fillmask.cli import main
from fillmask.inference import FillMaskModel
from fillmask.interop.export import export_checkpoint
from fillmask.objectives.mlm import MaskedLM

TOKENIZER = Path(__file__).resolve().parent / "assets" / "golden" / "tokenizer.json"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny post-LN BERT checkpoint (64 positions, golden tokenizer) and its export."""
    torch.manual_seed(0)
    model = MaskedLM(BertEncoder.preset("tiny", vocab_size=512, max_positions=64))
    with torch.no_grad():  # a trained head has a non-zero bias and LayerNorm
        for parameter in model.head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    root = tmp_path_factory.mktemp("fill")
    checkpoint = save_checkpoint(model, Tokenizer.from_file(str(TOKENIZER)), root / "tiny.ckpt")
    export_checkpoint(checkpoint, root / "exported")
    return checkpoint, root / "exported"


def fill(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["fill", *args])
    out, err = capsys.readouterr()
    return code, out, err


def inputs(count: int) -> list[str]:
    """Inputs of varied lengths, some with two masks."""
    words = "the module reads a list of files and returns their values".split()
    return [" ".join(words[: 2 + i % 9]) + " [MASK]" + (" of [MASK]" if i % 3 == 0 else "")
            for i in range(count)]


def test_batches_give_the_results_of_one_input_at_a_time(tiny):
    model = FillMaskModel.load(tiny[0])
    texts = inputs(23)
    batched = model.fill(texts, top_k=4, batch_size=5)
    for text, masks in zip(texts, batched, strict=True):
        (alone,) = model.fill([text], top_k=4)
        assert len(masks) == len(alone) == text.count("[MASK]")
        for ours, reference in zip(masks, alone, strict=True):
            assert [c["token_id"] for c in ours] == [c["token_id"] for c in reference]
            assert [c["score"] for c in ours] == pytest.approx(
                [c["score"] for c in reference], abs=1e-6)


def test_file_input_keeps_order_and_json_format(tiny, tmp_path, capsys):
    lines = inputs(40)
    file = tmp_path / "inputs.txt"
    file.write_text(lines[0] + "\n\n  \n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    code, out, _ = fill("--checkpoint", str(tiny[0]), "--json", "--top-k", "2",
                        "--batch-size", "8", "a [MASK] value", "--file", str(file),
                        capsys=capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in rows] == ["a [MASK] value", *lines]
    assert [len(r["masks"]) for r in rows] == [1, *(t.count("[MASK]") for t in lines)]
    assert set(rows[1]["masks"][0][0]) == {"token", "token_id", "score"}
    assert all(len(candidates) == 2 for r in rows for candidates in r["masks"])


def test_exported_folder_fills_like_its_checkpoint(tiny, capsys):
    checkpoint, folder = tiny
    texts = inputs(6)
    _, from_checkpoint, _ = fill("--checkpoint", str(checkpoint), "--json", *texts,
                                 capsys=capsys)
    code, from_folder, _ = fill("--checkpoint", str(folder), "--json", *texts, capsys=capsys)
    assert code == 0
    for ours, theirs in zip(from_folder.splitlines(), from_checkpoint.splitlines(), strict=True):
        a, b = json.loads(ours), json.loads(theirs)
        assert a["input"] == b["input"]
        for x, y in zip(a["masks"], b["masks"], strict=True):
            assert [c["token"] for c in x] == [c["token"] for c in y]
            assert [c["score"] for c in x] == pytest.approx([c["score"] for c in y], abs=1e-6)


def test_transformers_bert_folder_fills_with_transformers_probabilities(hf_bert_folder):
    from transformers import AutoTokenizer, BertForMaskedLM

    text = "the capital of france is [MASK] and the river is the [MASK] ."
    model = FillMaskModel.load(hf_bert_folder)
    masks = model.fill([text], top_k=3)[0]
    reference = BertForMaskedLM.from_pretrained(hf_bert_folder).eval()
    encoded = AutoTokenizer.from_pretrained(hf_bert_folder)(text, return_tensors="pt")
    with torch.no_grad():
        probs = reference(**encoded).logits[0].softmax(-1)  # (T, V)
    positions = (encoded["input_ids"][0] == 103).nonzero().squeeze(1)
    for candidates, position in zip(masks, positions.tolist(), strict=True):
        scores, ids = probs[position].topk(3)
        assert [c["token_id"] for c in candidates] == ids.tolist()
        assert [c["score"] for c in candidates] == pytest.approx(scores.tolist(), abs=1e-5)


def test_mistakes_are_one_line_with_exit_code_2(tiny, tmp_path, capsys):
    checkpoint, folder = tiny

    def error(*args: str, model: Path = checkpoint) -> str:
        code, _, err = fill("--checkpoint", str(model), *args, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    file = tmp_path / "inputs.txt"
    file.write_text("a [MASK]\n\n" + "word " * 100 + "[MASK]\n")
    assert re.search(rf"{re.escape(str(file))} line 3 has \d+ tokens, more than the model's 64 "
                     "positions", error("--file", str(file)))
    assert re.search(r"input 2 has \d+ tokens", error("a [MASK]", "word " * 100 + "[MASK]"))
    file.write_text("a [MASK]\nno blank here\n")
    assert f"{file} line 2 ('no blank here') has no [MASK] token" in error("--file", str(file))
    assert "missing.txt does not exist" in error("--file", str(tmp_path / "missing.txt"))
    file.write_bytes(b"a [MASK]\ncaf\xe9 [MASK]\n")
    assert f"{file} line 2 is not UTF-8 text" in error("--file", str(file))
    assert "none.ckpt does not exist" in error("a [MASK]", model=tmp_path / "none.ckpt")
    assert "device 'nosuch' is not a torch device" in error("a [MASK]", "--device", "nosuch")

    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert "holds a BertModel without a masked-LM head" in error("a [MASK]", model=bare)

    (tmp_path / "empty.txt").write_text("\n\n")
    for args in (["--file", str(tmp_path / "empty.txt")], ["a [MASK]", "--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["fill", "--checkpoint", str(checkpoint), *args])
        assert exit_info.value.code == 2


def test_command_reads_standard_input(tiny):
    result = subprocess.run([sys.executable, "-m", "fillmask", "fill", "--checkpoint",
                             str(tiny[1]), "--file", "-", "--top-k", "1"],
                            input="the [MASK] module\n\nreads [MASK] files\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "the [MASK] module" and lines[1].startswith("  [MASK]: ")
    assert lines[2] == "reads [MASK] files" and len(lines) == 4
