"""Callbacks that tell users how their run is going."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tokenizers import Tokenizer
from torch import nn

from fillmask.architectures.base import count_real_tokens
from fillmask.data.tokenize import SpecialTokens, resolve_special_tokens
from fillmask.errors import FillmaskError
from fillmask.heads import MLMHead


class FitSummary(L.Callback):
    """At the end of ``fit``, print the steps, wall time and last validation metrics."""

    def __init__(self) -> None:
        self._start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        minutes = (time.perf_counter() - self._start) / 60
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        shown = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(metrics.items()))
        rank_zero_info(f"fit done: {trainer.global_step} steps in {minutes:.1f} min; "
                       f"validation: {shown or 'not run'}")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 1024,
                        repeats: int = 10) -> float:
    """FLOP/s of a square matmul on ``device`` in ``dtype``: the peak utilisation is measured
    against (the hardware's dense peak is not known on every machine)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _synchronize(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput(L.Callback):
    """Log training tokens per second and useful-FLOP utilisation.

    Every ``log_every_n_steps`` the callback logs ``throughput/tokens_per_sec`` (all tokens of the
    run: this process's rate times the number of data-parallel processes),
    ``throughput/real_tokens_per_sec`` (non-padding) and ``throughput/utilisation``: useful model
    FLOPs (encoder on every real token, MLM head on masked positions only) per second over the
    peak measured by a square matmul at the start of training. Counts stay on the device
    between logs, so the training step is never synchronised for them.
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        """Args:
            peak_flops: The device's peak FLOP/s; measured with a matmul when not given.
        """
        self.peak_flops = peak_flops
        self._paused: float | None = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._since = now
        self._tokens = self._real = self._masked = 0
        self._steps = 0
        self._seq_len = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = measure_matmul_peak(pl_module.device, dtype)
        self._reset(time.perf_counter())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is not None:  # validation time does not count as training time
            self._since += time.perf_counter() - self._paused
            self._paused = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        self._tokens += ids.numel()
        self._real += count_real_tokens(batch)
        if "labels" in batch:
            self._masked += (batch["labels"] != -100).sum()
        self._seq_len = ids.shape[1]
        self._steps += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        real, masked = float(self._real), float(self._masked)
        # Every data-parallel process trains an equal share (fillmask's sharded sampler): the
        # run's rate is this process's times their number; utilisation stays per device.
        processes = max(1, trainer.world_size)
        metrics = {"throughput/tokens_per_sec": processes * self._tokens / elapsed,
                   "throughput/real_tokens_per_sec": processes * real / elapsed}
        encoder = getattr(pl_module, "encoder", None)
        if encoder is not None and self.peak_flops:
            flops = real * encoder.flops_per_token(self._seq_len)
            head = getattr(pl_module, "head", None)
            if head is not None:
                head_weights = sum(p.numel() for p in head.parameters() if p.ndim >= 2)
                flops += 6.0 * masked * head_weights
            metrics["throughput/utilisation"] = flops / elapsed / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        pl_module.log("tok/s", metrics["throughput/tokens_per_sec"], prog_bar=True,
                      on_step=True, on_epoch=False, logger=False)
        self._reset(now)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the metrics it shows every ``metrics_every``
    optimiser steps only.

    Showing a logged tensor copies it to the host, which on a GPU waits for every kernel queued
    so far; Lightning's bars read them after every batch, so a run with any progress-bar metric
    synchronises every step. Between reads this bar shows the values it read last (the batch
    counter moves on every batch); validation and epoch ends read them afresh.
    """

    def __init__(self, metrics_every: int | None = None, **kwargs: Any) -> None:
        """Args:
            metrics_every: Optimiser steps between reads; empty: the trainer's
                ``log_every_n_steps``.
            **kwargs: ``RichProgressBar``'s options (``refresh_rate``, ``leave``, ``theme``).
        """
        super().__init__(**kwargs)
        self.metrics_every = metrics_every
        self._shown: dict[str, Any] | None = None
        self._read_at = 0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if not trainer.training:
            self._shown = None
            return super().get_metrics(trainer, pl_module)
        every = self.metrics_every or max(1, trainer.log_every_n_steps)
        step = trainer.global_step
        if self._shown is None or step // every != self._read_at // every:
            self._shown, self._read_at = super().get_metrics(trainer, pl_module), step
        return self._shown


    def _get_train_description(self, current_epoch: int) -> str:
        # A phased run's epochs are its phases: name the phase (fillmask.phases sets the label).
        phase = getattr(self.trainer.lightning_module, "phase_label", None)
        if phase is not None:
            return f"{phase:{len(self.validation_description)}}"
        # Lightning's reads "Epoch 21/-2" when the run is bounded by max_steps (max_epochs -1).
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            description = f"Epoch {current_epoch}"
            return f"{description:{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


class ModelSummary(LightningModelSummary):
    """The model's layers and parameter counts at the start of ``fit``, as a table.

    Lightning's summary adds a FLOPs column and a "Total FLOPs" line that read 0 unless the
    model defines ``example_input_array`` (fillmask's objectives take variable batches, so
    they never do): this one shows FLOPs only when they were measured. Every fillmask run
    uses it in place of Lightning's default summary.
    """

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int,
                  trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        from lightning.pytorch.utilities.model_summary.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data
                   if name != "FLOPs" or total_flops > 0]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "FLOPs") else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        totals = Table.grid()
        frozen = total_parameters - trainable_parameters
        lines = [("Trainable params", get_human_readable_count(int(trainable_parameters))),
                 ("Non-trainable params", get_human_readable_count(int(frozen))),
                 ("Total params", get_human_readable_count(int(total_parameters))),
                 ("Estimated size (MB)", get_formatted_model_size(model_size)),
                 ("Modules in train / eval mode",
                  f"{total_training_modes['train']} / {total_training_modes['eval']}")]
        if total_flops > 0:
            lines.append(("Total FLOPs", get_human_readable_count(total_flops)))
        for label, value in lines:
            totals.add_row(f"[bold]{label}[/]: {value}")
        console = get_console()
        console.print(table)
        console.print(totals)


def use_fillmask_summary(trainer: L.Trainer) -> None:
    """Put :class:`ModelSummary` in place of the summary Lightning adds by default (a
    configured summary callback of another class stays)."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (LightningModelSummary, RichModelSummary):
            trainer.callbacks[index] = ModelSummary(max_depth=callback._max_depth)


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``grads`` taken as one vector (0-d float32, on the first's device)."""
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


class GradNorm(L.Callback):
    """Log the total L2 norm of the gradients, before clipping, as ``train/grad_norm``.

    Measured in ``on_before_optimizer_step``: after backward (and, under fp16 mixed precision,
    after unscaling), before Lightning clips the gradients and steps. Only the steps the trainer
    logs (every ``trainer.log_every_n_steps``) compute it, so the others pay nothing. Under a
    sharded strategy (FSDP) it is the norm of this process's shard.
    """

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        every = trainer.log_every_n_steps
        # global_step counts the optimizer steps taken; this one is number global_step + 1.
        if every <= 0 or (trainer.global_step + 1) % every:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        if grads:
            pl_module.log("train/grad_norm", total_grad_norm(grads), on_step=True,
                          on_epoch=False)


Candidates = list[tuple[str, float]]
"""The top-k (token, probability) pairs predicted for one mask."""


class FillMaskProbes(L.Callback):
    """Watch the model learn: fill the masks of a few cloze sentences every N training steps.

    Every ``every_n_steps`` optimizer steps and at the end of ``fit``, the current weights
    (model in eval mode, without gradients) fill each mask of ``sentences``, written with the
    tokenizer's mask token (``[MASK]`` or ``<mask>``). The ``top_k`` candidates are logged as a
    text table (tag ``probe/fill_mask``) to every TensorBoard logger, or printed when the run has
    none. With ``pseudo_perplexity`` the pseudo-perplexity of ``ppl_sentences`` (plain text,
    every token masked in turn, in batches) is logged as ``probe/pseudo_perplexity``.

    The probes run on rank zero (on every rank under a sharded strategy, whose forward needs
    them all), draw no random numbers and restore each module's train/eval mode, so the
    training run is the same with and without them. They need a model with an ``encoder`` and
    a masked-LM ``head`` (``MaskedLM`` and its subclasses) and the data module's tokenizer.
    """

    def __init__(
        self,
        sentences: list[str],
        every_n_steps: int = 500,
        top_k: int = 5,
        pseudo_perplexity: bool = False,
        ppl_sentences: list[str] | None = None,
        batch_size: int = 64,
    ) -> None:
        """Args:
            sentences: Cloze sentences, each with at least one mask token.
            every_n_steps: Probe every this many optimizer steps (and at the end of fit).
            top_k: Candidates shown per mask.
            pseudo_perplexity: Also log the pseudo-perplexity of ``ppl_sentences``.
            ppl_sentences: Plain sentences (no mask) scored when ``pseudo_perplexity`` is on.
            batch_size: Rows per forward pass when scoring (one row per token of
                ``ppl_sentences``).
        """
        if not sentences:
            raise ValueError("FillMaskProbes needs at least one sentence with a mask token")
        for name, value in (("every_n_steps", every_n_steps), ("top_k", top_k),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"FillMaskProbes {name}={value} must be at least 1")
        if pseudo_perplexity and not ppl_sentences:
            raise ValueError("FillMaskProbes pseudo_perplexity=true needs ppl_sentences: plain "
                             "sentences to score")
        if ppl_sentences and not pseudo_perplexity:
            rank_zero_warn("FillMaskProbes: ppl_sentences are ignored unless "
                           "pseudo_perplexity=true")
        self.sentences = list(sentences)
        self.every_n_steps = every_n_steps
        self.top_k = top_k
        self.pseudo_perplexity = pseudo_perplexity
        self.ppl_sentences = list(ppl_sentences or [])
        self.batch_size = batch_size
        self.last_predictions: list[list[Candidates]] = []
        """Of the latest probe: per sentence, per mask, the top-k candidates."""
        self.last_pseudo_perplexity: float | None = None
        """Of the latest probe, when ``pseudo_perplexity`` is on."""
        self._probed_step = -1

    # Setup: encode the sentences once.

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._tokenizer, self._special = _tokenizer_of(trainer)
        encoder, head = getattr(pl_module, "encoder", None), getattr(pl_module, "head", None)
        if encoder is None or not isinstance(head, MLMHead):
            raise FillmaskError(f"FillMaskProbes needs a model with an `encoder` and a masked-LM "
                                f"`head` (MaskedLM); {type(pl_module).__name__} has none")
        limit = getattr(encoder, "max_positions", None)
        self._mask_token = self._tokenizer.id_to_token(self._special.mask_id)
        self._cloze = self._encode(self.sentences, limit)
        for sentence, row in zip(self.sentences, self._cloze, strict=True):
            if not (row == self._special.mask_id).any():
                raise FillmaskError(f"FillMaskProbes sentence {sentence!r} has no mask token; "
                                    f"write {self._mask_token} where the model should fill in")
        if self.pseudo_perplexity:
            self._scored = _one_mask_per_row(self._encode(self.ppl_sentences, limit),
                                             self._special)

    def _encode(self, texts: list[str], limit: int | None) -> torch.Tensor:
        """Token ids (B, T) of ``texts``, padded; a text longer than ``limit`` is an error."""
        encodings = self._tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = torch.full((len(texts), width), self._special.pad_id, dtype=torch.long)
        for row, (text, e) in enumerate(zip(texts, encodings, strict=True)):
            if limit is not None and len(e.ids) > limit:
                raise FillmaskError(f"FillMaskProbes sentence {text!r} has {len(e.ids)} tokens, "
                                    f"more than the encoder's {limit} positions; shorten it")
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
        return ids

    # When to probe.

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._probed_step:
            self._probe(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._probed_step:
            self._probe(trainer, pl_module)

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._probed_step = trainer.global_step
        if not (trainer.is_global_zero or _sharded(trainer)):
            return
        with _eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            self.last_predictions = self._fill(pl_module)
            if self.pseudo_perplexity:
                self.last_pseudo_perplexity = self._pseudo_perplexity(pl_module)
        if trainer.is_global_zero:
            self._report(trainer)

    # What a probe computes.

    def _logits(self, pl_module: L.LightningModule, ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """Float logits (N, V) over the tokenizer's vocabulary at (row, column) ``positions``."""
        hidden = pl_module.encoder(ids, attention_mask=ids != self._special.pad_id)  # (B, T, C)
        logits = pl_module.head(hidden[positions[:, 0], positions[:, 1]])  # (N, V), V rounded up
        return logits[:, : self._tokenizer.get_vocab_size()].float()

    def _fill(self, pl_module: L.LightningModule) -> list[list[Candidates]]:
        ids = self._cloze.to(pl_module.device)
        at_mask = (ids == self._special.mask_id).nonzero()  # (M, 2), row-major order
        probs = self._logits(pl_module, ids, at_mask).softmax(-1)  # (M, V)
        scores, top = probs.topk(min(self.top_k, probs.shape[-1]))  # (M, k)
        per_sentence: list[list[Candidates]] = [[] for _ in self.sentences]
        for row, ids_, scores_ in zip(at_mask[:, 0].tolist(), top.tolist(), scores.tolist(),
                                      strict=True):
            tokens = [self._tokenizer.id_to_token(i) for i in ids_]
            per_sentence[row].append(list(zip(tokens, scores_, strict=True)))
        return per_sentence

    def _pseudo_perplexity(self, pl_module: L.LightningModule) -> float:
        """exp of minus the mean log-probability of each token given all the others."""
        rows, columns, targets = (t.to(pl_module.device) for t in self._scored)
        total = torch.zeros((), device=pl_module.device)
        for start in range(0, len(rows), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            n = len(rows[chunk])
            where = torch.stack([torch.arange(n, device=rows.device), columns[chunk]], dim=1)
            logp = self._logits(pl_module, rows[chunk], where).log_softmax(-1)  # (n, V)
            total += logp.gather(1, targets[chunk, None]).sum()
        return math.exp(-float(total) / max(len(rows), 1))

    # Reporting.

    def _report(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        boards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        for board in boards:
            board.experiment.add_text("probe/fill_mask", self.markdown(), global_step=step)
        ppl = self.last_pseudo_perplexity if self.pseudo_perplexity else None
        if ppl is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"probe/pseudo_perplexity": ppl}, step=step)
        if not boards:
            shown = "" if ppl is None else f" (pseudo-perplexity {ppl:.2f})"
            rank_zero_info(f"probes at step {step}{shown}:\n{self.plain_text()}")

    def _filled(self, sentence: str, masks: list[Candidates], mark: str) -> str:
        """``sentence`` with each mask replaced by its top candidate, between ``mark``s."""
        for candidates in masks:
            sentence = sentence.replace(self._mask_token, f"{mark}{candidates[0][0]}{mark}", 1)
        return sentence

    def markdown(self) -> str:
        """The latest predictions as a markdown table (TensorBoard renders it)."""
        lines = ["| sentence, top-1 filled in | candidates |", "|---|---|"]
        for sentence, masks in zip(self.sentences, self.last_predictions, strict=True):
            filled = self._filled(sentence, masks, "**").replace("|", "\\|")
            shown = "; ".join(
                f"[{m}] " + ", ".join(f"{_code(token)} {p:.3f}" for token, p in candidates)
                for m, candidates in enumerate(masks, start=1))
            lines.append(f"| {filled} | {shown} |")
        return "\n".join(lines)

    def plain_text(self) -> str:
        """The latest predictions as indented lines, for the console."""
        lines = []
        for sentence, masks in zip(self.sentences, self.last_predictions, strict=True):
            lines.append(f"  {self._filled(sentence, masks, '*')}")
            for m, candidates in enumerate(masks, start=1):
                shown = "  ".join(f"{token} {p:.3f}" for token, p in candidates)
                lines.append(f"    [{m}] {shown}")
        return "\n".join(lines)


def _tokenizer_of(trainer: L.Trainer) -> tuple[Tokenizer, SpecialTokens]:
    """The data module's tokenizer and its special-token ids."""
    datamodule = getattr(trainer, "datamodule", None)
    tokenizer = getattr(datamodule, "tokenizer", None)
    if not isinstance(tokenizer, Tokenizer):
        raise FillmaskError("FillMaskProbes needs the data module's tokenizer "
                            "(trainer.datamodule.tokenizer); fit with a MaskedLMDataModule")
    special = getattr(datamodule, "special_tokens", None)
    if not isinstance(special, SpecialTokens):
        special = resolve_special_tokens(tokenizer)
    return tokenizer, special


def _one_mask_per_row(ids: torch.Tensor, special: SpecialTokens
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every ordinary token of every sentence masked in turn: the rows (R, T), the masked
    column of each (R,) and the token it hid (R,)."""
    ordinary = ~torch.isin(ids, torch.tensor([*special.special_ids, special.pad_id]))  # (B, T)
    sentence, column = ordinary.nonzero(as_tuple=True)  # (R,), (R,)
    rows = ids[sentence].clone()  # (R, T)
    rows[torch.arange(len(rows)), column] = special.mask_id
    return rows, column, ids[sentence, column]


def _sharded(trainer: L.Trainer) -> bool:
    """Whether the model's forward needs every process (parameters sharded across them)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode, then give every submodule back its own mode (a distillation
    teacher stays in eval mode, the student returns to training)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _code(token: str) -> str:
    """``token`` as a markdown code span that survives a table cell."""
    token = token.replace("|", "\\|")
    return f"`` {token} ``" if "`" in token else f"`{token}`"
