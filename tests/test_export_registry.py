"""Every registered architecture, in every variant it declares, leaves fillmask with every head
that an objective delivers, and comes back.

Each (architecture x variant x objective) is exported to a transformers folder, loaded in a
fresh process where fillmask cannot be imported (tests/transformers_side.py), and its logits
are compared to fillmask's on a padded batch (real tokens) to 1e-5; the MLM folders also run
``pipeline("fill-mask")`` against fillmask's top-k and ``AutoTokenizer``; then every folder is
imported back. A plugin's architectures are in the matrix through the registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from fillmask.architectures.base import Encoder
from fillmask.interop.export import transformers_models, write_folder
from fillmask.interop.hf import import_transformers, read_transformers
from fillmask.objectives.base import Deliverable, EncoderObjective
from fillmask.objectives.classify import SequenceClassification, TokenClassification
from fillmask.objectives.distill import Distillation
from fillmask.objectives.mlm import MaskedLM
from fillmask.objectives.qa import QuestionAnswering
from fillmask.objectives.rtd import ReplacedTokenDetection
from fillmask.registry import architectures

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE / "assets" / "golden" / "tokenizer.json"
TEXTS = ["The [MASK] statement exits a function early.", "A list [MASK] values.",
         "Import the [MASK] module, then call its functions with the arguments that the "
         "documentation of the standard library describes for each of them, and [MASK] the "
         "result."]  # 49 tokens: past ModernBERT's tiny local window, so local attention shows
AUTO = {"mlm": "AutoModelForMaskedLM", "rtd": "AutoModelForPreTraining",
        "sequence": "AutoModelForSequenceClassification",
        "token": "AutoModelForTokenClassification", "base": "AutoModel",
        "qa": "AutoModelForQuestionAnswering"}
OBJECTIVES = {
    "mlm-tied": lambda encoder: MaskedLM(encoder, tie_embeddings=True),
    "mlm-untied": lambda encoder: MaskedLM(encoder, tie_embeddings=False),
    "rtd": lambda encoder: ReplacedTokenDetection(encoder),
    "sequence": lambda encoder: SequenceClassification(encoder=encoder, num_labels=3),
    "mean-pooled": lambda encoder: SequenceClassification(encoder=encoder, num_labels=3,
                                                          pooling="mean"),
    "token": lambda encoder: TokenClassification(encoder=encoder, num_labels=5),
    "qa": lambda encoder: QuestionAnswering(encoder=encoder),
}


def variants() -> list[tuple[str, type[Encoder], dict]]:
    out = []
    for name, component in sorted(architectures().items()):
        declared = component.cls.variants or {"tiny": {}}
        out += [(f"{name}-{variant}", component.cls, options)
                for variant, options in declared.items()]
    return out


VARIANTS = variants()


@dataclass
class Export:
    """One exported folder and what fillmask computes on the test batch."""

    name: str
    folder: Path
    deliverable: Deliverable
    expected: torch.Tensor  # logits (or states) on the padded batch
    states: torch.Tensor  # the encoder's hidden states on it
    kind: str


def build(cls: type[Encoder], options: dict, objective: str, vocab: int, teacher: Path
          ) -> EncoderObjective:
    """A tiny model of ``objective``; ``distilled``: a student of the ``teacher`` folder (the
    variant's exported MLM model, read back as a distillation teacher)."""
    torch.manual_seed(0)
    encoder = cls.preset("tiny", **{"vocab_size": vocab, "max_positions": 64, **options})
    if objective == "distilled":
        model = Distillation(teacher=str(teacher)).eval()
    else:
        model = OBJECTIVES[objective](encoder).eval()
    with torch.no_grad():  # trained models have non-zero biases and non-unit norms
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def batch(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    encodings = tokenizer.encode_batch(TEXTS)
    pad = tokenizer.token_to_id("[PAD]")
    width = max(len(e.ids) for e in encodings)
    ids = torch.full((len(TEXTS), width), pad, dtype=torch.long)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = torch.tensor(encoding.ids)
    return ids, ids != pad


def fillmask_outputs(d: Deliverable, ids: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        states = d.encoder(ids, attention_mask=mask)  # (B, T, C)
        return (d.head(states, mask) if d.kind == "sequence" else d.head(states)), states


def assert_close_on_real(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor,
                         what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.dim() >= 2 and got.shape[:2] == mask.shape:
        got, want = got[mask], want[mask]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export the whole matrix, then load every folder in one fresh process."""
    root = tmp_path_factory.mktemp("registry-export")
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    ids, mask = batch(tokenizer)
    exports: list[Export] = []
    for variant, cls, options in VARIANTS:
        for objective in [*OBJECTIVES, "distilled"]:
            teacher = root / variant / "mlm-tied"
            model = build(cls, options, objective, tokenizer.get_vocab_size(), teacher)
            targets = transformers_models(model)
            for sub, d in model.deliverables().items():
                name = "/".join(p for p in (variant, objective, sub) if p)
                folder = root / name
                write_folder(targets[sub], tokenizer, d.encoder, folder)
                expected, states = fillmask_outputs(d, ids, mask)
                exports.append(Export(name, folder, d, expected, states, d.kind))
    cases = [{"folder": str(e.folder), "auto": AUTO[e.kind], "input_ids": ids,
              "attention_mask": mask.long()} for e in exports]
    bases = [e for e in exports if e.name.endswith("/mlm-tied")]
    cases += [{"folder": str(e.folder), "auto": "AutoModel", "input_ids": ids,
               "attention_mask": mask.long()} for e in bases]
    pipelines = [{"folder": str(e.folder), "text": TEXTS[0], "top_k": 5} for e in bases]
    jobs, out = root / "jobs.pt", root / "out.pt"
    torch.save({"cases": cases, "pipeline": pipelines}, jobs)
    env = {"HF_HOME": str(root / "hf-home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONNOUSERSITE": "1"}
    run = subprocess.run([sys.executable, "-I", str(HERE / "transformers_side.py"), str(jobs),
                          str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = torch.load(out, weights_only=False)
    return {"exports": exports, "bases": bases, "results": results, "ids": ids, "mask": mask,
            "tokenizer": tokenizer}


def names() -> list[str]:
    return [f"{v}/{o}" for v, _, _ in VARIANTS for o in [*OBJECTIVES, "distilled"]]


@pytest.mark.parametrize("name", names())
def test_transformers_computes_what_fillmask_computes(exported, name):
    results, mask = exported["results"], exported["mask"]
    found = [(i, e) for i, e in enumerate(exported["exports"]) if e.name.startswith(name)]
    assert found
    for i, e in found:
        assert_close_on_real(results["outputs"][i], e.expected, mask,
                             f"{e.name} as {results['classes'][i]}")


@pytest.mark.parametrize("variant", [v for v, _, _ in VARIANTS])
def test_base_model_pipeline_and_tokenizer(exported, variant):
    results, mask, tokenizer = exported["results"], exported["mask"], exported["tokenizer"]
    offset = len(exported["exports"])
    index = next(i for i, e in enumerate(exported["bases"]) if e.name.startswith(variant + "/"))
    e = exported["bases"][index]
    assert_close_on_real(results["outputs"][offset + index], e.states, mask, f"{e.name} base")
    pipe = results["pipeline"][index]
    encoding = tokenizer.encode(TEXTS[0])
    position = encoding.ids.index(tokenizer.token_to_id("[MASK]"))
    with torch.no_grad():
        ids = torch.tensor([encoding.ids])
        logits = e.deliverable.head(e.deliverable.encoder(ids))[0, position]
    assert pipe["ids"] == logits.topk(5).indices.tolist()
    assert (pipe["mask"], pipe["pad"], pipe["cls"], pipe["sep"]) == (
        "[MASK]", "[PAD]", "[CLS]", "[SEP]")
    assert pipe["padding_side"] == "right"
    max_positions = e.deliverable.encoder.max_positions
    assert pipe["model_max_length"] == max_positions == pipe["truncated_length"]
    assert pipe["second_row"][-1] == tokenizer.token_to_id("[PAD]")
    types = "token_types" in e.deliverable.encoder.embedding_tables()
    assert ("token_type_ids" in pipe["inputs"]) == types


@pytest.mark.parametrize("name", names())
def test_exported_folder_imports_back(exported, name):
    mask, ids = exported["mask"], exported["ids"]
    for e in (e for e in exported["exports"] if e.name.startswith(name)):
        parts, tokenizer = read_transformers(e.folder)
        assert tokenizer is not None
        with torch.no_grad():
            states = parts.encoder.eval()(ids, attention_mask=mask)
            assert_close_on_real(states, e.states, mask, f"{e.name} imported back")
            if e.kind == "mlm":
                assert_close_on_real(parts.head(states), e.expected, mask, f"{e.name} head")
                config = json.loads((e.folder / "config.json").read_text())
                assert (parts.head.decoder is None) == config.get("tie_word_embeddings", True)
                if e.deliverable.head.decoder is None and "/rtd/" not in e.name:
                    assert parts.head.decoder is None, f"{e.name} lost its tied decoder"
        if e.name.endswith("/mlm-tied"):  # a folder to fine-tune from (`pretrained`)
            tuned = SequenceClassification(pretrained=str(e.folder), num_labels=2).eval()
            with torch.no_grad():
                states = tuned.encoder(ids, attention_mask=mask)
            assert_close_on_real(states, e.states, mask, f"{e.name} fine-tuned from")


def test_remote_code_is_chosen_only_where_transformers_has_no_class(exported):
    chosen = {e.name: json.loads((e.folder / "config.json").read_text())["architectures"][0]
              for e in exported["exports"]}
    native = {"BertEncoder-bert/mlm-tied": "BertForMaskedLM",
              "BertEncoder-bert/sequence": "BertForSequenceClassification",
              "BertEncoder-bert/mean-pooled": "FillmaskForSequenceClassification",
              "BertEncoder-bert/token": "BertForTokenClassification",
              "BertEncoder-bert/qa": "BertForQuestionAnswering",
              "BertEncoder-albert/qa": "AlbertForQuestionAnswering",
              "ModernBertEncoder-modernbert/qa": "FillmaskForQuestionAnswering",
              "DebertaEncoder-deberta-v3/qa": "FillmaskForQuestionAnswering",
              "BertEncoder-bert/rtd/discriminator": "ElectraForPreTraining",
              "BertEncoder-electra-small/mlm-tied": "ElectraForMaskedLM",
              "BertEncoder-gelu-tanh/mlm-tied": "ElectraForMaskedLM",
              "BertEncoder-quickstart/mlm-tied": "FillmaskForMaskedLM",
              "BertEncoder-albert-gelu/mlm-untied": "AlbertForMaskedLM",
              "BertEncoder-albert/mlm-tied": "FillmaskForMaskedLM",  # gelu_tanh vs the head
              "BertEncoder-albert/sequence": "AlbertForSequenceClassification",
              "BertEncoder-shared-unfactorised/token": "AlbertForTokenClassification",
              "ModernBertEncoder-modernbert/sequence": "FillmaskForSequenceClassification",
              "DebertaEncoder-deberta-v3/sequence": "DebertaV2ForSequenceClassification",
              "DebertaEncoder-deberta-v3/rtd/discriminator": "FillmaskForPreTraining",
              "BertEncoder-mosaicbert/sequence": "FillmaskForSequenceClassification"}
    for name, architecture in native.items():
        assert chosen[name] == architecture, name
    def backbone(name: str) -> str:
        folder = next(e.folder for e in exported["exports"] if e.name == name)
        return json.loads((folder / "config.json").read_text())["backbone"]["model_type"]

    # remote code wraps a native encoder where transformers has one
    assert backbone("BertEncoder-albert/mlm-tied") == "albert"
    assert backbone("BertEncoder-bert/mean-pooled") == "bert"  # BERT reads the CLS state only
    assert backbone("ModernBertEncoder-modernbert/sequence") == "modernbert"
    assert backbone("BertEncoder-quickstart/mlm-tied") == "fillmask-bert"
    for e in exported["exports"]:
        remote = chosen[e.name].startswith("Fillmask")
        assert (e.folder / "modeling_fillmask.py").is_file() == remote, e.name


def test_imported_folder_trains_on_as_a_masked_lm(exported):
    e = next(e for e in exported["exports"] if e.name == "BertEncoder-quickstart/mlm-tied")
    model, tokenizer = import_transformers(e.folder)
    with torch.no_grad():
        states = model.encoder.eval()(exported["ids"], attention_mask=exported["mask"])
    assert_close_on_real(model.head(states), e.expected, exported["mask"], "MaskedLM")
