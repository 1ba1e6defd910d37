"""Evaluation state gathered across processes: the reranker's scored pairs and extractive QA's
logits, as two gloo processes on CPU see them."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fillmask.objectives.qa import _gather
from fillmask.objectives.rerank import gather_columns


def rank_state(rank: int) -> tuple[torch.Tensor, dict, list]:
    """Different amounts of state per rank, as uneven shards leave them."""
    count = 2 + 3 * rank
    scored = torch.stack([torch.full((count,), float(rank)), torch.arange(count).double(),
                          torch.rand(count, dtype=torch.float64)])  # (3, count)
    logits = {10 * rank + i: (rank, i) for i in range(count)}
    losses = [(float(rank), count)]
    return scored, logits, losses


def worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        scored, logits, losses = rank_state(rank)
        gathered = gather_columns(scored)
        merged_logits, merged_losses = _gather((logits, losses))
        torch.save({"scored": gathered, "logits": merged_logits, "losses": merged_losses},
                   f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_see_every_process_state(tmp_path: Path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(worker, args=(init, str(tmp_path / "out")), nprocs=2, join=True)
    expected = []
    for rank in range(2):
        torch.manual_seed(rank)
        expected.append(rank_state(rank))
    want_scored = torch.cat([e[0] for e in expected], dim=1)
    want_logits = {**expected[0][1], **expected[1][1]}
    want_losses = expected[0][2] + expected[1][2]
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        torch.testing.assert_close(got["scored"], want_scored)  # rank order, all columns
        assert got["logits"] == want_logits
        assert got["losses"] == want_losses


def test_one_process_keeps_its_own_state():
    scored, logits, losses = rank_state(0)
    assert gather_columns(scored) is scored
    assert _gather((logits, losses)) == (logits, losses)
