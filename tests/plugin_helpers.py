"""Fake installed distributions for registry tests: a module and a ``.dist-info`` folder with
``entry_points.txt`` on a folder that goes on ``sys.path`` (or ``PYTHONPATH``), which is all
``importlib.metadata`` needs to see an installed package."""

from __future__ import annotations

from pathlib import Path

TOY_ENCODER = '''
"""A toy architecture: embeddings, then residual MLP blocks that mix tokens through the mean of
the real tokens of their sequence."""

import torch
from torch import nn

from fillmask.architectures.base import Encoder


class ToyEncoder(Encoder):
    presets = {"tiny": {}}

    def __init__(self, vocab_size: int = 1000, hidden_size: int = 32, num_layers: int = 2,
                 num_heads: int = 1, intermediate_size: int = 64, max_positions: int = 128,
                 embedding_size: int | None = None) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.max_positions, self.num_layers = max_positions, num_layers
        self.tokens = nn.Embedding(vocab_size, hidden_size)
        self.positions = nn.Embedding(max_positions, hidden_size)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, intermediate_size),
                          nn.GELU(), nn.Linear(intermediate_size, hidden_size))
            for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def embedding_tables(self):
        return {"tokens": self.tokens, "positions": self.positions}

    def set_embedding_table(self, role, table):
        setattr(self, role, table)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                document_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        real = attention_mask[..., None].float()  # (B, T, 1)
        x = self.tokens(input_ids) + self.positions(position_ids)  # (B, T, C)
        for block in self.blocks:
            context = (x * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)  # (B, 1, C)
            x = x + block(x + context)
        return self.norm(x)
'''


def make_distribution(root: Path, name: str, version: str, modules: dict[str, str],
                      entry_points: dict[str, dict[str, str]]) -> Path:
    """Write ``modules`` (module name -> source) and a ``name-version.dist-info`` declaring
    ``entry_points`` (group -> {entry name -> "module:attr"}) under ``root``; return root."""
    root.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                   encoding="utf-8")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{entry} = {target}" for entry, target in entries.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (info / "top_level.txt").write_text("\n".join(modules) + "\n", encoding="utf-8")
    return root


def toy_plugin(root: Path, name: str = "fillmask-toy", module: str = "fillmask_toy",
               version: str = "0.3.0") -> Path:
    """A distribution that registers ``ToyEncoder`` as an architecture."""
    return make_distribution(root, name, version, {module: TOY_ENCODER},
                             {"fillmask.architectures": {"ToyEncoder": f"{module}:ToyEncoder"}})
