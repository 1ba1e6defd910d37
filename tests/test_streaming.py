"""Streaming from shards: `fillmask data prepare` writes fillmask's packed blocks as Parquet
shards, and StreamingMaskedLMDataModule trains on them (through Hugging Face datasets) with the
in-memory module's masks, equal steps on every rank, an exact mid-epoch resume through
Lightning, and memory that does not grow with the corpus."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from fillmask.architectures.bert import BertEncoder
from fillmask.data import prepare
from fillmask.data.datamodule import BlockDataset, MaskedLMDataModule
from fillmask.data.packing import (
    DocumentPacking,
    LinePacking,
    Packing,
    SentencePairs,
)
from fillmask.data.prepare import data_main, prepare_shards
from fillmask.data.streaming import (
    BlockStream,
    ShardError,
    StreamingMaskedLMDataModule,
    table_columns,
)
from fillmask.objectives.mlm import MaskedLM

GOLDEN = Path(__file__).resolve().parent / "assets" / "golden"
BATCH = 64  # the golden corpus gives 844 training blocks of 32 tokens: 13 batches per epoch
STORED_TYPES = {"input_ids": np.uint16, "word_starts": np.uint8, "doc_lengths": np.int32,
                "token_type_ids": np.uint8}
PACKINGS = {"line": LinePacking, "document": DocumentPacking, "pairs": SentencePairs}


def in_memory(corpus: str, packing: Packing | None = None) -> MaskedLMDataModule:
    """The in-memory module of ``corpus`` with the golden tokenizer, packed to 32 tokens."""
    dm = MaskedLMDataModule(corpus=corpus, tokenizer=str(GOLDEN / "tokenizer.json"),
                            max_length=32, packing=packing)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> tuple[Path, MaskedLMDataModule]:
    """The golden corpus packed in memory and prepared into shards of 16 KB (6 files)."""
    dm = in_memory(str(GOLDEN / "corpus.txt"))
    folder = tmp_path_factory.mktemp("shards") / "golden"
    prepare_shards(dm, folder, shard_bytes="16KB")
    return folder, dm


def stored(folder: Path, split: str) -> dict[int, dict]:
    """Every row of a split's Parquet files, by sample id, with the types Parquet kept."""
    items: dict[int, dict] = {}
    files = sorted((folder / split).glob("part-*.parquet"))
    assert [f"{split}/{f.name}" for f in files] == json.loads(
        (folder / "fillmask.json").read_text())["splits"][split]["files"]
    for file in files:
        columns = table_columns(pq.read_table(file), fixed_length=False)
        for row in range(len(columns["sample_id"])):
            item = {name: values[row] for name, values in columns.items()}
            assert int(item["sample_id"]) not in items
            items[int(item["sample_id"])] = item
    return items


# The shards.


@pytest.mark.parametrize("packing", ["chunk", *PACKINGS])
def test_shards_hold_exactly_the_in_memory_blocks(golden, tmp_path, packing):
    folder, dm = golden
    if packing in PACKINGS:
        dm = in_memory(str(GOLDEN / "corpus.txt"), PACKINGS[packing]())
        folder = tmp_path / packing
        prepare_shards(dm, folder, shard_bytes="16KB")
    manifest = json.loads((folder / "fillmask.json").read_text())
    for split in ("train", "validation"):
        rows = dm.samples[split].with_format("numpy")
        items = stored(folder, split)
        assert sorted(items) == list(range(len(rows))) and len(rows) > 20
        for sid, item in items.items():
            row = rows[sid]
            for field in row:  # input_ids, word_starts and the packing's own fields
                assert np.array_equal(item[field], row[field]), (split, sid, field)
                if field in STORED_TYPES:  # as packed, not widened to int64
                    assert item[field].dtype == STORED_TYPES[field]
        tokens = sum(len(item["input_ids"]) for item in items.values())
        assert manifest["splits"][split]["samples"] == len(rows)
        assert manifest["splits"][split]["tokens"] == tokens
    streaming = StreamingMaskedLMDataModule(str(folder))
    assert streaming.max_length == 32 and streaming.vocab_size == dm.vocab_size
    assert streaming.special_tokens == dm.special_tokens
    assert type(streaming.packing) is type(dm.packing)
    assert streaming.tokenizer.to_str() == dm.tokenizer.to_str()
    assert np.array_equal(streaming.token_counts(), dm.token_counts())
    # A streamed batch is the in-memory module's batch of the same samples, field for field.
    batch = next(iter(streaming.train_dataloader()))
    blocks = BlockDataset(dm.samples["train"])
    expected = dm.collator(train=True)(blocks.__getitems__([(0, i) for i in
                                                            batch["sample_id"].tolist()]))
    assert batch.keys() == expected.keys()
    assert all(torch.equal(batch[key], expected[key]) for key in batch)


def test_urls_stream_through_fsspec(golden, tmp_path):
    """A ``file://`` URL stands in for object storage (s3://, gs://: the same fsspec path): the
    manifest and tokenizer are downloaded to the cache, shards are streamed by datasets, and the
    stream is the local folder's."""
    folder, _ = golden
    local = StreamingMaskedLMDataModule(str(folder), batch_size=16, seed=5)
    remote = StreamingMaskedLMDataModule(folder.as_uri(), batch_size=16, seed=5,
                                         cache_dir=str(tmp_path / "cache"))
    assert remote.vocab_size == local.vocab_size and remote.max_length == local.max_length
    assert remote.files("train")[0].startswith("file://")
    batches = 0
    for left, right in zip(local.train_dataloader(), remote.train_dataloader(), strict=True):
        assert all(torch.equal(left[key], right[key]) for key in left)
        batches += 1
    assert batches == 844 // 16
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.json")) == ["fillmask.json",
                                                                            "tokenizer.json"]


def test_prepare_command_reads_the_run_config(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  corpus: {GOLDEN / 'corpus.txt'}\n"
                      f"  tokenizer: {GOLDEN / 'tokenizer.json'}\n  max_length: 64\n")
    output = tmp_path / "shards"
    args = ["prepare", "--config", str(config), "--output", str(output)]
    assert data_main([*args, "--data.max_length", "32", "--data.packing", "LinePacking"]) == 0
    assert "training and" in capsys.readouterr().out
    manifest = json.loads((output / "fillmask.json").read_text())
    assert manifest["max_length"] == 32
    assert manifest["packing"]["class_path"] == "fillmask.data.packing.LinePacking"
    assert (output / "tokenizer.json").is_file()
    assert (output / "train" / "part-00000.parquet").is_file()

    assert data_main(args) == 2  # never overwrites without being asked
    error = capsys.readouterr().err
    assert "is not empty" in error and "--overwrite" in error and len(error.splitlines()) == 1
    assert data_main([*args, "--overwrite"]) == 0
    assert json.loads((output / "fillmask.json").read_text())["max_length"] == 64

    streaming_run = Path(__file__).resolve().parents[1] / "configs" / "streaming-example.yaml"
    assert data_main(["prepare", "--config", str(streaming_run), "--output", str(tmp_path)]) == 2
    assert "not a corpus" in capsys.readouterr().err


def test_a_folder_without_manifest_is_one_clear_line(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ShardError, match="holds no readable fillmask.json; prepare it with"):
        StreamingMaskedLMDataModule(str(tmp_path)).setup("fit")


# Masks.


def masks_by_sample(loader, epochs: int = 1) -> list[dict[int, tuple[list, list]]]:
    """Per epoch: each sample's masked ids and labels."""
    seen: list[dict[int, tuple[list, list]]] = []
    for _ in range(epochs):
        masks: dict[int, tuple[list, list]] = {}
        for batch in loader:
            for sid, ids, labels in zip(batch["sample_id"].tolist(), batch["input_ids"],
                                        batch["labels"], strict=True):
                assert sid not in masks, "a sample appeared twice in one epoch"
                masks[sid] = (ids.tolist(), labels.tolist())
        seen.append(masks)
    return seen


def test_masks_depend_on_the_sample_not_the_batch_size(golden):
    folder, dm = golden
    by_4 = masks_by_sample(StreamingMaskedLMDataModule(str(folder), batch_size=4)
                           .train_dataloader(), epochs=2)
    by_7 = masks_by_sample(StreamingMaskedLMDataModule(str(folder), batch_size=7, num_workers=2)
                           .train_dataloader(), epochs=2)
    for epoch in (0, 1):
        common = set(by_4[epoch]) & set(by_7[epoch])  # drop_last trims different samples
        assert len(common) > 0.95 * len(dm.samples["train"])
        assert all(by_4[epoch][i] == by_7[epoch][i] for i in common)
    assert sum(by_4[0][i] != by_4[1][i] for i in by_4[0]) > 0.9 * len(by_4[0])  # dynamic
    # The in-memory module masks the same sample id of the same epoch identically.
    blocks, collate = BlockDataset(dm.samples["train"]), dm.collator(train=True)
    for epoch in (0, 1):
        ids = sorted(by_4[epoch])[:100]
        batch = collate(blocks.__getitems__([(epoch, i) for i in ids]))
        for sid, row, labels in zip(ids, batch["input_ids"], batch["labels"], strict=True):
            assert by_4[epoch][sid] == (row.tolist(), labels.tolist())


def epoch_on_rank(rank: int, folder: str, port: int, out: str) -> None:
    """One process of two: join a gloo group and read one training epoch."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    try:
        loader = StreamingMaskedLMDataModule(folder, batch_size=16).train_dataloader()
        ids = [i for batch in loader for i in batch["sample_id"].tolist()]
        Path(out, f"rank{rank}.json").write_text(json.dumps([len(loader), ids]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="forks the two ranks")
def test_ranks_read_disjoint_halves_of_an_epoch(golden, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder, dm = golden
    torch.multiprocessing.start_processes(epoch_on_rank, args=(str(folder), port, str(tmp_path)),
                                          nprocs=2, start_method="fork")
    (length0, ids0), (length1, ids1) = (json.loads((tmp_path / f"rank{r}.json").read_text())
                                        for r in (0, 1))
    assert length0 == length1 == len(ids0) // 16 == len(ids1) // 16  # the same steps per rank
    assert not set(ids0) & set(ids1)
    assert len(ids0) + len(ids1) > 0.95 * len(dm.samples["train"])


def test_every_state_resumes_exactly_across_windows_row_groups_and_ranks(golden, tmp_path,
                                                                          monkeypatch):
    """A stream resumed from the state after any batch yields exactly the rest of the epoch:
    windows smaller than a shard, shards of several row groups (skipped unread on a resume),
    two ranks, training and evaluation, row counts from the manifest or the Parquet footers."""
    _, dm = golden
    monkeypatch.setattr(prepare, "ROW_GROUP", 37)
    folder = tmp_path / "groups"
    manifest = prepare_shards(dm, folder, shard_bytes="32KB")
    streaming = StreamingMaskedLMDataModule(str(folder))
    files, n = streaming.files("train"), streaming.num_samples("train")
    assert len(files) > 2 and pq.ParquetFile(files[0]).num_row_groups > 2
    assert sum(manifest["splits"]["train"]["file_samples"]) == n
    for shuffle, world, counts in ((True, 1, manifest["splits"]["train"]["file_samples"]),
                                   (True, 2, None), (False, 2, None)):
        ids = []
        for rank in range(world):
            def stream(rank=rank, shuffle=shuffle, world=world, counts=counts) -> BlockStream:
                stream = BlockStream(files, n, 16, 3, shuffle, True, rank, world,
                                     shuffle_buffer=50, file_samples=counts)
                stream.set_epoch(1)
                return stream

            full, states = [], []
            whole = stream()
            for batch in whole:
                full.append(batch["sample_id"].tolist())
                states.append(whole.state_dict())
            assert len(full) == len(whole)
            ends = len(full) if shuffle else len(full) - 1  # evaluation is never resumed
            for k in range(ends):
                resumed = stream()
                resumed.load_state_dict(states[k])
                assert [b["sample_id"].tolist() for b in resumed] == full[k + 1:], (rank, k)
            ids.append([i for batch in full for i in batch])
        assert not set(ids[0]) & set(ids[-1]) or world == 1
        assert all(len(rank_ids) == (n // world // 16 * 16 if shuffle else n // world)
                   for rank_ids in ids)
        if not shuffle:  # evaluation reads the shards in order: rank r has rows r, r + W, ...
            order = [i for file in files for i in pq.read_table(file)["sample_id"].to_pylist()]
            assert ids == [order[rank:world * (n // world):world] for rank in range(world)]


# Resume through Lightning.


class StepLog(L.Callback):
    """What every training step saw: sample ids, the masked inputs, and the loss."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[int], int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((batch["sample_id"].tolist(), int(batch["input_ids"].sum()),
                           float(outputs["loss"])))


def fit(folder: Path, workers: int, steps: int, run: Path, resume: str | None = None
        ) -> tuple[list, L.Trainer]:
    """Train a tiny MaskedLM to ``steps`` (from ``resume``), checkpointing at the last step."""
    L.seed_everything(0, verbose=False)
    dm = StreamingMaskedLMDataModule(str(folder), batch_size=BATCH, num_workers=workers, seed=7)
    encoder = BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32)
    log = StepLog()
    checkpoint = ModelCheckpoint(dirpath=run, filename="step{step}", every_n_train_steps=steps,
                                 auto_insert_metric_name=False, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, val_check_interval=10,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        callbacks=[log, checkpoint], default_root_dir=run)
    trainer.fit(MaskedLM(encoder, learning_rate=1e-3), datamodule=dm, ckpt_path=resume)
    return log.steps, trainer


@pytest.fixture
def one_thread():
    """One intra-op thread: a tiny model gains nothing from more, and on a busy machine
    spinning threads slow it down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_neither_skips_nor_repeats(golden, tmp_path, workers, one_thread):
    folder, _ = golden
    expected, trainer = fit(folder, workers, 18, tmp_path / "reference")
    per_epoch = trainer.num_training_batches
    assert per_epoch == 13  # the run crosses an epoch boundary
    first_epoch = [i for ids, _, _ in expected[:per_epoch] for i in ids]
    assert len(set(first_epoch)) == len(first_epoch) == per_epoch * BATCH
    state = torch.load(tmp_path / "reference" / "step18.ckpt", weights_only=False)
    loader = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]  # StreamLoader's
    assert loader["epoch"] == 1 and loader["yielded"] == 5 and not loader["finished"]
    got, resume = [], None
    # Stop mid-epoch 1, at its end, then twice in epoch 2 (resuming in the epoch it stops in).
    for stop in (5, 13, 15, 16, 18):
        steps, _ = fit(folder, workers, stop, tmp_path / f"to{stop}", resume)
        got += steps
        resume = str(tmp_path / f"to{stop}" / f"step{stop}.ckpt")
    assert [s[0] for s in got] == [s[0] for s in expected]  # the same samples, in order
    assert got == expected  # the same masks, and (dropout's RNG restored) the same losses


# Memory.

PEAK_RSS = r"""
import resource, sys
import lightning as L
import torch
from fillmask.architectures.bert import BertEncoder
from fillmask.data.streaming import StreamingMaskedLMDataModule
from fillmask.objectives.mlm import MaskedLM


def status(key):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


torch.set_num_threads(1)
L.seed_everything(0, verbose=False)
dm = StreamingMaskedLMDataModule(sys.argv[1], batch_size=16)
model = MaskedLM(BertEncoder.preset("tiny", vocab_size=dm.vocab_size, max_positions=32))
before = status("VmRSS")
L.Trainer(max_steps=40, logger=False, enable_progress_bar=False, enable_model_summary=False,
          enable_checkpointing=False, limit_val_batches=0).fit(model, datamodule=dm)
print(before, status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def copies_of_golden(folder: Path, copies: int) -> str:
    """``copies`` text files, each the golden corpus's paragraphs in another order."""
    paragraphs = (GOLDEN / "corpus.txt").read_text(encoding="utf-8").split("\n\n")
    folder.mkdir()
    for copy in range(copies):
        random.Random(copy).shuffle(paragraphs)
        (folder / f"part{copy:02d}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return str(folder / "*.txt")


def peak_rss_kib(folder: Path) -> tuple[int, int, int]:
    """Resident memory of 40 training steps on the shards in a fresh process, in KiB: before
    fit, the peak (VmHWM), and ru_maxrss. On Linux ru_maxrss also counts the parent's resident
    size when it forked the process (pytest's, which grows with what earlier tests loaded), so
    the peak compared is VmHWM, the process's own."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder)], capture_output=True,
                            text=True, timeout=300, check=True)
    before, peak, maxrss = result.stdout.split()[-3:]
    return int(before), int(peak), int(maxrss)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    sizes, memory = [], []
    for copies in (1, 20):
        dm = in_memory(copies_of_golden(tmp_path / f"text{copies}", copies))
        manifest = prepare_shards(dm, tmp_path / f"shards{copies}", shard_bytes="256KB")
        sizes.append(manifest["splits"]["train"]["tokens"])
        memory.append(peak_rss_kib(tmp_path / f"shards{copies}"))
    (small_before, small_peak, _), (large_before, large_peak, _) = memory
    assert sizes[1] > 15 * sizes[0]
    assert large_peak < 1.3 * small_peak
    # The peak is mostly the interpreter, torch and Lightning (about 690 MiB, 640 before fit);
    # what training adds (about 48 MiB, within 2 MiB from run to run) is the sharper test:
    # holding the larger corpus's 0.5M tokens as Python lists adds 11 MiB to it.
    grown = (large_peak - large_before) - (small_peak - small_before)
    assert grown < 8 * 1024, f"training on 20x the corpus took {grown} KiB more"
