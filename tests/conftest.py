"""Shared pytest set-up for the whole suite (CPU only; `make test` runs it with pytest -n 2).

* Triton kernels under TRITON_INTERPRET=1 when no GPU is present.
* One torch thread per xdist worker (2 workers on 2 cores: more threads only oversubscribe the CPU).
* Lightning's promotional tips off; Lightning's own deprecation noise filtered in pyproject.toml.
* ``tiny_vit_overrides``: Hydra overrides giving a ViT small enough for few-second training runs.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable is read when
# triton.language is first imported, so it is set here, before any test module imports a kernel.
if not torch.cuda.is_available():
    if "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # too late for this process (see tests/triton_interpreter.py): the kernel test modules re-run their
        # tests in a fresh one
        os.environ["ZOO_TRITON_IMPORTED_EARLY"] = "1"
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))



@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks called from tests fix torch's thread count (zoo.bench.timing.set_threads): put it back, so
    the tests after them in this worker run with the worker's share of the cores."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny runs: one intra-op thread (on a shared 2-core CI machine, OpenMP barriers of tiny ops cost more than the
    ops); the worker's count comes back afterwards. Modules of tiny runs only use it for every test
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_VIT = ["+model.embed_dim=16", "+model.depth=1", "+model.num_heads=2", "+model.mlp_ratio=2.0"]
FAST_RUN = ["experiment=vit_digits", "debug=fast", "num_threads=1", *TINY_VIT]


@pytest.fixture
def tiny_vit_overrides() -> list[str]:
    """Overrides for a fast vit_digits run: experiment + debug=fast + a one-block width-16 ViT."""
    return list(FAST_RUN)


def _stop_runs_at_epoch_end(monkeypatch, epoch: int, stop, signum):
    """Runs built by zoo train get a callback that calls ``stop()`` at the end of ``epoch`` (added to the callbacks
    group that holds the "last" checkpoint); the handler of ``signum`` is restored after the test."""
    import signal

    import lightning.pytorch as pl

    from zoo.train import run

    class StopAtEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                stop()

    real_group = run._instantiate_group
    monkeypatch.setattr(run, "_instantiate_group", lambda node: real_group(node) + (
        [StopAtEpochEnd()] if node is not None and "last" in str(node) else []))
    handler = signal.getsignal(signum)
    yield
    signal.signal(signum, handler)


@pytest.fixture
def sigterm_in_first_epoch(monkeypatch):
    """Runs built by zoo train get a callback that sends this process SIGTERM at the end of epoch 0 (a scheduler's or
    kill's signal: Lightning's handler raises SIGTERMException at the next step); the SIGTERM handler is restored
    after the test."""
    import signal

    yield from _stop_runs_at_epoch_end(monkeypatch, 0, lambda: os.kill(os.getpid(), signal.SIGTERM), signal.SIGTERM)


@pytest.fixture
def ctrl_c_in_second_epoch(monkeypatch):
    """Runs built by zoo train get a callback that raises KeyboardInterrupt (Ctrl-C) at the end of epoch 1; the SIGINT
    handler, which Lightning ignores while it shuts down, is restored after the test."""
    import signal

    def interrupt():
        raise KeyboardInterrupt

    yield from _stop_runs_at_epoch_end(monkeypatch, 1, interrupt, signal.SIGINT)
