"""DistilBERT-style distillation: the loss terms, the frozen teacher, the student's start and
checkpoints that work without the teacher. The teacher is a real transformers BertForMaskedLM
folder (2 layers, hidden 128, uncased WordPiece 30,522)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from fillmask.architectures.bert import BertEncoder
from fillmask.data.datamodule import MaskedLMDataModule
from fillmask.data.tokenize import TokenizerTraining
from fillmask.errors import FillmaskError
from fillmask.inference import FillMaskModel
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import load_objective
from fillmask.objectives.distill import (
    Distillation,
    DistillationError,
    build_encoder,
    default_layer_map,
    student_spec_from_teacher,
)
from fillmask.objectives.mlm import MaskedLM
from fillmask.objectives.pretrained import load_pretrained

REPO = Path(__file__).resolve().parents[1]
TEACHER_VOCAB = 30522


def student_encoder(vocab_size: int = TEACHER_VOCAB, **overrides) -> BertEncoder:
    """One layer with the teacher's block shape (hidden 128, 2 heads, FFN 512)."""
    args = dict(vocab_size=vocab_size, hidden_size=128, num_layers=1, num_heads=2,
                intermediate_size=512, max_positions=512)
    return BertEncoder(**{**args, **overrides})


def teacher_shaped_encoder(folder: Path) -> BertEncoder:
    """An encoder with the teacher's full shape (both layers), so it can copy it exactly."""
    teacher, _ = load_pretrained(folder)
    return build_encoder(student_spec_from_teacher(teacher.encoder, num_layers=2))


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four rows of 16 ids, the first padded after 12 tokens, every fourth token masked."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (4, 16), generator=generator)
    ids[:, 0] = 101  # [CLS]
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[0, 12:] = False
    ids[0, 12:] = 0  # [PAD]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3::4] = ids[:, 3::4]
    labels[~attention] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


# Training once, checked by several tests.


class Recorder(L.Callback):
    """Per step: the total and KL losses and whether the student and any teacher module were
    training."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.ce_losses: list[float] = []
        self.student_training: list[bool] = []
        self.teacher_training: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())
        self.ce_losses.append(trainer.callback_metrics["train/ce_loss"].item())
        self.student_training.append(pl_module.training)
        self.teacher_training.append(any(m.training for m in pl_module.teacher.modules()))


@pytest.fixture(scope="module")
def trained(hf_bert_folder: Path, small_corpus: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> SimpleNamespace:
    """Distil 30 steps from a copy of the teacher folder, which is deleted afterwards."""
    root = tmp_path_factory.mktemp("distill")
    teacher_dir = shutil.copytree(hf_bert_folder, root / "teacher")
    unpadded_tokenizer(teacher_dir / "tokenizer.json")
    dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer=str(teacher_dir), max_length=32,
                            batch_size=8)
    torch.manual_seed(0)
    model = Distillation(str(teacher_dir), encoder=student_encoder(dm.vocab_size),
                         learning_rate=1e-3, warmup_steps=5)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    recorder = Recorder()
    trainer = L.Trainer(default_root_dir=root, max_steps=30, logger=False,
                        enable_checkpointing=True, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, val_check_interval=30,
                        num_sanity_val_steps=0, callbacks=[recorder])
    trainer.fit(model, datamodule=dm)
    shutil.rmtree(teacher_dir)
    checkpoint = next((root / "checkpoints").glob("*.ckpt"))
    return SimpleNamespace(model=model, trainer=trainer, recorder=recorder, checkpoint=checkpoint,
                           teacher_before=teacher_before, teacher_dir=teacher_dir)


def unpadded_tokenizer(file: Path) -> None:
    """Rewrite ``file`` without its padding and truncation settings.

    The folder's tokenizer.json pads every batch to its longest text, and ``load_tokenizer``
    keeps that, so packed corpora would be mostly [PAD]; the vocabulary is unchanged.
    """
    tokenizer = Tokenizer.from_file(str(file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokenizer.save(str(file))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_loss_falls(trained):
    losses, ce = trained.recorder.losses, trained.recorder.ce_losses
    assert len(losses) == 30
    assert mean(losses[-6:]) < 0.92 * mean(losses[:6]), losses
    assert mean(ce[-6:]) < 0.9 * mean(ce[:6]), ce


def test_teacher_stays_frozen_and_in_eval_mode(trained):
    teacher = trained.model.teacher
    after = teacher.state_dict()
    assert after.keys() == trained.teacher_before.keys()
    assert all(torch.equal(after[k], v) for k, v in trained.teacher_before.items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(trained.recorder.student_training)
    assert not any(trained.recorder.teacher_training)


def test_checkpoint_holds_the_student_alone(trained):
    ckpt = torch.load(trained.checkpoint, map_location="cpu", weights_only=False)
    plain = MaskedLM(student_encoder(trained.model.encoder.vocab_size))
    assert ckpt["state_dict"].keys() == plain.state_dict().keys()
    optimised = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert optimised == len(list(trained.model.parameters()))
    assert "teacher" not in ckpt["hyper_parameters"]
    info = ckpt["fillmask"]
    assert info["objective"] == "fillmask.objectives.mlm.MaskedLM"
    assert info["distillation"]["teacher"] == str(trained.teacher_dir)
    assert info["distillation"]["alpha_ce"] == 5.0


def test_checkpoint_reloads_and_fills_without_the_teacher(trained):
    assert not trained.teacher_dir.exists()
    reloaded, tokenizer = load_objective(trained.checkpoint)
    assert type(reloaded) is MaskedLM and tokenizer.get_vocab_size() == TEACHER_VOCAB
    state = trained.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    filled = FillMaskModel.from_checkpoint(trained.checkpoint).fill(
        ["the [MASK] module reads files ."], top_k=3)
    candidates = filled[0][0]
    assert len(candidates) == 3 and all(isinstance(c["token"], str) for c in candidates)
    assert candidates[0]["score"] >= candidates[-1]["score"] > 0


def test_every_term_is_logged(trained):
    metrics = trained.trainer.callback_metrics
    for name in ("train/loss", "train/ce_loss", "train/mlm_loss", "train/cos_loss",
                 "val/loss", "val/accuracy", "val/ce_loss"):
        assert name in metrics and torch.isfinite(metrics[name]), name


# The student's initialisation.


def test_student_starts_from_the_teacher(hf_bert_folder):
    model = Distillation(str(hf_bert_folder), encoder=student_encoder(30528))
    teacher = model.teacher
    tokens = model.encoder.embeddings.tokens.weight
    assert torch.equal(tokens[:TEACHER_VOCAB], teacher.encoder.embeddings.tokens.weight)
    student_modules, teacher_modules = model.encoder, teacher.encoder
    for name in ("blocks.0", "embeddings.positions", "embeddings.token_types", "embeddings.norm"):
        mine, theirs = student_modules.get_submodule(name), teacher_modules.get_submodule(name)
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(),
                                                     theirs.state_dict().values(), strict=True))
    assert torch.equal(model.head.dense.weight, teacher.head.dense.weight)
    assert torch.equal(model.head.norm.weight, teacher.head.norm.weight)
    assert torch.equal(model.head.bias[:TEACHER_VOCAB], teacher.head.bias)
    mapped = Distillation(str(hf_bert_folder), encoder=student_encoder(), layer_map=[1])
    up = mapped.encoder.blocks[0].ffn.up.weight
    assert torch.equal(up, teacher.encoder.blocks[1].ffn.up.weight)
    fresh = Distillation(str(hf_bert_folder), encoder=student_encoder(), init_from_teacher=False)
    assert not torch.equal(fresh.encoder.blocks[0].ffn.up.weight,
                           teacher.encoder.blocks[0].ffn.up.weight)


def test_default_student_has_half_the_teachers_layers(hf_bert_folder):
    model = Distillation(str(hf_bert_folder))
    spec = model.encoder.spec()["init_args"]
    teacher_spec = model.teacher.encoder.spec()["init_args"]
    assert spec == {**teacher_spec, "num_layers": 1}
    assert student_spec_from_teacher(model.teacher.encoder, 2)["init_args"] == teacher_spec


def test_default_layer_map():
    assert default_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert default_layer_map(2, 1) == [0]
    assert default_layer_map(24, 12)[0] == 0 and default_layer_map(24, 12)[-1] == 23
    assert default_layer_map(4, 4) == [0, 1, 2, 3]
    with pytest.raises(DistillationError, match="give layer_map explicitly"):
        default_layer_map(2, 3)


# The loss terms.


def test_a_copy_of_the_teacher_has_zero_distillation_and_cosine_loss(hf_bert_folder):
    model = Distillation(str(hf_bert_folder), encoder=teacher_shaped_encoder(hf_bert_folder))
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        total, _, _, parts = model._step(batch)
        hidden, _ = model.teacher_outputs(batch)
        teacher_mlm, _, _ = model.teacher.mlm_loss(hidden, batch["labels"])
    assert parts["ce_loss"].abs().item() < 1e-5
    assert parts["cos_loss"].abs().item() < 1e-5
    torch.testing.assert_close(parts["mlm_loss"], teacher_mlm)
    torch.testing.assert_close(total, 2.0 * teacher_mlm, atol=1e-4, rtol=1e-5)


def test_distillation_loss_is_the_tempered_kl(hf_bert_folder):
    model = Distillation(str(hf_bert_folder), encoder=student_encoder(30528), temperature=3.0)
    model.eval()
    batch = make_batch(1)
    with torch.no_grad():
        _, student, _, parts = model._step(batch)
        _, teacher = model.teacher_outputs(batch)
    log_s = F.log_softmax(student[:, :TEACHER_VOCAB] / 3.0, dim=-1)
    log_t = F.log_softmax(teacher / 3.0, dim=-1)
    expected = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 9.0
    assert parts["ce_loss"].item() > 0.01
    torch.testing.assert_close(parts["ce_loss"], expected)


@pytest.mark.parametrize("term", ["ce", "mlm", "cos"])
def test_each_weight_selects_its_term_and_reaches_the_student(hf_bert_folder, term):
    weights = {f"alpha_{name}": 1.5 if name == term else 0.0 for name in ("ce", "mlm", "cos")}
    model = Distillation(str(hf_bert_folder), encoder=student_encoder(), **weights)
    total, _, _, parts = model._step(make_batch(2))
    assert parts[f"{term}_loss"].item() > 0
    torch.testing.assert_close(total, 1.5 * parts[f"{term}_loss"])
    total.backward()
    assert model.encoder.blocks[0].ffn.up.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_cosine_loss_counts_real_tokens_only(hf_bert_folder):
    model = Distillation(str(hf_bert_folder), encoder=student_encoder())
    states = torch.randn(2, 6, 128)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    noisy = states.clone()
    noisy[~mask] = torch.randn(3, 128)
    assert model.cosine_loss(states, noisy, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert model.cosine_loss(states, -states, mask).item() == pytest.approx(2.0, abs=1e-6)


def test_teacher_follows_the_student_and_stays_in_eval_mode(hf_bert_folder):
    model = Distillation(str(hf_bert_folder), encoder=student_encoder())
    model.train()
    assert model.training and not any(m.training for m in model.teacher.modules())
    model.double()
    assert all(p.dtype == torch.float64 for p in model.teacher.parameters())
    batch = make_batch(3)
    hidden, logits = model.teacher_outputs(batch)
    assert hidden.dtype == logits.dtype == torch.float64
    total, _, _, _ = model._step(batch)
    assert torch.isfinite(total)


def test_narrow_student_needs_no_cosine_term_and_no_initialisation(hf_bert_folder):
    narrow = dict(hidden_size=64, num_heads=2, intermediate_size=256)
    model = Distillation(str(hf_bert_folder), encoder=student_encoder(**narrow), alpha_cos=0.0,
                         init_from_teacher=False)
    total, _, _, parts = model._step(make_batch(4))
    assert parts["cos_loss"].item() == 0.0 and parts["ce_loss"].item() > 0
    assert torch.isfinite(total)


# Clear errors.


def test_missing_teacher_is_named(hf_bert_folder, tmp_path):
    missing = tmp_path / "no-such-bert"
    with pytest.raises(FillmaskError, match=rf"teacher '{missing}'.*does not exist"):
        Distillation(str(missing), encoder=student_encoder())


@pytest.mark.parametrize(("encoder", "options", "message"), [
    (dict(hidden_size=64, intermediate_size=256), {},
     r"alpha_cos=1\.0 .*hidden size is 64 and the teacher's 128"),
    (dict(hidden_size=64, intermediate_size=256), {"alpha_cos": 0.0},
     r"init_from_teacher: the teacher's .* is \(30522, 128\) but the student's is \(30522, 64\)"),
    (dict(intermediate_size=256), {}, r"blocks\.0\.ffn\.up\.weight is \(512, 128\)"),
    ({}, {"layer_map": [2]}, r"layer_map=\[2\] must give one teacher layer in \[0, 1\]"),
    (dict(vocab_size=1000), {}, r"1000 token rows but the teacher's tokenizer has 30522"),
    ({}, {"temperature": 0.0}, r"temperature=0\.0 must be positive"),
])
def test_bad_student_or_options_are_explained(hf_bert_folder, encoder, options, message):
    with pytest.raises(ValueError, match=message):
        Distillation(str(hf_bert_folder), encoder=student_encoder(**encoder), **options)


def test_data_on_another_tokenizer_is_refused(hf_bert_folder, small_corpus, tmp_path):
    dm = MaskedLMDataModule(corpus=str(small_corpus), tokenizer_training=TokenizerTraining(
        vocab_size=600), max_length=32, batch_size=8)
    model = Distillation(str(hf_bert_folder), encoder=student_encoder())
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(DistillationError, match=r"has 640 tokens|has 600 tokens") as error:
        trainer.fit(model, datamodule=dm)
    assert "set data.tokenizer to the teacher folder" in str(error.value)


# The recipe.


def test_distilbert_config_parses_without_the_teacher():
    config = REPO / "configs" / "distilbert.yaml"
    result = subprocess.run([sys.executable, "-m", "fillmask", "fit", "--config", str(config),
                             "--print_config"], capture_output=True, text=True, cwd=REPO,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "class_path: fillmask.objectives.distill.Distillation" in out
    assert "teacher: models/bert-base-uncased" in out
    assert not (REPO / "models" / "bert-base-uncased").exists()
    for line in ("selection: smoothed", "smoothing: 0.7", "temperature: 2.0", "alpha_ce: 5.0",
                 "alpha_mlm: 2.0", "alpha_cos: 1.0", "learning_rate: 0.0005", "eps: 1.0e-06",
                 "num_layers: 6", "hidden_size: 768", "accumulate_grad_batches: 32"):
        assert line in out, line
    assert "- 0\n    - 2\n    - 4\n    - 7\n    - 9\n    - 11" in out
