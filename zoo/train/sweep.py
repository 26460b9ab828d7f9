"""``zoo train -m`` / ``--multirun``: Hydra sweeps, one ``zoo train`` per combination, run one after another.

Users of Hydra-configured trainers (lightning-hydra-template, NeMo) sweep with ``python train.py -m task.lr=1e-3,3e-3
seed=0,1``. ``zoo train`` composes with Hydra's compose API instead of ``@hydra.main``, so Hydra's app runner (and its
sweeper and launcher) never runs; this module does their part:

* :func:`config_params` -- the sweep set in the config, ``hydra.sweeper.params`` (lightning-hydra-template keeps
  such sweeps in ``configs/hparams_search/*.yaml``), read as Hydra >= 1.2's ``BasicSweeper.sweep`` reads it
  (hydra/_internal/core_plugins/basic_sweeper.py): from the config Hydra composes for the sweeper (the command line
  without its sweep overrides, ``RunMode.MULTIRUN``), each entry written ``f"{key}={value}"`` and put before the
  command line's overrides; a key given in both keeps the params entry's position and takes the command line's
  values (``split_arguments`` below).
* :func:`expand` -- the jobs of a sweep, exactly as Hydra's ``BasicSweeper`` makes them: the overrides parsed by
  Hydra's own ``hydra.core.override_parser.overrides_parser.OverridesParser`` (commas, ``range()``, ``choice()``,
  ``glob()`` over a group's options, group sweeps such as ``model=vit_debug,maxvit_debug``) and combined by
  ``hydra._internal.core_plugins.basic_sweeper.BasicSweeper.split_arguments`` (the cartesian product, the last
  override varying fastest; a key given twice keeps the position of its first and the values of its last).
  ``interval()`` is refused: it is a range for optimizing sweepers (Optuna, Nevergrad), which BasicSweeper refuses too.
* :func:`plan` -- the sweep's directory (``sweep_dir=DIR``, default ``outputs/<name>/multirun/<date>_<time>`` in the
  style of zoo train's ``outputs/<name>/<date>_<time>``; Hydra's is ``multirun/<date>/<time>``) and each job's
  config composed up front (as Hydra's ``validate_batch_is_legal`` does before launching) with
  ``run_dir=<sweep_dir>/<job number>`` (Hydra's ``${hydra.sweep.dir}/${hydra.job.num}``).
* :func:`run` -- each job through :func:`zoo.train.run.compose` and :func:`zoo.train.run.train`, the path of a plain
  ``zoo train``, in this process. ``<sweep_dir>/sweep.json`` (rewritten atomically after each job) lists every job:
  number, overrides, run_dir, status (pending, ok, failed with its one-line error, interrupted), metrics, seconds.

Deliberate differences from Hydra:

* A job whose config does not compose (a key that one option of a group sweep lacks) fails alone; Hydra's
  ``validate_batch_is_legal`` refuses the whole sweep before any job runs. A job that fails in training does not
  stop the others either, as in Hydra 1.3 (its ``run_job`` keeps the exception in the JobReturn and
  ``BasicSweeper.sweep`` raises the first one after the batch, by default every job, has run). Each failure is
  recorded in sweep.json and the table with its one-line error, and ``zoo train -m`` exits 1 when any job failed.
  An error that is not a user error (zoo.cli._is_user_error: a plain zoo train shows its traceback) keeps its
  traceback in ``<run_dir>/error.txt``, named in the failure line and in sweep.json, and printed too under
  ZOO_DEBUG=1 (Hydra prints it after the batch). Ctrl-C stops the whole sweep (the job is recorded as interrupted;
  zoo train -m exits 130, as an interrupted process, and the job's own "resume with ckpt_path=" note, an override
  -m refuses, gives way to the sweep's "rerun with the same sweep_dir").
* Rerunning the same command with the same ``sweep_dir=`` continues the sweep (Hydra reruns every job): a job whose
  run directory holds ``metrics.json`` (written when a zoo train run ends) is kept as it is, and a job with only
  ``checkpoints/last.ckpt`` resumes from it with zoo train's own resume (``ckpt_path=<its run_dir>/checkpoints/
  last.ckpt``). The jobs keep the numbers sweep.json gave them (``shuffle()`` orders them anew on each expansion);
  a sweep_dir whose sweep.json lists another set of jobs is refused, as is a non-empty folder without one.
* ``hydra.sweeper`` holds ``params`` only (and BasicSweeper's own ``_target_`` and ``max_batch_size``, which changes
  nothing here: the jobs run one after another): another sweeper (Optuna's ``n_trials``, ``sampler``; an
  ``override /hydra/sweeper: optuna``) is refused, naming the key. When the config without the sweep's values does
  not compose (a key that only a swept group option has), the params are read from the config composed with the
  command line's group choices only (the defaults list, which alone decides where ``hydra.sweeper`` comes from);
  Hydra refuses such a sweep.
* Each job starts from the process's own settings (:func:`_process_state_restored`): Hydra's basic launcher runs
  its jobs in one process too, but zoo train changes process-wide settings (``num_threads=``).
* SIGTERM stops the whole sweep as Ctrl-C does (the job is recorded as interrupted); zoo train -m then exits 143.
* Multi-process DDP inside a sweep is refused (:func:`check_single_process`): Lightning's DDP launcher
  (``_SubprocessScriptLauncher``) starts the other ranks by re-running the command line, which here is the whole
  sweep. Tried with trainer=ddp_cpu seed=0,1: rank 1 started the sweep over from job 0 and ran it beside rank 0,
  both writing sweep.json and printing the table; it kept in step only because no job failed or was skipped on one
  rank alone (either would leave the other rank waiting in a collective). Sweep single-process jobs, or run one
  ``zoo train trainer=ddp_cpu ...`` per combination.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = ["Job", "split_sweep_arguments", "config_params", "config_sweep_keys", "expand", "check_single_process",
           "plan", "run", "print_table", "SWEEP_FILE"]

SWEEP_FILE = "sweep.json"


@dataclass
class Job:
    """One combination of a sweep: its number (Hydra's ``hydra.job.num``), its overrides and its run directory;
    ``error`` is the one-line composition error of a job whose config does not compose."""

    number: int
    overrides: list[str]
    run_dir: Path
    error: Optional[str] = None
    error_traceback: Optional[str] = None  # the traceback of a composition error that is not a user error
    config_dirs: tuple[str, ...] = ()  # zoo train --config-dir folders
    config_name: str = "train"  # the primary config (zoo train --config-name), recorded in sweep.json
    params: tuple[str, ...] = ()  # the config's hydra.sweeper.params entries (config_params), recorded in sweep.json
    record: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)  # its record in the sweep.json of an earlier run

    def run_overrides(self) -> list[str]:
        """The overrides that compose this job as it runs: its own, and its run directory."""
        return [*self.overrides, _path_override("run_dir", self.run_dir)]


def split_sweep_arguments(argv: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """(the Hydra overrides, ``sweep_dir``) from ``zoo train -m`` arguments (``-m`` / ``--multirun`` dropped);
    ``run_dir=`` and ``ckpt_path=`` are refused: each job has its own run directory and resumes itself. Refused
    too, before any job runs: a ``sweep_dir`` with ``${...}`` (each job's quoted ``run_dir=`` override would resolve
    it, sweep.json would stay in the literal folder, and a rerun would find neither), and ``hydra.*`` settings
    (:func:`_hydra_setting`) other than ``hydra.searchpath=[...]`` (the user's config folders, kept for every job)."""
    overrides, sweep_dir = [], None
    for token in argv:
        key, sep, value = token.partition("=")
        name = key.lstrip("+~")
        if sep and name == "sweep_dir":
            if not value.strip():
                raise ValueError("sweep_dir= is empty: give the folder the sweep's jobs go to (sweep_dir=DIR)")
            if "${" in value:
                raise ValueError(f"{token}: sweep_dir is a folder, not resolved as a config value (${{...}} would "
                                 f"be resolved in the jobs' run_dir but not for sweep.json); give the folder "
                                 f"literally, e.g. sweep_dir=outputs/<name>/my_sweep")
            sweep_dir = os.path.expanduser(value)
        elif key == "hydra.searchpath" and sep:  # the user's config folders: each job composes with them
            overrides.append(token)
        elif name == "hydra" or name.startswith("hydra."):
            raise ValueError(_hydra_setting(token, name, value))
        elif name == "run_dir":
            raise ValueError(f"{token}: with -m each job has its own run_dir (<sweep_dir>/<job number>); give the "
                             f"sweep's folder as sweep_dir=DIR instead")
        elif name == "ckpt_path":
            raise ValueError(f"{token}: with -m each job resumes from its own checkpoint when the sweep is rerun "
                             f"with the same sweep_dir; to start every job from trained weights use "
                             f"model.pretrained=...")
        elif token in ("-m", "--multirun"):
            continue
        else:
            overrides.append(token)
    return overrides, sweep_dir


def _hydra_setting(token: str, name: str, value: str) -> str:  # (hydra.searchpath=[...] is let through)
    """Why a ``hydra.*`` override is refused with -m, and what to give instead. ``zoo train`` composes its config
    without Hydra's app runner, so Hydra's own settings never reach a sweeper: ``hydra.sweep.dir`` (the
    lightning-hydra-template spelling of the sweep's folder) is ``sweep_dir=``; ``hydra.sweep.subdir`` is fixed to the
    job number (Hydra's default ``${hydra.job.num}``); ``hydra.sweeper.*`` is not taken as an override: a sweep set in
    a config is a config file's ``hydra.sweeper.params`` (:func:`config_params`)."""
    if name == "hydra.sweep.dir":
        return f"{token}: zoo train -m does not run Hydra's app runner; give the sweep's folder as sweep_dir={value}"
    if name == "hydra.sweep.subdir":
        return f"{token}: each job's folder is <sweep_dir>/<job number> (Hydra's default subdir); drop {name}"
    if name.startswith("hydra.sweeper"):
        return (f"{token}: Hydra sweeper settings (hydra.sweeper.*) are not taken as command-line "
                f"overrides; give the swept values on the command line (KEY=A,B), or in a config file's "
                f"hydra.sweeper.params (zoo train -m runs Hydra's basic sweeper; docs/training.md section 4b)")
    return (f"{token}: zoo train composes its config without Hydra's app runner, so hydra.* settings have no effect "
            f"(except hydra.searchpath=[...], as --config-dir DIR, which add your config folders); the sweep's folder "
            f"is sweep_dir=DIR")


# a ``~`` that starts an element of an override's value (``key=~/a,~/b``, ``key=choice(~/a,~/b)``) and is the whole
# element or followed by ``/``; a quoted ``'~/a'`` is a string Hydra's grammar takes as it is, and is left alone
_HOME_ELEMENT = re.compile(r"(?<![^=,(\[\s])~(?=/|,|\)|\]|\s|$)")


def _expand_home_elements(item: str) -> str:
    """``key=~/a,~/b`` with ``~`` expanded in every element: zoo.train.run._expand_home expands a value that starts with
    ``~`` (a single path: ``key=~/a,~/b`` became ``key=/home/me/a,~/b``, which Hydra's grammar refuses)."""
    key, sep, value = item.partition("=")
    if not sep or key.startswith("~") or "~" not in value:
        return item
    return f"{key}={_HOME_ELEMENT.sub(lambda _: os.path.expanduser('~'), value)}"


def _parse_overrides(parser, written: Sequence[str]) -> list:
    """Each override parsed by Hydra's ``OverridesParser`` (``~`` expanded in every element); an override that does
    not parse is named as the user wrote it."""
    from hydra.errors import HydraException

    parsed = []
    for item in written:
        try:
            parsed += parser.parse_overrides([_expand_home_elements(item)])
        except HydraException as error:
            first = str(error).strip().splitlines()[0]
            raise ValueError(f"override {item!r} is not a Hydra override: {first}") from None
    return parsed


def _interval_refusal(text: str) -> str:
    return (f"{text}: interval() is a continuous range for optimizing sweepers (Optuna, Nevergrad), which zoo train "
            f"-m does not run (nor does Hydra's basic sweeper); list values (a,b,c), range(start,stop,step) or "
            f"choice(a,b) instead")


#: Hydra's defaults of ``hydra.sweep`` (hydra/conf/__init__.py ``SweepDir``), unresolved: a config that sets
#: another is refused, as ``hydra.sweep.dir=`` on the command line is (the sweep's folder is ``sweep_dir=``)
_HYDRA_SWEEP_DEFAULTS = {"dir": "multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}", "subdir": "${hydra.job.num}"}

#: Hydra's basic sweeper, the ``_target_`` of ``hydra.sweeper`` unless another sweeper is chosen
#: (hydra/_internal/core_plugins/basic_sweeper.py ``BasicSweeperConf``)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def _compose_for_sweeper(loader, name: str, parsed: Sequence, items: Sequence[str], run_mode):
    """(the config Hydra composes before it sweeps, with its ``hydra`` node; the overrides it was composed with), as
    ``hydra._internal.hydra.Hydra.multirun`` composes it: ``load_configuration(..., RunMode.MULTIRUN)``, whose
    defaults list and overrides skip the sweep overrides. When that fails (a key that only a swept group option
    has: zoo runs such a sweep, each job failing or not alone), the config of the command line's group choices
    only; None when that fails too."""
    from hydra.errors import HydraException

    try:
        return loader.load_configuration(config_name=name, overrides=list(items), run_mode=run_mode,
                                          from_shell=False), list(items)
    except HydraException:
        pass
    choices = [item for override, item in zip(parsed, items) if not override.is_sweep_override() and (
        override.key_or_group == "hydra.searchpath" or loader.repository.group_exists(override.key_or_group))]
    try:
        return loader.load_configuration(config_name=name, overrides=choices, run_mode=run_mode,
                                          from_shell=False), choices
    except HydraException:
        return None, choices


def _setting_file(loader, name: str, items: Sequence[str], run_mode, node_path: str, key: str) -> str:
    """The config file that sets ``<node_path>.<key>`` for the sweeper (the last one in the defaults list that holds
    it: each later file overrides the earlier ones), as ``experiment/x.yaml``; "the config" when not found."""
    from hydra.errors import HydraException
    from omegaconf import DictConfig, OmegaConf

    try:
        defaults = loader.compute_defaults_list(name, list(items), run_mode).defaults
    except HydraException:
        return "the config"
    found = None
    for default in defaults:
        # a file's keys sit under its package: _global_ files ("") hold hydra: at their top, a "# @package
        # hydra.sweeper" file (Hydra's convention for sweeper configs) holds params: at its top
        package = default.package or ""
        if default.config_path is None or (package and package != node_path
                                           and not node_path.startswith(package + ".")):
            continue
        try:
            loaded = loader.repository.load_config(default.config_path)
        except HydraException:
            continue
        relative = node_path[len(package):].lstrip(".") if package else node_path
        config = loaded.config if loaded is not None else None
        node = (config if not relative else OmegaConf.select(config, relative)) if config else None
        if isinstance(node, DictConfig) and key in node:
            found = default.config_path
    return f"{found}.yaml" if found else "the config"


def config_params(overrides: Sequence[str], config_dirs: Sequence[str] = (), *,
                  config_name: str = "train") -> list[str]:
    """The sweep set in the config: ``hydra.sweeper.params`` of the config composed from ``config_name`` with the
    command line's overrides but not its sweeps (Hydra's ``Hydra.multirun``: ``RunMode.MULTIRUN``), each entry
    ``f"{key}={value}"`` in the config's order, as ``BasicSweeper._parse_config`` writes it (hydra-core 1.3,
    hydra/_internal/core_plugins/basic_sweeper.py); ``BasicSweeper.sweep`` then puts the command line's overrides
    after them (:func:`plan`). Refused, naming the file and key: another sweeper's settings (``_target_``, and keys
    other than BasicSweeper's ``params`` / ``max_batch_size``), an entry that is not a Hydra override, ``interval()``,
    and keys -m refuses on the command line (``run_dir``, ``ckpt_path``, ``hydra.*``) or takes there only
    (``sweep_dir``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from zoo.train import run as run_module

    written = list(overrides)
    name = run_module.primary_config_name(config_name)
    folders = [*config_dirs, *run_module.searchpath_folders(written)]
    with run_module.hydra_session(folders) as global_hydra:
        loader = global_hydra.config_loader()
        parser = OverridesParser.create(config_loader=loader)
        parsed = _parse_overrides(parser, written)
        items = [_expand_home_elements(item) for item in written]
        cfg, used = _compose_for_sweeper(loader, name, parsed, items, RunMode.MULTIRUN)
        if cfg is not None:
            sweeper = cfg.hydra.sweeper

            def where(node_path: str, key: str) -> str:
                return _setting_file(loader, name, used, RunMode.MULTIRUN, node_path, key)

            for key in sweeper:
                if key in ("params", "max_batch_size") or (key == "_target_" and sweeper[key] == BASIC_SWEEPER):
                    continue
                shown = f"{key}: {sweeper[key]}" if key == "_target_" else key
                raise ValueError(f"hydra.sweeper.{shown} (in {where('hydra.sweeper', key)}): zoo train's sweeps (-m) run "
                                 f"Hydra's basic sweeper only, whose settings are hydra.sweeper.params (the values "
                                 f"to sweep); drop {key} (an optimizing sweeper's setting: Optuna's, Nevergrad's)")
            for key, default in _HYDRA_SWEEP_DEFAULTS.items():
                raw = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get(key)
                if raw != default:
                    instead = ("give the sweep's folder as sweep_dir=DIR on the command line" if key == "dir" else
                               "each job's folder is <sweep_dir>/<job number>")
                    raise ValueError(f"hydra.sweep.{key}: {raw} (in "
                                     f"{where('hydra.sweep', key)}): zoo train -m does not run Hydra's launcher; "
                                     f"{instead}, and drop hydra.sweep.{key} from the config")
            try:
                params = sweeper.get("params") or {}
                entries = [f"{key}={value}" for key, value in params.items()]  # BasicSweeper._parse_config
            except OmegaConfBaseException as error:
                key = getattr(error, "full_key", None) or "hydra.sweeper.params"
                first = str(error).strip().splitlines()[0]
                raise ValueError(f"{key} (in {where('hydra.sweeper.params', str(key).rsplit('.', 1)[-1])}): {first}"
                                 f" (the sweep's values are read before any job exists: ${{hydra:...}} has no "
                                 f"value there)") from None
            for key, entry in zip(params, entries):
                def refused(why: str) -> ValueError:
                    return ValueError(f"hydra.sweeper.params in {where('hydra.sweeper.params', key)}: {why}")

                try:
                    parsed_entry = parser.parse_override(entry)
                except HydraException as error:
                    raise refused(f"{entry} is not a Hydra override: {str(error).strip().splitlines()[0]}") from None
                if parsed_entry.value_type == ValueType.INTERVAL_SWEEP:
                    raise refused(_interval_refusal(entry))
                try:
                    _, sweep_dir = split_sweep_arguments([entry])
                except ValueError as error:
                    raise refused(str(error)) from None
                if sweep_dir is not None:
                    raise refused(f"{entry}: the sweep's folder is given on the command line (sweep_dir=DIR)")
            return entries
    # the config does not compose even with the command line's group choices alone: zoo train's own error for it
    non_sweep = [item for override, item in zip(parsed, written) if not override.is_sweep_override()]
    run_module.compose(non_sweep, config_name=name, config_dirs=config_dirs)
    raise ValueError(f"the sweep's config does not compose without its swept values ({' '.join(non_sweep)})")


def config_sweep_keys(overrides: Sequence[str], config_dirs: Sequence[str] = (), *,
                      config_name: str = "train") -> tuple[bool, list[str]]:
    """What the config of a ``zoo train`` without -m says about sweeping, read as Hydra's ``Hydra.get_mode`` reads it
    (hydra/_internal/hydra.py: the config composed in ``RunMode.MULTIRUN``): (whether it sets ``hydra.mode:
    MULTIRUN``, which makes a ``@hydra.main`` app sweep without ``--multirun`` -- lightning-hydra-template's
    hparams_search files set it -- and so zoo train too; the keys of its ``hydra.sweeper.params``, which a run
    without either ignores, as Hydra does). (False, []) when the config does not compose (zoo train says why)."""
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from zoo.train import run as run_module

    # sweep_dir= is no config key: zoo train takes it for a sweep (one that hydra.mode: MULTIRUN makes, here)
    written = [item for item in overrides if item.partition("=")[0].lstrip("+~") != "sweep_dir"]
    folders = [*config_dirs, *run_module.searchpath_folders(written)]
    try:
        with run_module.hydra_session(folders) as global_hydra:
            cfg = global_hydra.config_loader().load_configuration(
                config_name=run_module.primary_config_name(config_name),
                overrides=[_expand_home_elements(item) for item in written], run_mode=RunMode.MULTIRUN,
                from_shell=False)
        return cfg.hydra.get("mode") == RunMode.MULTIRUN, [str(key) for key in (cfg.hydra.sweeper.get("params") or {})]
    except (HydraException, OmegaConfBaseException, ValueError):
        return False, []


def expand(overrides: Sequence[str], config_dirs: Sequence[str] = ()) -> list[list[str]]:
    """The jobs of a sweep (each a list of overrides), as Hydra's BasicSweeper makes them: parsed by
    ``OverridesParser.parse_overrides`` and combined by ``BasicSweeper.split_arguments`` (hydra-core 1.3,
    hydra/_internal/core_plugins/basic_sweeper.py), in its order. Errors quote the override as the user wrote it
    (before ``~`` was expanded)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    from zoo.train import run as run_module

    written = list(overrides)
    # glob() lists a group's options through Hydra's loader: zoo.configs, the --config-dir folders and those of a
    # hydra.searchpath override (which Hydra's loader reads only when it composes)
    folders = [*config_dirs, *run_module.searchpath_folders(written)]
    with run_module.hydra_session(folders) as global_hydra:
        parser = OverridesParser.create(config_loader=global_hydra.config_loader())
        parsed, given = _parse_overrides(parser, written), written
        for item, text in zip(parsed, given):
            if item.value_type == ValueType.INTERVAL_SWEEP:
                raise ValueError(_interval_refusal(text))
        try:
            jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
        except HydraException as error:  # a glob() over a key that is not a config group, ...
            raise ValueError(f"sweep {written}: {str(error).strip().splitlines()[0]}") from None
    if not jobs:
        empty = [text for item, text in zip(parsed, given)
                 if item.is_sweep_override() and not list(item.sweep_string_iterator())]
        raise ValueError(f"the sweep has no jobs: {', '.join(empty) or 'a sweep'} gives no values: give "
                         f"each swept key at least one")
    return [list(job) for job in jobs]


def _default_sweep_dir(name: str) -> Path:
    """``outputs/<name>/multirun/<date>_<time>``, beside zoo train's ``outputs/<name>/<date>_<time>``."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path("outputs") / name / "multirun" / stamp


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _error_line(error: BaseException) -> str:
    """A failed job's error as sweep.json and the table show it: the exception's type and first line."""
    return f"{type(error).__name__}: {_one_line(error)}"


def _device_count(devices) -> Optional[int]:
    """How many devices ``trainer.devices`` asks for (None: all of them, -1 / "auto" / "-1")."""
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    try:
        count = int(text)
    except ValueError:
        return None
    return None if count == -1 else count


def check_single_process(cfg, job: int) -> None:
    """Refuse a job that Lightning would run as several processes. DDP / FSDP / DeepSpeed's default launcher
    (``_SubprocessScriptLauncher``) starts the other ranks by re-running the command line, here the whole sweep, so
    every rank would start the sweep over from its first job; ``ddp_spawn`` pickles the trainer's callbacks, and
    zoo train's are local classes ("Can't pickle local object '_interrupt_callback.<locals>.InterruptNote'", the same
    in a plain zoo train); ``ddp_fork`` is Lightning's for notebooks, untested here."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    devices = _device_count(trainer.get("devices", "auto"))
    num_nodes = int(trainer.get("num_nodes") or 1)
    if devices is None and accelerator == "cpu":
        devices = 1  # Lightning's "auto" on the CPU accelerator is one process
    if num_nodes <= 1 and devices == 1:
        return
    asked = f"trainer.devices={trainer.get('devices')}" + (f", trainer.num_nodes={num_nodes}" if num_nodes > 1 else "")
    raise ValueError(f"job {job} runs on several processes ({asked}), which a sweep cannot: Lightning's DDP starts "
                     f"the other ranks by re-running the command line, here the whole sweep, so each rank would "
                     f"start the sweep over; sweep single-process jobs (trainer.devices=1), or run one zoo train per "
                     f"combination for DDP")


def plan(overrides: Sequence[str], sweep_dir: Optional[str] = None,
         config_dirs: Sequence[str] = (), *, config_name: str = "train") -> tuple[Path, list[Job]]:
    """(sweep_dir, the jobs) for a sweep's overrides: every job composed (a composition error is kept as the job's
    error: that job fails, the others run), multi-process jobs refused, and the sweep_dir checked to be this sweep's
    (or new, or empty). In a sweep_dir of an earlier run of this sweep, the jobs take the numbers (and the order)
    that sweep.json gives them: ``shuffle()`` orders the jobs anew on each expansion (Hydra seeds it from nothing),
    and a job's number is its run directory. The config's own sweep (``hydra.sweeper.params``, :func:`config_params`)
    comes first and the command line's overrides after it, as ``BasicSweeper.sweep`` merges them: a key in both
    keeps its params position and takes the command line's values."""
    from zoo.train import run as run_module

    config_name = run_module.primary_config_name(config_name)
    params = config_params(overrides, config_dirs, config_name=config_name)
    combinations = expand([*params, *overrides], config_dirs)
    composed = []
    for number, job_overrides in enumerate(combinations):
        try:
            # run_dir is added when the job runs (sweep_dir may be default)
            cfg = run_module.compose(job_overrides, config_name=config_name, config_dirs=config_dirs)
        except Exception as error:  # noqa: BLE001 -- recorded as this job's failure, the others still run
            composed.append((None, _error_line(error), _internal_traceback(error)))
            continue
        check_single_process(cfg, number)
        composed.append((cfg, None, None))
    if sweep_dir is None:
        names = [str(cfg.get("name") or "run") for cfg, _, _ in composed if cfg is not None]
        sweep_dir = _default_sweep_dir(names[0] if names else "run")
    root = Path(sweep_dir).expanduser().absolute()
    for path in (root, *root.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"sweep_dir={root}: {path} is an existing file, not a directory (give a directory)")
    stored = _stored_jobs(root, combinations, config_name)
    order = _stored_order(combinations, stored) if stored else range(len(combinations))
    return root, [Job(number, combinations[index], root / str(number), composed[index][1], composed[index][2],
                      config_dirs=tuple(config_dirs), config_name=config_name, params=tuple(params),
                      previous=stored[number] if stored else {})
                  for number, index in enumerate(order)]


def _stored_jobs(root: Path, combinations: Sequence[Sequence[str]], config_name: str = "train") -> list[dict[str, Any]]:
    """The job records of the sweep.json in ``root`` ([] for a new or empty folder). A sweep continues in its own
    sweep_dir only: one whose sweep.json lists another set of jobs, or a non-empty folder without sweep.json, is
    refused (its numbered run directories would be taken for this sweep's jobs)."""
    record = root / SWEEP_FILE
    if not record.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise ValueError(f"sweep_dir={root} is a non-empty folder without {SWEEP_FILE}: give a new or empty "
                             f"folder")
        return []
    try:
        written = json.loads(record.read_text(encoding="utf-8"))
        stored = written["jobs"]
        listed = [list(job["overrides"]) for job in stored]
        stored_name = str(written.get("config_name") or "train")  # (a sweep.json from before config_name: train)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"sweep_dir={root}: its {SWEEP_FILE} is unreadable ({_one_line(error)}): give another "
                         f"sweep_dir") from None
    if sorted(listed) != sorted(list(job) for job in combinations):
        raise ValueError(f"sweep_dir={root} holds another sweep ({len(listed)} jobs, the first "
                         f"{' '.join(listed[0]) if listed else 'none'}): give another sweep_dir, or that sweep's "
                         f"own overrides (and config hydra.sweeper.params) to continue it")
    if stored_name != config_name:  # the same overrides on another primary config are another sweep
        def named(which: str) -> str:
            return f"--config-name {which}" if which != "train" else "train.yaml (no --config-name)"

        raise ValueError(f"sweep_dir={root} holds a sweep composed from the primary config {named(stored_name)}, "
                         f"and this one is composed from {named(config_name)}: give another sweep_dir, or that "
                         f"sweep's own --config-name (and --config-dir) to continue it")
    return stored


def _stored_order(combinations: Sequence[Sequence[str]], stored: Sequence[dict[str, Any]]) -> list[int]:
    """For each job of sweep.json, in its order, the index of the same overrides in ``combinations`` (the same set,
    checked by _stored_jobs; a combination listed twice is matched once per listing)."""
    unused: dict[tuple[str, ...], list[int]] = {}
    for index, job in enumerate(combinations):
        unused.setdefault(tuple(job), []).append(index)
    return [unused[tuple(job["overrides"])].pop(0) for job in stored]


def _write_record(root: Path, overrides: Sequence[str], jobs: Sequence[Job]) -> None:
    from zoo.hub import atomic_write

    config_name = jobs[0].config_name if jobs else "train"  # (every job's: the sweep's primary config)
    params = list(jobs[0].params) if jobs else []  # (every job's: the config's hydra.sweeper.params)
    text = json.dumps({"sweep_dir": str(root), "config_name": config_name, "params": params,
                       "overrides": list(overrides), "jobs": [job.record for job in jobs]}, indent=2) + "\n"
    atomic_write(root / SWEEP_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _path_override(key: str, path: Path) -> str:
    """``key='<path>'``: a path quoted for Hydra's override grammar, where a comma in an unquoted value makes a sweep
    and brackets a list (a quote in the path escaped with a backslash, as the grammar reads it)."""
    escaped = str(path).replace("'", "\\'")
    return f"{key}='{escaped}'"


def _finished_metrics(run_dir: Path) -> Optional[dict]:
    """The metrics.json of a run that ended (zoo train writes it last), else None."""
    try:
        finished = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return finished if isinstance(finished, dict) and isinstance(finished.get("metrics"), dict) else None


#: the file in a failed job's run directory that keeps the traceback of an error that is not a user error
ERROR_FILE = "error.txt"


def _internal_traceback(error: BaseException) -> Optional[str]:
    """The traceback of ``error`` (raised in the ``except`` that calls this) when zoo train would show it: an error
    that is not a user error (zoo.cli._is_user_error, which a plain zoo train prints with its traceback), or any error
    under ZOO_DEBUG=1; None otherwise."""
    import traceback

    from zoo.cli import _is_user_error

    if _is_user_error(error) and not os.environ.get("ZOO_DEBUG"):
        return None
    return traceback.format_exc()


def _report_failure(job: Job, error_line: str, trace: Optional[str]) -> None:
    """Record a failed job and say so on stderr; a traceback (see _internal_traceback) is kept in
    ``<run_dir>/error.txt``, named in the line, and printed too under ZOO_DEBUG=1 (as zoo train raises it then)."""
    where = ""
    if trace is not None:
        path = job.run_dir / ERROR_FILE
        try:
            job.run_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(f"zoo train -m: job {job.number}: {' '.join(job.overrides)}\n{trace}", encoding="utf-8")
            job.record["traceback"] = str(path)
            where = f" (traceback in {path})"
        except OSError as problem:  # the traceback still goes to stderr below
            where = f" (its traceback could not be written to {path}: {problem})"
        if os.environ.get("ZOO_DEBUG"):
            print(trace, file=sys.stderr, end="", flush=True)
    print(f"zoo train -m: job {job.number} failed: {error_line}{where}", file=sys.stderr, flush=True)


def _run_job(job: Job) -> None:
    """Run (or skip, or resume) one job, filling ``job.record``; Ctrl-C (KeyboardInterrupt, or Lightning's SystemExit
    after it) marks it interrupted and stops the sweep."""
    from zoo.train import run as run_module

    job.record.update(status="pending", error=None)
    job.record.pop("traceback", None)
    (job.run_dir / ERROR_FILE).unlink(missing_ok=True)  # an earlier run's: this run's failure writes its own
    if job.error is not None:
        job.record.update(status="failed", error=job.error, metrics={}, seconds=0.0)
        _report_failure(job, job.error, job.error_traceback)
        return
    finished = _finished_metrics(job.run_dir)
    if finished is not None:
        # a job kept from an earlier run keeps its recorded wall time (metrics.json's "seconds" is the fit's alone)
        seconds = job.previous.get("seconds") if job.previous.get("status") == "ok" else None
        job.record.update(status="ok", metrics=finished["metrics"], skipped=True,
                          seconds=finished.get("seconds") if seconds is None else seconds)
        return
    last = job.run_dir / "checkpoints" / "last.ckpt"
    resume = [_path_override("ckpt_path", last)] if last.is_file() else []
    job.record["resumed_from"] = str(last) if last.is_file() else None
    start = time.perf_counter()
    try:
        with _process_state_restored():
            cfg = run_module.compose([*job.run_overrides(), *resume], config_name=job.config_name,
                                     config_dirs=job.config_dirs)
            # the user's primary config, recorded in the job's checkpoints (as zoo.cli._cmd_train passes it)
            source = {} if job.config_name == "train" else {"config_name": job.config_name,
                                                             "config_dirs": job.config_dirs}
            result = run_module.train(cfg, resume_advice=False, **source)  # the sweep says how to continue (run)
    except (KeyboardInterrupt, SystemExit):
        job.record.update(status="interrupted", seconds=round(time.perf_counter() - start, 3))
        raise
    except Exception as error:  # noqa: BLE001 -- a failed job does not stop the sweep (module docstring)
        job.record.update(status="failed", error=_error_line(error), metrics={},
                          seconds=round(time.perf_counter() - start, 3))
        _report_failure(job, job.record["error"], _internal_traceback(error))
        return
    job.record.update(status="ok", metrics=result.get("metrics", {}), seconds=round(time.perf_counter() - start, 3))


# environment variables a job sets: Lightning's seed_everything (PL_GLOBAL_SEED, PL_SEED_WORKERS) and deterministic
# mode (CUBLAS_WORKSPACE_CONFIG), zoo train's run directory (zoo.train.run.RUN_DIR_ENV)
_JOB_ENVIRONMENT = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG", "ZOO_RUN_DIR")


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    """Run a job with the process-wide settings that zoo train changes restored after it, as each job of Hydra's
    basic launcher would start from the process's own: the jobs run in this process, and a job's ``num_threads=1``
    (experiment=vit_digits sets it) made every later job run on one thread, with other weights than the same job
    run alone. zoo.train.run sets ``torch.set_num_threads`` (num_threads=), the seeds and PL_GLOBAL_SEED /
    PL_SEED_WORKERS (``seed_everything``; each job seeds again, the random states are restored anyway) and warnings
    filters (a resumed job's); Lightning's Trainer sets ``torch.use_deterministic_algorithms``, cuDNN's flags and
    CUBLAS_WORKSPACE_CONFIG for ``trainer.deterministic`` / ``trainer.benchmark``. The interop thread count is not
    set by zoo train (torch allows setting it once per process)."""
    import random

    import numpy
    import torch

    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    matmul_precision = torch.get_float32_matmul_precision()
    environment = dict(os.environ)
    random_states = (random.getstate(), numpy.random.get_state(), torch.random.get_rng_state())
    try:
        with warnings.catch_warnings():  # the filters, restored as they were
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        torch.set_float32_matmul_precision(matmul_precision)
        # the variables zoo train and Lightning set or change, as they were (variables a library sets once when it is
        # first imported during a job -- scikit-learn's KMP_* -- stay: the next job does not import it again)
        for key in _JOB_ENVIRONMENT:
            if key in environment:
                os.environ[key] = environment[key]
            else:
                os.environ.pop(key, None)
        random.setstate(random_states[0])
        numpy.random.set_state(random_states[1])
        torch.random.set_rng_state(random_states[2])


def run(overrides: Sequence[str], sweep_dir: Optional[str] = None,
        config_dirs: Sequence[str] = (), *, config_name: str = "train") -> tuple[Path, list[dict[str, Any]]]:
    """Run a sweep (module docstring); returns (sweep_dir, each job's record as written to sweep.json). Every job is
    composed from the primary config ``config_name`` (zoo train --config-name), which sweep.json records: a rerun
    with the same sweep_dir continues the sweep only from the same one."""
    root, jobs = plan(overrides, sweep_dir, config_dirs, config_name=config_name)
    for job in jobs:
        job.record = {"job": job.number, "overrides": job.overrides, "run_dir": str(job.run_dir),
                      "status": "pending", "error": None, "metrics": {}, "seconds": None}
    root.mkdir(parents=True, exist_ok=True)
    _write_record(root, overrides, jobs)
    print(f"zoo train -m: {len(jobs)} job(s) in {root}", file=sys.stderr, flush=True)
    for job in jobs:
        print(f"zoo train -m: job {job.number}: {' '.join(job.overrides)}", file=sys.stderr, flush=True)
        try:
            _run_job(job)
        except (KeyboardInterrupt, SystemExit) as stop:
            how = "terminated (SIGTERM)" if _is_sigterm(stop) else "interrupted"
            last = job.run_dir / "checkpoints" / "last.ckpt"
            resumes = (f"job {job.number} resumes from {last}" if last.is_file()
                       else f"job {job.number} starts over: it had written no checkpoint yet")
            print(f"zoo train -m: sweep {how} in job {job.number}; rerun the same command with "
                  f"sweep_dir={root} to continue it (finished jobs are kept, {resumes})",
                  file=sys.stderr, flush=True)
            raise
        finally:
            _write_record(root, overrides, jobs)
    return root, [job.record for job in jobs]


def _is_sigterm(stop: BaseException) -> bool:
    """Whether ``stop`` ended a run on SIGTERM: Lightning's handler makes the loops raise ``SIGTERMException``, a
    SystemExit without a code (so the interpreter would exit 0, as if the run had ended well)."""
    lightning_errors = sys.modules.get("lightning.pytorch.utilities.exceptions")
    sigterm = getattr(lightning_errors, "SIGTERMException", None)
    return isinstance(stop, SystemExit) and (stop.code is None or (sigterm is not None and isinstance(stop, sigterm)))


# metrics shown in the table first, when a run has them (the rest of metrics.json is in sweep.json)
_KEY_METRICS = ("val/acc1", "val/loss", "test/acc1", "test/loss", "train/loss")


def print_table(root: Path, records: Sequence[dict[str, Any]]) -> None:
    """The sweep as a Rich table: job, the overrides swept, key metrics, status (the error of a failed job)."""
    from rich.console import Console
    from rich.table import Table

    found = {key for record in records for key in record.get("metrics") or {}}
    shown = [key for key in _KEY_METRICS if key in found] or sorted(found)[:4]
    # the overrides that differ between jobs (the swept ones; sweep.json has them all): split_arguments gives every
    # job the same keys in the same order
    varying = [i for i, values in enumerate(zip(*(record["overrides"] for record in records))) if len(set(values)) > 1]
    table = Table(title=f"zoo train -m: {root}")
    table.add_column("job", justify="right")
    table.add_column("overrides")
    for key in shown:
        table.add_column(key, justify="right")
    table.add_column("status")
    for record in records:
        metrics = record.get("metrics") or {}
        cells = [f"{metrics[key]:.4f}" if isinstance(metrics.get(key), (int, float)) else "" for key in shown]
        status = record["status"] + (" (done before)" if record.get("skipped") else "")
        if record.get("error"):
            status += f": {record['error']}"
        shown_overrides = [record["overrides"][i] for i in varying] if varying else record["overrides"]
        table.add_row(str(record["job"]), " ".join(shown_overrides), *cells, status)
    console = Console()
    if not console.is_terminal:  # piped or redirected: Rich's 80 columns cut the overrides and metric names to "…"
        console = Console(width=max(80, 12 * (len(shown) + 2) + max(
            (len(" ".join(record["overrides"])) for record in records), default=0)))
    console.print(table)
