"""What ``zoo train`` / ``zoo eval`` / ``zoo predict`` do, as functions (the CLI only parses arguments).

Configs come from the installed package ``zoo.configs`` through Hydra's compose API
(``initialize_config_module("zoo.configs")``'s search path), so they work from a wheel as well as from the source
tree; the user's own folders join the search path with ``--config-dir`` / ``hydra.searchpath`` (:func:`compose`).

* :func:`compose` -- the composed, validated config for a list of Hydra overrides.
* :func:`build` -- (LightningModule, LightningDataModule) from a config: ``data`` and ``model`` are
  instantiated (the model through ``zoo.create_model``) and handed to the ``task`` module. A task config
  without ``_target_`` but with ``module: <python module>`` delegates to that module's
  ``build(cfg) -> (LightningModule, DataModule, ...)`` (the graph task does this).
* :func:`train` -- fit (resuming from ``ckpt_path``), test, and export ``<run_dir>/released``. Every
  run directory holds ``config.yaml`` (resolved), ``checkpoints/{best,last}.ckpt`` (atomic writes),
  ``csv/metrics.csv``, ``tensorboard/`` and ``metrics.json``. ``test_ckpt`` / ``export_ckpt`` (final | best)
  pick the weights the test and the release use: those at the end of training, or ``best.ckpt``'s.
* :func:`evaluate` / :func:`predict` -- from a ``.ckpt`` (which stores the resolved run config and the
  model's registry name and arguments in its hyper-parameters, all plain data, so it loads with
  ``torch.load(weights_only=True)``), from a released directory, or from a run directory (its released/,
  else checkpoints/best.ckpt, else checkpoints/last.ckpt).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from zoo.layers import usable_cpus
# the data keys that name files or folders (data.root: a data set's folder; data.path: graph classification's
# torch.save'd list of Data), and which of their values are paths on this machine
from zoo.train.order import _DATA_PATH_KEYS, _is_local_path

__all__ = ["compose", "build", "train", "evaluate", "predict", "load_for_inference", "CONFIG_MODULE"]

CONFIG_MODULE = "zoo.configs"
RUN_DIR_ENV = "ZOO_RUN_DIR"  # lets DDP worker processes (re-launched with the same argv) share run_dir


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def compose(overrides: Sequence[str] = (), config_name: str = "train", config_dirs: Sequence[str] = ()):
    """Compose ``zoo.configs/<config_name>.yaml`` with Hydra ``overrides`` (``key=value``, ``group=option``).

    ``config_dirs``: the user's own config folders (``zoo train --config-dir DIR``), searched after zoo.configs for
    group options, as Hydra's ``--config-dir`` adds its folder (hydra/_internal/utils.py ``run_hydra``: prepended
    before the ``schema`` entry, so after the primary config's own source). ``hydra.searchpath=[...]`` in the
    overrides adds folders too, handled by Hydra's config loader itself (``ConfigLoaderImpl
    ._process_config_searchpath``, appended after them); a missing folder of either is named here."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf

    overrides = [_expand_home(item) for item in overrides]
    for item in overrides:
        _check_override(item)
    name = primary_config_name(config_name)
    try:
        with hydra_session(config_dirs):
            cfg = hydra_compose(config_name=name, overrides=overrides)
    except MissingConfigException as error:
        if getattr(error, "missing_cfg_file", None) in (name, config_name):  # the primary config itself
            raise ValueError(_unknown_primary_config(config_name, config_dirs, overrides)) from None
        raise ValueError(_hydra_sweeper_error(str(error)) or
                         _composition_error(str(error), name, config_dirs, overrides)) from None
    except HydraException as error:
        raise ValueError(_hydra_sweeper_error(str(error)) or
                         _composition_error(str(error), name, config_dirs, overrides)) from None
    OmegaConf.set_struct(cfg, False)
    if name != "train":
        _check_extends_train(cfg, name, config_dirs)
    return cfg


def _hydra_sweeper_error(text: str) -> Optional[str]:
    """A config file's setting of another sweeper than Hydra's basic one, refused by Hydra's composition ("Key
    'n_trials' not in 'BasicSweeperConf'"; "Could not find 'hydra/sweeper/optuna'" for lightning-hydra-template's
    ``override /hydra/sweeper: optuna``), in one line naming the file and key; None for another error. zoo train -m
    runs Hydra's basic sweeper (zoo.train.sweep), whose only setting a config gives is ``hydra.sweeper.params``."""
    file = re.search(r"^In '([^']+)'", text.strip())
    where = f" (in {file.group(1)}.yaml)" if file else ""
    key = re.search(r"full_key: (hydra\.sweeper\.\S+)", text)
    if key and "BasicSweeperConf" in text:
        return (f"{key.group(1)}{where}: zoo train's sweeps (-m) run Hydra's basic sweeper only, whose settings are "
                f"hydra.sweeper.params (the values to sweep); drop {key.group(1).split('.')[2]} (an optimizing "
                f"sweeper's setting: Optuna's, Nevergrad's)")
    other = re.search(r"Could not find 'hydra/sweeper/([^']+)'", text)
    if other:
        return (f"hydra/sweeper: {other.group(1)}: zoo train's sweeps (-m) run Hydra's basic sweeper only (its "
                f"hydra.sweeper.params: the values to sweep); drop the override /hydra/sweeper: {other.group(1)} "
                f"and keep the swept values in hydra.sweeper.params")
    return None


def _composition_error(text: str, name: str, config_dirs: Sequence[str], overrides: Sequence[str]) -> str:
    """Hydra's composition error in one line, blamed on what caused it: the command line's overrides
    (:func:`_hydra_message`), or, for a primary config of the user's (``--config-name``) when train.yaml composes
    with the same overrides, that file -- named with Hydra's own sentence (an ``override /group`` its defaults list
    has no group for, a relative ``train`` in a subfolder). Hydra's errors do not say which."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException

    if name != "train":
        try:
            with hydra_session(config_dirs):
                hydra_compose(config_name="train", overrides=list(overrides))
        except HydraException:
            pass  # the overrides fail with train.yaml too: they are the cause
        else:
            where = _primary_config_path(name, config_dirs)
            first = text.strip().splitlines()[0] if text.strip() else text
            hint = ""
            if "/" in name:
                hint = ("; in a subfolder the packaged config is /train (defaults: [/train, _self_]) and the file "
                        "starts with # @package _global_ (a primary config in sub/ is composed under sub: "
                        "otherwise)")
            return f"--config-name {name} ({where}): {first}{hint}"
    return _hydra_message(text, overrides)


def _primary_config_path(name: str, config_dirs: Sequence[str]) -> str:
    """Where the user's primary config ``name`` was found (its path), or ``NAME.yaml``."""
    return next((str(folder / f"{name}.yaml") for _, folder in _primary_config_folders(config_dirs)
                 if (folder / f"{name}.yaml").is_file()), f"{name}.yaml")


def primary_config_name(config_name: Optional[str]) -> str:
    """The primary config's name as zoo train records it: ``train`` (zoo.configs' train.yaml) when none is given
    (``--config-name``), and without the ``.yaml`` suffix Hydra accepts (and drops) on a name."""
    name = "train" if config_name is None else str(config_name)
    return name[: -len(".yaml")] if name.endswith(".yaml") and len(name) > len(".yaml") else name


def primary_config_flags(config_name: Optional[str], config_dirs: Sequence[str] = ()) -> str:
    """The ``zoo train`` flags that compose from ``config_name`` again (``--config-dir DIR ... --config-name NAME ``,
    with a trailing space), for advice such as "resume with ... ckpt_path=..."; empty for train.yaml."""
    import shlex

    name = primary_config_name(config_name)
    if name == "train":
        return ""
    return "".join(f"--config-dir {shlex.quote(str(folder))} " for folder in config_dirs) + \
        f"--config-name {shlex.quote(name)} "


def _primary_config_folders(config_dirs: Sequence[str]) -> list[tuple[str, Path]]:
    """The folders Hydra looks for a primary config in, in its search-path order, each with how it was given:
    zoo.configs, then the --config-dir folders (not those of a ``hydra.searchpath=[...]`` override: see
    :func:`_unknown_primary_config`)."""
    from importlib import resources

    folders = [(CONFIG_MODULE, Path(str(resources.files(CONFIG_MODULE))))]
    folders += [(f"--config-dir {folder}", Path(path))
                for folder, path in zip(config_dirs, check_config_dirs(config_dirs))]
    return folders


def _unknown_primary_config(config_name: str, config_dirs: Sequence[str], overrides: Sequence[str]) -> str:
    """``--config-name NAME`` found nowhere: where Hydra looked and the .yaml files there (what NAME can be)."""
    import difflib

    name = primary_config_name(config_name)
    looked, found = [], []
    sub = Path(name).parent  # -cn sub/name: the files of that subfolder, named as -cn takes them
    for given, folder in _primary_config_folders(config_dirs):
        where = folder / sub
        files = (sorted((sub / p.name).as_posix() for p in where.iterdir() if p.suffix == ".yaml" and p.is_file())
                 if where.is_dir() else [])
        found += [file[: -len(".yaml")] for file in files]
        looked.append(f"{given} ({folder}): {', '.join(files) if files else 'no .yaml files'}")
    close = difflib.get_close_matches(name, found, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    folder_hint = "" if config_dirs else "; give the folder that holds it with --config-dir DIR"
    # Hydra's compose finds group options in the folders of a hydra.searchpath override, but not the primary config
    # ("Cannot find primary config", with that folder listed in its search path)
    beside = [folder for folder in searchpath_folders(overrides) if (Path(folder) / f"{name}.yaml").is_file()]
    if beside:
        folder_hint = (f"; {Path(beside[0]) / (name + '.yaml')} is in a hydra.searchpath folder, where Hydra looks for "
                       f"group options but not for the primary config: give that folder with --config-dir "
                       f"{beside[0]}")
    return (f"--config-name {config_name}: no primary config {name}.yaml on the search path; {hint}looked in "
            f"{'; '.join(looked)}{folder_hint}")


def _check_extends_train(cfg, name: str, config_dirs: Sequence[str]) -> None:
    """A primary config of the user's (``--config-name NAME``) that does not extend zoo.configs' train.yaml composes
    without the task, model and data groups (and train.yaml's top-level keys) that zoo train needs: one line saying
    how to extend it, Hydra's "extending configs" pattern (defaults: [train, _self_])."""
    from importlib import resources

    from omegaconf import OmegaConf

    missing = [group for group in _REQUIRED_GROUPS if group not in cfg]
    if not missing:
        return
    own = [key for key in OmegaConf.load(str(resources.files(CONFIG_MODULE) / "train.yaml")) if key != "defaults"]
    if all(key in cfg for key in own):  # it extends train.yaml and a group was deleted (~model): check_required's
        return
    where = _primary_config_path(name, config_dirs)
    nested = [key for key, value in cfg.items() if OmegaConf.is_dict(value) and all(g in value for g in missing)]
    if nested:  # composed under a package: a subfolder's name (sub/name -> sub:) or a "# @package foo" line
        raise ValueError(f"--config-name {name} ({where}) is composed under the package {nested[0]!r}, so its "
                         f"{', '.join(missing)} sit under {nested[0]}: instead of at the top: make its first line "
                         f"# @package _global_ (Hydra puts a primary config in a subfolder under that folder's name, "
                         f"and a # @package line's config under its package)"
                         + ("; in a subfolder the packaged config is /train (defaults: [/train, _self_])"
                            if "/" in name else ""))
    raise ValueError(f"--config-name {name} ({where}) composes a config without {', '.join(missing)}: zoo train's "
                     f"primary config extends the packaged train.yaml; start its defaults list with - train and "
                     f"- _self_ (defaults: [train, _self_]), then its own choices (- override /model: vit_debug) "
                     f"and keys")


@contextlib.contextmanager
def hydra_session(config_dirs: Sequence[str] = ()):
    """Hydra's global state for composing zoo.configs (:func:`initialize_hydra`) for the duration of the block, and
    the caller's own state back afterwards (its initialised GlobalHydra and version_base), as Hydra's ``initialize``
    context managers restore theirs: a library user composing inside an ``initialize_config_dir`` block or a
    ``@hydra.main`` app found its own ``hydra.compose`` failing after ``run.compose`` (review, 2026-12-07)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import VersionBase

    own_hydra = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    own_base = VersionBase.instance().getbase()
    try:
        initialize_hydra(config_dirs)
        yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().clear()
        if own_hydra is not None:
            GlobalHydra.instance().initialize(own_hydra)
        VersionBase.instance().version_base = own_base  # (setbase refuses Hydra's own "unspecified" marker)


def searchpath_folders(overrides: Sequence[str]) -> list[str]:
    """The existing local folders a ``hydra.searchpath=[...]`` override adds (``file://`` entries and plain paths;
    ``pkg://`` entries are not folders), for what lists a group's options outside Hydra's loader (a sweep's glob());
    a malformed override or a missing folder is left to :func:`compose`'s check, which names it."""
    folders = []
    for item in overrides:
        if item.partition("=")[0] != "hydra.searchpath":
            continue
        try:
            entries = _searchpath_entries(item)
        except ValueError:
            continue
        folders += [path for _, path in entries if path is not None and os.path.isdir(path)]
    return folders


def check_config_dirs(config_dirs: Sequence[str]) -> list[str]:
    """The absolute paths of ``--config-dir`` folders; a missing one is named (Hydra: "Additional config directory
    '...' not found")."""
    folders = []
    for folder in config_dirs:
        path = os.path.abspath(os.path.expanduser(str(folder)))
        if not os.path.isdir(path):
            raise ValueError(f"--config-dir {folder}: {path} is not a folder (give the folder that holds your "
                             f"experiment/, model/, data/, ... configs)")
        folders.append(path)
    return folders


def initialize_hydra(config_dirs: Sequence[str] = ()) -> None:
    """Hydra's global state for composing zoo.configs (as ``initialize_config_module(CONFIG_MODULE)``), with the
    user's ``config_dirs`` in its search path where Hydra's ``--config-dir`` puts its folder (see :func:`compose`).
    Use it through :func:`hydra_session`, which gives the caller's own Hydra state back."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_automatic_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.version import setbase

    folders = check_config_dirs(config_dirs)
    GlobalHydra.instance().clear()
    setbase("1.3")
    search_path = create_automatic_config_search_path(None, f"{CONFIG_MODULE}.app", None)
    for folder in folders:
        search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)


def _expand_home(item: str) -> str:
    """``key=~/data`` with ``~`` expanded (the shell leaves a ``~`` after ``=`` alone, and Hydra's override grammar
    refuses it: "LexerNoViableAltException"); the data modules and ``zoo viz`` expand ``~`` in paths too."""
    key, sep, value = item.partition("=")
    if sep and not key.startswith("~") and (value == "~" or value.startswith("~/")):
        return f"{key}={os.path.expanduser(value)}"
    return item


def _check_override(item: str) -> None:
    """One command-line override as ``compose`` takes it: ``key=value``, ``group=option``, ``+key=value`` (add) or
    ``~key`` (delete), as Hydra's override grammar; the forms that need Hydra's app runner, which ``zoo train`` does not
    use, are refused with what to do instead (they were silently ignored or refused as "not key=value")."""
    if item in ("-m", "--multirun"):
        raise ValueError(f"{item}: run.compose composes one config; a sweep is zoo train -m ... (zoo.train.sweep)")
    if "=" not in item and not item.startswith("~"):
        raise ValueError(f"override {item!r} is not of the form key=value (or group=option, +key=value, ~key)")
    written = item.partition("=")[0]
    key = written.lstrip("+~")
    if written == "hydra.searchpath":
        _check_searchpath(item)
    elif key == "hydra" or key.startswith("hydra."):
        raise ValueError(f"override {item!r}: zoo train composes its config without Hydra's app runner, so hydra.* "
                         f"settings have no effect (except hydra.searchpath=[...], as --config-dir DIR, which add "
                         f"your config folders); the run's directory is run_dir=... (hydra.run.dir's role)")
    elif key == "sweep_dir":
        raise ValueError(f"{item}: sweep_dir= is the folder of a sweep's jobs and applies to zoo train -m only; "
                         f"run_dir=DIR names the folder of one run")


def _searchpath_entries(item: str) -> list[tuple[str, Optional[str]]]:
    """The entries of a ``hydra.searchpath=[...]`` override, each with its local folder (``file://`` or no scheme;
    None for another scheme, ``pkg://``); a malformed override or a value that is not a list of strings is a
    ValueError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        entries = OverridesParser.create().parse_override(item).value()
    except HydraException as error:
        raise ValueError(f"override {item!r} is not a Hydra override: {str(error).strip().splitlines()[0]}") from None
    if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
        raise ValueError(f"{item}: hydra.searchpath is a list of folders: hydra.searchpath=[file:///abs/dir,...] "
                         f"(or zoo train --config-dir DIR)")
    located = []
    for entry in entries:
        scheme, sep, path = entry.partition("://")
        located.append((entry, (path if sep else entry) if not sep or scheme == "file" else None))
    return located


def _check_searchpath(item: str) -> None:
    """``hydra.searchpath=[...]``: each folder given as a path (``file://`` or none) must exist; Hydra itself only
    warns ("provider=..., path=... is not available") and then reports the option as unknown."""
    for entry, path in _searchpath_entries(item):
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"{item}: {entry} is not a folder ({os.path.abspath(path)} does not exist); give the "
                             f"folder that holds your experiment/, model/, ... configs")


def _hydra_message(text: str, overrides: Sequence[str]) -> str:
    """Hydra's composition error in one line: a misspelt option ("Could not find 'experiment/vit_digit'" followed by
    the options and Hydra's config search path) becomes the override, the closest options and the full list; a
    misspelt key keeps Hydra's sentence without its "+key" hint (which would add the misspelt key)."""
    import difflib
    import re

    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    options = re.search(r"Available options in '([^']+)':\s*\n((?:\t.*\n?)+)", text)
    if missing and options:
        group, wrong = missing.group(1), missing.group(2)
        choices = [line.strip() for line in options.group(2).splitlines() if line.strip()]
        close = difflib.get_close_matches(wrong, choices, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        registered = ""
        if group == "model" and "zoo" in choices:  # a registry name given as a config option (a timm user's habit)
            try:
                import zoo

                if zoo.is_model(wrong):
                    registered = (f"{wrong} is a registered model: give model=zoo model.name={wrong} (with the "
                                  f"input size and classes of your data: model.img_size=..., model.num_classes=...); ")
            except Exception:  # noqa: BLE001 -- only a hint
                pass
        return f"unknown {group}={wrong}: {registered}{hint}({group} options: {', '.join(choices)})"
    key = re.search(r"Could not override '([^']+)'", text)
    if key and key.group(1).startswith("trainer.") and key.group(1)[len("trainer."):] in _TRAINER_GROUP_KEYS:
        return _trainer_group_key_message(key.group(1)[len("trainer."):])
    if key:
        return (f"unknown config key {key.group(1)!r} (from the overrides {list(overrides)}): check its spelling in "
                f"`zoo train ... --cfg`; +{key.group(1)}=... would add it as a new key")
    one_run = "and zoo train without -m runs one config: add -m (zoo train -m ...) to run one job per value"
    sweep = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if sweep:
        return (f"{sweep.group(1)} is a sweep (a value with commas), {one_run}; a list is key=[a,b], a string with "
                f"commas is quoted: key='a,b'")
    # Hydra's sweep functions (range, choice, interval, glob) compose only under --multirun
    sweep = re.search(r"Sweep parameters '(.+)' requires --multirun", text)
    if sweep:
        return (f"{sweep.group(1)} is a sweep (Hydra's range/choice/interval/glob), {one_run}; a list value is "
                f"key=[a,b]")
    first = text.strip().splitlines()[0] if text.strip() else text
    return f"invalid config overrides {list(overrides)}: {first}"


def _plain(cfg) -> Any:
    """The config as plain data, interpolations unresolved (``${...}`` strings) and ``???`` kept."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg


def _missing_keys(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _missing_keys(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [k for i, value in enumerate(node) for k in _missing_keys(value, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == "???" else []


def _missing_hint(plain: dict, key: str) -> str:
    """What to put in a required (``???``) key; the data rows follow the README's "what to put where" table."""
    data = plain.get("data") if isinstance(plain.get("data"), dict) else {}
    target, name = str(data.get("_target_", "")), str(data.get("name", ""))
    if key == "data.root":
        if target.endswith("ImageFolderDataModule"):
            return ("a folder holding train/<class>/*.png (or .jpg, ...); optional val/<class>/ and test/<class>/ "
                    "(else data.val_fraction of train)")
        if target.endswith("CIFARDataModule"):
            if str(data.get("variant")) == "100":
                return "the folder you extracted cifar-100-python.tar.gz into, so that <root>/cifar-100-python/train exists"
            return "the folder you extracted cifar-10-python.tar.gz into, so that <root>/cifar-10-batches-py/data_batch_1 exists"
        if name.startswith("planetoid:"):
            proper = name.split(":", 1)[1]
            return f"a folder holding {proper}/raw/ind.{proper.lower()}.{{x,tx,allx,y,ty,ally,graph,test.index}}"
        if name.startswith("ogb:"):
            folder = name.split(":", 1)[1].replace("-", "_")
            return (f"a folder in OGB's raw CSV layout: <root>/{folder}/raw/{{edge,node-feat,node-label}}.csv.gz and "
                    f"<root>/{folder}/split/<scheme>/{{train,valid,test}}.csv.gz")
        return "the folder holding the data set"
    if key == "data.num_classes":
        if target.endswith("ImageFolderDataModule"):
            return "the number of class folders under <data.root>/train"
        return "the number of classes of the data"
    if key == "model.name":
        return "a registered model name (zoo list)"
    return "a value on the command line"


def check_required(cfg) -> None:
    """Raise one line naming each missing mandatory (``???``) key and what to put there."""
    check_groups_present(cfg)
    check_no_hydra_resolver(cfg)
    _infer_folder_classes(cfg)
    plain = _plain(cfg)
    missing = _missing_keys(plain)
    if missing:
        raise ValueError("; ".join(f"{key} is required: {_missing_hint(plain, key)} (add {key}=...)" for key in missing))
    _check_model_fits_data(cfg)
    _check_graph_model_kind(cfg)
    _check_model_channels(plain)
    _check_task_fits_data(cfg)


# the config groups a run cannot do without, and the key that makes a node of each buildable (a task config may instead
# name a ``module`` whose build(cfg) builds the run: the graph tasks)
_REQUIRED_GROUPS = {"task": ("_target_", "module"), "model": ("_target_",), "data": ("_target_",)}


def _group_options(group: str) -> list[str]:
    """The options of a config group in the installed zoo.configs (what ``group=option`` can name)."""
    from importlib import resources

    folder = resources.files(CONFIG_MODULE) / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")) if folder.is_dir() else []


def check_groups_present(cfg) -> None:
    """task, model and data are each required: deleted (``~model``) the run failed reading them ("Missing key
    task", a traceback); deleted after an experiment that sets one of their keys, the node held only that key
    ("config node has no _target_: ['heads']"). One line naming the group option to give."""
    from omegaconf import OmegaConf

    for group, buildable in _REQUIRED_GROUPS.items():
        node = cfg.get(group)
        if OmegaConf.is_dict(node) and any(node.get(key) for key in buildable):
            continue
        left = (f" (the config's {group} holds only {', '.join(map(str, node))}, set by another config, and no "
                f"{buildable[0]})" if OmegaConf.is_dict(node) and len(node) else "")
        raise ValueError(f"{group} is required: give {group}=<option>{left}; {group} options: "
                         f"{', '.join(_group_options(group))}")


# zoo train composes with Hydra's compose API, which sets no HydraConfig: OmegaConf's "hydra" resolver then fails with
# "HydraConfig was not set" (lightning-hydra-template's paths.output_dir is ${hydra:runtime.output_dir})
_HYDRA_RESOLVER = re.compile(r"\$\{\s*hydra\s*:")


def check_no_hydra_resolver(cfg) -> None:
    """A ``${hydra:...}`` interpolation, named with what to use instead: zoo train runs without Hydra's app runner,
    so its config has no hydra node for the resolver to read."""
    def found(node, prefix: str = ""):
        if isinstance(node, dict):
            return next((hit for key, value in node.items() for hit in [found(value, f"{prefix}{key}.")] if hit), None)
        if isinstance(node, list):
            return next((hit for i, value in enumerate(node) for hit in [found(value, f"{prefix}{i}.")] if hit), None)
        return (prefix[:-1], node) if isinstance(node, str) and _HYDRA_RESOLVER.search(node) else None

    hit = found(_plain(cfg))
    if hit is not None:
        key, value = hit
        raise ValueError(f"{key}: {value}: zoo train composes its config without Hydra's app runner, so there is no "
                         f"hydra node for ${{hydra:...}} to read; use ${{run_dir}} for the run's folder "
                         f"(${{hydra:runtime.output_dir}}; in a zoo train -m sweep each job's run_dir is "
                         f"<sweep_dir>/<job number>) and ${{name}} for the run's name")


# The task config (configs/task/<option>.yaml) that trains on each data module, and each option's task class: a task
# paired with the other kind of data failed inside its first step ("list indices must be integers or slices, not
# str", "too many values to unpack").
_TASK_FOR_DATA = {"DigitsDataModule": "classification", "ImageFolderDataModule": "classification",
                  "CIFARDataModule": "classification", "NodeDataModule": "graph_node",
                  "GraphClassificationDataModule": "graph_classification",
                  "DictionaryLookupDataModule": "graph_dictlookup"}
_TASK_CLASS = {"classification": "ImageClassifier", "graph_node": "NodeClassificationModule",
               "graph_classification": "GraphTargetsModule", "graph_dictlookup": "GraphTargetsModule"}


def _check_task_fits_data(cfg) -> None:
    """The task config trains on the kind of data configured (an image classifier on images, node classification
    on one graph, graph-level targets on batches of graphs); else one line naming the task option to use."""
    task, data = cfg.get("task"), cfg.get("data")
    if task is None or data is None:
        return
    task_class = str(task.get("_target_", "")).rsplit(".", 1)[-1]
    data_class = str(data.get("_target_", "")).rsplit(".", 1)[-1]
    wanted = _TASK_FOR_DATA.get(data_class)
    if wanted is None or task_class not in _TASK_CLASS.values() or _TASK_CLASS[wanted] == task_class:
        return  # a task or data module of the user's own: nothing known to compare
    data_name = data.get("name") or data_class
    raise ValueError(f"task {task_class} does not train on data {data_name} ({data_class}): with this data use "
                     f"task={wanted} (or the experiment=... that pairs them)")


def _infer_folder_classes(cfg) -> None:
    """An image folder without data.num_classes: the number of class folders under data.root/train (else test/ or
    val/), as ImageFolder itself counts them, said on stderr. Without such folders, what to put where (it was
    "data.num_classes is required", a key the user could not know from a wrong or empty data.root)."""
    from omegaconf import OmegaConf

    data = cfg.get("data")
    if not OmegaConf.is_dict(data) or not str(data.get("_target_", "")).endswith("ImageFolderDataModule"):
        return
    if not OmegaConf.is_missing(data, "num_classes") or OmegaConf.is_missing(data, "root") or not data.get("root"):
        return
    from zoo.tasks.vision.data import image_folder_classes, image_folder_layout_message

    root = Path(os.path.expanduser(str(data.root)))
    folder, classes = image_folder_classes(root)  # as ImageFolder counts them
    if folder is None:
        problem = f"{root} does not exist" if not root.exists() else f"{root} has no train/, val/ or test/ folder"
        raise FileNotFoundError(image_folder_layout_message(root, problem))
    if not classes:
        raise FileNotFoundError(image_folder_layout_message(root, f"{folder} has no class folders"))
    data.num_classes = len(classes)
    print(f"zoo: data.num_classes={len(classes)} (the class folders under {folder})", file=sys.stderr)


def _check_model_fits_data(cfg) -> None:
    """A model config reads its sizes from the data config (``${data.num_features}``, ``${data.img_size}``);
    paired with data of the other domain that is omegaconf's "Interpolation key 'data.model_kind' not found".
    Say which model and data were paired, and what goes with what."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    if not OmegaConf.is_dict(cfg.get("model")) or not OmegaConf.is_dict(cfg.get("data")):
        return  # a missing group is check_groups_present's to name
    try:
        OmegaConf.to_container(cfg.model, resolve=True)
    except InterpolationKeyError as error:
        key = str(error).split("'")[1] if "'" in str(error) else "?"
        if not key.startswith("data."):
            raise
        model = str((_plain(cfg).get("model") or {}).get("name", "?")).split("_${")[0]  # gatv2_${data.model_kind}
        data = cfg.data.get("name") or str(cfg.data.get("_target_", "?")).rsplit(".", 1)[-1]
        raise ValueError(
            f"model {model} reads {key}, which data {data} does not have: graph models (model=gat|gatv2|transformer) "
            f"need graph data (data=graph_*, or experiment=graph_*), vision models image data (data=digits, "
            f"image_folder, cifar10, ...)"
        ) from None


def _graph_model_kind(name: str) -> str:
    """The batches a registered graph model reads, from its name: gatv2_node / gat_graph_debug /
    gatv2_dictlookup -> node / graph / dictlookup (the registry has no such field; the model configs pick
    ``<conv>_${data.model_kind}``, so the suffix is the contract)."""
    return name.removesuffix("_debug").rsplit("_", 1)[-1]


def _check_graph_model_kind(cfg) -> None:
    """A graph model of another kind than the data's batches (model.name=gatv2_node on DictionaryLookup) failed
    in its first forward ("Boolean value of Tensor with more than one value is ambiguous", "missing positional
    arguments"): said before anything is built, with the models that read the data's batches."""
    import zoo

    model, data = cfg.get("model"), cfg.get("data")
    if model is None or data is None or not str(model.get("_target_", "")).endswith("create_model"):
        return
    name, wanted = model.get("name"), data.get("model_kind")
    if not isinstance(name, str) or not isinstance(wanted, str) or not zoo.is_model(name):
        return
    kind = _graph_model_kind(name)
    # only the built-in naming (<conv>_<kind>): a model a user registered under another name is not judged by it
    if zoo.get_model_entry(name).task != "graph" or kind not in ("node", "graph", "dictlookup") or kind == wanted:
        return
    matching = [m for m in zoo.list_models("*", task="graph") if _graph_model_kind(m) == wanted]
    data_name = data.get("name") or str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    raise ValueError(f"model {name} reads {kind} batches but data {data_name} gives "
                     f"{wanted} batches: use model.name=<one of {', '.join(matching)}> (or "
                     f"model=gat|gatv2|transformer, which picks <conv>_{wanted})")


def _check_model_channels(plain: dict) -> None:
    """model=zoo model.name=<image model> builds the name's own input channels (3 for most) and, for ViT, image
    size: on 1-channel data (the digits) the run failed in its first step ("ViT expects 3 input channels, got 1"),
    and so did a ViT on another data.img_size. Said before anything is built, with the override to add. (A model
    loaded from a checkpoint keeps the checkpoint's channels.)
    ``plain``: the config unresolved (``_plain``): a graph model's name reads data keys image data lacks."""
    import zoo

    model, data = plain.get("model"), plain.get("data")
    if not isinstance(model, dict) or not isinstance(data, dict):
        return
    name, pretrained = model.get("name"), model.get("pretrained")
    if not str(model.get("_target_", "")).endswith("create_model") or pretrained not in (False, None):
        return
    entry = zoo.get_model_entry(name) if isinstance(name, str) and zoo.is_model(name) else None
    if entry is None or entry.task != "vision":
        return
    built = (entry.default_cfg.get("input_size") or (None,))[0]
    wanted = None if "in_chans" in model else data.get("in_chans")
    data_name = data.get("name") or str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    if isinstance(wanted, int) and built is not None and wanted != built:
        raise ValueError(f"model {name} is built for {built} input channels and data {data_name} has {wanted}: add "
                         f"+model.in_chans={wanted} (and +model.img_size={data.get('img_size')} for the data's image "
                         f"size)")
    # ViT's position embedding has the size it was built for (timm's fixed-size ViT): another data.img_size failed in
    # the first training step with the Python API's wording; MaxViT and Agent-DeiT take any size (docs/timm.md)
    built_size = tuple((entry.default_cfg.get("input_size") or (None, None, None))[1:])
    size = data.get("img_size")
    if (entry.family == "vit" and "img_size" not in model and not model.get("dynamic_img_size")
            and isinstance(size, int) and None not in built_size and built_size != (size, size)):
        raise ValueError(f"model {name} is built for {built_size[0]}x{built_size[1]} images and data {data_name} gives "
                         f"{size}x{size}: add +model.img_size={size} (the position embedding is built for that grid) "
                         f"or +model.dynamic_img_size=true (resampled at run time)")


def _to_container(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


def _call_target(node, *, where: Optional[str] = None, **extra):
    """Instantiate a config node with ``_target_`` by calling the target with plain (resolved) values.

    ``where``: the node's config key (``task``, ``data``); a key of it that the target does not take
    (``+task.optimizer=sgd``) is then named in one line with the keys it takes, as the model's unknown arguments
    are (zoo.registry), instead of Python's bare "__init__() got an unexpected keyword argument"."""
    from hydra.utils import get_object

    kwargs = _to_container(node)
    target = kwargs.pop("_target_", None)
    kwargs.pop("_convert_", None)
    kwargs.pop("_recursive_", None)
    if target is None:
        raise ValueError(f"config node has no _target_: {sorted(kwargs)}")
    factory = get_object(target)
    try:
        return factory(**kwargs, **extra)
    except TypeError as error:
        unknown = _unknown_config_key(error, factory, kwargs, where, exclude=extra)
        if unknown is None:
            raise
        raise TypeError(unknown) from None


def _accepted_keywords(factory) -> list[str]:
    """The keyword arguments ``factory`` (a class or a function) takes, following ``**kwargs`` up the base classes'
    ``__init__`` (DigitsDataModule(shift, ..., **kwargs) passes the rest to VisionDataModule)."""
    import inspect

    inits = [klass.__dict__["__init__"] for klass in factory.__mro__ if "__init__" in klass.__dict__] \
        if inspect.isclass(factory) else [factory]
    names: set[str] = set()
    for init in inits:
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # a builtin's __init__ (object): nothing more to learn
            break
        names.update(p.name for p in parameters if p.name != "self"
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return sorted(names)


def _unknown_config_key(error: TypeError, factory, kwargs: dict, where: Optional[str], exclude=()) -> Optional[str]:
    """The one-line message for a config key the target refused ("got an unexpected keyword argument 'x'"): the
    key, the closest accepted one and all of them; None when the error is about something else."""
    import difflib
    import re

    match = re.search(r"got an unexpected keyword argument '(\w+)'", str(error))
    if where is None or match is None or match.group(1) not in kwargs:
        return None
    key = match.group(1)
    accepted = [name for name in _accepted_keywords(factory) if name not in exclude]
    if key in accepted:  # refused further down (another call inside the constructor): not a config key problem
        return None
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" (did you mean {where}.{close[0]}?)" if close else ""
    return (f"unknown key {where}.{key}{hint}; {getattr(factory, '__name__', factory)} ({where}) accepts: "
            f"{', '.join(accepted)}")


def _resolve_run_dir(cfg) -> Path:
    run_dir = cfg.get("run_dir") or os.environ.get(RUN_DIR_ENV)
    if not run_dir and cfg.get("ckpt_path"):
        ckpt = Path(cfg.ckpt_path)
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    if not run_dir:
        stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path("outputs") / str(cfg.get("name") or "run") / stamp
    run_dir = Path(run_dir).expanduser().absolute()
    for path in (run_dir, *run_dir.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"run_dir={run_dir}: {path} is an existing file, not a directory (give a directory)")
    cfg.run_dir = str(run_dir)
    return run_dir


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------
def build(cfg, model: Optional[torch.nn.Module] = None):
    """(LightningModule, DataModule) for ``cfg``; ``model`` replaces ``cfg.model`` when given."""
    try:
        module, datamodule = _build(cfg, model)
    except (ValueError, TypeError) as error:
        named = _named_by_group(cfg, str(error))
        if named is None:
            raise
        raise type(error)(named) from error
    _set_adaptive_clipping(module, cfg)
    return module, datamodule


def _adaptive_clip_factor(trainer_cfg) -> Optional[float]:
    """trainer.gradient_clip_val when trainer.gradient_clip_algorithm is agc (any case: Lightning lowercases norm and
    value), else None."""
    algorithm = trainer_cfg.get("gradient_clip_algorithm") if trainer_cfg is not None else None
    if not isinstance(algorithm, str) or algorithm.lower() != "agc":
        return None
    return trainer_cfg.get("gradient_clip_val")


def _set_adaptive_clipping(module, cfg) -> None:
    """trainer.gradient_clip_algorithm=agc (timm's --clip-mode agc): the module clips adaptively with
    trainer.gradient_clip_val as the clip factor (ZooModule.configure_gradient_clipping); _trainer keeps both out of
    Lightning's Trainer, which knows only norm and value."""
    factor = _adaptive_clip_factor(cfg.get("trainer"))
    if factor is None:
        return
    from zoo.train.module import ZooModule

    if not isinstance(module, ZooModule):
        raise ValueError(f"trainer.gradient_clip_algorithm=agc is applied by the zoo's task modules, and "
                         f"{type(module).__name__} is not one: use gradient_clip_algorithm=norm or value")
    module.adaptive_clip_factor = float(factor)


def _named_by_group(cfg, message: str) -> Optional[str]:
    """``message`` with its leading option name qualified by its config group ("lr must be ..." from the task's
    constructor -> "task.lr must be ..."), when that name belongs to exactly one of the task, data and model
    groups; None otherwise (the message is then kept as it is)."""
    from omegaconf import OmegaConf

    first = message.split(" ", 1)[0]
    if not first.isidentifier():
        return None
    groups = [group for group in ("task", "data", "model")
              if OmegaConf.is_dict(cfg.get(group)) and first in cfg[group] and not first.startswith("_")]
    return f"{groups[0]}.{message}" if len(groups) == 1 else None


def _absolute_data_root(cfg) -> None:
    """data.root and data.path as absolute paths (``~`` expanded): the config is recorded with the run's checkpoints
    and released weights, and a relative path there named another file or folder for zoo eval / zoo predict /
    zoo viz run elsewhere (data.path=graphs.pt silently read another folder's graphs.pt)."""
    from omegaconf import OmegaConf

    data = cfg.get("data")
    if not OmegaConf.is_dict(data):
        return
    for key in _DATA_PATH_KEYS:
        if key in data and not OmegaConf.is_missing(data, key) and _is_local_path(data.get(key)):
            data[key] = os.path.abspath(os.path.expanduser(data.get(key)))


def _pin_stored_data_paths(cfg, info: Optional[dict]) -> list[str]:
    """A run from before data.path / data.root were stored absolute (_absolute_data_root) recorded a relative one,
    which read from here named another file (zoo eval silently scored another folder's graphs.pt) or none. Each is
    replaced by the absolute path the run's data module recorded with the weights (``info``: its describe(), the
    .ckpt's data_info or a release's metadata.data) where there is one; the others are returned as
    ``data.<key>=<stored value>`` for zoo eval and zoo predict to refuse when they read the data."""
    data = cfg.get("data") if cfg is not None else None
    if not data:
        return []
    unknown = []
    for key in _DATA_PATH_KEYS:
        stored = data.get(key)
        if not _is_local_path(stored) or os.path.isabs(os.path.expanduser(stored)):
            continue
        recorded = (info or {}).get(key)
        if _is_local_path(recorded) and os.path.isabs(recorded):
            data[key] = recorded
        else:
            unknown.append(f"data.{key}={stored}")
    return unknown


def _relative_data_path_problem(ckpt, stored: str, command: str) -> str:
    """The first half of the refusal of an unknown relative data path (_pin_stored_data_paths); the caller adds what
    to do."""
    return (f"{ckpt}: the run's config stores {stored}, relative to the folder the run was trained in (a run from "
            f"before data paths were stored absolute), which {command} does not know")


def _build(cfg, model: Optional[torch.nn.Module] = None):
    from omegaconf import OmegaConf

    from zoo.hub import refuse_url

    check_required(cfg)
    _absolute_data_root(cfg)
    if model is None and OmegaConf.is_dict(cfg.get("model")):  # named as zoo train's option, not create_model's
        refuse_url(cfg.model.get("pretrained"), "model.pretrained", "the checkpoint", model=True)
    task = cfg.task
    if "_target_" not in task and task.get("module"):
        built = importlib.import_module(str(task.module)).build(cfg)
        return built[0], built[1]
    datamodule = _call_target(cfg.data, where="data")
    if model is None:
        model = _call_target(cfg.model)
    if hasattr(datamodule, "adopt_model_stats"):  # data.mean=model: normalise as the (pretrained) model expects
        datamodule.adopt_model_stats(model)
    _note_token_count(model, cfg)
    module = _call_target(task, where="task", model=model)
    if hasattr(module, "hparams"):
        module.hparams["zoo_config"] = _to_container(cfg)
        if hasattr(datamodule, "describe"):
            module.hparams["data_info"] = datamodule.describe()
    return module, datamodule


def _trainer(cfg, *, callbacks: Optional[list] = None, loggers: Optional[list] = None, **extra):
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from zoo.train.checkpoint import AtomicCheckpointIO

    from omegaconf import OmegaConf

    _check_trainer_group_keys(cfg.trainer)
    kwargs = {}
    for key, value in cfg.trainer.items():
        if key in ("_target_", "_convert_") or value is None:
            continue
        if OmegaConf.is_dict(value) and "_target_" in value:
            kwargs[key] = instantiate(value)
        else:
            kwargs[key] = _to_container(value) if OmegaConf.is_config(value) else value
    kwargs.update(extra)
    _check_trainer_options(kwargs)
    if _adaptive_clip_factor(kwargs) is not None:  # applied by the module (_set_adaptive_clipping), not Lightning
        kwargs.pop("gradient_clip_algorithm")
        kwargs.pop("gradient_clip_val")
    kwargs.setdefault("plugins", [AtomicCheckpointIO()])
    if callbacks is not None:
        kwargs["callbacks"] = callbacks
    if kwargs.get("enable_progress_bar") is False and kwargs.get("callbacks"):
        # +trainer.enable_progress_bar=false with callbacks=default (whose RichProgressBar Lightning then refuses:
        # "configured with enable_progress_bar=False but found RichProgressBar"): the bar is left out
        kwargs["callbacks"] = [c for c in kwargs["callbacks"] if not isinstance(c, pl.callbacks.ProgressBar)]
    if loggers is not None:
        kwargs["logger"] = loggers if loggers else False
    if not any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in kwargs.get("callbacks", []) or []):
        kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(**kwargs)


# integer trainer.* options and their smallest value (-1: no limit); Lightning would accept some wrong values
# and fail later (max_epochs="abc": a bare AssertionError once training starts; check_val_every_n_epoch=0: a
# ZeroDivisionError)
_TRAINER_INTS = {"max_epochs": -1, "min_epochs": 0, "max_steps": -1, "min_steps": 0, "check_val_every_n_epoch": 1,
                 "log_every_n_steps": 0, "accumulate_grad_batches": 1, "num_sanity_val_steps": -1}


# Trainer arguments that zoo train builds from its config groups (configs/logger, configs/callbacks) or sets itself,
# and the override that does the job: given as +trainer.<key>=..., they were silently replaced (logger), dropped
# the atomic checkpoint writes (plugins) or failed inside Lightning (enable_checkpointing=false with the
# checkpoint callbacks: MisconfigurationException).
_TRAINER_GROUP_KEYS = {
    "logger": "the loggers are the logger group: logger=none (no logger), logger=csv or logger=tensorboard (one of "
              "them), ~logger.<name> drops one",
    "callbacks": "the callbacks are the callbacks group: callbacks=minimal (the checkpoint callbacks "
                 "only), ~callbacks.<name> drops one (last_checkpoint, best_checkpoint, progress_bar); "
                 "+trainer.enable_progress_bar=false hides the bar",
    "plugins": "zoo train sets the plugins itself (zoo.train.checkpoint.AtomicCheckpointIO: checkpoints written "
               "atomically), and a list here would drop it; precision is trainer.precision=..., the cluster "
               "environment trainer.strategy=...",
    "enable_checkpointing": "checkpoints are the callbacks group's last_checkpoint and best_checkpoint: "
                            "~callbacks.last_checkpoint ~callbacks.best_checkpoint writes none (zoo train then turns "
                            "Lightning's checkpointing off), callbacks=minimal keeps only them",
}


def _trainer_group_key_message(key: str) -> str:
    return f"trainer.{key} is not a zoo train setting: {_TRAINER_GROUP_KEYS[key]}"


def _check_trainer_group_keys(trainer_cfg) -> None:
    """trainer.logger / callbacks / plugins / enable_checkpointing refused in one line, with the group override that
    does the job (see _TRAINER_GROUP_KEYS)."""
    for key in _TRAINER_GROUP_KEYS:
        if key in trainer_cfg:
            raise ValueError(_trainer_group_key_message(key))


def _check_trainer_options(kwargs: dict) -> None:
    """The trainer.* values Lightning would accept and only fail on later (or with a traceback), named."""
    for key, minimum in _TRAINER_INTS.items():
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            limit = f">= {minimum}" if minimum >= 0 else ">= 0 (or -1: no limit)"
            raise ValueError(f"trainer.{key} must be an integer {limit}, got {value!r}")
    clip = kwargs.get("gradient_clip_val")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf):
        # Lightning skips clipping at <= 0: a negative value switched it off without a word
        raise ValueError(f"trainer.gradient_clip_val must be a number >= 0 (0 or null: no clipping), got {clip!r}")
    algorithm = kwargs.get("gradient_clip_algorithm")
    if isinstance(algorithm, str) and algorithm.lower() == "agc" and not clip:
        # timm's train.py and Lightning clip nothing without a value; an agc asked for and silently off is refused
        raise ValueError(f"trainer.gradient_clip_algorithm=agc (adaptive gradient clipping, timm's --clip-mode agc) "
                         f"needs its clip factor as trainer.gradient_clip_val (e.g. 0.01, timm's NFNet recipes; "
                         f"timm's --clip-grad), got {clip!r}")
    if algorithm is not None and not (isinstance(algorithm, str) and algorithm.lower() in ("norm", "value", "agc")):
        raise ValueError(f"trainer.gradient_clip_algorithm must be norm, value (Lightning's) or agc (adaptive gradient "
                         f"clipping, timm's --clip-mode agc), got {algorithm!r}")
    accelerator = kwargs.get("accelerator")
    if isinstance(accelerator, str) and accelerator.lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} needs a CUDA GPU and none is available here "
                         "(use trainer=cpu or trainer.accelerator=cpu)")
    precision = str(kwargs.get("precision"))
    on_cpu = (accelerator if isinstance(accelerator, str) else "auto").lower() == "cpu" or (
        (accelerator is None or str(accelerator).lower() == "auto") and not torch.cuda.is_available())
    if on_cpu and precision in ("16-mixed", "16"):
        # Lightning runs bf16 instead with a warning, while config.yaml and the checkpoint keep saying 16-mixed
        raise ValueError(f"trainer.precision={precision}: fp16 autocast does not run on CPU; use "
                         "trainer.precision=bf16-mixed (what Lightning would silently use instead)")
    devices = kwargs.get("devices")
    if on_cpu and isinstance(devices, int) and not isinstance(devices, bool) and devices > usable_cpus() \
            and os.environ.get("LOCAL_RANK", "0") == "0":
        # legal (a DDP test on a small machine) but every process shares the cores: say so once
        print(f"zoo train: note: trainer.devices={devices} starts {devices} CPU processes on {usable_cpus()} usable "
              f"core(s); they share them (slower than one process)", file=sys.stderr)


def _keep_previous_metrics(loggers) -> None:
    """A CSV logger writing into a folder that already holds metrics.csv (a resumed run, a second fit into the same
    run_dir) would overwrite it: the earlier fit's rows go to metrics.1.csv (then .2, ...) first."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        current = Path(logger.log_dir) / "metrics.csv"
        if current.is_file():
            n = 1
            while current.with_name(f"metrics.{n}.csv").exists():
                n += 1
            current.replace(current.with_name(f"metrics.{n}.csv"))


def _tidy_for_resume(run_dir: Path) -> None:
    """Before a resumed run: delete the temporary files of checkpoint and release writes that a kill interrupted
    (``checkpoints/.<name>.<random>.tmp``, zoo.train.checkpoint's atomic writes; ``released/.<name>.<random>.tmp``
    and ``.released.<random>.tmp/``, zoo.hub.save_pretrained's; one process writes a run_dir, and a new run is
    refused there, so none is in progress), and silence Lightning's warnings that the run's folders are
    not empty and its 'previous log files will be deleted': resuming writes there by design, and the earlier
    metrics.csv was kept as metrics.<n>.csv."""
    for stale in (run_dir / "checkpoints").glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    # zoo.hub.save_pretrained's staged files in released/ (.model.safetensors.<random>.tmp, ...) and the staging
    # folder of a first release (.released.<random>.tmp beside it)
    for stale in (run_dir / "released").glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    for stale in run_dir.glob(".released.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    for message in (r"Checkpoint directory .* exists and is not empty",
                    r"Experiment logs directory .* exists and is not empty"):
        warnings.filterwarnings("ignore", message=message)


def _instantiate_group(node) -> list:
    """The objects of a callbacks / logger group. An entry without ``_target_`` (``+callbacks.early_stopping.monitor=
    val/loss`` alone, or a misspelt entry name) was skipped without a word, so the run trained without the callback
    the user had asked for: refused, naming the entry and what to add."""
    if node is None:
        return []
    group = node._key() if hasattr(node, "_key") else "callbacks"  # an OmegaConf node knows its key: callbacks | logger
    objects = []
    for name, item in node.items():
        if item is None:  # an entry switched off (callbacks.progress=null)
            continue
        if not hasattr(item, "keys") or "_target_" not in item:
            example = "loggers.CSVLogger" if group == "logger" else "callbacks.EarlyStopping"
            raise ValueError(f"{group}.{name} has no _target_, so nothing would be built from it: give the class too, "
                             f"e.g. +{group}.{name}._target_=lightning.pytorch.{example} "
                             f"(or {group}.{name}=null to switch an entry off)")
        objects.append(_call_target(item))
    return objects


def _float_metrics(metrics: dict) -> dict[str, float]:
    return {str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1}


# --------------------------------------------------------------------------------------------------
# train / evaluate / predict
# --------------------------------------------------------------------------------------------------
def train(cfg, *, resume_advice: bool = True, config_name: str = "train",
          config_dirs: Sequence[str] = ()) -> dict[str, Any]:
    """Fit, test and export as configured; returns {"run_dir", "metrics", "last_ckpt", "released", "seconds", ...}.
    ``resume_advice``: on Ctrl-C, say how to resume the run (``ckpt_path=``); a job of ``zoo train -m`` gives the
    sweep's own advice instead (zoo.train.sweep: rerun with the same sweep_dir; -m refuses ckpt_path=).
    ``config_name`` / ``config_dirs``: the primary config ``cfg`` was composed from (``zoo train --config-name``),
    recorded in the checkpoints (hyper-parameters ``zoo_config_name``, ``zoo_config_dirs``; none for train.yaml) so
    that a resume composed from another primary config -- train.yaml, the --config-name forgotten -- is refused
    instead of continuing the run with other values (the same name from other folders: a note,
    :func:`_check_resumed_primary_config`)."""
    check_no_hydra_resolver(cfg)  # before run_dir, which may be the one that reads it
    _resolve_ckpt_shortcut(cfg)
    run_dir = _resolve_run_dir(cfg)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP workers are re-launched with the same argv: same run_dir
    try:
        return _train(cfg, run_dir, resume_advice, primary_config_name(config_name), tuple(config_dirs))
    finally:
        _release_run_dir(run_dir)
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


# a zoo train run going on in a run_dir holds an OS lock (flock) on this file, which names it ("process <pid> on
# <host>"); the lock goes with the process, however it ends, and the (emptied) file stays
_RUN_LOCK = ".zoo_train.lock"
_HELD_RUN_LOCKS: dict[str, int] = {}  # run_dir -> the locked file descriptor of this process


def _claim_run_dir(run_dir: Path) -> None:
    """Two zoo train runs started together into one run_dir (the same run_dir=, or the default one, named to the
    second) both wrote it: one failed inside Lightning's CSV logger ("dict contains fields not in fieldnames") and
    the other finished with the first one's truncated csv/metrics.csv (audit 2026-12-07). The first takes an
    exclusive flock on ``run_dir/.zoo_train.lock``; a second one, while the first runs, is refused in one line. The
    kernel releases the lock when its process ends, killed or not, so a resume after a crash, an OOM kill or a
    requeue on another host finds it free (a pid-file scheme refused those, review 2026-12-07). Without fcntl
    (Windows) nothing is claimed."""
    try:
        import fcntl
    except ImportError:
        return
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / _RUN_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = lock.read_text(errors="replace").strip() if lock.is_file() else ""
        os.close(fd)
        raise ValueError(f"run_dir={run_dir} is in use by another zoo train ({holder or 'a process'}, which holds "
                         f"{lock}): wait for it to end, or give another run_dir= (the default one is named to the "
                         f"second, so runs started together need their own)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    _HELD_RUN_LOCKS[str(run_dir)] = fd


def _release_run_dir(run_dir: Path) -> None:
    """Give up this process's claim of ``run_dir`` (the file is emptied and left: removing it could let a process
    that opened it meanwhile lock a file nobody else sees)."""
    fd = _HELD_RUN_LOCKS.pop(str(run_dir), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    finally:
        os.close(fd)  # releases the flock


# Lightning's ckpt_path shortcuts (Trainer.fit(ckpt_path="last" | "best")) and the file of a zoo train run that
# each names: configs/callbacks/minimal.yaml writes ${run_dir}/checkpoints/{last,best}.ckpt
_CKPT_SHORTCUTS = ("last", "best")


def _resolve_ckpt_shortcut(cfg) -> None:
    """``ckpt_path=last`` / ``ckpt_path=best``, Lightning's names for the checkpoint callbacks' last and best files,
    as that file of the run in ``run_dir`` (else ZOO_RUN_DIR, set for DDP workers). zoo train reads the checkpoint
    itself before fitting (its checks, and run_dir from its path), so the names were taken as files ("ckpt_path=last
    does not exist"). A missing file is then named by _resume_checkpoint."""
    shortcut = cfg.get("ckpt_path")
    if not isinstance(shortcut, str) or shortcut not in _CKPT_SHORTCUTS:
        return
    run_dir = cfg.get("run_dir") or os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        raise ValueError(f"ckpt_path={shortcut} resumes from {shortcut}.ckpt of the run in run_dir: add "
                         f"run_dir=<the run's directory> (or give ckpt_path=<run_dir>/checkpoints/{shortcut}.ckpt)")
    cfg.ckpt_path = str(_last_checkpoint(Path(str(run_dir)).expanduser().absolute()).with_name(f"{shortcut}.ckpt"))


def _last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint that resumes it (configs/callbacks/*.yaml: ${run_dir}/checkpoints/last)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resume_hint(run_dir: Path, flags: str = "") -> str:
    """How to resume the run in ``run_dir`` after a stop (Ctrl-C, SIGTERM): the ``ckpt_path=`` of its last
    checkpoint, after ``flags`` (the primary config's, :func:`primary_config_flags`), or that none was written."""
    last = _last_checkpoint(run_dir)
    if last.is_file():
        return f"resume from its last checkpoint with {flags}ckpt_path={last}"
    return "no checkpoint had been written yet"


def _interrupt_note(run_dir: Path, epoch: int, flags: str = "") -> str:
    return f"zoo train: interrupted in epoch {epoch} of the run in {run_dir}; {resume_hint(run_dir, flags)}"


def _interrupt_callback(run_dir: Path, resume_advice: bool = True, flags: str = ""):
    """A Lightning callback that, on Ctrl-C (Lightning shuts down gracefully and exits 1 with only its own line),
    says where the run is and how to resume it (built here: lightning is imported only when training); without
    ``resume_advice`` (a sweep's job) it says nothing: the sweep says how to continue."""
    import lightning.pytorch as pl

    class InterruptNote(pl.Callback):
        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            if resume_advice and isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
                print(_interrupt_note(Path(run_dir), int(trainer.current_epoch), flags), file=sys.stderr, flush=True)

    return InterruptNote()


def _validation_step_callback():
    """A Lightning callback whose ``step`` is the global step of the last validation of the fit (None before one)."""
    import lightning.pytorch as pl

    class ValidationStep(pl.Callback):
        step: Optional[int] = None

        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and trainer.state.fn == "fit":
                self.step = int(trainer.global_step)

    return ValidationStep()


def _training_clock_callback():
    """A Lightning callback that keeps the run's training time across resumes: ``seconds()`` is the time of this
    fit so far plus the time recorded in the checkpoint it resumed from (saved with every checkpoint, under
    ``state_key``). metrics.json, the released card's ``train_seconds`` and a sweep's table used to record the
    last call's time alone (a 2 + 2 epoch resumed run read as its last 2 epochs). The time a killed call spent
    after its last checkpoint is not counted: the resume trains that part again."""
    import lightning.pytorch as pl

    class TrainingClock(pl.Callback):
        def __init__(self) -> None:
            self.before = 0.0  # seconds trained by the calls before this one
            self.restored = False  # whether the resumed checkpoint had the record (not one written before it was kept)
            self.started: Optional[float] = None

        @property
        def state_key(self) -> str:
            return "zoo_training_clock"

        def on_fit_start(self, trainer, pl_module) -> None:
            self.started = time.perf_counter()

        def seconds(self) -> float:
            return self.before + (0.0 if self.started is None else time.perf_counter() - self.started)

        def state_dict(self) -> dict[str, float]:
            return {"seconds": self.seconds()}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.before = float(state_dict.get("seconds", 0.0))
            self.restored = "seconds" in state_dict

    return TrainingClock()


def _check_launcher(trainer, cfg) -> None:
    """Multi-process training runs with Lightning's script launcher (strategy=ddp: trainer=ddp_cpu / trainer=ddp), whose
    process 0 is this one and trains as a rank. The multiprocessing launchers (ddp_spawn, ddp_fork, ddp_notebook;
    Lightning picks ddp_fork itself for devices > 1 in a notebook) train in child processes: this process keeps
    global_step 0 after fit, and zoo train then reported "no training step ran", wrote no released/ and started
    the CSV log afresh (ddp_fork, audit 2026-12-07), or failed pickling its callbacks (ddp_spawn). Refused before
    the run's files are touched."""
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _MultiProcessingLauncher):
        chosen = cfg.trainer.get("strategy") or "auto"
        raise ValueError(f"trainer.strategy={chosen} trains in {_processes(int(trainer.world_size))} started by "
                         f"multiprocessing ({launcher._start_method}), which zoo train does not support (it reads "
                         f"the run's progress in this process); use trainer=ddp_cpu (CPU) or trainer=ddp (GPUs), "
                         f"whose strategy=ddp launches the processes as scripts, from a shell; in a notebook, train "
                         f"on one device (trainer.devices=1)")


def _processes(count: int) -> str:
    return f"{count} process{'es' if count != 1 else ''}"


def _check_resumed_processes(order: Optional[dict], world_size: int, global_zero: bool = True) -> None:
    """A resume with another number of processes (trainer.devices x trainer.num_nodes): the checkpoint's position in
    an epoch counts the samples each process trained, in its share of the epoch's order, and the shares change with
    the process count (2 -> 1 trained 320 samples twice, 1 -> 2 never trained 205, audit 2026-12-07): refused in
    the middle of an epoch. At an epoch's end it is exact; an epoch then has another number of steps, so the
    learning-rate schedule is recomputed, and a note says so. Checkpoints from before the count was stored are
    not checked."""
    if not isinstance(order, dict) or order.get("world_size") is None:
        return
    before = int(order["world_size"])
    if before == world_size:
        return
    processes = _processes(world_size)
    if int(order.get("batches_done") or 0):
        # (a checkpoint written when validation ends, best.ckpt among them, counts as inside its epoch: Lightning
        # has not closed the epoch then; last.ckpt is written when a training epoch ends)
        raise ValueError(f"cannot resume in the middle of epoch {int(order['epoch'])} (after "
                         f"{int(order['batches_done'])} of its batches) with {processes}: the checkpoint's run trained "
                         f"it with {before}, each counting the samples of its own share of the epoch; resume with "
                         f"{before} (trainer.devices x trainer.num_nodes), or from a checkpoint written at an epoch's "
                         f"end (the run's checkpoints/last.ckpt when it stopped between epochs; a checkpoint written "
                         f"when validation ended, best.ckpt among them, counts as inside its epoch)")
    if global_zero:  # (every process of a DDP run gets here)
        print(f"zoo train: resuming with {processes} (the run used {before}): an epoch has another number of "
              f"steps, so the learning-rate schedule is recomputed for this run and from the restored step follows "
              f"the new one", file=sys.stderr)


def _validates(cfg) -> bool:
    """Whether the run has validation batches (``trainer.limit_val_batches`` not 0)."""
    limit = cfg.trainer.get("limit_val_batches", 1.0)
    return limit is None or float(limit) > 0


# what a run leaves in its run_dir that says the folder holds one: the checkpoint that resumes it, and, when its
# checkpoints/ was deleted to save disk (the release and metrics kept), its release's card and its metrics.json. A
# folder with only csv/, an empty checkpoints/ or a lone config.yaml (a run killed before its first checkpoint)
# holds nothing to lose.
def _run_record(run_dir: Path) -> Optional[Path]:
    """The file that shows ``run_dir`` holds a run (see above); None when it holds none."""
    for record in (_last_checkpoint(run_dir), run_dir / "released" / "config.json", run_dir / "metrics.json"):
        if record.is_file():
            return record
    return None


def _is_own_checkpoint(ckpt, run_dir: Path) -> bool:
    """Whether ``ckpt`` is a checkpoint of the run in ``run_dir``: its absolute path lies inside run_dir (as given,
    ``..`` folded), or it is that run's last.ckpt / best.ckpt (the same file), or it lies in run_dir's checkpoints/
    wherever that resolves to (a checkpoints/ symlinked to another disk; resolved, the path left run_dir and the
    run's own checkpoint was taken for another run's), or resolved it lies inside run_dir resolved (a run_dir
    named through a symlink)."""
    path, run_dir = Path(os.path.abspath(Path(str(ckpt)).expanduser())), Path(os.path.abspath(run_dir))
    if path.is_relative_to(run_dir):
        return True
    own = run_dir / "checkpoints"
    for name in _CKPT_SHORTCUTS:
        try:
            if os.path.samefile(path, own / f"{name}.ckpt"):
                return True
        except OSError:  # one of them does not exist
            pass
    return path.resolve().parent == own.resolve() or path.resolve().is_relative_to(run_dir.resolve())


def _check_not_a_finished_run(run_dir: Path, cfg) -> None:
    """A new run into a run_dir that holds one would overwrite its checkpoints, config.yaml and released/ (Lightning
    only warns): refused, unless the run resumes from a checkpoint of that run_dir (_is_own_checkpoint). A
    checkpoint of another run continues into a new or empty run_dir (a fine-tune, or a run continued elsewhere);
    into one holding a run it overwrote that run with no message (audit 2026-12-06: a graph run resumed into a
    vit_digits run's folder), as did any run into a finished run's folder whose checkpoints/ had been deleted
    (_run_record). DDP workers (rank > 0) skip the check: rank 0 has made it, and by the time they start, their own
    run may have written checkpoints."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    record = _run_record(run_dir)
    if record is None:
        return
    last = _last_checkpoint(run_dir)
    ckpt = cfg.get("ckpt_path")
    resume = (f"resume it with ckpt_path={last}, or give another run_dir" if last.is_file()
              else "its checkpoints/ holds no last.ckpt to resume it: give another run_dir")
    if not ckpt:
        raise ValueError(f"run_dir={run_dir} already holds a run ({record}): {resume} (delete that folder to start it "
                         f"over)")
    if not _is_own_checkpoint(ckpt, run_dir):
        to_resume = f", or ckpt_path={last} to resume the run in run_dir" if last.is_file() else ""
        raise ValueError(f"run_dir={run_dir} already holds a run ({record}), and ckpt_path={ckpt} is a checkpoint of "
                         f"another run: continuing it there would overwrite that run; give another run_dir to "
                         f"continue it in{to_resume}")


def _check_resumed_primary_config(resume: tuple[Path, dict], config_name: str, config_dirs: Sequence[str]) -> None:
    """A run composed from the user's primary config (``--config-name``) is resumed with the same name: resumed with
    another (train.yaml, the flag forgotten), the run would continue with that config's values. The same name from
    other ``--config-dir`` folders (another file, perhaps other values) is accepted with a note naming both."""
    path, ckpt = resume
    hp = ckpt.get("hyper_parameters") or {}
    stored = primary_config_name(hp.get("zoo_config_name"))
    stored_dirs = [str(folder) for folder in hp.get("zoo_config_dirs") or ()]
    if stored == config_name:
        given = check_config_dirs(config_dirs) if config_name != "train" else []
        if config_name != "train" and given != stored_dirs:  # the same name from other folders: another file
            print(f"zoo train: note: resuming {path}, whose run composed --config-name {config_name} from "
                  f"--config-dir {' '.join(stored_dirs) or '(none)'}, with --config-dir {' '.join(given) or '(none)'}: "
                  f"the run continues with the values of the {config_name}.yaml found now (its config.yaml and the "
                  f"checkpoints record them)", file=sys.stderr, flush=True)
        return
    described = {stored: f"--config-name {stored}" if stored != "train" else "train.yaml (no --config-name)",
                 config_name: f"--config-name {config_name}" if config_name != "train" else
                 "train.yaml (no --config-name)"}
    raise ValueError(f"cannot resume from {path}: its run was composed from the primary config "
                     f"{described[stored]}, this one from {described[config_name]}; resume with the run's own: zoo "
                     f"train {primary_config_flags(stored, stored_dirs)}ckpt_path={path} ...")


def _train(cfg, run_dir: Path, resume_advice: bool = True, config_name: str = "train",
           config_dirs: Sequence[str] = ()) -> dict[str, Any]:
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    seed, threads = cfg.get("seed"), cfg.get("num_threads")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"num_threads must be an integer >= 1 (or null or 0: torch's default), got {threads!r}")
    for key in _WEIGHTS_KEYS:
        _weights_choice(cfg, key)
    resume = _resume_checkpoint(cfg.get("ckpt_path"))
    if resume is not None:
        _check_resumed_primary_config(resume, config_name, config_dirs)
        _continue_an_older_run(cfg, (resume[1].get("hyper_parameters") or {}).get("zoo_config"))
    _check_not_a_finished_run(run_dir, cfg)
    if threads:
        torch.set_num_threads(threads)
    pl.seed_everything(seed, workers=True, verbose=False)
    module, datamodule = build(cfg)
    if config_name != "train" and hasattr(module, "hparams"):  # (see train): stored in every checkpoint
        module.hparams["zoo_config_name"] = config_name
        module.hparams["zoo_config_dirs"] = check_config_dirs(config_dirs)
    resumed_at_step, resumed_order = None, None
    if resume is not None:
        _check_resume_fits(resume, module, cfg)
        _check_resumed_order_fits(resume[1], datamodule, cfg)
        resumed_at_step = resume[1].get("global_step")
        resumed_order = (resume[1].get(type(datamodule).__qualname__) or {}).get("training_order")
        del resume  # Lightning reads the file again in fit(): do not hold two copies
    validated, clock = _validation_step_callback(), _training_clock_callback()
    callbacks = _instantiate_group(cfg.get("callbacks")) + [
        _interrupt_callback(run_dir, resume_advice, primary_config_flags(config_name, config_dirs)), validated, clock]
    _check_best_checkpoint_can_exist(cfg, callbacks)
    trainer = _trainer(cfg, callbacks=callbacks, loggers=_instantiate_group(cfg.get("logger")))
    _check_launcher(trainer, cfg)
    if callable(getattr(datamodule, "check_processes", None)):  # e.g. full-batch node data: one process only
        datamodule.check_processes(int(trainer.world_size))
    _check_resumed_processes(resumed_order, int(trainer.world_size), bool(trainer.is_global_zero))
    if trainer.is_global_zero:
        _claim_run_dir(run_dir)  # before any of the run's files is touched
        _keep_previous_metrics(trainer.loggers)
        if cfg.get("ckpt_path"):
            _tidy_for_resume(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomically(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") or None)
    except Exception as error:  # the two monitor errors below get one line; every other error is raised as it was
        message = _early_stopping_monitor_error(error, cfg, trainer) or _checkpoint_monitor_error(error, cfg, trainer)
        if message is None:
            raise
        raise ValueError(message) from error
    seconds = clock.seconds()  # with the time of the calls this run resumed from
    metrics = _float_metrics(trainer.callback_metrics)
    finished = resumed_at_step is not None and int(trainer.global_step) == int(resumed_at_step)
    stale = _stale_outputs(trainer, cfg, run_dir) if finished else set()
    # outputs rewritten by a resume that trained nothing: the training time and train/* recorded at this step (this
    # call has none of its own)
    stored_seconds, stored_train = _stored_train_record(run_dir, int(trainer.global_step)) if stale else (None, {})
    metrics.update({key: value for key, value in stored_train.items() if key not in metrics})
    if (_validates(cfg) and trainer.global_step > 0
            and (bool(stale) if finished else validated.step != int(trainer.global_step))):
        # the last epochs trained without validation (trainer.check_val_every_n_epoch not dividing max_epochs, or
        # max_steps ending between validations): the val/* of metrics.json and released/ would be those of
        # earlier weights; validated once more, they are the final weights'. A resume that trained no step but
        # writes outputs a kill left stale validates too: it has no val/* of its own (audit 2026-12-06: the
        # rewritten card and metrics.json had none)
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics.update(_float_metrics(results[0] if results else {}))
    tested, released_from, release_metrics, notes = _test_and_pick_release(trainer, module, datamodule, cfg, metrics)
    result: dict[str, Any] = {"run_dir": str(run_dir), "metrics": metrics, "seconds": seconds, "released": None,
                              "last_ckpt": None, "global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                              "world_size": int(trainer.world_size), "global_zero": bool(trainer.is_global_zero),
                              "test_weights": tested, "released_weights": None}
    last = _last_checkpoint(run_dir)
    if last.is_file():
        result["last_ckpt"] = str(last)
    if trainer.is_global_zero:
        if finished and not stale:
            # the checkpoint already stood at max_epochs / max_steps: released/ and metrics.json stay the ones of the
            # run that trained them (their card's training time would read as this call's few seconds)
            # (or trainer.max_time: Lightning's Timer counts the time trained before the resume and stops at once)
            max_time = cfg.trainer.get("max_time")
            timer = (f", trainer.max_time={max_time}, which counts the time trained before the resume too"
                     if max_time is not None else "")
            print(f"zoo train: the resumed run trained no further step: its checkpoint is at step {resumed_at_step}, "
                  f"epoch {int(trainer.current_epoch)}, already the end of this run (trainer.max_epochs="
                  f"{cfg.trainer.get('max_epochs')}, trainer.max_steps={cfg.trainer.get('max_steps', -1)}{timer}); "
                  f"raise one of them to train on; released/ and metrics.json are kept as they were", file=sys.stderr)
            for note in notes:
                print(note, file=sys.stderr)
            return result
        if finished:
            # interrupted after its last training step (during the final validation, test or the writing of its
            # outputs): the resume has nothing to train, but the run never wrote them whole; they are written now,
            # with the training time the run recorded at this step (this call trained nothing)
            if stored_seconds is not None:
                seconds = result["seconds"] = stored_seconds
            else:
                print(f"zoo train: note: neither metrics.json nor released/ records the run's training time at step "
                      f"{resumed_at_step} (they are of another step); the rewritten outputs record "
                      + (f"the training time kept in the checkpoint, {seconds:.1f} s," if clock.restored else
                         f"this call's {seconds:.1f} s (the checkpoint keeps no training time)")
                      + " and no train/* metrics", file=sys.stderr)
            print(f"zoo train: the resumed run's training was already complete (step {resumed_at_step}); writing "
                  f"the {' and '.join(sorted(stale))} it had not written, or whose writing was interrupted",
                  file=sys.stderr)
        if cfg.get("export", True) and int(trainer.global_step) == 0:
            # trainer.max_epochs=0 / limit_train_batches=0: released/ would hold untrained (or unchanged) weights
            # under a model card of this run; zoo eval scores a checkpoint without training
            print(f"zoo train: no training step ran (trainer.max_epochs={cfg.trainer.get('max_epochs')}), so "
                  f"released/ is not written", file=sys.stderr)
        elif cfg.get("export", True) and released_from is not None and finished and "released/" not in stale:
            # only metrics.json was stale: the release is whole and current, kept as it is (with its card)
            result["released"], result["released_weights"] = str(run_dir / "released"), released_from
        elif cfg.get("export", True) and released_from is not None:
            released = export_released(module, datamodule, cfg, run_dir / "released", release_metrics, seconds,
                                       released_from=released_from)
            result["released"] = str(released) if released is not None else None
            result["released_weights"] = released_from if released is not None else None
        _write_text_atomically(run_dir / "metrics.json", json.dumps(
            {k: v for k, v in result.items() if k != "metrics"} | {"metrics": metrics}, indent=2) + "\n")
        for note in notes:
            print(note, file=sys.stderr)
    return result


# Lightning's EarlyStopping (callbacks/early_stopping.py, _validate_condition_metric) with strict=True, when its
# monitor is not among the logged metrics: a plain RuntimeError, where ModelCheckpoint's same mistake is a
# MisconfigurationException
_EARLY_STOPPING_MISSING = re.compile(r"Early stopping conditioned on metric `(?P<monitor>.*)` which is not available\.")


def _early_stopping_monitor_error(error: BaseException, cfg, trainer) -> Optional[str]:
    """The one-line message for Lightning's EarlyStopping error about a monitor the run does not log (at the first
    validation, or the first epoch end where it checks), naming the config key that set it and the metrics logged;
    None for every other error. It was a 40-line traceback, where the same mistake in the checkpoint callback's
    monitor is one line (audit 2026-12-06). Recognised by its type, its message and the Lightning function that
    raises it, not as any RuntimeError."""
    if type(error) is not RuntimeError:
        return None
    match = _EARLY_STOPPING_MISSING.match(str(error))
    frames = traceback.extract_tb(error.__traceback__)
    raised_by = frames[-1] if frames else None
    if (match is None or raised_by is None or raised_by.name != "_validate_condition_metric"
            or Path(raised_by.filename).name != "early_stopping.py"):
        return None
    return _unlogged_monitor(cfg, trainer, match.group("monitor"), "EarlyStopping", "EarlyStopping's monitor",
                             "early stopping")


def _unlogged_monitor(cfg, trainer, monitor: str, target_part: str, unnamed: str, what: str) -> str:
    """One line for a callback ``monitor`` the run does not log: the config key that set it (the callbacks entry
    whose ``_target_`` contains ``target_part`` and monitors it; ``unnamed`` otherwise) and the metrics logged."""
    callbacks = cfg.get("callbacks") or {}
    key = next((f"callbacks.{name}.monitor" for name, node in callbacks.items()
                if node is not None and target_part in str(node.get("_target_", ""))
                and node.get("monitor") == monitor), unnamed)
    logged = ", ".join(sorted(str(name) for name in trainer.callback_metrics if name not in ("epoch", "step")))
    return (f"{key}={monitor!r} is not a metric this run logs, so {what} has nothing to compare (logged at step "
            f"{int(trainer.global_step)}: {logged or 'none yet'}); monitor one of them")


_CHECKPOINT_MISSING = re.compile(r"`ModelCheckpoint\(monitor='(?P<monitor>.*)'\)` could not find the monitored key")


def _checkpoint_monitor_error(error: BaseException, cfg, trainer) -> Optional[str]:
    """The same one line for a checkpoint callback's monitor the run does not log: Lightning's own message named
    neither the config key nor only the logged metrics (it listed ``epoch`` and ``step`` among them). None for every
    other error (recognised by Lightning's exception type and message)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    match = _CHECKPOINT_MISSING.match(str(error)) if isinstance(error, MisconfigurationException) else None
    if match is None:
        return None
    return _unlogged_monitor(cfg, trainer, match.group("monitor"), "Checkpoint", "the checkpoint callback's monitor",
                             "the best checkpoint")


def _check_resumed_order_fits(ckpt: dict, datamodule, cfg) -> None:
    """The data module's checks of the training order it would resume at in the middle of an epoch
    (zoo.train.order.ResumableTrainingOrder: another data set, or a larger data.batch_size), made before the run's
    config.yaml is rewritten rather than when Lightning builds the training loader. A checkpoint from before the
    samples done were stored gets them from its stored zoo_config's data.batch_size (restore_old_order)."""
    from zoo.train.order import ResumableTrainingOrder

    order = (ckpt.get(type(datamodule).__qualname__) or {}).get("training_order") or {}
    if not isinstance(datamodule, ResumableTrainingOrder) or not int(order.get("batches_done") or 0):
        return  # a new epoch: nothing of it trained yet
    stored = (ckpt.get("hyper_parameters") or {}).get("zoo_config")
    epoch, done, samples = int(order["epoch"]), int(order["batches_done"]), order.get("samples_done")
    stored_data = dict(stored["data"]) if isinstance(stored, dict) and isinstance(stored.get("data"), dict) else None
    if stored_data is not None:  # a relative data.path / data.root of an older run: the file its data module read
        _pin_stored_data_paths({"data": stored_data}, (ckpt.get("hyper_parameters") or {}).get("data_info"))
    if _older_vision_data(stored_data):  # its data.seed drew the split: what _continue_an_older_run continues with
        stored_data["split_seed"] = stored_data["seed"]
    datamodule.check_same_data(epoch, stored_data,
                               _to_container(cfg.get("data")) if cfg.get("data") is not None else None)
    if samples is None:
        samples = datamodule.restore_old_order(order, stored)
    batch_size = getattr(datamodule, "batch_size", None)
    if isinstance(batch_size, int) and samples is not None:
        datamodule.check_batch_size_fits(epoch, done, int(samples), batch_size)


def _stale_outputs(trainer, cfg, run_dir: Path) -> set[str]:
    """For a resume that trained no step: which of the run's outputs a kill left stale ("metrics.json", "released/"),
    read on every process (the validation they call for runs on all of them). The release is checked against the
    weights ``export_ckpt`` names (final, or best.ckpt), as _test_and_pick_release picks them."""
    stale = set() if _metrics_are_current(run_dir / "metrics.json", int(trainer.global_step)) else {"metrics.json"}
    choice = _weights_choice(cfg, "export_ckpt")
    releases = ({"ckpt": "final", "global_step": int(trainer.global_step)} if choice == "final"
                else _best_weights(trainer) if choice == "best" else None)
    if releases is not None and not _release_is_current(run_dir / "released", releases):
        stale.add("released/")
    return stale


def _stored_train_record(run_dir: Path, global_step: int) -> tuple[Optional[float], dict[str, float]]:
    """The training time and the train/* metrics the run recorded at ``global_step`` (the step it resumed at and
    trained no further) before a kill: from metrics.json when it records that step, else from the model card when it
    releases the final weights of that step ((None, {}) where neither does). A file of another step is not the run's
    record: a kill after the last step of an extended run leaves the previous segment's metrics.json and release,
    whose time (5.7 s for a step-84 run, that of its step-63 part: audit 2026-12-06) and train/* are that segment's.
    Without a record the rewritten outputs carry this call's time and val/* and test/* only (zoo train notes it)."""
    from zoo.hub import read_config

    records = []
    try:
        record = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        if isinstance(record, dict) and record.get("global_step") == global_step:
            records.append((record.get("seconds"), record.get("metrics")))
    except (OSError, ValueError):
        pass
    try:
        card = (read_config(run_dir / "released") or {}).get("metadata") or {}
    except Exception:  # a half-written release
        card = {}
    if card.get("weights") == {"ckpt": "final", "global_step": global_step}:
        records.append((card.get("train_seconds"), card.get("metrics")))
    for seconds, metrics in records:
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            train = {key: float(value) for key, value in (metrics if isinstance(metrics, dict) else {}).items()
                     if key.startswith("train/") and isinstance(value, (int, float)) and not isinstance(value, bool)}
            return float(seconds), train
    return None, {}


def _metrics_are_current(path: Path, global_step: int) -> bool:
    """Whether ``metrics.json`` is the one of the run as it now stands (written last, after released/: a run
    killed before it keeps the file of the run it extended, at that run's step)."""
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["global_step"]) == global_step
    except (OSError, ValueError, TypeError, KeyError):
        return False


def _release_is_current(directory: Path, released_from: dict) -> bool:
    """Whether ``released/`` holds the weights this run releases, whole: it passes from_pretrained's checks of an
    interrupted save (zoo.hub: no config.json beside the parked old one; config.json and the weights from two
    saves) and its model card records these weights (metadata "weights": final or best, with the step). A kill
    during the final release of an extended run left the previous release (another step) or a half-swapped one,
    which a rerun of the resume kept as it was (audit 2026-12-06). A release that records no weights (written
    before that record) is taken as current, as it was."""
    from zoo.hub import CheckpointError, _check_not_interrupted, _check_same_save, read_config

    weights = directory / "model.safetensors"
    try:
        _check_not_interrupted(directory)
        config = read_config(directory)
        if config is None or not weights.is_file():
            return False
        _check_same_save(config, weights)
    except CheckpointError:
        return False
    recorded = (config.get("metadata") or {}).get("weights")
    if not isinstance(recorded, Mapping):
        return True
    return (recorded.get("ckpt"), recorded.get("global_step")) == (released_from.get("ckpt"),
                                                                   released_from.get("global_step"))


# top-level keys naming the weights the test after training and the release use (configs/train.yaml)
_WEIGHTS_KEYS = {"test_ckpt": "test", "export_ckpt": "export"}
_WEIGHTS_CHOICES = ("final", "best")


def _weights_choice(cfg, key: str) -> Optional[str]:
    """``test_ckpt`` / ``export_ckpt`` as final or best; None when the step it picks for (``test`` /
    ``export``) is off. A null value is the default, final."""
    value = cfg.get(key)
    value = "final" if value is None else value
    if value not in _WEIGHTS_CHOICES:
        raise ValueError(f"{key} must be final (the weights at the end of training) or best "
                         f"(<run_dir>/checkpoints/best.ckpt), got {value!r}")
    return value if cfg.get(_WEIGHTS_KEYS[key], True) else None


def _best_checkpoint_callback(callbacks):
    """The callback that writes the run's best checkpoint: the first ModelCheckpoint with a monitor
    (configs/callbacks best_checkpoint); None without one. (Lightning's ``ckpt_path="best"`` reads
    ``trainer.checkpoint_callback``, the first ModelCheckpoint, which here is last.ckpt's.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((c for c in callbacks or [] if isinstance(c, ModelCheckpoint) and c.monitor is not None), None)


def _check_best_checkpoint_can_exist(cfg, callbacks) -> None:
    """``test_ckpt=best`` / ``export_ckpt=best`` with a config that cannot write best.ckpt (no best checkpoint
    callback, no validation batches, or validation less often than the run has epochs), refused in one line
    before training; a best.ckpt that is missing for another reason is said at the end of the run."""
    wanted = [key for key in _WEIGHTS_KEYS if _weights_choice(cfg, key) == "best"]
    if not wanted:
        return
    asked, instead = " and ".join(f"{key}=best" for key in wanted), " or ".join(f"{key}=final" for key in wanted)
    problem = None
    trainer = cfg.trainer
    every, epochs = trainer.get("check_val_every_n_epoch", 1), trainer.get("max_epochs")
    best_callback = _best_checkpoint_callback(callbacks)
    if best_callback is None:
        problem = ("the callbacks keep no best checkpoint (a ModelCheckpoint with a monitor: keep "
                   "callbacks.best_checkpoint)")
    elif best_callback.save_top_k == 0:
        problem = "callbacks.best_checkpoint.save_top_k=0 keeps no checkpoint (1 keeps the best, k the k best)"
    elif not _validates(cfg):
        problem = "trainer.limit_val_batches=0 runs no validation, so no best checkpoint is written"
    elif (isinstance(every, int) and isinstance(epochs, int) and not isinstance(epochs, bool) and 0 <= epochs < every
          and trainer.get("max_steps", -1) in (-1, None)):
        problem = (f"trainer.check_val_every_n_epoch={every} > trainer.max_epochs={epochs}: no validation runs during "
                   f"training, so no best checkpoint is written")
    if problem is not None:
        verb = "use" if len(wanted) > 1 else "uses"
        raise ValueError(f"{asked} {verb} <run_dir>/checkpoints/best.ckpt, but {problem}; or use {instead}")


def _best_weights(trainer) -> Optional[dict[str, Any]]:
    """Where the run's best weights are: {"ckpt": "best", "path", "global_step", "monitor", "score"}, from the best
    checkpoint callback; None when it wrote no file."""
    callback = _best_checkpoint_callback(trainer.callbacks)
    path = Path(callback.best_model_path) if callback is not None and callback.best_model_path else None
    if path is None or not path.is_file():
        return None
    stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: only the step is read
    score = callback.best_model_score
    return {"ckpt": "best", "path": str(path), "global_step": int(stored.get("global_step", -1)),
            "monitor": callback.monitor, "score": None if score is None else float(score)}


def _test_and_pick_release(trainer, module, datamodule, cfg, metrics: dict):
    """The test after training on the weights ``test_ckpt`` names, and the module left holding the weights
    ``export_ckpt`` names: final (as training ended) or best (best.ckpt, loaded as Lightning's
    ``trainer.test(ckpt_path=...)`` does, the EMA copy with it: the evaluated and released weights are the EMA
    ones when the run keeps one). ``metrics`` gets the test metrics.

    Returns (the tested weights, the weights to release, the metrics of those weights for the model card, notes to
    print at the end): the card states only metrics measured on the released weights (the best weights are
    validated once more for it)."""
    final = {"ckpt": "final", "global_step": int(trainer.global_step)}
    test_on, release_from = _weights_choice(cfg, "test_ckpt"), _weights_choice(cfg, "export_ckpt")
    best = _best_weights(trainer) if "best" in (test_on, release_from) else None
    notes = []
    if best is None and "best" in (test_on, release_from):
        callback = _best_checkpoint_callback(trainer.callbacks)
        monitor = callback.monitor if callback is not None else "its monitor"
        why = (f"zoo train: no best checkpoint was written (no validation during training reported {monitor}), "
               f"so")
        if test_on == "best":
            notes.append(f"{why} the test with test_ckpt=best did not run: zoo eval "
                         f"ckpt={_last_checkpoint(Path(str(cfg.run_dir)))} tests the final weights")
            test_on = None
        if release_from == "best":
            notes.append(f"{why} released/ (export_ckpt=best) is not written: export_ckpt=final releases the final "
                         f"weights")
            release_from = None
    keep_final = None
    if test_on == "best" and release_from == "final":  # the release comes after the test on the best weights
        keep_final = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    release_metrics, tested, test_metrics = dict(metrics), None, {}
    if test_on is not None:
        tested = best if test_on == "best" else final
        results = trainer.test(module, datamodule=datamodule, verbose=trainer.is_global_zero,
                               ckpt_path=tested.get("path"))
        test_metrics = _float_metrics(results[0] if results else {})
        metrics.update(test_metrics)
    if release_from == "best":
        results = trainer.validate(module, datamodule=datamodule, verbose=False, ckpt_path=best["path"])
        release_metrics = _float_metrics(results[0] if results else {})
    elif keep_final is not None:
        module.load_state_dict(keep_final)
    if release_from is not None and release_from == test_on:
        release_metrics.update(test_metrics)
    released_from = {"final": final, "best": best, None: None}[release_from]
    return tested, released_from, release_metrics, notes


def _write_text_atomically(path: Path, text: str) -> None:
    """A run's metrics.json / config.yaml through a staged file and a rename (zoo.hub.atomic_write): a kill or a
    full disk mid-write left an empty or partial file that scripts read."""
    from zoo.hub import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _resume_checkpoint(ckpt_path) -> Optional[tuple[Path, dict]]:
    """(path, checkpoint) for ``ckpt_path=`` (None when not resuming), read with evaluate()'s checks."""
    if not ckpt_path:
        return None
    from zoo.hub import refuse_url

    refuse_url(ckpt_path, "ckpt_path", "the .ckpt")
    path = Path(str(ckpt_path)).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file():  # a released/ folder: weights to start from, not a run to resume
            run = _last_checkpoint(path.parent)
            resume = f"resume its run with ckpt_path={run}" if run.is_file() else "its run's checkpoints/last.ckpt resumes it"
            raise FileNotFoundError(f"ckpt_path={ckpt_path} is released weights, not a training checkpoint: start a new "
                                    f"run from them with model.pretrained={ckpt_path}, or {resume}")
        candidates = [c for c in (_last_checkpoint(path), path / "last.ckpt") if c.is_file()]
        hint = f"ckpt_path={candidates[0]}" if candidates else "the .ckpt file, e.g. <run_dir>/checkpoints/last.ckpt"
        raise FileNotFoundError(f"ckpt_path={ckpt_path} is a directory; give {hint} to resume from")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (give the .ckpt to resume from)")
    try:
        return path, _load_ckpt(path)
    except ValueError as error:
        raise ValueError(f"cannot resume from ckpt_path={ckpt_path}: {error}") from None


def _older_vision_data(data_cfg) -> bool:
    """A vision data config stored before data.split_seed existed: its data.seed drew the validation split as well
    as the training order and augmentation."""
    return (isinstance(data_cfg, Mapping) and str(data_cfg.get("_target_", "")).startswith("zoo.tasks.vision.")
            and "seed" in data_cfg and "split_seed" not in data_cfg)


def _continue_an_older_run(cfg, stored) -> None:
    """Resuming a vision run from before data.split_seed: its data.seed drew the validation split, the order and the
    augmentation, and today's configs compose data.seed=${seed} and split_seed=0; the resumed run takes the stored
    seed for both, so that it validates on its own split and replays its own batches (it re-drew 129 of 144
    validation images and, with seed=42, reshuffled), and says so."""
    data = (stored or {}).get("data") if isinstance(stored, Mapping) else None
    if not _older_vision_data(data) or "data" not in cfg or "split_seed" not in cfg.data:
        return
    seed = data["seed"]
    if (cfg.data.seed, cfg.data.split_seed) != (seed, seed):
        print(f"zoo train: note: the checkpoint's run predates data.split_seed; its data.seed={seed} drew the "
              f"validation split too, so this run continues with data.seed={seed} data.split_seed={seed}",
              file=sys.stderr)
    cfg.data.seed = cfg.data.split_seed = seed


def _config_differences(saved, current, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for key in sorted(set(saved) | set(current), key=str)
                for d in _config_differences(saved.get(key, "<unset>"), current.get(key, "<unset>"), f"{prefix}.{key}")]
    return [] if saved == current else [(prefix, saved, current)]


# task.* values a resumed run cannot change: the optimizer (task.optimizer: its state would be loaded into another
# class), its param groups (lr, weight decay, betas, momentum, layer-wise scales) and the scheduler's base learning
# rates come back from the checkpoint
_RESTORED_TASK_KEYS = tuple(("task", key) for key in ("lr", "weight_decay", "betas", "layer_decay", "optimizer",
                                                      "momentum", "layer_decay_min_scale", "layer_decay_no_opt_scale"))


# values the warm-up + decay schedule is computed from at the start of each fit (it is not stored)
_SCHEDULE_KEYS = (("trainer", "max_epochs"), ("trainer", "max_steps"), ("trainer", "accumulate_grad_batches"),
                  ("trainer", "limit_train_batches"), ("data", "batch_size"), ("task", "warmup_epochs"),
                  ("task", "min_lr_ratio"), ("task", "scheduler"), ("task", "decay_epochs"), ("task", "decay_rate"))

# task.* keys of the warm-up schedule's tasks added after runs were saved: the value such a run trained with
# (AdamW + cosine), compared in its place on resume, so that resuming an older run is not refused for them
_TASK_KEYS_ADDED = {"optimizer": "adamw", "momentum": 0.9, "scheduler": "cosine", "decay_epochs": 90, "decay_rate": 0.1,
                    "layer_decay_min_scale": 0.0, "layer_decay_no_opt_scale": None}


class _NotUsedBy:
    """A task.momentum / task.betas the optimizer does not take, as a resume message prints it ("(not used by
    adamw)"; the run's config may well hold 0.9, which the message used to print as None); equal to any other
    such value, so switching between two optimizers that ignore it is no change of it."""

    def __init__(self, optimizer: str) -> None:
        self.optimizer = optimizer

    def __eq__(self, other) -> bool:
        return isinstance(other, _NotUsedBy)

    def __str__(self) -> str:
        return f"(not used by {self.optimizer})"


def _as_the_optimizer_reads(config: dict, stored: bool = False) -> dict:
    """``config`` with task.optimizer as timm reads it (lower case) and task.momentum / task.betas left out when that
    optimizer does not take them, so that a resume is refused only for a change the optimizer would see (AdamW vs
    adamw, or another momentum for AdamW, were refused); in the run's ``stored`` config they are kept as
    :class:`_NotUsedBy`, which a message prints as such."""
    task = dict(config.get("task") or {})
    name = task.get("optimizer")
    if not isinstance(name, str):
        return config
    task["optimizer"] = name.lower()
    try:
        from timm.optim import get_optimizer_info

        info = get_optimizer_info(task["optimizer"].split("_")[-1])
    except Exception:  # an unknown name: the module refuses it when it is built
        return {**config, "task": task}
    for key, used in (("momentum", info.has_momentum), ("betas", info.has_betas)):
        if not used:
            task[key] = _NotUsedBy(task["optimizer"])
            if not stored:
                del task[key]
    if info.has_betas and task.get("betas") is not None:
        from zoo.train.optim import DEFAULT_BETAS, own_betas

        if tuple(float(b) for b in task["betas"]) == DEFAULT_BETAS:  # the default pair means the optimizer's own
            task["betas"] = list(own_betas(task["optimizer"]) or DEFAULT_BETAS)
        else:
            task["betas"] = [float(b) for b in task["betas"]]
    return {**config, "task": task}


class _NotSet:
    """A setting absent from a config (``+trainer.max_steps`` left out), printed as such, not as None (equal to
    None, as absent and null settings compared before)."""

    def __eq__(self, other) -> bool:
        return other is None or isinstance(other, _NotSet)

    def __str__(self) -> str:
        return "(not set)"


_NOT_SET = _NotSet()


def _changed_settings(stored: dict, current: dict, keys, only_given: bool = False) -> tuple[str, str]:
    """("g.k=new, ...", "g.k=old, ...") for the (group, key) settings whose value differs between the run's
    stored config and this one ("", "" when none does); ``only_given``: keys the current config has."""
    changed = [(f"{group}.{key}", (stored.get(group) or {}).get(key, _NOT_SET), (current.get(group) or {}).get(key, _NOT_SET))
               for group, key in keys if not only_given or key in (current.get(group) or {})]
    changed = [item for item in changed if item[1] != item[2]]
    return ", ".join(f"{k}={new}" for k, _, new in changed), ", ".join(f"{k}={old}" for k, old, _ in changed)


LARGE_TOKEN_COUNT = 4096


def _note_token_count(model: torch.nn.Module, cfg) -> None:
    """A patch model whose input size makes more than LARGE_TOKEN_COUNT tokens per image, said on stderr: an
    experiment whose model follows ${data.img_size} (vit_digits, patch 2) met an image folder's default of 224 px:
    12,544 tokens per image, and the run seemed to hang."""
    embed = getattr(model, "patch_embed", None)
    size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if size is None or patch is None:
        return
    tokens = math.prod(-(-int(s) // int(p)) for s, p in zip(size, patch))
    if tokens > LARGE_TOKEN_COUNT:
        name = getattr(model, "zoo_model_name", type(model).__name__)
        data_size = (cfg.get("data") or {}).get("img_size")
        print(f"zoo train: note: {name} at {size[0]} x {size[1]} px with {patch[0]} x {patch[1]} patches makes "
              f"{tokens:,} tokens per image (attention cost grows with their square); data.img_size is {data_size}: "
              f"is that the size you meant?", file=sys.stderr, flush=True)


def _note_schedule_changes(stored: dict, current: dict) -> None:
    """Resuming with another run length (train longer: trainer.max_epochs=300) recomputes the schedule for the
    new length: from the restored step the learning rate follows the new curve, a jump from the old one. Say so
    (stderr), since the checkpoint otherwise restores the run exactly."""
    now, before = _changed_settings(stored, current, _SCHEDULE_KEYS)
    if now:
        scheduler = (current.get("task") or {}).get("scheduler", "cosine")
        print(f"zoo train: resuming with {now} (the run used {before}): the warm-up + {scheduler} learning-rate schedule "
              "is recomputed for this run, so from the restored step the learning rate follows the new schedule",
              file=sys.stderr)


def _check_resume_fits(resume: tuple[Path, dict], module, cfg) -> None:
    """A checkpoint whose weights do not fit the configured module, or optimizer settings that resuming would
    ignore: name the config values that differ."""
    from torch.nn.parameter import UninitializedParameter

    path, ckpt = resume
    stored, current = (ckpt.get("hyper_parameters") or {}).get("zoo_config"), _to_container(cfg)
    if isinstance(stored, dict) and "warmup_epochs" in (stored.get("task") or {}):  # the warm-up schedule's tasks
        stored = {**stored, "task": {**_TASK_KEYS_ADDED, **stored["task"]}}  # a run saved before those keys
        stored, current = _as_the_optimizer_reads(stored, stored=True), _as_the_optimizer_reads(current)
    if isinstance(stored, dict):  # Lightning restores the optimizer and the schedule over these: refuse a change
        now, before = _changed_settings(stored, current, _RESTORED_TASK_KEYS, only_given=True)
        if now:
            raise ValueError(
                f"cannot resume from {path} with {now}: the run used {before}, and resuming restores its optimizer "
                "and learning-rate schedule, which would keep those values; resume with them, or start a new run "
                "from its weights (model.pretrained=<its released/ directory>)"
            )
    if isinstance(stored, dict) and "warmup_epochs" in (stored.get("task") or {}):  # tasks with that schedule
        _note_schedule_changes(stored, current)
    saved, own = ckpt["state_dict"], module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k, v in own.items() if k in saved and not isinstance(v, UninitializedParameter)
              and isinstance(saved[k], torch.Tensor) and tuple(saved[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    diffs = [d for group in ("model", "task") for d in _config_differences(stored.get(group), current.get(group), group)
             if d[0] != "model.pretrained"]
    if diffs:
        raise ValueError(
            f"cannot resume from {path}: it was trained with " + ", ".join(f"{k}={a}" for k, a, _ in diffs)
            + "; this config has " + ", ".join(f"{k}={b}" for k, _, b in diffs)
            + " (the checkpoint stores its zoo_config: use the same values to resume)"
        )
    raise ValueError(f"cannot resume from {path}: its weights do not fit this config's model (missing {missing[:4]}, "
                     f"unexpected {unexpected[:4]}, other shapes {shapes[:4]})")


def export_released(module, datamodule, cfg, directory: Path, metrics: dict, seconds: float,
                    released_from: Optional[dict] = None) -> Optional[Path]:
    """save_pretrained of the weights used for evaluation (EMA when enabled), with data/metric metadata;
    ``released_from``: which weights of the run they are (metadata "weights": final or best, with the step)."""
    import zoo

    model = getattr(module, "model", None)
    if model is None or not hasattr(model, "zoo_model_name"):
        return None
    weights = getattr(module, "eval_model", model)
    state = weights.state_dict() if weights is not model else None
    metadata = {
        "experiment": cfg.get("name"),
        "data": datamodule.describe() if hasattr(datamodule, "describe") else {},
        "metrics": metrics,
        "train_seconds": round(seconds, 1),
        "zoo_config": _to_container(cfg),
    }
    if released_from is not None:
        metadata["weights"] = dict(released_from)
    if hasattr(datamodule, "eval_preprocessing"):  # how evaluation resized and cropped, for timm's transforms
        metadata["pretrained_cfg"] = datamodule.eval_preprocessing()
    return zoo.save_pretrained(model, directory, metadata=metadata, state_dict=state)


def _load_ckpt(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        reason = "the file is empty" if path.stat().st_size == 0 else type(error).__name__ + (f": {first}" if 0 < len(first) <= 100 else "")
        raise ValueError(f"cannot read training checkpoint {path} (corrupt, or not written by zoo train; {reason})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hp = ckpt.get("hyper_parameters") or {}
    if "zoo_config" not in hp:
        raise ValueError(f"{path} has no zoo_config in its hyper-parameters; was it written by `zoo train`?")
    return ckpt


def _resolve_source(ckpt: str | os.PathLike) -> Path:
    """``ckpt=`` as a path: a .ckpt file as given; a released directory, a Hugging Face cache folder or a
    repository id in the local cache resolved to its snapshot (zoo.hub); FileNotFoundError when none exists."""
    from zoo.hub import _looks_like_repo_id, _resolve_pretrained

    if not str(ckpt).strip():
        raise ValueError("ckpt= is empty: give a .ckpt file from zoo train or a released directory")
    ckpt = resolve_ckpt_argument(ckpt)  # a run directory, a shipped card named as README names it
    path = Path(ckpt).expanduser()
    if not path.exists() and (path.suffix == ".ckpt" or not _looks_like_repo_id(str(ckpt))):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path if path.suffix == ".ckpt" else _resolve_pretrained("", str(ckpt))


def _run_directory_source(ckpt):
    """``ckpt=<run_dir>`` (a directory zoo train wrote: config.yaml, checkpoints/, released/, and no config.json of
    its own) as the first of its released/, checkpoints/best.ckpt, checkpoints/last.ckpt that exists, said on stderr;
    any other ``ckpt`` unchanged. It was refused as "expected a .ckpt or a directory written by
    zoo.save_pretrained", although the run's directory is what zoo train prints."""
    from zoo.hub import _RUN_DIRECTORY_SOURCES, _is_run_directory

    if not str(ckpt).strip():  # Path("") is the working directory: the empty value is named by the callers
        return ckpt
    path = Path(str(ckpt)).expanduser()
    if not _is_run_directory(path):  # (a source tree, whose checkpoints/ holds the shipped cards, is not a run)
        return ckpt
    for name in _RUN_DIRECTORY_SOURCES:
        source = path / name
        if source.exists():
            print(f"zoo: ckpt={ckpt} is a zoo train run: using {source}", file=sys.stderr)
            return source
    raise FileNotFoundError(f"ckpt={ckpt} is a zoo train run directory without released/ or checkpoints/best.ckpt or "
                            f"last.ckpt (it wrote none yet): give a .ckpt or a released directory")


def resolve_ckpt_argument(ckpt):
    """``ckpt=`` as every command reads it before loading: a zoo train run directory as its released/ (else best.ckpt,
    else last.ckpt), a shipped card named as README names it (``checkpoints/vit_digits``) or by its card or model
    name when no such path exists here; anything else unchanged (the loaders then name what is wrong with it).
    An http(s) URL is refused, saying what to do instead (zoo.hub.refuse_url): it was reported as a missing file."""
    from zoo.hub import _shipped_source, refuse_url

    refuse_url(ckpt, "ckpt", "the checkpoint (a released directory, .safetensors or .ckpt)", model=True)
    ckpt = _run_directory_source(ckpt)
    path = Path(str(ckpt)).expanduser()
    if str(ckpt).strip() and not path.exists():
        shipped = _shipped_source(path)
        if shipped is not None:
            return shipped
    return ckpt


def _inference_source(ckpt: str | os.PathLike, overrides: Sequence[str] = (), *, command: Optional[str] = None,
                      config_dirs: Sequence[str] = ()):
    """(cfg, model, LightningModule state_dict or None, preprocessing info) from a .ckpt or a released directory.
    A relative data.path / data.root stored by an older run is replaced by the absolute one its data module recorded
    (_pin_stored_data_paths); ``command`` (zoo eval, which reads the data) refuses one that cannot be, unless
    ``overrides`` give that key or another data group."""
    import zoo
    from omegaconf import OmegaConf

    path = _resolve_source(ckpt)
    if path.suffix == ".ckpt":
        checkpoint = _load_ckpt(path)
        hp = checkpoint["hyper_parameters"]
        cfg = OmegaConf.create(hp["zoo_config"])
        model = zoo.create_model(hp["model_name"], **hp.get("model_args", {})) if "model_name" in hp else None
        state = checkpoint["state_dict"]
        info = dict(hp.get("data_info") or {})
    else:
        from zoo.hub import read_config

        config = read_config(path)
        if config is None:
            raise ValueError(f"{path}: expected a .ckpt from zoo train or a directory written by zoo.save_pretrained")
        meta = config.get("metadata") or {}
        model = zoo.from_pretrained(path)
        cfg = OmegaConf.create(meta.get("zoo_config") or {})
        if "task" not in cfg:
            raise ValueError(f"{path}: config.json has no metadata.zoo_config (not exported by zoo train); use zoo.from_pretrained")
        if "ema_decay" in cfg.task:  # released weights are already the EMA average
            cfg.task.ema_decay = 0.0
        state = None
        info = dict(meta.get("data") or {})
    OmegaConf.set_struct(cfg, False)
    data_cfg = cfg.get("data") or {}
    if data_cfg.get("mean") == "model" and info.get("mean") and info.get("std"):
        # data.mean=model was resolved at training time from the model it started from (a timm tag's or a
        # checkpoint's statistics); the model rebuilt here carries its name's defaults, so use what training used
        cfg.data.mean, cfg.data.std = list(info["mean"]), list(info["std"])
    if model is not None and state is not None:
        # a .ckpt: the model rebuilt from its name carries the registry's preprocessing; the run's record (mean/std,
        # crop_pct, crop_mode, interpolation) goes on it, so that data.crop_pct=model / interpolation=model resolve
        # to what training evaluated with (crop_mode too, which is no config key); a release carries its own
        from zoo.hub import apply_training_preprocessing

        apply_training_preprocessing(model, info)
    if _older_vision_data(data_cfg):  # a run from before data.split_seed: its data.seed drew the split as well
        cfg.data.split_seed = data_cfg.seed
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
    given = {item.split("=", 1)[0] for item in overrides}
    unknown = [stored for stored in _pin_stored_data_paths(cfg, info)
               if "data" not in given and stored.split("=", 1)[0] not in given]
    if command is not None and unknown:
        key = unknown[0].split("=", 1)[0]
        raise ValueError(f"{_relative_data_path_problem(ckpt, unknown[0], command)}: give its absolute path, "
                         f"{command} ckpt={ckpt} {key}=<absolute path>")
    groups = [item.split("=", 1)[1] for item in overrides if item.split("=", 1)[0] == "data"]
    overrides = [item for item in overrides if item.split("=", 1)[0] != "data"]
    if groups:
        cfg.data = _other_data(cfg, groups[-1], config_dirs)
    if overrides:
        plain = _plain(cfg)
        newer = _newer_data_keys(plain.get("data") or {})
        for item in overrides:
            key = item.split("=", 1)[0]
            if key.startswith("data.") and key[len("data."):] in newer:
                continue  # a data option added after this run was trained (data.inference_batch_size): it may be set
            try:
                _check_eval_override(plain, key)
            except ValueError as error:
                if newer and key.startswith("data.") and str(error).startswith("unknown key"):
                    raise ValueError(f"{error}; added since this run was trained, also: "
                                     f"{', '.join(sorted(newer))}") from None
                raise
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    cfg.model.pretrained = False
    return cfg, model, state, info


def _newer_data_keys(stored_data: dict) -> set[str]:
    """Loader options of the run's data module that its stored data config lacks: options added after the run was
    trained (``data.inference_batch_size``, ``data.num_workers``), which ``zoo eval`` may set on it with
    ``data.KEY=VALUE`` (its plain form, as for a current run) instead of refusing them as unknown. Only the keys the
    module declares changeable in the middle of an epoch (``mid_epoch_changeable_keys``: how the data is batched, not
    which data) and its shipped configs define: another key a sibling config has (``data.normalize_features`` of
    another node data set) would change the data the run is scored on, and stays refused."""
    from importlib import resources

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    target = stored_data.get("_target_")
    if not target:
        return set()
    try:
        loader_keys = set(getattr(get_class(str(target)), "mid_epoch_changeable_keys", ()))
    except Exception:  # a data module that cannot be imported here: nothing is added
        return set()
    keys: set[str] = set()
    for path in (resources.files("zoo.configs") / "data").iterdir():
        if path.name.endswith(".yaml"):
            config = OmegaConf.load(str(path))
            if config.get("_target_") == target:
                keys.update(str(k) for k in config.keys())
    return {key for key in keys & loader_keys if key not in stored_data}


def _preview(names: Sequence, shown: int = 6) -> str:
    names = [str(n) for n in names]
    return "[" + ", ".join(names[:shown]) + (f", ... ({len(names)})" if len(names) > shown else "") + "]"


# what the model was trained to take: an evaluation on other data (zoo eval data=<group>) keeps these from the run
_MODEL_INPUT_KEYS = ("img_size", "in_chans", "mean", "std", "num_features", "num_classes")
# and how the run evaluated (VisionDataModule.eval_preprocessing): the resize/crop its metrics were taken with, as
# timm's validate.py evaluates with the model's data config. crop_mode is no config key: a stored "model" resolves it
# from the checkpoint's model (apply_training_preprocessing, or a release's pretrained_cfg), a number keeps "center"
_EVAL_TRANSFORM_KEYS = ("crop_pct", "interpolation")


def _other_data(cfg, group: str, config_dirs: Sequence[str] = ()):
    """The data config ``data/<group>.yaml`` for evaluating the run's model on other data of its domain (``zoo eval
    ckpt=... data=image_folder data.root=DIR``): the run's input size, channels, normalisation, feature and class
    counts are kept, since the model was trained on those, and so is its evaluation resize/crop (crop_pct,
    interpolation; crop_mode with them), so that the metrics are those of the run's own config on the same files
    (a data.crop_pct= / data.interpolation= override still wins). Looked up as zoo train's composition finds a group
    option: zoo.configs first, then the ``config_dirs`` folders (``zoo eval --config-dir DIR``) in their order. A
    data config is one file here: one with a defaults list (which only Hydra's composition would expand) is
    refused."""
    from importlib import resources

    from omegaconf import OmegaConf

    folders = check_config_dirs(config_dirs)
    if group in _group_options("data"):
        path = str(resources.files(CONFIG_MODULE) / "data" / f"{group}.yaml")
    else:
        found = [os.path.join(folder, "data", f"{group}.yaml") for folder in folders]
        found = [candidate for candidate in found if os.path.isfile(candidate)]
        if not found:
            own = sorted({name[:-5] for folder in folders if os.path.isdir(os.path.join(folder, "data"))
                          for name in os.listdir(os.path.join(folder, "data")) if name.endswith(".yaml")})
            where = (f"; in the --config-dir folders: {', '.join(own) or 'none'}" if folders else
                     "; a data config of your own: add --config-dir DIR, the folder holding data/<name>.yaml")
            raise ValueError(f"data={group}: no such data config (options: {', '.join(_group_options('data'))}"
                             f"{where})")
        path = found[0]
    with open(path, encoding="utf-8") as file:  # Hydra reads the header from the comments before the content
        leading = "".join(itertools.takewhile(lambda line: not line.strip() or line.lstrip().startswith("#"), file))
    header = re.search(r"^\s*#\s*@package\s+(\S+)", leading, re.MULTILINE)
    if header and header.group(1) not in ("data", "_group_"):
        raise ValueError(f"data={group}: {path} declares '# @package {header.group(1)}'; zoo eval reads a data file "
                         f"as the data node itself (no header, or '# @package data' / '_group_'): write it that way")
    other = OmegaConf.load(path)
    if "defaults" in other:
        raise ValueError(f"data={group}: {path} has a defaults list, which zoo eval does not expand (it reads one "
                         f"data file); write the data options out in it, or evaluate with data.* overrides instead")
    stored = cfg.get("data") or {}
    if not other.get("_target_"):
        raise ValueError(f"data={group}: {path} has no _target_ (the data module to build), so it is no data config "
                         f"(keys: {', '.join(map(str, other.keys())) or 'none'})")

    def kind(node) -> str:  # zoo.tasks.<domain>, and for graphs what the model predicts (nodes, graphs, ...)
        domain = str(node.get("_target_", "")).rsplit(".", 2)[0]
        return domain + (f" ({node['model_kind']} model)" if "model_kind" in node else "")

    if kind(other) != kind(stored):
        raise ValueError(f"data={group} is {kind(other)} data, but the checkpoint's model was trained on "
                         f"{kind(stored)} data ({stored.get('_target_')})")
    for key in _MODEL_INPUT_KEYS:
        if key in other.keys() and key in stored:  # (a "???" value is not "in" a DictConfig)
            other[key] = stored[key]
    for key in _EVAL_TRANSFORM_KEYS:  # also where the other config leaves them to the module (digits.yaml): every
        if key in stored:  # data module of the domain that stored them takes them (VisionDataModule)
            other[key] = stored[key]
    return other


def _check_eval_override(plain: dict, key: str) -> None:
    """An eval override must name a key of the stored run config, and not the model (built from the checkpoint)."""
    if key.startswith(("+", "~")):
        raise ValueError(f"{key}: eval overrides set keys of the stored run config (key=value); Hydra's "
                         f"'+' (add) and '~' (delete) forms have no place there")
    if key == "model" or key.startswith("model."):
        raise ValueError(f"{key}: model.* cannot be overridden in eval (the model comes from the checkpoint)")
    parts, node = key.split("."), plain
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            parent = ".".join(parts[:depth])
            keys = (", ".join(sorted(k for k in map(str, node) if not k.startswith("_"))) if isinstance(node, dict)
                    else f"none: {parent} is a value")
            raise ValueError(f"unknown key {key} ({parent + ' keys' if parent else 'top-level keys'}: {keys})")
        node = node[part]


# Trainer settings of the stored run that evaluation replaces (all batches, one device, no bar), unless the user gives
# them: trainer.limit_test_batches=10 is a quick look at a few batches, and was silently evaluated on all of them.
_EVAL_TRAINER_DEFAULTS = {"limit_test_batches": None, "limit_val_batches": None, "enable_progress_bar": False}
_EVAL_ONE_DEVICE = ("devices", "strategy", "num_nodes")


def _eval_trainer_settings(overrides: Sequence[str]) -> dict[str, Any]:
    given = {item.split("=", 1)[0] for item in overrides}
    for key in _EVAL_ONE_DEVICE:
        if f"trainer.{key}" in given:
            raise ValueError(f"trainer.{key}: zoo eval evaluates on one device (trainer.accelerator=cpu|gpu picks "
                             f"which); {key} is a training setting")
    settings = {key: value for key, value in _EVAL_TRAINER_DEFAULTS.items() if f"trainer.{key}" not in given}
    return {"devices": 1, "strategy": "auto", **settings}


def evaluate(ckpt: str | os.PathLike, overrides: Sequence[str] = (), *, split: str = "test",
             config_dirs: Sequence[str] = ()) -> dict[str, float]:
    """Test metrics of a ``.ckpt``, released directory or run directory on its configured data (``data.*``
    overridable; ``data=<group>`` another data config of the model's domain, from zoo.configs or the
    ``config_dirs`` folders)."""
    if split not in ("test", "val"):  # before the model and data are built
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    ckpt = resolve_ckpt_argument(ckpt)
    cfg, model, state, info = _inference_source(ckpt, overrides, command="zoo eval", config_dirs=config_dirs)
    _match_folders_to_trained_classes(cfg, info.get("class_names"))
    try:
        module, datamodule = build(cfg, model=model)
    except ValueError as error:
        raise ValueError(_kept_eval_transform_note(error, cfg, overrides)) from None
    trained, found = info.get("class_names"), getattr(datamodule, "class_names", None)
    if trained and found and list(map(str, trained)) != list(map(str, found)):
        print(f"zoo eval: warning: the model was trained on classes {_preview(trained)}, this data has "
              f"{_preview(found)}; class i of the data is scored as the model's class i", file=sys.stderr)
    if state is not None:
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{ckpt}: state dict does not fit the configured module: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key in _TRAINER_GROUP_KEYS:  # a run trained before they were refused may store one; evaluation sets its own
        cfg.trainer.pop(key, None)
    trainer = _trainer(cfg, callbacks=[], loggers=[], enable_model_summary=False, enable_checkpointing=False,
                       **_eval_trainer_settings(overrides))
    if split == "val":
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
    elif split == "test":
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    else:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    return _float_metrics(results[0] if results else {})


def _kept_eval_transform_note(error: ValueError, cfg, overrides: Sequence[str]) -> str:
    """A data module's refusal of the evaluation transform zoo eval data=GROUP carried over from the run (the digits
    take only an uncropped bilinear resize), with that reason and the override that scores without it."""
    given = {item.split("=", 1)[0] for item in overrides}
    if "data" not in given or not any(f"data.{key}" not in given and key in str(error) for key in _EVAL_TRANSFORM_KEYS):
        return str(error)
    data = cfg.get("data") or {}
    kept = ", ".join(f"{key}={data.get(key)}" for key in _EVAL_TRANSFORM_KEYS)
    return (f"{error} ({kept} is the run's evaluation transform, which data=GROUP keeps; to score with another, give "
            f"data.crop_pct=1.0 data.interpolation=bilinear)")


def _match_folders_to_trained_classes(cfg, trained: Optional[Sequence[str]]) -> None:
    """zoo eval on class folders that are the model's trained classes, or some of them (a test set of a few
    classes' photos): the folders are matched to the model's classes by name (``data.classes``), instead of being
    refused for their count, or scored by their sorted position against a head whose classes are in another order
    (a run trained with ``data.classes``). Folders in exactly the trained order need no matching; folders not all
    among the classes keep the plain rule (count and order, with a warning naming both lists)."""
    from omegaconf import open_dict

    from zoo.tasks.vision.data import image_folder_classes

    data = cfg.get("data")
    if not trained or data is None or not str(data.get("_target_", "")).endswith("ImageFolderDataModule") \
            or data.get("classes") is not None:
        return
    _, found = image_folder_classes(Path(os.path.expanduser(str(data.get("root")))))
    trained = [str(name) for name in trained]
    if found and found != trained and set(found) <= set(trained):
        what = (f"are {len(found)} of the model's {len(trained)} classes" if len(found) < len(trained) else
                f"are the model's classes in another order ({_preview(trained)})")
        print(f"zoo eval: the class folders {_preview(found)} {what}: scored as those classes (matched by name)",
              file=sys.stderr)
        with open_dict(data):
            data.classes = trained
            data.num_classes = len(trained)


def load_for_inference(ckpt: str | os.PathLike):
    """(model in eval mode -- the EMA weights when trained with EMA --, preprocessing info dict).

    A released directory without a ``zoo train`` record (written by ``zoo.save_pretrained`` from the user's own
    pipeline, or timm's Hugging Face Hub files) is preprocessed by its model's ``pretrained_cfg`` with timm's
    evaluation transform (info ``data_config``)."""
    model, info, _ = _inference_model(ckpt)
    return model, info


def _inference_model(ckpt: str | os.PathLike):
    """load_for_inference's (model, info) and the run's stored config (None for a release without a zoo train
    record), which zoo predict of a graph model rebuilds the run's data from."""
    ckpt = resolve_ckpt_argument(ckpt)
    released = _released_without_run(ckpt)
    if released is not None:
        return (*released, None)
    cfg, model, state, info = _inference_source(ckpt)
    if model is None:
        raise ValueError(f"{ckpt}: the checkpoint does not name a registered model (model_name)")
    if state is not None:
        from zoo.hub import lightning_model_weights, load_weights

        load_weights(model, lightning_model_weights(state) or {}, source=str(ckpt))
    if not info:
        data = cfg.get("data") or {}
        info = {k: data.get(k) for k in ("img_size", "in_chans", "mean", "std")}
    if state is not None:  # a .ckpt: the model carries its name's defaults; the run's normalisation goes with it
        from zoo.hub import apply_training_preprocessing

        apply_training_preprocessing(model, info)
    return model.eval(), info, cfg


def _eval_crop(info: dict) -> dict[str, Any]:
    """The evaluation resize/crop a run recorded (data.crop_pct, data.interpolation resolved; VisionDataModule.
    describe), as load_image_file's arguments; a record without them is a run evaluated with the defaults."""
    return {"crop_pct": float(info.get("crop_pct", 1.0)), "interpolation": str(info.get("interpolation", "bilinear")),
            "crop_mode": str(info.get("crop_mode", "center"))}


def released_eval_transform(data_config: dict):
    """timm's evaluation transform of a released model's ``pretrained_cfg`` (crop_pct, interpolation, mean/std):
    how zoo predict (and zoo viz after it) preprocesses a model released without a zoo train record."""
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=data_config))


def _released_without_run(ckpt: str | os.PathLike):
    """(model, info) of a released directory whose config.json has no zoo train record, else None."""
    import zoo
    from zoo.hub import read_config

    path = _resolve_source(ckpt)
    if path.suffix == ".ckpt":
        return None
    config = read_config(path)
    meta = (config or {}).get("metadata") or {}
    if config is None or meta.get("zoo_config"):
        return None
    model = zoo.from_pretrained(path).eval()
    task = _model_task(model)
    if task not in (None, "vision"):  # an image model's pretrained_cfg is no question to ask of it
        raise ValueError(f"{path}: {model.zoo_model_name} is a {task} model saved without a zoo train record (no "
                         f"metadata.zoo_config in config.json), and its inputs are rebuilt from the run's data config "
                         f"that zoo train records: give the .ckpt or released directory that zoo train wrote, or run "
                         f"the model in Python (zoo.from_pretrained)")
    data_config = getattr(model, "pretrained_cfg", None)
    if not isinstance(data_config, dict) or len(data_config.get("input_size") or ()) != 3:
        raise ValueError(f"{path}: neither a zoo train record (metadata.zoo_config) nor an image model's "
                         f"pretrained_cfg with an input_size to preprocess with")
    names = (meta.get("data") or {}).get("class_names")
    if not names and meta.get("source") == "timm":  # timm's ImageNet-family heads: names as timm's inference shows them
        import timm.data

        subset = timm.data.infer_imagenet_subset(model)
        if subset is not None:
            labels = timm.data.ImageNetInfo(subset)
            names = [labels.index_to_description(i) for i in range(labels.num_classes())]
    info = {"in_chans": data_config["input_size"][0], "img_size": data_config["input_size"][1],
            "mean": data_config.get("mean"), "std": data_config.get("std"), "data_config": dict(data_config),
            "class_names": names}
    return model, info


def _collect_inputs(spec: str) -> list[tuple[str, Any]]:
    from zoo.tasks.vision.data import IMAGE_EXTENSIONS

    if spec.startswith("digits:"):
        return [(spec, "digits")]
    if not spec.strip():  # Path("") is the current directory: every image under it, silently
        raise ValueError("input= is empty: give an image file, a folder of images, or digits:<index>")
    from zoo.hub import refuse_url

    refuse_url(spec, "input", "the image")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _image_files(path, IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"input folder {path} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return [(str(p), p) for p in files]
    if not path.is_file():
        raise FileNotFoundError(f"input {path} does not exist (give an image file, a folder of images, or digits:<index>)")
    return [(str(path), path)]


def _image_files(folder: Path, extensions) -> list[Path]:
    """The image files under ``folder``, as torchvision's ImageFolder (zoo eval data=image_folder, training) finds
    them: os.walk following symlinked folders (each real folder once, so a symlink loop ends), regular files with an
    image extension only (a folder named x.png is not one; nor a macOS AppleDouble ``._x.png``), sorted. rglob did not follow linked folders, so their
    images were silently left out."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files += [Path(root) / name for name in names
                  if Path(name).suffix.lower() in extensions and not name.startswith("._")  # (is_image_file_name)
                  and os.path.isfile(os.path.join(root, name))]
    return sorted(files)


def _digits_image(spec: str, img_size: int, in_chans: int, mean, std, transform=None,
                  crop: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The digit ``digits:<index>`` as the model's input: upsampled as the digits experiments train, or, for a model
    preprocessed by timm's evaluation transform (``transform``) or a run that evaluated with another resize/crop
    than the default (``crop``: ``_eval_crop`` of its record, e.g. an image folder of the digits with crop_pct=0.6
    bicubic), as an 8-bit picture through that preprocessing, as if the digit were an image file: the digit and
    the same digit saved as a PNG get the same logits (the tensor path skipped the crop and resized otherwise)."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    images = load_digits().images
    try:
        index = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"input={spec!r}: expected digits:<index>") from None
    if not 0 <= index < len(images):
        raise ValueError(f"input={spec!r}: index out of range 0..{len(images) - 1}")
    crop = dict(crop or _eval_crop({}))
    if transform is not None or crop != _eval_crop({}):
        from PIL import Image

        from zoo.tasks.vision.data import _picture_tensor

        picture = Image.fromarray((images[index] * (255.0 / 16.0)).round().astype("uint8"), mode="L")
        return _picture_tensor(picture, img_size, in_chans, mean, std, transform, **crop)
    x = torch.tensor(images[index], dtype=torch.float32)[None, None] / 16.0
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(1, in_chans, img_size, img_size)[0]
    mean_t = torch.tensor(mean if len(mean) == in_chans else list(mean) * in_chans, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std if len(std) == in_chans else list(std) * in_chans, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean_t) / std_t


def _predict_device(device) -> torch.device:
    """zoo predict's device=: cpu (the default) or cuda / cuda:<index>, refused in one line where there is none."""
    try:
        chosen = torch.device(str(device))
    except RuntimeError:
        raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {device!r}") from None
    if chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {device!r}")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             f"use device=cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"device={device}: there are {torch.cuda.device_count()} CUDA GPU(s) here "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return chosen


def _model_task(model) -> Optional[str]:
    """The registry's task of a loaded model (vision, graph, ...); None for a model the registry does not know."""
    import zoo

    name = getattr(model, "zoo_model_name", None)
    return zoo.get_model_entry(name).task if name and zoo.is_model(name) else None


def _require_image_classifier(model, ckpt, inputs: Sequence[str] = ()) -> None:
    """An image model for image inputs: a model of another task, or a graph input (nodes:, graphs:, a .pt file)
    given to an image model, refused in one line."""
    from zoo.tasks.graph.predict import is_graph_input

    name, task = getattr(model, "zoo_model_name", None), _model_task(model)
    if task is not None and task != "vision":
        raise ValueError(f"zoo predict classifies images; {ckpt} holds {name}, a {task} model (use zoo eval for its test metrics)")
    graph_inputs = [spec for spec in map(str, inputs) if is_graph_input(spec)]
    if graph_inputs:
        raise ValueError(f"input={graph_inputs[0]} is a graph input, but {ckpt} holds "
                         f"{name or type(model).__name__}, an image model: give it image files, folders of images "
                         f"or digits:<index> (graph inputs go to graph models, e.g. a zoo train experiment=graph_* run)")


def _predict_graph(model, cfg, info: dict, ckpt, inputs: Sequence[str], topk: int,
                   batch_size: int) -> list[dict[str, Any]]:
    """zoo predict of a graph model (zoo.tasks.graph.predict): its run's data is rebuilt from the stored config as
    zoo eval builds it. A run from before data.path / data.root were stored absolute (_absolute_data_root) takes
    the absolute path its data module recorded (``info``), else is refused when its data is needed: relative to
    this directory it named another file (or none)."""
    from zoo.tasks.graph.predict import _RunDataUnreadable, predict_graph

    if cfg is None or not cfg.get("data"):
        raise ValueError(f"{ckpt}: a graph model without its zoo train record (the run's data config): predict "
                         f"with a .ckpt or released directory written by zoo train")
    relative = _pin_stored_data_paths(cfg, info)

    def make_datamodule():
        if relative:
            raise _RunDataUnreadable(_relative_data_path_problem(ckpt, relative[0], "zoo predict"),
                                     f"give the graphs as input=<file.pt>, or evaluate with zoo eval ckpt={ckpt} "
                                     f"{relative[0].split('=', 1)[0]}=<absolute path>")
        return _call_target(cfg.data, where="data")

    return predict_graph(model, _to_container(cfg.data), list(map(str, inputs)), topk=topk, ckpt=str(ckpt),
                         batch_size=batch_size, make_datamodule=make_datamodule, data_info=info)


def predict(ckpt: str | os.PathLike, inputs: Sequence[str | os.PathLike] | str | os.PathLike, topk: int = 5,
            batch_size: int = 64, device: str = "cpu") -> list[dict[str, Any]]:
    """Top-``topk`` classes: [{"input", "top": [(class, prob)]}, plus "label" where the data has one: graph data with
    classes, and ``digits:N`` for a model of the ten digits (image files have none)]. ``inputs``: a list, or one
    input (a str or path).

    Image models: image files / folders / ``digits:<index>``, read and preprocessed ``batch_size`` at a time (a
    folder of any size is streamed, as timm's inference.py streams it through a DataLoader: only one batch of
    images is held) and classified on ``device`` (cpu, or cuda). A file that cannot be read (corrupt, truncated) is
    skipped with a line on stderr naming it, as timm's ImageDataset skips it; the other files are reported, and only
    inputs none of which can be read are an error. Graph models (zoo.tasks.graph.predict): nodes of the
    run's graph (``nodes:all|train|val|test|<i,j>``) or of a saved graph (a ``.pt`` file) for node classifiers,
    graphs (``graphs:...`` or a ``.pt`` list of Data) for graph classifiers."""
    from zoo.tasks.vision.data import _picture_tensor, read_image

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = _predict_device(device)
    if isinstance(inputs, (str, os.PathLike)):  # one input: a str is a sequence too, of one-letter "inputs"
        inputs = [inputs]
    inputs = [str(spec) for spec in inputs]
    model, info, cfg = _inference_model(ckpt)
    if _model_task(model) == "graph":
        if device.type != "cpu":
            raise ValueError(f"device={device}: zoo predict runs graph models on the cpu (device= is for image models)")
        return _predict_graph(model, cfg, info, ckpt, inputs, topk, batch_size)
    _require_image_classifier(model, ckpt, inputs)
    if getattr(model, "num_classes", None) == 0:
        raise ValueError(f"{ckpt}: {getattr(model, 'zoo_model_name', type(model).__name__)} has no classifier "
                         f"(num_classes=0: a feature backbone such as DINOv2 or SigLIP's tower); fine-tune a head first "
                         f"(zoo train ... model.pretrained={ckpt}) or use its features in Python")
    img_size = info.get("img_size") or (model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else None)
    if not img_size:
        raise ValueError(f"{ckpt}: no preprocessing facts (img_size) stored; use a .ckpt or released directory from zoo train")
    img_size = int(img_size)
    in_chans = int(info.get("in_chans") or getattr(model, "in_chans", 3))
    mean, std = list(info.get("mean") or [0.5]), list(info.get("std") or [0.5])
    names = list(info.get("class_names") or [])
    items = [item for spec in inputs for item in _collect_inputs(spec)]  # names only: nothing is read yet
    if not items:
        raise ValueError("no inputs given (input=<image file | folder | digits:<index>>)")
    transform = None
    if info.get("data_config"):  # a model released without a zoo train record: timm's evaluation transform
        height, width = info["data_config"]["input_size"][1:]
        if height != width:
            raise ValueError(f"{ckpt}: zoo predict resizes to square inputs; this model takes {height} x {width}")
        transform = released_eval_transform(info["data_config"])
    crop = _eval_crop(info)

    def batches():
        """(the batch's (label, source) items, its input tensor), batch_size inputs read at a time; unreadable
        files left out with a line naming them."""
        for start in range(0, len(items), batch_size):
            kept, tensors = [], []
            for label, source in items[start : start + batch_size]:
                if source == "digits":
                    tensors.append(_digits_image(label, img_size, in_chans, mean, std, transform, crop))
                else:
                    try:  # only the reading is forgiven: a preprocessing error is the same for every file
                        picture = read_image(source)
                    except (ValueError, OSError) as error:  # read_image's message names the file
                        print(f"zoo predict: skipped {error}", file=sys.stderr)
                        skipped.append(str(error))
                        continue
                    tensors.append(_picture_tensor(picture, img_size, in_chans, mean, std, transform, **crop))
                kept.append((label, source))
            if tensors:
                yield kept, torch.stack(tensors)

    # digits:N rows show the digit drawn as their label when the model's classes are the ten digits (a model of
    # other classes has no such class to compare with)
    digit_names = [str(i) for i in range(10)]
    digits_model = names == digit_names or (not names and getattr(model, "num_classes", None) == 10)
    digit_classes = _digit_classes() if digits_model and any(source == "digits" for _, source in items) else None
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    model = model.to(device)
    with torch.no_grad():
        for kept, batch in batches():
            probs = model(batch.to(device)).float().softmax(-1)
            values, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
            for (label, source), vals, idxs in zip(kept, values.tolist(), indices.tolist()):
                top = [(names[i] if i < len(names) else str(i), float(v)) for v, i in zip(vals, idxs)]
                row = {"input": label, "top": top}
                if source == "digits" and digit_classes is not None:  # the data's label, as graph rows show theirs
                    row["label"] = str(int(digit_classes[int(label.split(":", 1)[1])]))
                results.append(row)
    if not results:
        raise ValueError(skipped[0] if len(skipped) == 1 else f"none of the {len(skipped)} input images could be "
                         f"read (the first: {skipped[0]})")
    return results


def _digit_classes():
    """The class of each image of scikit-learn's digits (the digit drawn), which digits:N rows show as "label"."""
    from sklearn.datasets import load_digits

    return load_digits().target
