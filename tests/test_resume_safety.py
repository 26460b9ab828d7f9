"""Resuming never loses or overwrites what a run wrote (audit "nothing is ever lost", 2026-12-06).

* a release interrupted at the end of an extended run is written again by the same resume command;
* a checkpoint of another run cannot be continued into a run_dir that holds a run;
* a mid-epoch resume with another data.batch_size / seed= trains exactly the epoch's samples not trained yet, from
  an older checkpoint too (its stored config's batch size and seed);
* a release whose config.json names an unknown model says which file.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import zoo
from zoo import hub
from zoo.train import order, run

from conftest import FAST_RUN


def _vit(tmp_path, name, *extra):
    """A tiny vit_digits run (debug=fast: 2 training batches an epoch), released (export=true), not tested."""
    return run.compose([*FAST_RUN, f"run_dir={tmp_path / name}", "test=false", "export=true", *extra])


def _karate(tmp_path, name, *extra):
    return run.compose(["experiment=graph_karate", "callbacks=minimal", "logger=none", "num_threads=1", "test=false",
                        "export=false", "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                        f"run_dir={tmp_path / name}", *extra])


def _released_step(directory: Path) -> int:
    return json.loads((directory / "config.json").read_text())["metadata"]["weights"]["global_step"]


# --------------------------------------------------------------------------------------------------
# 1. a release interrupted at the end of an extended run
# --------------------------------------------------------------------------------------------------
class _Killed(Exception):
    """Stands for the kill: raised halfway through the release write."""


def _die_in_safetensors_write(monkeypatch):
    import safetensors.torch

    def partial_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise _Killed(filename)

    monkeypatch.setattr(safetensors.torch, "save_file", partial_write)


def _die_in_the_swap(monkeypatch):
    """zoo.hub's os, with a replace that dies when the new config.json is renamed into place (after the weights)."""
    import os

    class DyingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, source, target):
            if str(target).endswith("/config.json") and ".config.json." in str(source):
                raise _Killed(source)
            return os.replace(source, target)

    monkeypatch.setattr(hub, "os", DyingOs())


@pytest.mark.parametrize("kill", [_die_in_safetensors_write, _die_in_the_swap], ids=["in_safetensors", "in_swap"])
def test_rerunning_a_resume_killed_in_its_release_writes_the_release(tmp_path, monkeypatch, capsys, kill):
    """Killed in the final release of a resumed (extended) run, the same resume command then kept the previous
    release (the step before the extension) or a half-swapped one that from_pretrained refuses, saying "trained no
    further step ... kept as they were". It writes them now, and clears the kill's leftover staged files."""
    first = run.train(_vit(tmp_path, "r"))
    assert first["global_step"] == 2 and _released_step(tmp_path / "r" / "released") == 2
    resume = _vit(tmp_path, "r", "trainer.max_epochs=2", f"ckpt_path={first['last_ckpt']}")
    with monkeypatch.context() as patch:
        kill(patch)
        with pytest.raises(_Killed):
            run.train(copy.deepcopy(resume))
    released = tmp_path / "r" / "released"
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # what a SIGKILL leaves besides (an exception removes its own staged file): save_pretrained's staged files
    (released / ".model.safetensors.k1ll3d.tmp").write_bytes(b"partial")
    (tmp_path / "r" / ".released.k1ll3d.tmp").mkdir()
    capsys.readouterr()
    again = run.train(copy.deepcopy(resume))
    assert "trained no further step" not in capsys.readouterr().err
    assert again["released"] == str(released) and _released_step(released) == 4
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["global_step"] == 4
    zoo.from_pretrained(released)
    assert sorted(p.name for p in released.iterdir()) == ["config.json", "model.safetensors"]
    assert not list((tmp_path / "r").glob(".released.*.tmp"))
    # rerun once more: the release is current now, kept as it is
    before = (released / "model.safetensors").read_bytes()
    run.train(copy.deepcopy(resume))
    assert "trained no further step" in capsys.readouterr().err
    assert (released / "model.safetensors").read_bytes() == before


def _val_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith("val/")}


def _evaluated(metrics: dict) -> dict:
    """The metrics measured on the final weights (val/*, test/*): train/* are the training's, which a resume that
    trains no step cannot measure again."""
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}


def test_rerunning_a_resume_killed_before_its_metrics_json_writes_it(tmp_path, capsys):
    """metrics.json is written after released/: killed between them, the run kept the metrics.json of the run it
    extended (its step, its metrics), and the rerun kept it too since the file existed. The rerun writes it with the
    val/* of the final weights and the run's training time (it wrote {} and 0.0 s: the resume trained no step and
    skipped validation), and keeps the release, which is current (it was rewritten the same way)."""
    first = run.train(_vit(tmp_path, "m"))
    stale = (tmp_path / "m" / "metrics.json").read_text()
    resume = _vit(tmp_path, "m", "trainer.max_epochs=2", f"ckpt_path={first['last_ckpt']}")
    run.train(copy.deepcopy(resume))
    reference = json.loads((tmp_path / "m" / "metrics.json").read_text())  # as the uninterrupted resume wrote it
    released = {p.name: p.read_bytes() for p in (tmp_path / "m" / "released").iterdir()}
    card_seconds = json.loads(released["config.json"])["metadata"]["train_seconds"]
    assert _val_metrics(reference["metrics"])
    (tmp_path / "m" / "metrics.json").write_text(stale)  # the kill came before the new one replaced it
    capsys.readouterr()
    run.train(copy.deepcopy(resume))
    assert "trained no further step" not in capsys.readouterr().err
    written = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert written["global_step"] == 4
    assert _val_metrics(written["metrics"]) == pytest.approx(_val_metrics(reference["metrics"]))
    assert written["seconds"] == card_seconds == pytest.approx(reference["seconds"], abs=0.05)
    # the train/* of the run, recorded at this step by its card (the rewritten file had val/* only)
    train = {k: v for k, v in reference["metrics"].items() if k.startswith("train/")}
    assert train and {k: v for k, v in written["metrics"].items() if k.startswith("train/")} == pytest.approx(train)
    assert written["released"] == str(tmp_path / "m" / "released")
    assert {p.name: p.read_bytes() for p in (tmp_path / "m" / "released").iterdir()} == released


@pytest.mark.parametrize("test", ["false", "true"])
def test_rerunning_a_resume_whose_release_is_stale_writes_it_with_its_metrics(tmp_path, capsys, test):
    """A finished run whose release is stale (its card names another step: a kill during an extension's release)
    is released again by the resume: the card had metrics {} (test=true: test/* only) and train_seconds 0.0, as
    the resume trained no step and skipped validation. The trusted reference: the card the run wrote itself."""
    first = run.train(_vit(tmp_path, "s", f"test={test}"))
    card_path = tmp_path / "s" / "released" / "config.json"
    reference = json.loads(card_path.read_text())["metadata"]
    assert _val_metrics(reference["metrics"]) and ("test/loss" in reference["metrics"]) == (test == "true")
    stale = json.loads(card_path.read_text())
    stale["metadata"]["weights"]["global_step"] = 1
    card_path.write_text(json.dumps(stale))
    run.train(_vit(tmp_path, "s", f"test={test}", f"ckpt_path={first['last_ckpt']}"))
    err = capsys.readouterr().err
    card = json.loads(card_path.read_text())["metadata"]
    assert card["weights"]["global_step"] == first["global_step"]
    # train/* too: metrics.json records them at this step (the card had val/* and test/* only)
    assert card["metrics"] == pytest.approx(reference["metrics"])
    assert card["train_seconds"] == reference["train_seconds"]
    written = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert _evaluated(written["metrics"]) == pytest.approx(_evaluated(first["metrics"]))
    assert "writing the released/ it had not written" in err  # metrics.json was current


def test_rerunning_a_resume_whose_outputs_are_all_of_the_previous_segment_records_no_stale_time(tmp_path, capsys):
    """Killed after the last step of an extension (step 4) but before its outputs, the run_dir holds the step-2
    run's release and metrics.json; the rerun recorded their training time (the step-2 part's) as the step-4 run's,
    and its train/*. No file records step 4's: the training time the step-4 checkpoint keeps (both calls'), no
    train/*, and a note saying so."""
    first = run.train(_vit(tmp_path, "p"))
    previous = {name: (tmp_path / "p" / name).read_bytes() for name in ("metrics.json", "released/config.json",
                                                                         "released/model.safetensors")}
    resume = _vit(tmp_path, "p", "trainer.max_epochs=2", f"ckpt_path={first['last_ckpt']}")
    run.train(copy.deepcopy(resume))
    for name, content in previous.items():  # the kill came before the extension wrote its outputs
        (tmp_path / "p" / name).write_bytes(content)
    capsys.readouterr()
    again = run.train(copy.deepcopy(resume))
    err = capsys.readouterr().err
    assert ("note: neither metrics.json nor released/ records the run's training time at step 4 (they are of "
            "another step); the rewritten outputs record the training time kept in the checkpoint") in err
    written = json.loads((tmp_path / "p" / "metrics.json").read_text())
    card = json.loads((tmp_path / "p" / "released" / "config.json").read_text())["metadata"]
    assert written["global_step"] == 4 and card["weights"]["global_step"] == 4
    assert written["seconds"] == again["seconds"] and card["train_seconds"] == round(again["seconds"], 1)
    assert again["seconds"] > first["seconds"]  # the first call's time is part of the step-4 run's
    assert not [k for k in written["metrics"] if k.startswith("train/")] and _val_metrics(written["metrics"])


# --------------------------------------------------------------------------------------------------
# 2. a checkpoint of another run, continued into a run_dir holding a run
# --------------------------------------------------------------------------------------------------
def test_a_checkpoint_of_another_run_does_not_overwrite_a_run_dir(tmp_path):
    """ckpt_path= skipped the "already holds a run" check whatever run it came from: a graph run continued into a
    vit_digits run's folder overwrote its checkpoints, config.yaml, released/ and metrics.json with no message."""
    graph = run.train(_karate(tmp_path, "graph", "trainer.max_epochs=1"))
    vit = run.train(_vit(tmp_path, "vit"))
    kept = {p: p.read_bytes() for p in (tmp_path / "vit").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"run_dir=.*vit already holds a run \(.*vit/checkpoints/last\.ckpt\), and "
                                         r"ckpt_path=.*graph/checkpoints/last\.ckpt is a checkpoint of another run"):
        run.train(_karate(tmp_path, "vit", "trainer.max_epochs=2", f"ckpt_path={graph['last_ckpt']}"))
    assert {p: p.read_bytes() for p in (tmp_path / "vit").rglob("*") if p.is_file()} == kept
    # into a new run_dir it continues, and a run's own checkpoint resumes it (also named through a symlink)
    assert run.train(_karate(tmp_path, "fresh", "trainer.max_epochs=2", f"ckpt_path={graph['last_ckpt']}"))[
        "epoch"] >= 1
    (tmp_path / "link").symlink_to(tmp_path / "vit")
    resumed = run.train(_vit(tmp_path, "vit", "trainer.max_epochs=2",
                             f"ckpt_path={tmp_path / 'link' / 'checkpoints' / 'last.ckpt'}"))
    assert resumed["global_step"] == 2 * vit["global_step"]


def test_a_run_whose_checkpoints_folder_links_to_another_disk_resumes(tmp_path, monkeypatch):
    """checkpoints/ moved to another disk and symlinked back (to keep big checkpoints off $HOME): its last.ckpt,
    resolved, lay outside run_dir, and the run's own resume was refused as "a checkpoint of another run" with the
    advice to give the very ckpt_path given."""
    first = run.train(_vit(tmp_path, "c"))
    shutil.move(str(tmp_path / "c" / "checkpoints"), str(tmp_path / "scratch"))
    (tmp_path / "c" / "checkpoints").symlink_to(tmp_path / "scratch")
    resumed = run.train(_vit(tmp_path, "c", "trainer.max_epochs=2",
                             f"ckpt_path={tmp_path / 'c' / 'checkpoints' / 'last.ckpt'}"))
    assert resumed["global_step"] == 2 * first["global_step"]
    monkeypatch.chdir(tmp_path)  # relative paths, and Lightning's shortcut
    again = run.train(run.compose([*FAST_RUN, "run_dir=c", "test=false", "export=true", "trainer.max_epochs=3",
                                   "ckpt_path=last"]))
    assert again["global_step"] == 3 * first["global_step"]
    assert run.train(run.compose([*FAST_RUN, "test=false", "export=true", "trainer.max_epochs=4",
                                  "ckpt_path=c/checkpoints/last.ckpt"]))["global_step"] == 4 * first["global_step"]


@pytest.mark.parametrize("into", ["another_runs_checkpoint", "a_new_run"])
def test_a_finished_run_whose_checkpoints_were_deleted_is_not_overwritten(tmp_path, into):
    """A finished run keeps released/ and metrics.json when its checkpoints/ is deleted to save disk; only
    checkpoints/last.ckpt counted as "holds a run", so another run's checkpoint, or a new run, replaced its release
    and metrics with no message. A folder with only an empty checkpoints/ and a config.yaml (a run killed before
    its first checkpoint) still takes a new run."""
    run.train(_vit(tmp_path, "a", "seed=1"))
    shutil.rmtree(tmp_path / "a" / "checkpoints")
    kept = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    if into == "a_new_run":
        extra, refusal = ["seed=3"], (r"run_dir=.*a already holds a run \(.*a/released/config\.json\): its "
                                      r"checkpoints/ holds no last\.ckpt to resume it: give another run_dir")
    else:
        other = run.train(_vit(tmp_path, "b", "seed=2", "trainer.max_epochs=1"))["last_ckpt"]
        extra, refusal = [f"ckpt_path={other}", "trainer.max_epochs=2"], (
            r"run_dir=.*a already holds a run \(.*a/released/config\.json\), and ckpt_path=.*b/checkpoints/"
            r"last\.ckpt is a checkpoint of another run: .*give another run_dir to continue it in$")
    with pytest.raises(ValueError, match=refusal):
        run.train(_vit(tmp_path, "a", *extra))
    (tmp_path / "a" / "released" / "config.json").unlink()  # metrics.json alone says so too
    with pytest.raises(ValueError, match=r"already holds a run \(.*a/metrics\.json\)"):
        run.train(_vit(tmp_path, "a", *extra))
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == {
        p: b for p, b in kept.items() if p.name != "config.json" or p.parent.name != "released"}
    (tmp_path / "killed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "killed" / "config.yaml").write_text("seed: 0\n")
    assert run.train(_vit(tmp_path, "killed", *extra))["global_step"] > 0


# --------------------------------------------------------------------------------------------------
# 3. a mid-epoch resume with another batch size or seed
# --------------------------------------------------------------------------------------------------
# one epoch of digits' training split, cut by trainer.max_steps after 5 batches of 64
_EPOCH = ["trainer.limit_train_batches=1.0", "trainer.limit_val_batches=0", "export=false"]
_CUT = 5


@pytest.fixture
def sampler_passes(monkeypatch):
    """Every pass over the training sampler: (epoch, its indices), as the DataLoader received them."""
    passes = []
    iterate = order.EpochShuffleSampler.__iter__

    def logged(self):
        indices = list(iterate(self))
        passes.append((int(self.epoch), indices))
        return iter(indices)

    monkeypatch.setattr(order.EpochShuffleSampler, "__iter__", logged)
    return passes


@pytest.fixture
def cut_run(tmp_path, sampler_passes):
    """A run stopped in its first epoch after 5 batches of 64; (its run_dir, the epoch's full order, the samples
    trained). The trusted reference: the uninterrupted epoch is the sampler's whole first pass."""
    result = run.train(_vit(tmp_path, "cut", *_EPOCH, f"+trainer.max_steps={_CUT}"))
    assert result["global_step"] == _CUT
    full = _last_pass(sampler_passes, 0)
    assert len(full) > 10 * 64
    sampler_passes.clear()
    return tmp_path / "cut", full, full[:_CUT * 64]


def _last_pass(passes, epoch):
    """The indices of the last pass over ``epoch`` (Lightning may start a fresh run's first iterator twice)."""
    return [indices for e, indices in passes if e == epoch][-1]


def _resume_copy(tmp_path, cut_dir, name, *extra):
    shutil.copytree(cut_dir, tmp_path / name)
    last = tmp_path / name / "checkpoints" / "last.ckpt"
    return run.train(_vit(tmp_path, name, *_EPOCH, "+trainer.max_steps=1000", f"ckpt_path={last}", *extra))


def test_a_mid_epoch_resume_with_another_batch_size_trains_each_sample_once(tmp_path, cut_run, sampler_passes):
    """Resumed with data.batch_size=32, the rest of the epoch skipped 5 batches of 32 of it: 160 samples trained
    twice, and as many never. The checkpoint records the samples done; the rest of the epoch is exactly the others,
    in batches of 32."""
    cut_dir, full, trained = cut_run
    resumed = _resume_copy(tmp_path, cut_dir, "bs32", "data.batch_size=32")
    rest = _last_pass(sampler_passes, 0)
    assert Counter(trained + rest) == Counter(full)  # no sample twice, none left out
    assert resumed["global_step"] == _CUT + math.ceil((len(full) - len(trained)) / 32)
    # a checkpoint written mid-epoch after the change counts both sizes: cut again, resumed, still exact
    sampler_passes.clear()
    shutil.copytree(cut_dir, tmp_path / "twice")
    last = tmp_path / "twice" / "checkpoints" / "last.ckpt"
    run.train(_vit(tmp_path, "twice", *_EPOCH, f"+trainer.max_steps={_CUT + 4}", f"ckpt_path={last}",
                   "data.batch_size=32"))
    state = torch.load(last, weights_only=True)["DigitsDataModule"]["training_order"]
    assert state["samples_done"] == _CUT * 64 + 4 * 32 and state["batches_done"] == _CUT + 4
    run.train(_vit(tmp_path, "twice", *_EPOCH, "+trainer.max_steps=1000", f"ckpt_path={last}", "data.batch_size=16"))
    second, third = [indices for _, indices in sampler_passes]
    assert Counter(trained + second[:4 * 32] + third) == Counter(full)


def test_a_mid_epoch_resume_with_a_larger_batch_size_is_refused(tmp_path, cut_run):
    """Lightning ends an epoch when its batch count reaches the loader's length, counting the 5 batches restored:
    with batches of 128 it would end the epoch before its last samples."""
    cut_dir, _, _ = cut_run
    with pytest.raises(ValueError, match=r"data\.batch_size=128 cannot take over in the middle of epoch 0: the "
                                         r"checkpoint stopped after 5 batches \(320 samples\).*resume with "
                                         r"data\.batch_size<=64"):
        _resume_copy(tmp_path, cut_dir, "bs128", "data.batch_size=128")
    # refused before the run's files are rewritten
    assert (tmp_path / "bs128" / "config.yaml").read_text() == (cut_dir / "config.yaml").read_text()


def test_a_mid_epoch_resume_with_another_seed_finishes_the_epoch_in_its_order(tmp_path, cut_run, sampler_passes,
                                                                              capsys):
    """seed= drew the rest of the epoch in another permutation (samples trained twice, others never); the rest of
    the epoch keeps its order, the new seed orders the next one, and a note says so."""
    cut_dir, full, trained = cut_run
    capsys.readouterr()
    _resume_copy(tmp_path, cut_dir, "seed7", "seed=7", "trainer.max_epochs=2")
    rest, following = _last_pass(sampler_passes, 0), _last_pass(sampler_passes, 1)
    assert Counter(trained + rest) == Counter(full)
    assert ("resumed in the middle of epoch 0, whose order was drawn with seed=0: the rest of that epoch keeps it, "
            "and seed=7 orders the epochs after it") in capsys.readouterr().err
    reference = order.EpochShuffleSampler(range(len(full)), seed=7)
    reference.set_epoch(1)
    assert following == list(iter(reference))


def _graphs(tmp_path, name, *extra):
    """Graph classification (GraphClassificationDataModule, the synthetic set: 40 graphs, batches of 4)."""
    return run.compose(["experiment=graph_synthetic", "data.num_graphs=40", "data.batch_size=4", "callbacks=minimal",
                        "logger=none", "num_threads=1", "test=false", "export=false", "trainer.max_epochs=1",
                        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                        "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                        "+model.hidden_channels=4", "model.heads=2", f"run_dir={tmp_path / name}", *extra])


def test_a_mid_epoch_resume_of_graph_classification_keeps_its_data_set(tmp_path, sampler_passes):
    """GraphClassificationDataModule names data.seed as its order seed and only data.batch_size / num_workers as
    changeable mid-epoch (a13a7a4): data.seed and data.num_graphs generate another set of graphs, which the stored
    position does not count, and are refused naming the key before the run's files are rewritten; a smaller
    batch size trains the epoch's other graphs, each once. The reference: the sampler's uninterrupted first pass."""
    cut = run.train(_graphs(tmp_path, "cut", "+trainer.max_steps=3"))
    assert cut["global_step"] == 3
    full = _last_pass(sampler_passes, 0)
    trained = full[:3 * 4]
    assert len(full) > len(trained)
    sampler_passes.clear()
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    config = (tmp_path / "cut" / "config.yaml").read_text()
    for change, stored in (("data.seed=5", "data.seed=0"), ("data.num_graphs=48", "data.num_graphs=40")):
        with pytest.raises(ValueError, match=rf"^cannot resume in the middle of epoch 0 with {change}: the "
                                             rf"checkpoint's run used {stored}, .* \(only data\.batch_size, "
                                             rf"data\.num_workers may change mid-epoch\)$"):
            run.train(_graphs(tmp_path, "cut", change, "+trainer.max_steps=1000", f"ckpt_path={last}"))
        assert (tmp_path / "cut" / "config.yaml").read_text() == config
    resumed = run.train(_graphs(tmp_path, "cut", "data.batch_size=2", "+trainer.max_steps=1000",
                                f"ckpt_path={last}"))
    rest = _last_pass(sampler_passes, 0)
    assert Counter(trained + rest) == Counter(full)
    assert resumed["global_step"] == 3 + math.ceil((len(full) - len(trained)) / 2)


def test_the_order_note_of_graph_classification_names_data_seed(capsys):
    """Its training order is drawn with data.seed, not the run's seed= (ResumableTrainingOrder.order_seed_key)."""
    from zoo.tasks.graph.datasets import GraphClassificationDataModule

    module = GraphClassificationDataModule(num_graphs=40, batch_size=4, seed=0)
    module.load_state_dict({"training_order": {"epoch": 0, "batches_done": 2, "samples_done": 8, "seed": 3}})
    module.setup()
    module.train_dataloader()
    assert ("resumed in the middle of epoch 0, whose order was drawn with data.seed=3: the rest of that epoch keeps "
            "it, and data.seed=0 orders the epochs after it") in capsys.readouterr().err


def _as_an_old_checkpoint(last: Path, *dropped_data_keys: str) -> None:
    """``last`` as a checkpoint from before samples_done / seed were stored: its training order holds the epoch and
    the batches done only (and its stored zoo_config's data section lacks ``dropped_data_keys``)."""
    ckpt = torch.load(last, weights_only=False)
    state = ckpt["DigitsDataModule"]["training_order"]
    assert state == {"epoch": 0, "batches_done": _CUT, "samples_done": _CUT * 64, "seed": 0, "world_size": 1}
    ckpt["DigitsDataModule"]["training_order"] = {"epoch": 0, "batches_done": _CUT}
    for key in dropped_data_keys:
        del ckpt["hyper_parameters"]["zoo_config"]["data"][key]
    torch.save(ckpt, last)


def test_an_old_mid_epoch_checkpoint_skips_the_samples_its_run_trained(tmp_path, cut_run, sampler_passes):
    """A checkpoint from before samples_done / seed were stored, resumed with data.batch_size=32, skipped 5 batches
    of 32 (160 samples trained twice, as many never) in the current seed's order. Its stored zoo_config holds the
    batch size and seed its epoch was trained with: the rest of the epoch is exactly the samples not trained yet."""
    cut_dir, full, trained = cut_run
    _as_an_old_checkpoint(cut_dir / "checkpoints" / "last.ckpt")
    resumed = _resume_copy(tmp_path, cut_dir, "old", "data.batch_size=32", "seed=7")
    rest = _last_pass(sampler_passes, 0)
    assert Counter(trained + rest) == Counter(full)  # no sample twice, none left out
    assert resumed["global_step"] == _CUT + math.ceil((len(full) - len(trained)) / 32)
    # a larger size is refused there as for a new checkpoint
    with pytest.raises(ValueError, match=r"data\.batch_size=128 cannot take over in the middle of epoch 0: the "
                                         r"checkpoint stopped after 5 batches \(320 samples\)"):
        _resume_copy(tmp_path, cut_dir, "old128", "data.batch_size=128")


def test_an_old_checkpoint_whose_config_has_no_batch_size_resumes_as_before_with_a_note(tmp_path, cut_run,
                                                                                       sampler_passes, capsys):
    """Without the batch size in the stored config either, the batches done times the current size are skipped,
    as before, and a note says so."""
    cut_dir, full, _ = cut_run
    _as_an_old_checkpoint(cut_dir / "checkpoints" / "last.ckpt", "batch_size")
    capsys.readouterr()
    _resume_copy(tmp_path, cut_dir, "old", "data.batch_size=32")
    assert _last_pass(sampler_passes, 0) == full[_CUT * 32:]
    assert ("note: the checkpoint records neither the samples of epoch 0 it trained on nor its data.batch_size: the "
            "rest of the epoch skips 5 batches of the current size; resume with the data.batch_size it was trained "
            "with to train each sample once") in capsys.readouterr().err


def test_a_mid_epoch_resume_with_another_image_split_is_refused(tmp_path, cut_run, sampler_passes):
    """data.split_seed / data.val_fraction draw another train / val split: the rest of the epoch trained 191 images
    twice and 227 never, and 36 trained images moved into validation (audit 2026-12-06), accepted silently. They
    are refused naming the key before the run's files are rewritten (VisionDataModule.mid_epoch_fixed_keys); an
    augmentation option does not change which images train and is accepted, each image trained once."""
    cut_dir, full, trained = cut_run
    for change, stored in (("data.split_seed=5", "data.split_seed=0"), ("data.val_fraction=0.3",
                                                                      "data.val_fraction=0.1")):
        with pytest.raises(ValueError, match=rf"^cannot resume in the middle of epoch 0 with {change}: the "
                                             rf"checkpoint's run used {stored}, .* \(data\._target_, data\.root, "
                                             rf"data\.variant, data\.val_fraction, data\.split_seed define the "
                                             rf"training set\)$"):
            _resume_copy(tmp_path, cut_dir, change.replace("=", "_").replace(".", "_"), change)
        assert ((tmp_path / change.replace("=", "_").replace(".", "_") / "config.yaml").read_text()
                == (cut_dir / "config.yaml").read_text())
    _resume_copy(tmp_path, cut_dir, "shift", "data.augment=shift")
    assert Counter(trained + _last_pass(sampler_passes, 0)) == Counter(full)


def _dictlookup(**options):
    from zoo.tasks.graph.dictlookup import DictionaryLookupDataModule

    module = DictionaryLookupDataModule(**{"k": 6, "max_examples": 400, "batch_size": 32, "seed": 11, **options})
    module.setup()
    return module


def test_an_old_mid_epoch_dictlookup_checkpoint_resumes_in_its_data_seed_order(capsys):
    """DictionaryLookup draws its order with data.seed (11, configs/data/graph_dictlookup.yaml), not the run's seed=:
    an older checkpoint (no samples_done / seed) of a seed=3 run resumed in seed=3's order (68 examples twice, 68
    never) and the note named seed=. The reference: the uninterrupted epoch's order, data.seed=11's."""
    module = _dictlookup()
    stored = {"seed": 3, "data": {"k": 6, "max_examples": 400, "batch_size": 32, "seed": 11}}
    assert module.restore_old_order({"epoch": 0, "batches_done": 3}, stored) == 3 * 32
    module.load_state_dict({"training_order": {"epoch": 0, "batches_done": 3}})
    rest = list(iter(module.train_dataloader().sampler))
    full = list(iter(order.EpochShuffleSampler(range(len(module.train_perms)), seed=11)))
    assert Counter(full[:3 * 32] + rest) == Counter(full) and rest == full[3 * 32:]
    assert "note" not in capsys.readouterr().err  # the order seed did not change


def test_a_mid_epoch_dictlookup_resume_refuses_another_data_seed():
    """data.seed=12 draws other permutations and another split: refused, naming data.seed (mid_epoch_changeable_keys
    was None: accepted); data.batch_size and data.num_workers only batch and load."""
    module = _dictlookup()
    stored = {"k": 6, "max_examples": 400, "batch_size": 32, "seed": 11, "num_workers": 0}
    with pytest.raises(ValueError, match=r"^cannot resume in the middle of epoch 0 with data\.seed=12: the "
                                         r"checkpoint's run used data\.seed=11, .* \(only data\.batch_size, "
                                         r"data\.num_workers may change mid-epoch\)$"):
        module.check_same_data(0, stored, {**stored, "seed": 12})
    module.check_same_data(0, stored, {**stored, "batch_size": 16, "num_workers": 2})


def test_a_new_data_seed_is_accepted_mid_epoch_where_the_graph_does_not_depend_on_it(tmp_path, sampler_passes,
                                                                                    capsys):
    """karate's split is its own (Planetoid's and OGB's too): data.seed only orders its training nodes, and a
    mid-epoch resume with data.seed=1 finishes the epoch in its stored order with the note (it was refused). sbm
    and networkx graphs, which data.seed draws, are still refused (NodeDataModule.data_depends_on_order_seed)."""
    from zoo.tasks.graph.datasets import NodeDataModule

    sampled = ["data.batch_size=2", "data.num_neighbors=[5,5]", "trainer.max_epochs=1",
               "trainer.check_val_every_n_epoch=1"]
    run.train(_karate(tmp_path, "cut", *sampled, "+trainer.max_steps=1"))
    full = _last_pass(sampler_passes, 0)
    sampler_passes.clear()
    capsys.readouterr()
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    run.train(_karate(tmp_path, "cut", *sampled, "data.seed=1", f"ckpt_path={last}"))
    assert Counter(full[:2] + _last_pass(sampler_passes, 0)) == Counter(full)
    assert ("resumed in the middle of epoch 0, whose order was drawn with data.seed=0: the rest of that epoch keeps "
            "it, and data.seed=1 orders the epochs after it") in capsys.readouterr().err
    for name in ("sbm", "networkx:florentine_families"):
        stored = {"name": name, "seed": 0, "batch_size": 2}
        with pytest.raises(ValueError, match=r"with data\.seed=1: the checkpoint's run used data\.seed=0"):
            NodeDataModule(name=name, batch_size=2, num_neighbors=[5, 5]).check_same_data(0, stored,
                                                                                          {**stored, "seed": 1})


def test_a_new_data_seed_mid_epoch_is_refused_only_where_it_draws_the_graph_split(tmp_path):
    """Graph classification: data.seed draws the stratified split of graphs without their own (a list in data.path,
    TU data sets): refused; a dict of train / val / test lists keeps its split: accepted (it was refused)."""
    from torch_geometric.data import Data

    from zoo.tasks.graph.datasets import GraphClassificationDataModule

    graphs = [Data(x=torch.ones(3, 2), edge_index=torch.tensor([[0, 1], [1, 2]]), y=torch.tensor([i % 2]))
              for i in range(12)]
    torch.save(graphs, tmp_path / "list.pt")
    torch.save({"train": graphs[:8], "val": graphs[8:10], "test": graphs[10:]}, tmp_path / "split.pt")
    for name, refused in (("list.pt", True), ("split.pt", False)):
        path = str(tmp_path / name)
        stored = {"path": path, "seed": 0, "batch_size": 2}
        module = GraphClassificationDataModule(path=path, batch_size=2)
        if refused:
            with pytest.raises(ValueError, match=r"with data\.seed=1: the checkpoint's run used data\.seed=0"):
                module.check_same_data(0, stored, {**stored, "seed": 1})
        else:
            module.check_same_data(0, stored, {**stored, "seed": 1})


def test_an_older_run_with_a_relative_data_path_resumes_mid_epoch_with_the_same_command(tmp_path, monkeypatch):
    """A run from before data paths were stored absolute recorded data.path=graphs.pt; the current config holds it
    absolute (_absolute_data_root), and the same command was refused mid-epoch ("keep data.path=graphs.pt"). Paths
    compare as the files they name: the stored one read from here, or the absolute one its data module recorded."""
    from zoo.tasks.graph.datasets import GraphClassificationDataModule

    monkeypatch.chdir(tmp_path)
    data = {"_target_": "zoo.tasks.graph.datasets.GraphClassificationDataModule", "name": "synthetic", "root": None,
            "path": "graphs.pt", "seed": 0, "batch_size": 8}
    current = {**data, "path": str(tmp_path / "graphs.pt")}
    module = GraphClassificationDataModule(path=current["path"], batch_size=8)

    def ckpt(stored_path, data_info=None):
        return {"GraphClassificationDataModule": {"training_order": {"epoch": 0, "batches_done": 2,
                                                                     "samples_done": 16, "seed": 0}},
                "hyper_parameters": {"zoo_config": {"data": {**data, "path": stored_path}},
                                     **({"data_info": data_info} if data_info else {})}}

    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": current})
    run._check_resumed_order_fits(ckpt("graphs.pt"), module, cfg)
    run._check_resumed_order_fits(ckpt("graphs.pt", {"path": str(tmp_path / "graphs.pt")}), module, cfg)
    # another file: refused, from the stored path or from the one the run recorded
    for refused in (ckpt("other.pt"), ckpt("graphs.pt", {"path": str(tmp_path / "elsewhere" / "graphs.pt")})):
        with pytest.raises(ValueError, match=r"cannot resume in the middle of epoch 0 with data\.path="):
            run._check_resumed_order_fits(refused, module, cfg)


def test_image_data_modules_record_their_absolute_root(tmp_path, monkeypatch):
    """describe() (the .ckpt's data_info, a release's metadata.data) records an image folder's absolute root, which
    zoo eval of a run whose config stored a relative data.root reads (_pin_stored_data_paths), as for graph data."""
    import numpy as np
    from PIL import Image

    from zoo.tasks.vision.data import ImageFolderDataModule

    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / split / label / "0.png")
    monkeypatch.chdir(tmp_path)
    module = ImageFolderDataModule(root="imgs", img_size=8, in_chans=1)
    module.setup()
    info = module.describe()
    assert info["root"] == str(tmp_path / "imgs")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data": {"root": "imgs"}})
    assert run._pin_stored_data_paths(cfg, info) == [] and cfg.data.root == str(tmp_path / "imgs")


# --------------------------------------------------------------------------------------------------
# 4. a release naming an unknown model
# --------------------------------------------------------------------------------------------------
def test_a_release_naming_an_unknown_model_names_its_config(tmp_path):
    """The registry's "unknown model 'vit_nope'. Did you mean ..." did not say which file named it."""
    model = zoo.create_model("vit_digits", embed_dim=16, depth=1, num_heads=2)
    zoo.save_pretrained(model, tmp_path / "rel")
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    (tmp_path / "rel" / "config.json").write_text(json.dumps({**config, "model_name": "vit_nope"}))
    with pytest.raises(hub.CheckpointError, match=rf"{tmp_path / 'rel' / 'config.json'}: its model_name is not a "
                                                  r"model of this zoo: unknown model 'vit_nope'\.") as info:
        zoo.from_pretrained(tmp_path / "rel")
    assert isinstance(info.value, KeyError)  # still the registry's UnknownModelError for callers catching it
    assert "\n" not in str(info.value)


def test_a_mid_epoch_checkpoint_from_before_split_seed_resumes(tmp_path, cut_run, sampler_passes, capsys):
    """A vision checkpoint from before data.split_seed (its data.seed drew the split): zoo train continues it with
    data.split_seed = its data.seed, and the mid-epoch data check compared that with "no data.split_seed", refusing
    the resume (and "keep no data.split_seed" would have drawn another split). The stored config is read the same
    way: the resume is accepted and the rest of the epoch is exactly the samples not trained yet."""
    cut_dir, full, trained = cut_run
    _as_an_old_checkpoint(cut_dir / "checkpoints" / "last.ckpt", "split_seed")
    _resume_copy(tmp_path, cut_dir, "older", "data.batch_size=64")
    assert Counter(trained + _last_pass(sampler_passes, 0)) == Counter(full)


def test_the_data_check_reads_defaults_from_the_base_constructor_and_follows_links(tmp_path):
    """DigitsDataModule(*args, **kwargs) passes split_seed on to VisionDataModule: its default was not seen, so a key
    absent on one side compared as unset. A data.root given through a symbolic link names the same files."""
    from zoo.tasks.vision.data import DigitsDataModule, ImageFolderDataModule

    assert order._constructor_defaults(DigitsDataModule)["split_seed"] == 0
    module = DigitsDataModule()
    module.check_same_data(0, {"seed": 0}, {"seed": 0, "split_seed": 0})  # the default on one side: the same split
    with pytest.raises(ValueError, match=r"data\.split_seed=3"):
        module.check_same_data(0, {"seed": 0}, {"seed": 0, "split_seed": 3})
    real = tmp_path / "imgs"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    folder = ImageFolderDataModule.__new__(ImageFolderDataModule)
    folder.check_same_data(0, {"root": str(real)}, {"root": str(tmp_path / "link")})
    with pytest.raises(ValueError, match=r"data\.root="):
        folder.check_same_data(0, {"root": str(real)}, {"root": str(tmp_path)})


def _kept(run_dir: Path) -> dict[str, tuple[int, float]]:
    """The top-k record of a run's last.ckpt: kept file name -> (its own global_step, recorded score)."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    record = next(value for key, value in state.items() if "'monitor': 'val/acc1'" in key)
    return {Path(path).name: (torch.load(path, weights_only=True)["global_step"], float(score))
            for path, score in record["best_k_models"].items()}


def test_a_resume_with_a_smaller_save_top_k_keeps_the_k_best(tmp_path):
    """Karate with mode=min validates at epochs 9, 19, 29, 39 (val/acc1 0.53, 0.07, 0.33, 0.40), kept with k=3, then
    resumed with k=2 to epoch 60: Lightning deletes only when its record holds exactly k, so the kept set grew (4
    files); now the k best of everything validated stay, in files, and best.ckpt is the best's copy."""
    pytest.importorskip("hydra")
    common = ["callbacks.best_checkpoint.mode=min"]
    run.train(_karate(tmp_path, "k", *common, "trainer.max_epochs=40", "callbacks.best_checkpoint.save_top_k=3"))
    assert len(_kept(tmp_path / "k")) == 3
    run.train(_karate(tmp_path, "k", *common, "trainer.max_epochs=60", "callbacks.best_checkpoint.save_top_k=2",
                      f"ckpt_path={tmp_path / 'k' / 'checkpoints' / 'last.ckpt'}"))
    kept = _kept(tmp_path / "k")
    files = sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("best-*.ckpt"))
    assert sorted(kept) == files and len(files) == 2, (files, kept)
    assert all(name == f"best-epoch{step - 1}-step{step}.ckpt" for name, (step, _) in kept.items())
    best_name = min(kept, key=lambda name: kept[name][1])
    best_step = torch.load(tmp_path / "k" / "checkpoints" / "best.ckpt", weights_only=True)["global_step"]
    assert best_step == kept[best_name][0]


def test_a_resume_with_save_top_k_above_one_keeps_the_best_ckpt_validation_in_its_own_file(tmp_path):
    """A save_top_k=1 run keeps its best validation only as best.ckpt; resumed with k=-1 (every validation kept), the
    next new best's copy overwrote best.ckpt, so that validation's weights were gone though kept, and the record paired
    best.ckpt with its score. Now it gets its own file (from its own epoch and step) and best.ckpt stays the copy."""
    pytest.importorskip("hydra")
    common = ["callbacks.best_checkpoint.mode=min"]
    run.train(_karate(tmp_path, "k", *common, "trainer.max_epochs=15"))
    first = torch.load(tmp_path / "k" / "checkpoints" / "best.ckpt", weights_only=True)
    assert first["global_step"] == 10
    run.train(_karate(tmp_path, "k", *common, "trainer.max_epochs=40", "callbacks.best_checkpoint.save_top_k=-1",
                      f"ckpt_path={tmp_path / 'k' / 'checkpoints' / 'last.ckpt'}"))
    kept = _kept(tmp_path / "k")
    assert sorted(step for step, _ in kept.values()) == [10, 20, 30, 40]
    assert "best.ckpt" not in kept
    adopted = torch.load(tmp_path / "k" / "checkpoints" / "best-epoch9-step10.ckpt", weights_only=True)
    for key, value in first["state_dict"].items():
        assert torch.equal(adopted["state_dict"][key], value), key
    best_name = min(kept, key=lambda name: kept[name][1])
    best_step = torch.load(tmp_path / "k" / "checkpoints" / "best.ckpt", weights_only=True)["global_step"]
    assert best_step == kept[best_name][0]


def test_a_non_integer_save_top_k_is_refused_before_training(tmp_path):
    """Lightning takes save_top_k=2.5 and fails at the fourth validation with `zoo train: error: ''`."""
    pytest.importorskip("hydra")
    for bad in ("2.5", "-2", "true"):
        with pytest.raises(ValueError, match=r"^callbacks\.best_checkpoint\.save_top_k must be an integer >= -1"):
            run.train(_karate(tmp_path, f"bad{bad}", f"callbacks.best_checkpoint.save_top_k={bad}"))
        assert not (tmp_path / f"bad{bad}" / "checkpoints").exists()


def _with_world_size(last: Path, world_size: int) -> None:
    """The checkpoint as a run of ``world_size`` processes would have written it (DDP itself is not needed to
    check the refusal, which comes before any process starts)."""
    ckpt = torch.load(last, weights_only=False)
    ckpt["DigitsDataModule"]["training_order"]["world_size"] = world_size
    torch.save(ckpt, last)


def test_a_mid_epoch_resume_with_another_process_count_is_refused(tmp_path, cut_run, capsys):
    """samples_done counts one process's share of the epoch: a run of 2 processes cut mid-epoch and resumed in one
    trained 320 samples twice, 1 -> 2 never trained 205 (audit 2026-12-07). Another process count is refused in the
    middle of an epoch, before the run's files are rewritten; at an epoch's end it resumes with a note that the
    schedule is recomputed (an epoch has another number of steps)."""
    cut_dir, _, _ = cut_run
    state = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=True)["DigitsDataModule"]
    assert state["training_order"]["world_size"] == 1  # recorded by every checkpoint
    shutil.copytree(cut_dir, tmp_path / "two")
    _with_world_size(tmp_path / "two" / "checkpoints" / "last.ckpt", 2)
    with pytest.raises(ValueError, match=r"^cannot resume in the middle of epoch 0 \(after 5 of its batches\) with 1 "
                                         r"process: the checkpoint's run trained it with 2, each counting the samples "
                                         r"of its own share of the epoch; resume with 2 \(trainer\.devices x "
                                         r"trainer\.num_nodes\), or from a checkpoint written at an epoch's end \(the "
                                         r"run's checkpoints/last\.ckpt .*best\.ckpt among them, counts as inside its "
                                         r"epoch\)$"):
        run.train(_vit(tmp_path, "two", *_EPOCH, "+trainer.max_steps=1000",
                       f"ckpt_path={tmp_path / 'two' / 'checkpoints' / 'last.ckpt'}"))
    assert (tmp_path / "two" / "config.yaml").read_text() == (cut_dir / "config.yaml").read_text()
    # at an epoch's end: resumed, with the note
    ended = run.train(_vit(tmp_path, "ended", *_EPOCH, "trainer.max_epochs=1"))
    _with_world_size(Path(ended["last_ckpt"]), 2)
    capsys.readouterr()
    run.train(_vit(tmp_path, "ended", *_EPOCH, "trainer.max_epochs=2", f"ckpt_path={ended['last_ckpt']}"))
    assert ("zoo train: resuming with 1 process (the run used 2): an epoch has another number of steps, so the "
            "learning-rate schedule is recomputed for this run and from the restored step follows the new one"
            in capsys.readouterr().err.splitlines())


def test_a_run_dir_in_use_by_another_zoo_train_is_refused(tmp_path):
    """Two zoo train runs started together into one run_dir both wrote it: one died in Lightning's CSV logger ("dict
    contains fields not in fieldnames"), the other finished with a truncated csv/metrics.csv (audit 2026-12-07). The
    first holds an flock on run_dir/.zoo_train.lock; a second one, while that process holds it, is refused before it
    touches a file. The lock goes with its process however it ends: a file left by a killed run (the same pid again,
    another host's, or empty) does not block a resume, as a pid-file scheme did (review, 2026-12-07)."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".zoo_train.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'process 12345 on elsewhere')\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"^run_dir={run_dir} is in use by another zoo train \(process 12345 on "
                                             rf"elsewhere, which holds {lock}\): wait for it to end, or give another "
                                             r"run_dir="):
            run.train(_karate(tmp_path, "run", "trainer.max_epochs=1"))
        assert sorted(p.name for p in run_dir.iterdir()) == [".zoo_train.lock"]  # nothing of the run written
    finally:
        holder.kill()
        holder.wait()
    # its process is gone (the file still names it): the run goes on, and gives the lock up when it ends
    assert lock.read_text().startswith("process 12345")
    result = run.train(_karate(tmp_path, "run", "trainer.max_epochs=1"))
    assert result["global_step"] >= 1 and lock.read_text() == ""
    import fcntl
    import os

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)


def test_a_kept_checkpoint_named_by_its_real_path_in_a_linked_checkpoints_folder_is_the_runs_own(tmp_path):
    """checkpoints/ symlinked to another disk: a kept checkpoint there other than last.ckpt / best.ckpt (save_top_k
    > 1: best-epoch0-step5.ckpt), named by its real path, is the run's own, and resuming from it into the run_dir is
    not refused as "a checkpoint of another run"; another run's checkpoint still is (mutation audit m12)."""
    scratch, run_dir = tmp_path / "scratch", tmp_path / "run"
    scratch.mkdir()
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(scratch)
    for name in ("last.ckpt", "best-epoch0-step5.ckpt"):
        (scratch / name).write_bytes(b"x")
    kept = scratch / "best-epoch0-step5.ckpt"
    assert run._is_own_checkpoint(kept, run_dir)
    run._check_not_a_finished_run(run_dir, {"ckpt_path": str(kept)})
    other = tmp_path / "other" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    assert not run._is_own_checkpoint(other, run_dir)
    with pytest.raises(ValueError, match="is a checkpoint of another run"):
        run._check_not_a_finished_run(run_dir, {"ckpt_path": str(other)})


def test_another_process_count_is_refused_after_a_single_batch_of_the_epoch(capsys):
    """One batch done in the epoch is already a share of its samples per process: refused like five (mutation audit
    m12: a threshold of more than one batch let it through); none done resumes with the schedule note."""
    with pytest.raises(ValueError, match=r"^cannot resume in the middle of epoch 3 \(after 1 of its batches\) with 1 "
                                         r"process: the checkpoint's run trained it with 2"):
        run._check_resumed_processes({"epoch": 3, "batches_done": 1, "world_size": 2}, 1)
    run._check_resumed_processes({"epoch": 3, "batches_done": 0, "world_size": 2}, 1)
    assert "zoo train: resuming with 1 process (the run used 2)" in capsys.readouterr().err
    run._check_resumed_processes({"epoch": 3, "batches_done": 1, "world_size": 2}, 2)  # the same count: nothing


def test_a_resume_with_another_weight_decay_is_refused(tmp_path):
    """Lightning restores the optimizer's param groups, weight_decay among them, so a resume given another
    task.weight_decay would train on with the old one: refused naming both values, as task.lr is (mutation audit m12:
    weight_decay dropped from the compared keys went unnoticed)."""
    stored_cfg = run.compose(FAST_RUN)
    stored = {"hyper_parameters": {"zoo_config": run._to_container(stored_cfg)},
              "state_dict": run.build(stored_cfg)[0].state_dict()}
    old = stored_cfg.task.weight_decay
    current = run.compose([*FAST_RUN, f"task.weight_decay={old * 2}"])
    with pytest.raises(ValueError, match=rf"cannot resume from .* with task\.weight_decay={old * 2}: the run used "
                                         rf"task\.weight_decay={old}"):
        run._check_resume_fits((tmp_path / "a.ckpt", stored), run.build(current)[0], current)
    same = run.compose(FAST_RUN)
    run._check_resume_fits((tmp_path / "a.ckpt", stored), run.build(same)[0], same)


def test_atomic_checkpoints_get_the_permissions_a_plain_torch_save_gives(tmp_path):
    """mkstemp makes its file 0600: a checkpoint written through it stayed unreadable to the group (a shared project
    folder) unless chmod-ed to what the umask gives. The reference is torch.save straight to a path (mutation audit
    m12)."""
    import os
    import stat

    from zoo.train.checkpoint import AtomicCheckpointIO, atomic_torch_save

    previous = os.umask(0o022)
    try:
        for umask in (0o022, 0o002, 0o077):
            os.umask(umask)
            torch.save({"a": 1}, tmp_path / f"plain_{umask:o}.ckpt")
            atomic_torch_save({"a": 1}, tmp_path / f"atomic_{umask:o}.ckpt")
            AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / f"io_{umask:o}.ckpt")
            modes = {name: stat.S_IMODE(os.stat(tmp_path / f"{name}_{umask:o}.ckpt").st_mode)
                     for name in ("plain", "atomic", "io")}
            assert modes["plain"] == 0o666 & ~umask
            assert modes == {name: modes["plain"] for name in modes}, (oct(umask), modes)
    finally:
        os.umask(previous)
    assert not list(tmp_path.glob(".*.tmp"))
