"""``fillmask merge``: checkpoints of one architecture combined into one checkpoint.

Two methods. ``mean`` averages the weights, uniformly or with given weights (a "model soup",
Wortsman et al. 2022). ``ties`` is TIES-merging (Yadav et al. 2023), which mmBERT used on its
decay-phase variants: each checkpoint's change from a shared ``base`` is trimmed to its largest
``density`` share by magnitude (per tensor), a sign is elected per entry from the weighted sum of
the trimmed changes, and only the changes that agree with it are averaged onto the base.

The result is a checkpoint like the ones ``fillmask fit`` writes (the first checkpoint's
metadata, tokenizer and hyper-parameters, the merged weights) with no optimiser state: it fills
masks, exports and fine-tunes like any other, and a new run starts from it with
``model.init_args.init_from``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from fillmask.checkpoint_file import CheckpointError, read_checkpoint
from fillmask.errors import FillmaskError
from fillmask.objectives.base import load_objective

Method = Literal["mean", "ties"]
METHODS = ("mean", "ties")
DROPPED_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "fillmask_rng")
"""Training state of the first checkpoint that does not describe the merged weights."""


class MergeError(FillmaskError):
    """Checkpoints that cannot be merged, or options that do not fit them."""


def merge_states(states: Sequence[dict[str, torch.Tensor]], method: Method = "mean",
                 weights: Sequence[float] | None = None,
                 base: dict[str, torch.Tensor] | None = None,
                 density: float = 0.2) -> dict[str, torch.Tensor]:
    """Merge state dicts with identical keys and shapes. Integer and boolean tensors (step
    counters, index buffers) are not averaged: they must be equal, and the first is kept."""
    mix = merge_weights(len(states), weights)
    if method == "ties" and base is None:
        raise MergeError("--method ties needs --base: the checkpoint the merged runs started "
                         "from (their changes from it are what TIES trims and elects)")
    if method not in METHODS:
        raise MergeError(f"--method {method!r} is not a merge method; choose mean or ties")
    if not 0.0 < density <= 1.0:
        raise MergeError(f"--density {density} must be in (0, 1]: the share of each "
                         "checkpoint's changes TIES keeps")
    merged = {}
    for name, first in states[0].items():
        values = [state[name] for state in states]
        if not first.is_floating_point():
            if any(not torch.equal(first, value) for value in values[1:]):
                raise MergeError(f"{name} (a {first.dtype} tensor) differs between the "
                                 "checkpoints and cannot be averaged")
            merged[name] = first.clone()
        elif method == "mean":
            merged[name] = weighted_mean(values, mix).to(first.dtype)
        else:
            assert base is not None
            merged[name] = ties(values, base[name], mix, density).to(first.dtype)
    return merged


def merge_weights(count: int, weights: Sequence[float] | None) -> torch.Tensor:
    """The mixing weights, normalised to sum to 1 (uniform when none are given)."""
    if count < 2:
        raise MergeError(f"give at least two checkpoints to merge (got {count})")
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    if len(weights) != count:
        raise MergeError(f"--weights has {len(weights)} values for {count} checkpoints; give "
                         "one per checkpoint")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise MergeError(f"--weights {list(weights)} must be non-negative with a positive sum")
    mix = torch.tensor(weights, dtype=torch.float64)
    return mix / mix.sum()


def weighted_mean(values: Sequence[torch.Tensor], mix: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([v.double() for v in values])  # (N, ...)
    return torch.tensordot(mix, stacked, dims=1)


def trim(change: torch.Tensor, density: float) -> torch.Tensor:
    """``change`` with all but its ``density`` share of largest-magnitude entries zeroed."""
    keep = max(1, int(round(density * change.numel())))
    if keep >= change.numel():
        return change
    threshold = change.abs().flatten().kthvalue(change.numel() - keep + 1).values
    return torch.where(change.abs() >= threshold, change, torch.zeros_like(change))


def ties(values: Sequence[torch.Tensor], base: torch.Tensor, mix: torch.Tensor,
         density: float) -> torch.Tensor:
    """TIES-merging of one tensor: trim, elect sign, disjoint (weighted) mean of the agreeing
    changes, added to ``base``."""
    changes = torch.stack([trim(v.double() - base.double(), density) for v in values])  # (N, ...)
    scale = mix.view(-1, *([1] * base.ndim))  # (N, 1, ...)
    sign = torch.sign((scale * changes).sum(0))  # (...)
    agree = (torch.sign(changes) == sign) & (changes != 0)  # (N, ...)
    total = (scale * agree).sum(0)
    merged = (scale * changes * agree).sum(0) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return base.double() + merged


def check_mergeable(checkpoints: Sequence[dict[str, Any]], paths: Sequence[str]) -> None:
    """One line naming the first checkpoint that differs from the first one in architecture,
    encoder settings, vocabulary or weights' names and shapes."""
    first, reference = checkpoints[0], paths[0]
    spec = first["fillmask"].get("encoder", {})
    for ckpt, path in zip(checkpoints[1:], paths[1:], strict=True):
        other = ckpt["fillmask"].get("encoder", {})
        if other.get("class_path") != spec.get("class_path"):
            raise MergeError(f"{path} holds a {other.get('class_path')} encoder, {reference} a "
                             f"{spec.get('class_path')}; merge checkpoints of one architecture")
        args, ours = other.get("init_args", {}), spec.get("init_args", {})
        differing = sorted(k for k in set(args) | set(ours)
                           if args.get(k) != ours.get(k) and "dropout" not in k)
        if differing:
            key = differing[0]
            raise MergeError(f"{path} has {key}={args.get(key)!r}, {reference} has "
                             f"{key}={ours.get(key)!r}; merge checkpoints of one configuration")
        if ckpt["fillmask"].get("tokenizer") != first["fillmask"].get("tokenizer"):
            raise MergeError(f"{path} was trained with another tokenizer (vocabulary) than "
                             f"{reference}; merged weights need one vocabulary")
        mine, theirs = first["state_dict"], ckpt["state_dict"]
        if set(mine) != set(theirs):
            name = sorted(set(mine) ^ set(theirs))[0]
            raise MergeError(f"{path} and {reference} hold different weights ({name} is in one "
                             "only); merge checkpoints of the same objective")
        for name, tensor in mine.items():
            if tensor.shape != theirs[name].shape:
                raise MergeError(f"{name} has shape {tuple(theirs[name].shape)} in {path} but "
                                 f"{tuple(tensor.shape)} in {reference}")


def merge_checkpoints(paths: Sequence[str], output: str | Path, method: Method = "mean",
                      weights: Sequence[float] | None = None, base: str | None = None,
                      density: float = 0.2, overwrite: bool = False) -> Path:
    """Merge the checkpoints at ``paths`` into a new checkpoint at ``output``; an existing
    file there is kept unless ``overwrite``."""
    output = Path(output).expanduser()
    if output.exists() and not overwrite:
        raise MergeError(f"{output} exists; choose another --output or pass --overwrite")
    sources = [*paths, base] if base else list(paths)
    if output.resolve() in {Path(p).expanduser().resolve() for p in sources}:
        raise MergeError(f"--output {output} is one of the inputs; write the merge elsewhere")
    mix = merge_weights(len(paths), weights)  # the cheap checks before reading any weights
    checkpoints = [read_checkpoint(path) for path in paths]
    base_ckpt = read_checkpoint(base) if base else None
    check_mergeable([*checkpoints, base_ckpt] if base_ckpt else checkpoints, sources)
    states = [ckpt["state_dict"] for ckpt in checkpoints]
    merged_state = merge_states(states, method, weights,
                                base_ckpt["state_dict"] if base_ckpt else None, density)
    merged = {k: v for k, v in checkpoints[0].items() if k not in DROPPED_KEYS}
    merged["state_dict"] = merged_state
    merged["fillmask"] = {**checkpoints[0]["fillmask"], "merged": {
        "method": method, "checkpoints": [str(p) for p in paths], "base": base,
        "weights": mix.tolist(), "density": density}}
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    torch.save(merged, partial)
    try:
        load_objective(partial)  # the merged file rebuilds as a model before it takes the name
    except BaseException:
        partial.unlink()
        raise
    partial.replace(output)
    return output


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fillmask merge", description=(
        "Merge checkpoints of one architecture and vocabulary into one checkpoint: a weighted "
        "mean (model soup) or TIES-merging against the checkpoint they started from."))
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="two or more checkpoints written by fillmask fit")
    parser.add_argument("--method", choices=METHODS, default="mean",
                        help="mean (default) or ties")
    parser.add_argument("--weights", nargs="+", type=float,
                        help="one weight per checkpoint (normalised; default uniform)")
    parser.add_argument("--base", help="ties: the checkpoint the merged runs started from")
    parser.add_argument("--density", type=float, default=0.2,
                        help="ties: share of each checkpoint's changes kept (default 0.2)")
    parser.add_argument("--output", required=True, help="the checkpoint file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    if args.base and args.method != "ties":
        parser.error("--base is for --method ties; mean merges need no base")
    try:
        path = merge_checkpoints(args.checkpoints, args.output, args.method, args.weights,
                                 args.base, args.density, args.overwrite)
    except (MergeError, CheckpointError) as error:
        parser.error(str(error))
    print(f"wrote {path}: {args.method} of {len(args.checkpoints)} checkpoints")
    return 0


__all__ = ["MergeError", "merge_checkpoints", "merge_main", "merge_states"]
