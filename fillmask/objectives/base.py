"""What every objective shares: an encoder, AdamW with warm-up and decay, checkpoint metadata.

Objectives subclass :class:`EncoderObjective` and pass the optimisation arguments through
``**kwargs``, so each YAML names them once (``model.init_args.learning_rate``) whatever the
objective, and `--model.help` lists them with the objective's own options.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch import nn

from fillmask.architectures.base import Encoder, count_real_tokens, encoder_inputs
from fillmask.architectures.transformers_format import HeadKind
from fillmask.checkpoint_file import (  # noqa: F401  (CheckpointError: importers use this name)
    CheckpointError,
    build_encoder,
    encoder_class,
    import_class,
    objective_class,
    read_checkpoint,
)
from fillmask.errors import FillmaskError

Schedule = Literal["linear", "cosine", "constant", "wsd"]
Optimizer = Literal["adamw", "stableadamw"]


@dataclass
class Deliverable:
    """A trained encoder and the head that leaves with it (``fillmask export``)."""

    encoder: Encoder
    kind: HeadKind
    """``mlm``, ``rtd`` (replaced-token detection), ``sequence`` or ``token`` classification."""
    head: nn.Module


class EncoderObjective(L.LightningModule):
    """Base class of fillmask objectives: the optimiser, its schedule and checkpoint metadata."""

    def __init__(
        self,
        encoder: Encoder,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        warmup_steps: float = 10_000,
        schedule: Schedule = "linear",
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        decay_fraction: float = 0.1,
        decoupled_weight_decay: bool = False,
        fused_adamw: bool = True,
        compile: bool = False,
        optimizer: Optimizer = "adamw",
    ) -> None:
        """Configure optimisation.

        Args:
            encoder: Any fillmask encoder; its vocabulary size is linked from the tokenizer.
            learning_rate: Peak AdamW learning rate.
            weight_decay: Decoupled weight decay (not applied to biases, norms or other
                one-dimensional parameters).
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: Linear warm-up length: optimiser steps, or a fraction (< 1) of all steps.
            schedule: Decay after warm-up: ``linear``, ``cosine``, ``constant``, or ``wsd``
                (warm-up-stable-decay, ModernBERT's trapezoid: the peak rate until the last
                ``decay_fraction`` of the steps, then a 1 - sqrt decay to ``min_lr_ratio``).
            min_lr_ratio: Final learning rate as a fraction of the peak.
            total_steps: Length of the schedule in optimiser steps; defaults to the trainer's
                (``max_steps`` or epochs). Set it when one schedule spans several runs, as
                BERT's sequence-128 and sequence-512 phases do.
            decay_fraction: Share of all steps that ``wsd`` spends decaying.
            decoupled_weight_decay: Read ``weight_decay`` as the fraction of each weight removed
                per step at the peak rate, independent of the learning rate's size (Composer's
                DecoupledAdamW, used by MosaicBERT and ModernBERT: 1e-5). Off: PyTorch's AdamW,
                which removes ``learning_rate x weight_decay`` per step.
            fused_adamw: Update every parameter in one fused AdamW kernel (CPU and CUDA; the
                transformers Trainer's default too). Off, or on other devices: the
                multi-tensor (foreach) implementation. The same update up to rounding.
            compile: Compile the encoder with ``torch.compile`` (fuses the element-wise work
                around the matmuls; the first steps pay the compilation, and on CPU it needs a
                C++ compiler). The same model and checkpoints as eager execution.
            optimizer: ``adamw`` (PyTorch's) or ``stableadamw`` (torch-optimi's StableAdamW,
                ModernBERT's optimiser: AdamW whose step on each tensor is scaled down by the
                root mean square of ``grad**2 / v`` when it exceeds 1, Adafactor's update
                clipping). Both take the same betas, eps, weight decay (decoupled or not) and
                parameter groups (no decay on norms and biases).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self._step_tokens: torch.Tensor | int = 0  # real tokens since the last optimiser step
        # Set by fillmask.phases.Phases: the phased run's learning-rate multiplier per step
        # (None: warm-up then `schedule`), the encoder options its phases change, and the
        # current phase's name for the progress bar.
        self.phased = False
        self.phase_schedule: Callable[[int], float] | None = None
        self.phased_options: set[str] = set()
        self.phase_label: str | None = None

    def deliverables(self) -> dict[str, Deliverable]:
        """What this objective hands downstream, by export subfolder (``""``: the folder
        itself): the trained encoder and the head users keep. Objectives whose heads leave
        override it; this default has none, and ``fillmask export`` says so."""
        return {}

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states (B, T, C) of a collated batch."""
        return self.encoder(batch["input_ids"], **encoder_inputs(batch))

    # Optimisation.

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = build_optimizer(self._parameter_groups(), hp.get("optimizer", "adamw"),
                                    lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps,
                                    fused=hp.get("fused_adamw", True))
        total = hp.total_steps or max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps
        warmup = int(warmup * total) if isinstance(warmup, float) and warmup < 1 else int(warmup)
        scale = self.phase_schedule or warmup_then_decay(warmup, total, hp.schedule,
                                                         hp.min_lr_ratio, hp.decay_fraction)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """Weights decay; biases, norms and other one-dimensional parameters do not. Under
        FSDP every parameter is a flat shard by now, so shapes recorded in :meth:`setup`
        (before the strategy wrapped the model) decide."""
        decays = getattr(self, "_decays", None) or decay_flags(self)
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (decay if decays.get(unwrapped_name(name), False) else no_decay).append(param)
        hp = self.hparams
        # AdamW multiplies weight decay by the current rate; dividing by the peak rate makes
        # the per-step decay weight_decay x (rate / peak), DecoupledAdamW's.
        weight_decay = hp.weight_decay / hp.learning_rate if hp.decoupled_weight_decay \
            else hp.weight_decay
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # Global-batch bookkeeping: what one optimiser step sees, all processes together.

    def on_train_start(self) -> None:
        self._step_tokens = 0
        if not self.phased:  # a phased run logs each phase's global batch when it starts
            log_global_batch_size(self.trainer)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_tokens = self._step_tokens + count_real_tokens(batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log ``train/tokens_per_step``: the real (non-padding) tokens of every micro-batch of
        this optimiser step, summed over all processes. Counts stay on the device and only the
        steps the trainer logs (every ``log_every_n_steps``) reduce them across processes, so
        the other steps pay no synchronisation."""
        tokens, self._step_tokens = self._step_tokens, 0
        every = self.trainer.log_every_n_steps
        # global_step counts the optimizer steps taken; this one is number global_step + 1.
        if every <= 0 or (self.trainer.global_step + 1) % every:
            return
        value = torch.as_tensor(tokens, device=self.device, dtype=torch.float32)
        self.log("train/tokens_per_step", value, on_step=True, on_epoch=False,
                 reduce_fx="sum", sync_dist=True)

    # Checkpoints carry what inference needs to rebuild the model without the YAML.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from fillmask.registry import provenance

        info: dict[str, Any] = {
            "encoder": self.encoder.spec(),
            "objective": f"{type(self).__module__}.{type(self).__qualname__}",
            # Which installed packages provided the classes: a reader without them is told
            # what to install.
            "provenance": {"encoder": provenance(type(self.encoder)),
                           "objective": provenance(type(self))},
        }
        tokenizer = self._datamodule_tokenizer()
        if tokenizer is not None:
            info["tokenizer"] = tokenizer.to_str()
        checkpoint["fillmask"] = info
        # Dropout draws from the global generators: restoring them makes a resumed run's loss
        # curve bitwise equal to the uninterrupted one (masking never uses them).
        checkpoint["fillmask_rng"] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compatible(checkpoint, self)
        start_next_epoch_afresh(checkpoint)
        if "fillmask_rng" in checkpoint and self._trainer is not None:
            restore_rng_states(checkpoint["fillmask_rng"])

    def _datamodule_tokenizer(self) -> Tokenizer | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        return getattr(datamodule, "tokenizer", None) if datamodule is not None else None

    def setup(self, stage: str) -> None:
        self._decays = decay_flags(self)  # before a strategy (FSDP) flattens the parameters
        if self.hparams.get("compile") and not getattr(self, "_compiled", False):
            check_compiler(self.trainer.strategy.root_device)
            self.encoder.compile()  # in place: parameter names and checkpoints stay as they are
            self._compiled = True
        datamodule = getattr(self.trainer, "datamodule", None)
        length = getattr(datamodule, "max_length", None)
        limit = getattr(self.encoder, "max_positions", None)
        if length is not None and limit is not None and length > limit:
            raise MismatchError(
                f"data.max_length={length} exceeds the encoder's max_positions={limit}; lower "
                f"max_length to {limit} or build the encoder with max_positions >= {length}")
        tokenizer = self._datamodule_tokenizer()
        if tokenizer is None:
            return
        tokens = tokenizer.get_vocab_size()
        if tokens > self.encoder.vocab_size:
            raise MismatchError(
                f"the tokenizer has {tokens} tokens but the encoder's embedding has only "
                f"{self.encoder.vocab_size} rows; set the encoder's vocab_size to at least "
                f"{tokens} (the CLI links it from the data module) or use a smaller tokenizer"
            )


def check_compiler(device: torch.device) -> None:
    """``compile: true`` on a CPU needs a C++ compiler (torch.compile builds C++ kernels): say
    so before step 0 instead of failing inside the first compiled step."""
    if device.type != "cpu":
        return
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(name) for name in candidates):
        raise MismatchError(
            f"model.init_args.compile: true on a CPU needs a C++ compiler, and none of "
            f"{', '.join(candidates)} is on PATH; install one (apt install g++) or set "
            "compile: false")


def build_optimizer(groups: list[dict[str, Any]], name: Optimizer, lr: float,
                    betas: tuple[float, float], eps: float,
                    fused: bool = True) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``groups`` (each group's ``weight_decay`` and ``lr``, when
    set, are its own). Both apply weight decay as ``param *= 1 - lr x weight_decay``, decoupled
    from the gradient; :meth:`EncoderObjective._parameter_groups` has already divided it by the
    peak rate when ``decoupled_weight_decay`` is on."""
    if name == "stableadamw":
        from optimi import StableAdamW

        # decouple_lr stays off: the groups' weight decay is already expressed per unit of lr.
        # Its Triton kernel is for CUDA tensors: with triton installed (CUDA builds of torch
        # ship it) its default would pick the kernel for CPU parameters too, and fail.
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        return StableAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=0.0,
                           triton=None if on_cuda else False)
    if name != "adamw":
        raise MismatchError(f"model.init_args.optimizer={name!r} is not an optimiser fillmask "
                            "knows; choose adamw or stableadamw")
    fused = fused and fused_adamw_supports(groups)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def fused_adamw_supports(groups: list[dict[str, Any]]) -> bool:
    """Whether AdamW's fused kernel takes these parameters: floating point, on CPU or CUDA."""
    params = [p for group in groups for p in group["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


def data_parallel_processes(trainer: L.Trainer) -> int:
    """Processes that each see their own data (``num_nodes x devices`` under DDP and FSDP)."""
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
    return int(kwargs["num_replicas"]) if kwargs else 1


def log_global_batch_size(trainer: L.Trainer) -> int | None:
    """Log ``train/global_batch_size``, the sequences per optimiser step (batch size x
    accumulate_grad_batches x data-parallel processes), once, and print how it is made up.
    None when the per-process batch size is unknown (a data module without ``batch_size``)."""
    datamodule = getattr(trainer, "datamodule", None)
    per_process = getattr(datamodule, "batch_size", None) if datamodule is not None \
        else getattr(trainer.train_dataloader, "batch_size", None)
    if not isinstance(per_process, int):
        return None
    accumulate, processes = trainer.accumulate_grad_batches, data_parallel_processes(trainer)
    size = per_process * accumulate * processes
    rank_zero_info(f"global batch: {size} sequences per optimiser step ({per_process} per "
                   f"batch x {accumulate} accumulated x {processes} process(es))")
    for logger in trainer.loggers:  # loggers write on rank zero only
        logger.log_metrics({"train/global_batch_size": float(size)}, step=trainer.global_step)
    return size


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts that FSDP, activation checkpointing and torch.compile insert."""


def unwrapped_name(name: str) -> str:
    """A parameter's name without the wrappers' module names."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def decay_flags(module: torch.nn.Module) -> dict[str, bool]:
    """Whether each parameter (by unwrapped name) gets weight decay: matrices yes; biases,
    norms and other one-dimensional parameters no."""
    return {unwrapped_name(name): param.ndim >= 2 and "norm" not in name
            for name, param in module.named_parameters()}


_LAYER_INDEX = re.compile(r"\.(?:blocks|layers|layer)\.(\d+)\.")


def layer_depths(names: list[str]) -> dict[str, int]:
    """The depth of each parameter (by name) for layer-wise learning-rate decay: 0 for the
    encoder's embeddings, i + 1 for its block i, L + 1 for everything above the L blocks (the
    final norm, the heads)."""
    blocks = {n: int(m.group(1)) for n in names
              if n.startswith("encoder.") and (m := _LAYER_INDEX.search(n))}
    top = max(blocks.values(), default=-1) + 2
    return {n: blocks[n] + 1 if n in blocks else
            0 if n.startswith("encoder.") and "embed" in n else top for n in names}


def layerwise_groups(model: nn.Module, groups: list[dict[str, Any]], peak: float,
                     decay: float) -> list[dict[str, Any]]:
    """``groups`` split by depth, each with the learning rate ``peak x decay ** (top -
    depth)``: the heads train at the peak rate, each block below at ``decay`` times the rate of
    the one above, the embeddings slowest (ELECTRA's and DeBERTa's fine-tuning)."""
    names = {id(p): unwrapped_name(n) for n, p in model.named_parameters()}
    depths = layer_depths(list(names.values()))
    top = max(depths.values(), default=0)
    out = []
    for group in groups:
        by_depth: dict[int, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_depth.setdefault(depths[names[id(param)]], []).append(param)
        out += [{**group, "params": params, "lr": peak * decay ** (top - depth)}
                for depth, params in sorted(by_depth.items())]
    return out


def start_next_epoch_afresh(checkpoint: dict[str, Any]) -> None:
    """Fix a resume gap of Lightning's loops: a checkpoint saved after an epoch completed (a
    SIGTERM on the epoch's last batch lands there) still holds that epoch's batch counters, so
    the resumed run would end the next epoch after one batch. Zero them, as a new epoch does."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loops.get("epoch_progress"), loops.get("epoch_loop.batch_progress")
    if not epochs or not batches or not batches.get("is_last_batch"):
        return
    epoch = epochs["current"]
    if epoch["completed"] == epoch["processed"] and batches["current"]["completed"] > 0:
        batches["current"] = {key: 0 for key in batches["current"]}
        batches["is_last_batch"] = False


def collect_rng_states() -> dict[str, Any]:
    """The global generators' states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global generators back to ``states`` (from :func:`collect_rng_states`)."""
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def warmup_then_decay(warmup: int, total: int, schedule: Schedule, floor: float,
                      decay_fraction: float = 0.1):
    """Learning-rate multiplier: linear warm-up to 1, then decay to ``floor`` at ``total``
    (``wsd``: hold 1 until the last ``decay_fraction`` of the steps, then 1 - sqrt decay)."""
    if schedule == "wsd" and not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction={decay_fraction} must be in (0, 1]")

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "wsd":
            start = max(warmup, total - int(decay_fraction * total))
            progress = min(1.0, max(0, step - start) / max(1, total - start))
            return floor + (1.0 - floor) * (1.0 - math.sqrt(progress))
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return scale


def checkpoint_classes(ckpt: dict[str, Any]) -> tuple[type, type]:
    """The encoder and objective classes a checkpoint's metadata names, imported; a
    :class:`CheckpointError` names the distribution to install when one is missing."""
    return encoder_class(ckpt), objective_class(ckpt)


def load_objective(path: str | Path) -> tuple[EncoderObjective, Tokenizer | None]:
    """Rebuild the objective (encoder, heads, weights) and tokenizer stored in a checkpoint."""
    import inspect

    ckpt = read_checkpoint(path)
    encoder: Encoder = build_encoder(ckpt)
    model_cls = objective_class(ckpt)
    parameters = inspect.signature(model_cls).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items()
               if k != "encoder" and not k.startswith("_") and (open_ended or k in parameters)}
    model = model_cls(encoder=encoder, **hparams)
    check_state_dict(model, ckpt["state_dict"], path)
    model.load_state_dict(ckpt["state_dict"])
    info = ckpt["fillmask"]
    tokenizer = Tokenizer.from_str(info["tokenizer"]) if "tokenizer" in info else None
    return model, tokenizer


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """One line, instead of torch's list, when a checkpoint's weights do not fit the model its
    own configuration builds (an edited file, or one written by another version)."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    resized = [k for k in ours if k in state and tuple(ours[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or resized):
        return
    found = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
             f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else
             f"{resized[0]} has shape {tuple(state[resized[0]].shape)}, the configuration "
             f"gives {tuple(ours[resized[0]].shape)}")
    raise CheckpointError(f"{path}: its weights do not match the model its configuration "
                          f"describes ({found}); use the checkpoint as fillmask fit wrote it")


class MismatchError(FillmaskError, ValueError):
    """A configuration that cannot work (found before step 0), with the fix."""


def check_compatible(checkpoint: dict[str, Any], model: EncoderObjective) -> None:
    """Refuse to resume from a checkpoint of another objective, architecture or vocabulary,
    with one line naming what differs, instead of a state-dict error from deep inside torch."""
    info = checkpoint.get("fillmask") or {}
    saved = info.get("encoder") or {}
    ours = model.encoder.spec()
    if saved and saved.get("class_path") != ours["class_path"]:
        raise MismatchError(f"the checkpoint holds a {saved.get('class_path')} encoder but this "
                            f"run builds a {ours['class_path']}; resume with the config that "
                            "wrote the checkpoint, or start a new run without --ckpt_path")
    phased = getattr(model, "phased_options", set())  # a phase sets them again on resume
    differing = sorted(key for key, value in saved.get("init_args", {}).items()
                       if key in ours["init_args"] and ours["init_args"][key] != value
                       and "dropout" not in key  # regularisation may change between runs
                       and key not in phased)
    if differing:
        key = differing[0]
        raise MismatchError(
            f"the checkpoint's encoder has {key}={saved['init_args'][key]!r} but this run's has "
            f"{key}={ours['init_args'][key]!r} ({len(differing)} setting(s) differ: "
            f"{', '.join(differing)}); resume with the config and tokenizer that wrote it, or "
            "start from its weights with model.init_args.init_from")
    objective = info.get("objective")
    expected = f"{type(model).__module__}.{type(model).__qualname__}"
    if objective and objective != expected and not isinstance(model, import_class(objective)):
        raise MismatchError(f"the checkpoint was written by {objective}, this run trains "
                            f"{expected}; resume with the same objective")
