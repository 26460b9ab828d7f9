"""Under DDP (2 gloo processes on CPU) the logged epoch metrics are those of the whole split, as in one process.

They were rank 0's alone: the graph tasks logged per-process means, and Lightning's default DistributedSampler
padded an odd evaluation split with a repeated graph (test/acc1 9/23 of rank 0's padded half of 45 graphs, 20/45 in
one process on the same checkpoint); the vision task's epoch train/loss was rank 0's mean too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from zoo.train import run

from conftest import FAST_RUN

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend (2 CPU processes)",
)


class RecordTrainLoss(pl.Callback):
    """Each training batch's loss and image count on this process, written to ``$ZOO_TEST_RECORD/rank<r>.json``
    (the DDP subprocess loads it: +callbacks.record._target_=test_ddp_metrics.RecordTrainLoss)."""

    def __init__(self):
        self.batches: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((float(outputs["loss"]), int(batch[1].shape[0])))

    def on_train_end(self, trainer, pl_module):
        Path(os.environ["ZOO_TEST_RECORD"], f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


def _train_two_processes(tmp_path: Path, *overrides: str, env: dict | None = None) -> dict:
    """``zoo train ... trainer=ddp_cpu trainer.devices=2`` in a subprocess; its metrics.json."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", POSSIBLE_USER_WARNINGS="off", **(env or {}))
    env.pop("ZOO_RUN_DIR", None)
    command = [sys.executable, "-m", "zoo.cli", "train", *overrides, "num_threads=1", "trainer=ddp_cpu",
               "trainer.devices=2", f"run_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    return metrics["metrics"]


@needs_gloo
@pytest.mark.slow
def test_graph_classification_ddp_metrics_are_the_whole_splits(tmp_path):
    # 45 graphs: 7 validation and 7 test graphs, 4 on one process and 3 on the other (each once, no padding), in
    # batches of 4: the processes hold different counts, so a mean of per-process means would be off too
    metrics = _train_two_processes(
        tmp_path, "experiment=graph_synthetic", "debug=fast", "data.num_graphs=45", "data.batch_size=4",
        "+model.hidden_channels=4", "trainer.limit_val_batches=null", "trainer.limit_test_batches=null")
    for split in ("val", "test"):
        single = run.evaluate(tmp_path / "ddp" / "checkpoints" / "last.ckpt", split=split)  # one process
        assert metrics[f"{split}/acc1"] == pytest.approx(single[f"{split}/acc1"], abs=1e-6), split
        assert round(metrics[f"{split}/acc1"] * 7) == pytest.approx(metrics[f"{split}/acc1"] * 7, abs=1e-4)
        assert metrics[f"{split}/loss"] == pytest.approx(single[f"{split}/loss"], abs=1e-5), split


@needs_gloo
@pytest.mark.slow
def test_vision_epoch_train_loss_is_the_mean_over_both_processes(tmp_path):
    record = tmp_path / "record"
    record.mkdir()
    tests_dir = str(Path(__file__).resolve().parent)
    metrics = _train_two_processes(
        tmp_path, *FAST_RUN, "data.batch_size=8", "+callbacks.record._target_=test_ddp_metrics.RecordTrainLoss",
        env={"ZOO_TEST_RECORD": str(record),
             "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))})
    batches = [json.loads((record / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(len(b) == 2 for b in batches)  # debug=fast: 2 training batches per process

    def mean(pairs):
        return sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs)

    assert mean(batches[0]) != pytest.approx(mean(batches[1]), abs=1e-4)  # else rank 0's mean would pass too
    assert metrics["train/loss_epoch"] == pytest.approx(mean(batches[0] + batches[1]), abs=1e-5)


def test_an_evaluation_split_smaller_than_the_process_count_is_refused(monkeypatch):
    """Under DDP a process without a graph to score skipped the evaluation while the others waited for it in the
    metrics' reduction (Lightning's own sampler failed there with a bare AssertionError on that process alone)."""
    from zoo.tasks.graph.datasets import evaluation_sampler

    assert evaluation_sampler([0], "val split", "raise data.num_graphs") is None  # one process: no sampler
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(ValueError, match=r"^the val split holds 1 graph\(s\) for 2 DDP processes: .*; raise "
                                         r"data.num_graphs, or use fewer trainer.devices$"):
        evaluation_sampler([0], "val split", "raise data.num_graphs")
    assert list(evaluation_sampler([0, 1, 2], "val split", "raise data.num_graphs")) == [1]  # each graph once


def test_an_image_evaluation_split_smaller_than_the_process_count_is_refused(monkeypatch):
    """The image data modules' evaluation sampler makes the same check (Lightning's sampler failed with a bare
    AssertionError on the process left without an image)."""
    from zoo.tasks.vision.data import _evaluation_sampler

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"^the val or test split holds 2 image\(s\) for 3 DDP processes: "):
        _evaluation_sampler([0, 1], "val or test split", "raise data.val_fraction")
    assert list(_evaluation_sampler([0, 1, 2, 3, 4], "val or test split", "raise data.val_fraction")) == [2]
