"""Knowledge distillation, the DistilBERT recipe (Sanh et al., 2019): a small MLM student learns
from a frozen, trained teacher.

Loss = ``alpha_ce`` x KL(teacher || student) of the masked positions' vocabulary distributions
at temperature T (times T squared, so its gradients keep their size as T changes)
+ ``alpha_mlm`` x the student's own MLM cross-entropy
+ ``alpha_cos`` x (1 - cosine similarity) of the two models' last hidden states on real tokens.

The teacher (a fillmask checkpoint or a transformers folder, see
:func:`fillmask.objectives.pretrained.load_pretrained`) is loaded when the objective is
built, never when a YAML is parsed. It is held outside the module tree: it is not in the state
dict, the optimiser never sees it, Lightning cannot switch it to training mode, and it
follows the student's device and dtype. By default the student starts from the teacher: its
embeddings, the MLM head and every other layer (12 -> 6: layers 0, 2, 4, 7, 9, 11).

Checkpoints hold the student alone, recorded as a plain :class:`MaskedLM` (the distillation
options are kept under ``checkpoint["fillmask"]["distillation"]``), so ``fillmask fill`` and
:func:`fillmask.objectives.base.load_objective` use them without the teacher.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from fillmask.architectures.base import Encoder, real_tokens
from fillmask.errors import FillmaskError
from fillmask.heads import MaskedLMParts
from fillmask.masking.base import IGNORE_INDEX
from fillmask.objectives.base import CheckpointError, import_class
from fillmask.objectives.mlm import MaskedLM
from fillmask.objectives.pretrained import load_pretrained

__all__ = ["Distillation", "DistillationError", "copy_teacher_weights", "default_layer_map",
           "student_spec_from_teacher"]

# Constructor options that only make sense with a teacher; checkpoints drop them.
DISTILLATION_OPTIONS = ("teacher", "temperature", "alpha_ce", "alpha_mlm", "alpha_cos",
                        "init_from_teacher", "layer_map")


class DistillationError(FillmaskError):
    """A teacher, student or tokenizer that cannot be distilled together, and the fix."""


class Distillation(MaskedLM):
    """A MaskedLM student trained on a frozen teacher's predictions and hidden states."""

    def __init__(
        self,
        teacher: str,
        encoder: Encoder | None = None,
        temperature: float = 2.0,
        alpha_ce: float = 5.0,
        alpha_mlm: float = 2.0,
        alpha_cos: float = 1.0,
        init_from_teacher: bool = True,
        layer_map: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load the teacher and build the student.

        Args:
            teacher: A checkpoint written by ``fillmask fit`` or a transformers
                ``BertForMaskedLM`` folder (with ``tokenizer.json``). Train on its tokenizer:
                ``data.tokenizer`` = the same folder (or its ``tokenizer.json``).
            encoder: The student encoder. In Python it may be ``None``: the teacher's encoder
                with half its layers (:func:`student_spec_from_teacher`). YAML configs must
                give it, since the CLI links ``data.vocab_size`` into it.
            temperature: Softmax temperature T of both distributions in the KL term.
            alpha_ce: Weight of the distillation (KL) loss, logged as ``ce_loss``.
            alpha_mlm: Weight of the student's masked-LM cross-entropy.
            alpha_cos: Weight of the hidden-state cosine loss; needs the teacher's hidden size
                (set 0 for a narrower student).
            init_from_teacher: Start the student from the teacher's embeddings, MLM head and the
                layers ``layer_map`` names (same encoder class, hidden size and layer shape).
            layer_map: Teacher layer copied into each student layer; default: evenly spaced,
                first and last included (:func:`default_layer_map`).
            **kwargs: Options of :class:`MaskedLM` and the optimiser (learning_rate, ...).
        """
        teacher_model, teacher_tokenizer = load_teacher(teacher)
        if encoder is None:
            encoder = build_encoder(student_spec_from_teacher(teacher_model.encoder))
        super().__init__(encoder, **kwargs)
        check_options(temperature, alpha_ce, alpha_mlm, alpha_cos)
        check_student(self.encoder, teacher_model.encoder, teacher_tokenizer, alpha_cos)
        # Outside the module tree: no state dict entry, no optimiser group, no train() from
        # Lightning. `_apply` below moves it with the student.
        object.__setattr__(self, "_teacher", teacher_model)
        object.__setattr__(self, "_teacher_tokenizer", teacher_tokenizer)
        self._vocab = teacher_tokenizer.get_vocab_size()
        if init_from_teacher:
            copy_teacher_weights(self, teacher_model, layer_map)

    @property
    def teacher(self) -> MaskedLM:
        """The frozen teacher (encoder + MLM head), always in eval mode."""
        return self._teacher

    # Keep the teacher frozen, in eval mode, on the student's device and dtype.

    def train(self, mode: bool = True) -> Distillation:
        """Set the student's mode; the teacher stays in eval mode (no dropout) whatever ``mode``."""
        super().train(mode)
        self._teacher.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Distillation:
        """Apply ``.to()``, ``.cuda()``, ``.double()``, ... to the teacher as to the student."""
        super()._apply(fn, recurse)
        self._teacher._apply(fn, recurse)
        return self

    # The loss.

    def _step(self, batch: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total, student masked logits (N, V), targets (N,) and each loss term."""
        hidden = self.encode(batch)
        mlm, logits, targets = self.mlm_loss(hidden, batch["labels"])
        teacher_hidden, teacher_logits = self.teacher_outputs(batch)
        ce = self.distillation_loss(logits, teacher_logits)
        cos = self.cosine_loss(hidden, teacher_hidden, real_tokens(batch))
        extras = self.extra_losses(batch, hidden)
        hp = self.hparams
        total = hp.alpha_ce * ce + hp.alpha_mlm * mlm + hp.alpha_cos * cos
        total = total + sum(weight * loss for loss, weight in extras.values())
        parts = {"mlm_loss": mlm, "ce_loss": ce, "cos_loss": cos,
                 **{name: loss for name, (loss, _) in extras.items()}}
        return total, logits, targets, parts

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's last hidden states (B, T, C') and masked-position logits (N, V')."""
        hidden = self._teacher.encode(batch)
        selected = batch["labels"] != IGNORE_INDEX
        return hidden, self._teacher.head(hidden[selected])

    def distillation_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T^2 x KL(softmax(teacher / T) || softmax(student / T)), averaged over the masked
        positions, on the tokenizer's ids (padding rows of either vocabulary left out)."""
        if student.shape[0] == 0:  # nothing masked: zero, keep the graph
            return student.sum() * 0.0
        t = self.hparams.temperature
        log_student = F.log_softmax(student[:, : self._vocab].float() / t, dim=-1)
        log_teacher = F.log_softmax(teacher[:, : self._vocab].float() / t, dim=-1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return kl * t * t

    def cosine_loss(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
                    ) -> torch.Tensor:
        """Mean of 1 - cos(student state, teacher state) over real tokens; zero (no gradient
        path needed) when the widths differ, which ``alpha_cos`` = 0 allows."""
        if student.shape[-1] != teacher.shape[-1] or not mask.any():
            return student.sum() * 0.0
        similarity = F.cosine_similarity(student[mask].float(), teacher[mask].float(), dim=-1)
        return (1.0 - similarity).mean()

    # Data and checkpoints.

    def setup(self, stage: str) -> None:
        super().setup(stage)
        tokenizer = self._datamodule_tokenizer()
        if tokenizer is not None:
            check_same_tokenizer(tokenizer, self._teacher_tokenizer, self.hparams.teacher)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the student as a plain MaskedLM for ``load_objective`` and ``fillmask fill``
        (no teacher needed); the distillation options move to ``fillmask.distillation``.

        Lightning's own ``_class_path`` entry still names this class, so ``fit --ckpt_path``
        resumes distillation with the YAML's teacher.
        """
        super().on_save_checkpoint(checkpoint)
        info = checkpoint["fillmask"]
        info["objective"] = f"{MaskedLM.__module__}.{MaskedLM.__qualname__}"
        info.setdefault("tokenizer", self._teacher_tokenizer.to_str())
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        info["distillation"] = {k: hparams.pop(k) for k in DISTILLATION_OPTIONS if k in hparams}
        checkpoint["hyper_parameters"] = hparams


# Loading and checking.


def load_teacher(source: str) -> tuple[MaskedLM, Tokenizer]:
    """The teacher at ``source``, frozen and in eval mode, with its tokenizer."""
    try:
        teacher, tokenizer = load_pretrained(source)
    except CheckpointError as error:
        raise DistillationError(f"Distillation teacher {source!r}: {error}") from error
    if isinstance(teacher, MaskedLMParts):  # a transformers folder
        teacher = MaskedLM.from_parts(teacher)
    if not isinstance(teacher, MaskedLM):
        raise DistillationError(f"Distillation teacher {source!r} is a "
                                f"{type(teacher).__name__}, not a masked-LM objective")
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher, tokenizer


def check_options(temperature: float, alpha_ce: float, alpha_mlm: float,
                  alpha_cos: float) -> None:
    """Reject a non-positive temperature and negative loss weights."""
    if temperature <= 0:
        raise DistillationError(f"temperature={temperature} must be positive (DistilBERT: 2.0)")
    for name, value in (("alpha_ce", alpha_ce), ("alpha_mlm", alpha_mlm),
                        ("alpha_cos", alpha_cos)):
        if value < 0:
            raise DistillationError(f"{name}={value} must be >= 0")


def check_student(student: Encoder, teacher: Encoder, tokenizer: Tokenizer,
                  alpha_cos: float) -> None:
    """The student must cover the teacher's tokenizer and, for the cosine loss, its width."""
    tokens = tokenizer.get_vocab_size()
    if student.vocab_size < tokens:
        raise DistillationError(
            f"the student's encoder has {student.vocab_size} token rows but the teacher's "
            f"tokenizer has {tokens} tokens; give the student vocab_size >= {tokens} (the CLI "
            "links it from the data when data.tokenizer is the teacher's)")
    if alpha_cos > 0 and student.hidden_size != teacher.hidden_size:
        raise DistillationError(
            f"alpha_cos={alpha_cos} compares hidden states, but the student's hidden size is "
            f"{student.hidden_size} and the teacher's {teacher.hidden_size}; give the student "
            "the teacher's hidden size or set alpha_cos: 0")


def check_same_tokenizer(data: Tokenizer, teacher: Tokenizer, source: str) -> None:
    """The data must be tokenized with the teacher's vocabulary, id for id."""
    fix = (f"distillation compares the two models token by token, so train on the teacher's "
           f"tokenizer: set data.tokenizer to the teacher folder or its tokenizer.json "
           f"({source})")
    if data.get_vocab_size() != teacher.get_vocab_size():
        raise DistillationError(f"the data's tokenizer has {data.get_vocab_size()} tokens but "
                                f"the teacher's has {teacher.get_vocab_size()}; {fix}")
    if data.get_vocab() != teacher.get_vocab():
        raise DistillationError(f"the data's tokenizer maps tokens to other ids than the "
                                f"teacher's; {fix}")


# The student's shape and its initialisation from the teacher.


def student_spec_from_teacher(teacher: Encoder, num_layers: int | None = None
                              ) -> dict[str, Any]:
    """The teacher encoder's spec with ``num_layers`` layers (default: half, at least one).

    Args:
        teacher: The teacher's encoder.
        num_layers: Student depth; ``None`` halves the teacher's (DistilBERT: 12 -> 6).
    """
    spec = teacher.spec()
    args = dict(spec["init_args"])
    if "num_layers" not in args:
        raise DistillationError(f"{spec['class_path']} has no num_layers argument; give the "
                                "student encoder explicitly")
    args["num_layers"] = num_layers or max(1, args["num_layers"] // 2)
    return {"class_path": spec["class_path"], "init_args": args}


def build_encoder(spec: dict[str, Any]) -> Encoder:
    """Instantiate an encoder from ``{"class_path": ..., "init_args": ...}``."""
    return import_class(spec["class_path"])(**spec["init_args"])


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, first and last included: 12 -> 6 gives
    [0, 2, 4, 7, 9, 11] (DistilBERT); a one-layer student takes layer 0."""
    if student_layers > teacher_layers:
        raise DistillationError(f"the student has {student_layers} layers, the teacher only "
                                f"{teacher_layers}; give layer_map explicitly (repeats allowed)")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(i * step + 0.5) for i in range(student_layers)]


def copy_teacher_weights(student: MaskedLM, teacher: MaskedLM,
                         layer_map: list[int] | None = None) -> list[int]:
    """Copy the teacher's embeddings, the mapped layers and the MLM head into ``student``.

    Args:
        student: The MaskedLM to initialise (in place).
        teacher: A MaskedLM whose encoder has the student's class, width and layer shape.
        layer_map: Teacher layer index for each student layer; default
            :func:`default_layer_map`.

    Returns:
        The layer map used.
    """
    source, target = teacher.encoder, student.encoder
    layer_map = resolve_layer_map(source, target, layer_map)
    weights = source.state_dict()
    tables = embedding_tables(target)
    with torch.no_grad():
        for name, tensor in target.state_dict(keep_vars=True).items():
            copy_rows(tensor, weights[teacher_name(name, layer_map)], name, name in tables)
        copy_head(student, teacher)
    return layer_map


def resolve_layer_map(teacher: Encoder, student: Encoder, layer_map: list[int] | None
                      ) -> list[int]:
    """Check that both encoders are of one class with ``blocks``, and the map fits them."""
    if type(teacher) is not type(student):
        raise DistillationError(f"init_from_teacher needs the teacher's encoder class "
                                f"({type(teacher).__name__}), not {type(student).__name__}; "
                                "set init_from_teacher: false")
    if not isinstance(getattr(student, "blocks", None), nn.ModuleList):
        raise DistillationError(f"init_from_teacher copies layers from `blocks`, which "
                                f"{type(student).__name__} lacks; set init_from_teacher: false")
    depth, width = len(teacher.blocks), len(student.blocks)
    layer_map = default_layer_map(depth, width) if layer_map is None else list(layer_map)
    if len(layer_map) != width or not all(0 <= i < depth for i in layer_map):
        raise DistillationError(f"layer_map={layer_map} must give one teacher layer in "
                                f"[0, {depth - 1}] for each of the student's {width} layers")
    return layer_map


def embedding_tables(encoder: nn.Module) -> set[str]:
    """State-dict names of the encoder's embedding tables (their row counts may differ)."""
    return {f"{name}.weight" for name, module in encoder.named_modules()
            if isinstance(module, nn.Embedding)}


def teacher_name(name: str, layer_map: list[int]) -> str:
    """The teacher's parameter for the student's ``name``: ``blocks.i.*`` -> ``blocks.map[i].*``."""
    parts = name.split(".", 2)
    if parts[0] != "blocks":
        return name
    return f"blocks.{layer_map[int(parts[1])]}.{parts[2]}"


def copy_rows(target: torch.Tensor, source: torch.Tensor, name: str, rows_may_differ: bool
              ) -> None:
    """Copy ``source`` into ``target``; tables may differ in rows (the shared ones are copied)."""
    if target.shape == source.shape:
        target.copy_(source)
        return
    if rows_may_differ and target.shape[1:] == source.shape[1:]:
        rows = min(target.shape[0], source.shape[0])
        target[:rows].copy_(source[:rows])
        return
    raise DistillationError(
        f"init_from_teacher: the teacher's {name} is {tuple(source.shape)} but the student's "
        f"is {tuple(target.shape)}; the student needs the teacher's hidden size and layer "
        "shape (student_spec_from_teacher), or set init_from_teacher: false")


def copy_head(student: MaskedLM, teacher: MaskedLM) -> None:
    """Copy the MLM head: transform, bias and, for an untied student, the decoder rows."""
    mine, theirs = student.head, teacher.head
    for name in ("dense.weight", "dense.bias", "norm.weight", "norm.bias"):
        copy_rows(mine.get_parameter(name), theirs.get_parameter(name), f"head.{name}", False)
    copy_rows(mine.bias, theirs.bias, "head.bias", True)
    if mine.decoder is not None:
        copy_rows(mine.decoder, theirs.decoder_weight, "head.decoder", True)
