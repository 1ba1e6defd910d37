"""Test helpers for fillmask and for plugin packages: import the fixtures into a
``conftest.py`` (``from fillmask.testing import isolated_cache, one_thread, small_corpus``) and
check an export with :func:`assert_export_matches`; train a few steps on ready-made batches with
:func:`fit_losses`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Corpora and tokenizers are built in one fresh session cache, never in ~/.cache."""
    cache = tmp_path_factory.mktemp("fillmask-cache")
    previous = os.environ.get("FILLMASK_CACHE")
    os.environ["FILLMASK_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("FILLMASK_CACHE", None)
    else:
        os.environ["FILLMASK_CACHE"] = previous


def fit_losses(model: L.LightningModule, batches: list[dict[str, torch.Tensor]], folder: Path,
               steps: int) -> list[float]:
    """Train ``model`` for ``steps`` optimiser steps on ready-made ``batches`` (no validation,
    logging or checkpoints, files under ``folder``); the loss of every step."""
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=folder, callbacks=[Record()])
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    return losses


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests: tiny models gain nothing from more, and lose
    much when other processes share the cores (busy-waiting threads stall every operation).
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text corpus file: the first 60 documents of the embedded python-docs corpus."""
    from fillmask.data.embedded import python_docs_documents

    docs = python_docs_documents()[:60]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(d.text for d in docs) + "\n", encoding="utf-8")
    return path


def assert_export_matches(checkpoint: Path, folder: Path, architecture: str,
                          text: str = "the [MASK] of a list is [MASK]") -> None:
    """transformers loads ``folder`` (written by ``fillmask export`` from ``checkpoint``) as
    ``architecture``, its tokenizer encodes ``text`` as fillmask's does, its logits equal
    fillmask's to 1e-5, and importing the folder back gives the checkpoint's weights exactly."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from fillmask.interop.hf import import_transformers
    from fillmask.objectives.base import load_objective

    model, tokenizer = load_objective(checkpoint)
    reference = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert type(reference).__name__ == architecture
    ids = torch.tensor([tokenizer.encode(text).ids])
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        ours = model.eval().head(model.encoder(ids))  # (1, T, V)
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    again, _ = import_transformers(folder)
    original = model.state_dict()
    assert set(again.state_dict()) == set(original)
    assert all(torch.equal(v, original[k]) for k, v in again.state_dict().items())
