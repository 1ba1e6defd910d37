"""`fillmask merge`: mean and TIES merges of checkpoints, which fill masks, export and fine-tune
like any checkpoint; mismatched inputs are one line and nothing is overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_export import TOKENIZER, padded_batch, save_checkpoint
from tokenizers import Tokenizer

from fillmask.architectures.bert import BertEncoder
from fillmask.cli import main
from fillmask.inference import FillMaskModel
from fillmask.interop.export import export_checkpoint
from fillmask.merging import MergeError, merge_states, trim
from fillmask.objectives.base import load_objective
from fillmask.objectives.classify import SequenceClassification
from fillmask.objectives.mlm import MaskedLM
from fillmask.testing import fit_losses


def variant(seed: int, hidden: int = 32, noise: float = 0.05) -> MaskedLM:
    """The same initial model, each variant moved by its own noise (as runs from one base)."""
    torch.manual_seed(0)
    encoder = BertEncoder.preset("tiny", vocab_size=512, max_positions=64, hidden_size=hidden,
                                 num_heads=2, intermediate_size=2 * hidden)
    model = MaskedLM(encoder).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("merge")
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    paths = {name: save_checkpoint(variant(seed, noise=0.0 if name == "base" else 0.05),
                                   tokenizer, folder / f"{name}.ckpt")
             for seed, name in enumerate(["base", "a", "b", "c"])}
    paths["wide"] = save_checkpoint(variant(9, hidden=48), tokenizer, folder / "wide.ckpt")
    return paths


def states(*paths: Path) -> list[dict[str, torch.Tensor]]:
    return [load_objective(p)[0].state_dict() for p in paths]


def test_mean_merge_is_the_weighted_average(checkpoints, tmp_path):
    a, b, c = states(checkpoints["a"], checkpoints["b"], checkpoints["c"])
    out = tmp_path / "soup.ckpt"
    assert main(["merge", "--checkpoints", str(checkpoints["a"]), str(checkpoints["b"]),
                 str(checkpoints["c"]), "--weights", "1", "1", "2", "--output", str(out)]) == 0
    merged, _ = load_objective(out)
    for name, value in merged.state_dict().items():
        expected = (a[name] + b[name] + 2 * c[name]) / 4 if value.is_floating_point() else a[name]
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-6)
    saved = torch.load(out, weights_only=False)
    assert "optimizer_states" not in saved and saved["fillmask"]["merged"]["method"] == "mean"
    assert saved["fillmask"]["merged"]["weights"] == pytest.approx([0.25, 0.25, 0.5])


def test_ties_trims_elects_a_sign_and_averages_the_agreeing_changes():
    base = {"w": torch.zeros(4)}
    changes = [torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([2.0, 2.0, -0.1, -1.0]),
               torch.tensor([-1.0, 1.5, 0.2, -4.0])]
    full = merge_states([{"w": c} for c in changes], "ties", base=base, density=1.0)["w"]
    # signs of the sums (2, 1.5, 0.2, -2); the agreeing entries' means.
    torch.testing.assert_close(full, torch.tensor([1.5, 1.75, 0.15, -2.5]))
    # density 0.5 keeps each change's two largest entries: (0,-2,0,3), (2,2,0,0), (0,1.5,0,-4);
    # sums (2, 1.5, 0, -1): entry 2 has no elected sign and stays at the base.
    half = merge_states([{"w": c} for c in changes], "ties", base=base, density=0.5)["w"]
    torch.testing.assert_close(half, torch.tensor([2.0, 1.75, 0.0, -4.0]))
    torch.testing.assert_close(trim(changes[2], 0.5), torch.tensor([0.0, 1.5, 0.0, -4.0]))


def test_merged_checkpoint_fills_masks_exports_and_fine_tunes(checkpoints, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "ties.ckpt"
    assert main(["merge", "--checkpoints", str(checkpoints["a"]), str(checkpoints["b"]),
                 "--method", "ties", "--base", str(checkpoints["base"]), "--density", "0.5",
                 "--output", str(out)]) == 0
    merged, tokenizer = load_objective(out)
    merged.eval()
    a, base = states(checkpoints["a"], checkpoints["base"])
    name = "encoder.blocks.0.attention.qkv.weight"
    name = name if name in a else next(k for k in a if k.endswith(".weight") and a[k].ndim == 2)
    moved = (merged.state_dict()[name] - base[name]) != 0
    assert 0.3 < moved.float().mean() < 0.9  # trimmed: about half of each change, not all
    filled = FillMaskModel.load(out).fill(["The [MASK] statement exits a function."], top_k=3)
    assert len(filled[0][0]) == 3
    export_checkpoint(out, tmp_path / "hf")
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        ours = merged.head(merged.encoder(ids, mask))  # (B, T, V)
        theirs = exported(input_ids=ids, attention_mask=mask.long()).logits
    assert (ours[mask] - theirs[mask]).abs().max() < 1e-5
    classifier = SequenceClassification(pretrained=str(out), num_labels=2, learning_rate=1e-3,
                                        warmup_steps=1)
    torch.testing.assert_close(classifier.encoder.state_dict()[name.removeprefix("encoder.")],
                               merged.state_dict()[name])
    batch = {"input_ids": ids, "attention_mask": mask.long(), "labels": torch.tensor([0, 1])}
    losses = fit_losses(classifier, [batch] * 3, tmp_path, steps=3)
    assert len(losses) == 3 and losses[-1] < losses[0]


def run_merge(capsys, *words: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["merge", *words])
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_merges_are_one_line_and_keep_existing_files(checkpoints, tmp_path, capsys):
    a, b, wide = (str(checkpoints[k]) for k in ("a", "b", "wide"))
    out = tmp_path / "m.ckpt"
    assert "hidden_size=48" in run_merge(capsys, "--checkpoints", a, wide, "--output", str(out))
    assert "needs --base" in run_merge(capsys, "--checkpoints", a, b, "--method", "ties",
                                       "--output", str(out))
    assert "3 values for 2 checkpoints" in run_merge(
        capsys, "--checkpoints", a, b, "--weights", "1", "2", "3", "--output", str(out))
    assert "at least two" in run_merge(capsys, "--checkpoints", a, "--output", str(out))
    assert "does not exist" in run_merge(capsys, "--checkpoints", a, str(tmp_path / "no.ckpt"),
                                         "--output", str(out))
    assert not out.exists()
    out.write_text("keep me")
    assert "exists" in run_merge(capsys, "--checkpoints", a, b, "--output", str(out))
    assert out.read_text() == "keep me"
    assert "one of the inputs" in run_merge(capsys, "--checkpoints", a, b, "--output", a,
                                            "--overwrite")


def test_another_vocabulary_is_refused(checkpoints, tmp_path, capsys):
    other = torch.load(checkpoints["b"], weights_only=False)
    other["fillmask"]["tokenizer"] = other["fillmask"]["tokenizer"].replace("[MASK]", "<mask>")
    torch.save(other, tmp_path / "other.ckpt")
    line = run_merge(capsys, "--checkpoints", str(checkpoints["a"]), str(tmp_path / "other.ckpt"),
                     "--output", str(tmp_path / "m.ckpt"))
    assert "another tokenizer" in line


def test_merge_states_refuses_differing_integer_buffers():
    with pytest.raises(MergeError, match="differs between the checkpoints"):
        merge_states([{"n": torch.tensor([1])}, {"n": torch.tensor([2])}])
