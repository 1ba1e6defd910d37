"""`fillmask score`: pseudo-log-likelihoods equal a plain transformers loop (one masked copy per
forward pass), whole-word scoring, minimal pairs, JSON output and one-line errors."""

from __future__ import annotations

import functools
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from test_export import save_checkpoint
from tokenizers import Tokenizer, models, normalizers

from fillmask.architectures.bert import BertEncoder
from fillmask.cli import main
from fillmask.errors import FillmaskError
from fillmask.inference import FillMaskModel
from fillmask.interop.hf import import_bert
from fillmask.objectives.mlm import MaskedLM
from fillmask.scoring import (
    mask_groups,
    minimal_pair_accuracy,
    pseudo_log_likelihoods,
    pseudo_perplexity,
    read_pairs,
)

TOKENIZER = Path(__file__).resolve().parent / "assets" / "golden" / "tokenizer.json"
SENTENCES = [
    "The cat sat on the mat.",
    "Unbelievably, tokenization works here!",  # words of several pieces
    "A snowman \u2603 melts quickly in spring.",  # the snowman is [UNK]: not scored
]
PAIRS = [
    ("The cats sleep on the sofa.", "The cats sleeps on the sofa."),
    ("She has eaten the apple.", "She have eaten the apple."),
    ("Who did you see?", "Who did you saw?"),
    ("These books are heavy.", "These books is heavy."),
    ("He drove to the station.", "He drived to the station."),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert(hf_bert_folder: Path) -> FillMaskModel:
    """The real transformers BERT folder, imported into fillmask."""
    return FillMaskModel.from_objective(*import_bert(hf_bert_folder))


@pytest.fixture(scope="module")
def reference(hf_bert_folder: Path):
    from transformers import AutoTokenizer, BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(hf_bert_folder).eval()
    return model, AutoTokenizer.from_pretrained(hf_bert_folder)


@functools.cache
def reference_pll(reference, text: str, whole_word: bool = False) -> tuple[float, int]:
    """PLL with transformers, the straightforward way: one masked copy per forward pass."""
    model, tokenizer = reference
    encoded = tokenizer(text)
    ids = torch.tensor(encoded["input_ids"])  # (T,)
    words = encoded.word_ids()
    special = set(tokenizer.all_special_ids)
    groups: dict[int, list[int]] = {}
    for position, token in enumerate(ids.tolist()):
        if token not in special:
            groups.setdefault(words[position] if whole_word else position, []).append(position)
    total = 0.0
    for group in groups.values():
        masked = ids.clone()
        masked[group] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=masked[None]).logits[0, group]  # (G, V)
        total += logits.log_softmax(-1)[range(len(group)), ids[group]].sum().item()
    return total, sum(len(group) for group in groups.values())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny post-LN BERT checkpoint with the golden tokenizer (64 positions)."""
    torch.manual_seed(0)
    model = MaskedLM(BertEncoder.preset("tiny", vocab_size=512, max_positions=64))
    with torch.no_grad():  # a trained head has a non-zero bias and LayerNorm
        for parameter in model.head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    path = tmp_path_factory.mktemp("score") / "tiny.ckpt"
    return save_checkpoint(model, Tokenizer.from_file(str(TOKENIZER)), path)


def score(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["score", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("whole_word", [False, True], ids=["token", "whole-word"])
def test_pll_equals_transformers_one_copy_at_a_time(bert, reference, whole_word):
    ours = pseudo_log_likelihoods(bert, SENTENCES, whole_word=whole_word, batch_size=5)
    for sentence, scored in zip(SENTENCES, ours, strict=True):
        pll, tokens = reference_pll(reference, sentence, whole_word)
        assert scored.tokens == tokens
        assert scored.pll == pytest.approx(pll, abs=1e-4)
    assert "[UNK]" not in ours[2].scored_tokens and ours[2].tokens == 9
    assert ours[1].scored_tokens[:2] == ("un", "##bel")


def test_whole_word_masks_every_piece_of_a_word_together(bert):
    by_token, by_word = (pseudo_log_likelihoods(bert, SENTENCES, whole_word=w) for w in (0, 1))
    assert by_word[0].pll == pytest.approx(by_token[0].pll)  # one piece per word: the same
    assert by_word[1].tokens == by_token[1].tokens == 11
    assert by_word[1].pll < by_token[1].pll - 1  # "un ##bel ##ie ##va ##bly" hides itself
    encoding = bert.tokenizer.encode(SENTENCES[1])
    assert mask_groups(bert, SENTENCES[1], encoding, whole_word=True)[:3] == [
        (1, 2, 3, 4, 5), (6,), (7, 8)]


def test_words_from_offsets_without_a_pre_tokenizer():
    """A SentencePiece-style tokenizer without a pre-tokenizer has no word ids: pieces whose
    text touches form a word, and a piece made from a space starts one."""
    vocab = [("<unk>", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[MASK]", 0.0), ("[PAD]", 0.0),
             ("\u2581the", -1.0), ("\u2581ca", -2.0), ("t", -2.0), ("s", -3.0), ("\u2581", -4.0)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                                 normalizers.Replace(" ", "\u2581")])
    model = FillMaskModel.from_objective(
        MaskedLM(BertEncoder.preset("tiny", vocab_size=64)), tokenizer)
    text = "the cats the"
    encoding = tokenizer.encode(text)
    assert encoding.tokens == ["\u2581the", "\u2581ca", "t", "s", "\u2581the"]
    assert mask_groups(model, text, encoding, whole_word=True) == [(0,), (1, 2, 3), (4,)]
    assert len(mask_groups(model, text, encoding, whole_word=False)) == 5


def test_batch_size_does_not_change_scores(checkpoint):
    model = FillMaskModel.load(checkpoint)
    texts = ["a list holds values .", "the import statement loads a module", "x", "open files"]
    one = pseudo_log_likelihoods(model, texts, batch_size=1)
    for batch_size in (3, 64):
        many = pseudo_log_likelihoods(model, texts, batch_size=batch_size)
        assert [s.tokens for s in many] == [s.tokens for s in one]
        assert [s.pll for s in many] == pytest.approx([s.pll for s in one], abs=1e-5)
    assert pseudo_perplexity(one) == pytest.approx(
        math.exp(-sum(s.pll for s in one) / sum(s.tokens for s in one)))
    assert math.isnan(pseudo_perplexity([]))


def test_minimal_pair_accuracy_equals_transformers(bert, reference, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"good": g, "bad": b, "UID": "agreement"}) for g, b in PAIRS[:3]]
    lines += ["", *(json.dumps({"sentence_good": g, "sentence_bad": b}) for g, b in PAIRS[3:])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = read_pairs(str(path))
    assert [p.line for p in pairs] == [1, 2, 3, 5, 6]
    expected = [reference_pll(reference, g)[0] > reference_pll(reference, b)[0] for g, b in PAIRS]
    result = minimal_pair_accuracy(bert, pairs, batch_size=16)
    assert [pair.correct for pair in result.pairs] == expected
    assert result.correct == sum(expected) and result.total == 5
    assert 0 < result.correct < 5  # the comparison can go either way on this model
    for pair, (good, _) in zip(result.pairs, PAIRS, strict=True):
        assert pair.good.pll == pytest.approx(reference_pll(reference, good)[0], abs=1e-4)

    whole = minimal_pair_accuracy(bert, PAIRS, whole_word=True)
    expected_whole = [reference_pll(reference, g, True)[0] > reference_pll(reference, b, True)[0]
                      for g, b in PAIRS]
    assert [pair.correct for pair in whole.pairs] == expected_whole


def test_pairs_on_the_command_line(hf_bert_folder, tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"good": g, "bad": b}) + "\n" for g, b in PAIRS[:2]))
    second.write_text("".join(json.dumps({"good": g, "bad": b}) + "\n" for g, b in PAIRS[2:]))
    code, out, _ = score("--checkpoint", str(hf_bert_folder), "--pairs", str(first),
                         str(second), capsys=capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{first}: ") and "of 2 pairs correct" in lines[0]
    assert lines[2].startswith("all: ") and "of 5 pairs correct" in lines[2]

    code, out, _ = score("--checkpoint", str(hf_bert_folder), "--pairs", str(first), "--json",
                         capsys=capsys)
    *rows, summary = (json.loads(line) for line in out.splitlines())
    assert [r["line"] for r in rows] == [1, 2] and rows[0]["good"] == PAIRS[0][0]
    assert all(r["correct"] == (r["pll_good"] > r["pll_bad"]) for r in rows)
    counts = summary["summary"]
    assert counts["pairs"] == 2 and counts["correct"] == sum(r["correct"] for r in rows)
    assert counts["files"][str(first)]["pairs"] == 2


def test_json_output_file_input_and_summary(checkpoint, tmp_path, capsys, monkeypatch):
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a list holds values .\n\n   \nthe import statement loads a module\n")
    code, out, _ = score("--checkpoint", str(checkpoint), "--json", "--file", str(sentences),
                         "open files", capsys=capsys)
    assert code == 0
    *rows, summary = (json.loads(line) for line in out.splitlines())
    assert [r["input"] for r in rows] == ["open files", "a list holds values .",
                                          "the import statement loads a module"]
    api = pseudo_log_likelihoods(FillMaskModel.load(checkpoint), [r["input"] for r in rows])
    assert [r["pll"] for r in rows] == pytest.approx([s.pll for s in api], abs=1e-6)
    assert [r["tokens"] for r in rows] == [s.tokens for s in api]
    totals = summary["summary"]
    assert totals["sentences"] == 3 and totals["tokens"] == sum(r["tokens"] for r in rows)
    assert totals["pseudo_perplexity"] == pytest.approx(
        math.exp(-sum(r["pll"] for r in rows) / totals["tokens"]))

    monkeypatch.setattr("sys.stdin", io.StringIO("open files\n\nx y\n"))
    code, out, _ = score("--checkpoint", str(checkpoint), "--whole-word", "--file", "-",
                         capsys=capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["PLL", "tokens", "sentence"]
    assert lines[1].endswith("  open files") and lines[2].endswith("  x y")
    assert lines[3].startswith("pseudo-perplexity ") and "of 2 sentences" in lines[3]


def test_mistakes_are_one_line_with_exit_code_2(checkpoint, tmp_path, capsys):
    def error(*args: str) -> str:
        code, _, err = score("--checkpoint", str(checkpoint), *args, capsys=capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    assert re.search(r"input 2 has \d+ tokens, more than the model's 64 positions",
                     error("a b", "word " * 200))
    long_file = tmp_path / "long.txt"
    long_file.write_text("short one\n\n" + "word " * 100 + "\n")
    assert f"{long_file} line 3 has " in error("--file", str(long_file))
    assert "missing.txt does not exist" in error("--file", str(tmp_path / "missing.txt"))

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"good": "a b", "bad": "b a"}\nnot json\n')
    assert f"{pairs} line 2 is not valid JSON" in error("--pairs", str(pairs))
    pairs.write_text('{"good": "a b", "bad": "b a"}\n{"good": "a b", "label": 1}\n')
    assert f"{pairs} line 2 lacks the key 'bad'" in error("--pairs", str(pairs))
    pairs.write_text('["a", "b"]\n')
    assert f"{pairs} line 1 is not a JSON object" in error("--pairs", str(pairs))
    pairs.write_text('{"good": "a", "bad": "' + "word " * 100 + '"}\n')
    assert f"the bad sentence of {pairs} line 1 has " in error("--pairs", str(pairs))

    code, _, err = score("--checkpoint", str(tmp_path / "none.ckpt"), "a b", capsys=capsys)
    assert code == 2 and "none.ckpt does not exist" in err and "Traceback" not in err
    for args in (["a b", "--pairs", str(pairs)], [], ["a b", "--batch-size", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["score", "--checkpoint", str(checkpoint), *args])
        assert exit_info.value.code == 2


def test_api_reports_the_input_that_is_too_long(checkpoint):
    model = FillMaskModel.load(checkpoint)
    with pytest.raises(FillmaskError, match=r"input 3 has \d+ tokens"):
        pseudo_log_likelihoods(model, ["a", "b", "word " * 100])
