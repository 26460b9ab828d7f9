"""The ``zoo`` command line (console script ``zoo = "zoo.cli:main"``; also ``python -m zoo.cli``).

Commands::

    zoo train [experiment=<name>] [group=option ...] [key=value ...]   train (Hydra overrides)
    zoo eval ckpt=<.ckpt | released dir | run dir> [data=GROUP] [data.key=value ...]  test metrics
    zoo predict ckpt=<.ckpt | released dir | run dir> input=<image | folder | digits:N> [topk=5]
                graph models: input=<nodes:S | graphs:S | graph.pt>       top-k classes
    zoo list [pattern] [--task vision]                                 registered models
    zoo bench <name> [args]                                            zoo.bench.<name>.main(args)
    zoo viz <kind> [key=value ...]                                     attention pictures (PNG)
    zoo export [args]                                                  zoo.export.main(args)

Every command prints its own help with ``zoo <command> --help``.
"""
from __future__ import annotations

import difflib
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["main", "VIZ_COMMANDS"]

# `zoo viz <kind>` -> "module:function"; each function takes argv (key=value strings) and returns an exit code.
VIZ_COMMANDS: dict[str, str] = {
    "rollout": "zoo.tasks.vision.viz:rollout_main",
    "maxvit": "zoo.tasks.vision.viz_maxvit:maxvit_main",
    "agent": "zoo.tasks.vision.viz_agent:agent_main",
    "graph": "zoo.tasks.graph.viz:main",
    "mask": "zoo.mask_viz:mask_main",
}

TOP_HELP = """usage: zoo <command> [arguments]

Attention Zoo command line.

commands:
  train     train a model: zoo train experiment=vit_digits [run_dir=DIR] [key=value ...]
  eval      test metrics of a checkpoint: zoo eval ckpt=DIR/checkpoints/last.ckpt
  predict   top-5 classes: zoo predict ckpt=DIR/released input=image.png|folder|digits:0 (graph models:
            input=nodes:test|graphs:test|graph.pt)
  list      registered models: zoo list 'vit_*'
  bench     benchmarks: zoo bench attention|vision|vision_agent|vision_maxvit|graph|points|knn|relpos [args]
  viz       attention pictures: zoo viz rollout|maxvit|agent|graph|mask [key=value ...]
  export    export models (ONNX): zoo export [args]

`zoo <command> --help` describes each command; `zoo --version` prints the versions to quote in a bug report.
Exit status: 0 done, 1 a failed run (one error line on stderr), 2 a usage error (a bad command line).
"""

TRAIN_HELP = """usage: zoo train [experiment=NAME] [GROUP=OPTION ...] [KEY=VALUE ...] [--cfg [job|all] [--resolve]]
                 [--config-dir DIR] [--config-name NAME]
   or: zoo train -m|--multirun [sweep_dir=DIR] [experiment=NAME] KEY=A,B ['KEY=range(0,3)'] [GROUP=X,Y] ...

Train with Hydra configs from the installed package zoo.configs (groups: task, model, data, trainer,
logger, callbacks, experiment, debug, hparams_search: sweeps for -m). Overrides are Hydra's: `group=option` picks a config file,
`a.b=value` sets a key, `+a.b=value` adds a key (e.g. a model constructor argument).

Examples:
  zoo train experiment=vit_digits run_dir=outputs/demo
  zoo train experiment=vit_digits debug=fast                       # a few batches, end to end
  zoo train experiment=vit_digits trainer=ddp_cpu trainer.devices=2  # DDP on CPU (gloo)
  zoo train experiment=vit_digits ckpt_path=outputs/demo/checkpoints/last.ckpt trainer.max_epochs=200  # resume
  zoo train experiment=vit_digits model.pretrained=checkpoints/vit_digits data=image_folder data.root=DIR \
      data.img_size=8 data.in_chans=1 data.augment=crop data.hflip=0   # fine-tune on DIR/train/<class>/*.png

Top-level keys: name, seed, num_threads (torch threads), run_dir (default outputs/<name>/<time>), ckpt_path
(resume), test (evaluate after training), export (write <run_dir>/released via zoo.save_pretrained),
test_ckpt and export_ckpt (which weights the test and released/ use: final, as training ended, the default;
or best, <run_dir>/checkpoints/best.ckpt, as Lightning's trainer.test(ckpt_path="best"); metrics.json's
test_weights / released_weights and released/config.json's metadata.weights say which).
Outputs: <run_dir>/{config.yaml, checkpoints/{best,last}.ckpt, csv/, tensorboard/, released/, metrics.json}.
--cfg (or Hydra's --cfg job, -c all) prints the composed config and exits; with --resolve, interpolations resolved.
Your own configs: --config-dir DIR (or --config-dir=DIR, -cd DIR, hydra.searchpath=[file://DIR]) adds a folder
searched after zoo.configs, as Hydra does: DIR/experiment/mine.yaml, DIR/model/mine.yaml, ... are then
experiment=mine, model=mine (the packaged options keep their names). ${hydra:...} interpolations have no hydra
node to read (use ${run_dir}).
A primary config of your own: --config-name NAME (or --config-name=NAME, -cn NAME; NAME.yaml accepted) composes
NAME.yaml of a --config-dir folder in place of train.yaml, as Hydra does. It extends the packaged train.yaml, Hydra's
"extending configs" pattern: its defaults list starts with train and ends with _self_ (defaults: [train, _self_]),
with its group choices between them, and its own values follow:
    # myconf/my_run.yaml                           zoo train --config-dir myconf --config-name my_run task.lr=1e-3
    defaults: [train, {override /model: vit_debug}, _self_]
    seed: 7
It works with --cfg and -m (every job composed from it; sweep.json records it); the run's checkpoints record it, and
a resume (ckpt_path=) is composed from the same one (-cn NAME again: a resume without it is refused); zoo eval and
zoo predict read the run's stored config. In a subfolder (-cn sub/name) Hydra composes the file under the package
sub: start it with # @package _global_ and defaults: [/train, _self_]. Hydra's --config-path (-cp) would replace
zoo.configs itself: refused (use --config-dir DIR); --info is not supported.

Sweeps (-m / --multirun, as Hydra's basic sweeper): one job per combination of the swept values (a,b,c;
range(start,stop[,step]); choice(a,b); glob(pattern) over a group's options; a group: model=vit_debug,maxvit_debug),
the last override varying fastest; quote the functions for the shell ('seed=range(0,3)'). The jobs run one after
another in this process, each a zoo train into <sweep_dir>/<job number> (sweep_dir default
outputs/<name>/multirun/<date>_<time>); <sweep_dir>/sweep.json records each job's overrides, status, metrics and
seconds, and a table ends the sweep. A failed job does not stop the others (exit status 1 if any failed; 143 when
stopped by SIGTERM, 130 by Ctrl-C); a job's error that is not a user error keeps its traceback in
<sweep_dir>/<job>/error.txt (printed too with ZOO_DEBUG=1). Rerunning the same command with the same sweep_dir
keeps the finished jobs and resumes an interrupted one from its last.ckpt (in the stored job order, so shuffle()
sweeps continue too). --cfg prints each job's config (a job that does not compose: its error, in place; exit
status 1). Not with -m: run_dir= and ckpt_path= (each job has its own), hydra.* other than hydra.searchpath
(hydra.sweep.dir is sweep_dir=), ${...} in sweep_dir, interval() (for optimizing sweepers), multi-process DDP (its
ranks re-run the command line: the whole sweep).
e.g. zoo train -m experiment=graph_karate task.lr=1e-3,3e-3 'seed=range(0,3)' sweep_dir=outputs/lr_sweep  # 6 jobs
Sweeps in a config (Hydra's basic sweeper's hydra.sweeper.params, in the primary config, an experiment or an
hparams_search file starting with # @package _global_): its entries come first and the command line's after them;
a key in both (written alike: seed=, not +seed=) keeps its place and takes the command line's values. Without -m
they are ignored (as in Hydra; a note names them) unless the config sets hydra.mode: MULTIRUN, which sweeps as -m
does. Another sweeper's settings (Optuna's n_trials, sampler, override /hydra/sweeper) and hydra.sweep.dir/subdir
(the folder is sweep_dir=) are refused.
e.g. zoo train -m hparams_search=karate_lr                # configs/hparams_search/karate_lr.yaml: task.lr x seed
e.g. zoo train -m hparams_search=karate_lr seed=7,8       # seed's values replaced, task.lr's kept
"""

EVAL_HELP = """usage: zoo eval ckpt=<.ckpt | released dir | run dir> [split=test|val] [data=GROUP [--config-dir DIR]] [data.KEY=VALUE ...]

Evaluates a checkpoint written by `zoo train` (a .ckpt, or the released/ directory; a run directory means its
released/, else checkpoints/best.ckpt, else checkpoints/last.ckpt, named on stderr) on the data it was
trained with (the config stored in the checkpoint; data.* overrides change it, e.g. data.root=...).
data=GROUP evaluates on another data config of the model's domain, with the run's input size, channels,
normalisation, class count and evaluation resize/crop (data.crop_pct, data.interpolation: given, they win):
  zoo eval ckpt=checkpoints/vit_digits data=image_folder data.root=DIR    # DIR/test/<class>/*.png (else val/)
A data config of your own: --config-dir DIR (-cd DIR, repeatable) with data=GROUP reads DIR/data/GROUP.yaml
(zoo.configs' options come first, as zoo train --config-dir finds them).
Class folders that are the model's classes (all, in any order, or some) are matched to them by name; a
warning names the classes when the data's class names differ from training's. trainer.* settings of the run
apply (trainer.accelerator, trainer.precision; trainer.limit_test_batches=N for a quick look); it evaluates every
batch on one device unless told otherwise (trainer.devices / strategy are refused).
Prints the metrics as JSON.
"""

PREDICT_HELP = """usage: zoo predict ckpt=<.ckpt | released dir | run dir> input=<INPUT> [input=...] [topk=5] [json=true]
                  [batch_size=64] [device=cpu|cuda]

Prints the top-k classes with probabilities for each input (json=true: a JSON list of {"input", "top",
"label"}: the true class where the data has one, i.e. graph inputs with labels and digits:N for a model of
the ten digits; image files have none); topk beyond the class count gives every class.

Image models: input=<image file | folder of images | digits:N>. Files are converted to the model's channels,
resized and cropped as the run evaluated (its crop_pct, interpolation) and normalised as in training; digits:N
is image N of scikit-learn's digits, preprocessed as that digit saved as an 8-bit image file would be (the
digits' own upsampling for a run evaluated without a crop). Inputs are read batch_size at a time (a folder of
any size is streamed) and classified on device= (cpu; cuda or cuda:<index> for a GPU). A file that cannot be
read is skipped with a line naming it; the others are reported (an error only when none can be read).
A released directory without a zoo train record (zoo.save_pretrained from your own pipeline, or timm's
Hugging Face Hub files, e.g. ~/.cache/huggingface/hub/models--timm--<name>) is preprocessed with timm's
evaluation transform of the model's pretrained_cfg (resize, center crop, normalise); a timm ImageNet head
without label names in its config gets timm's ImageNet class descriptions.

Graph models (zoo train experiment=graph_*), with the run's data rebuilt from the checkpoint's config:
  node classification   input=nodes:all|train|val|test|<i,j,...>   nodes of the run's graph
                        input=graph.pt   every node of a graph saved with torch.save(Data(x=..., edge_index=...))
                        (or a dict of x, edge_index[, edge_attr]); x preprocessed as in training
                        (data.normalize_features row normalisation)
  graph classification  input=graphs:all|train|val|test|<i,j,...>   graphs of the run's data (graph i is the
                        i-th of graphs:all: the train, val, then test graphs)
                        input=graphs.pt   one prediction per graph of a torch.save'd list of Data (labels not
                        needed; graphs without x get one-hot degrees capped as the run's were when the run
                        trained on one-hot degrees, and are refused when it trained on node features x)
Files are read with torch.load(weights_only=True): nothing in them runs. DictionaryLookup models are scored
by zoo eval.
"""

LIST_HELP = """usage: zoo list [PATTERN ...] [--task TASK] [--json]

Registered models matching shell-style patterns (default '*'), as a table of name, task, family and
default input size.
"""


class UsageError(SystemExit):
    """A command-line usage error (an unknown command or key, a missing or malformed argument): exit status 2, as
    argparse's (and `zoo list`'s / `zoo bench`'s own argparse errors), so scripts tell a bad command line from a
    failed run (1). The message goes to stderr (:func:`main`)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 2


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    """" (did you mean 'x'?)" for the closest of ``choices`` to a misspelt ``name`` ("" when none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help", "help") for a in argv)


def _key_values(argv: Sequence[str], allowed: Sequence[str], command: str, passthrough_dotted: bool = False):
    values: dict[str, list[str]] = {}
    rest: list[str] = []
    for token in argv:
        if "=" not in token:
            raise UsageError(f"zoo {command}: expected key=value, got {token!r} (see zoo {command} --help)")
        key, value = token.split("=", 1)
        if key in allowed:
            values.setdefault(key, []).append(value)
        elif passthrough_dotted and "." in key:
            rest.append(token)
        else:
            raise UsageError(f"zoo {command}: unknown argument {key!r}{_did_you_mean(key, allowed)}; accepted: "
                             f"{', '.join(allowed)}" + (", data.*/task.* overrides" if passthrough_dotted else ""))
    return values, rest


def _config_options(groups: Sequence[str] = ("experiment", "model", "data", "task", "trainer", "logger", "callbacks",
                                             "debug", "hparams_search")) -> str:
    """The options of the main config groups, read from the installed zoo.configs package (what `group=option`
    can name)."""
    from zoo.train.run import _group_options

    lines = ["", "Options (zoo.configs):"]
    for group in groups:
        names = _group_options(group)
        if names:
            lines.append(f"  {group}: {', '.join(names)}")
    return "\n".join(lines)


def _cmd_train(argv: list[str]) -> int:
    from zoo.train import run

    if _wants_help(argv):
        print(TRAIN_HELP + _config_options())
        return 0
    print_cfg, resolve, config_dirs, config_name, overrides = _print_config_flags(argv)
    config_name = run.primary_config_name(config_name)
    if any(token in ("-m", "--multirun") for token in overrides):
        return _sweep(overrides, print_cfg, resolve, config_dirs, config_name)
    from zoo.train import sweep

    multirun, sweep_keys = sweep.config_sweep_keys(overrides, config_dirs, config_name=config_name)
    if multirun:  # Hydra's Hydra.get_mode: a config's hydra.mode: MULTIRUN sweeps without --multirun
        print("zoo train: note: the config sets hydra.mode: MULTIRUN, so this is a sweep (as Hydra runs it without "
              "--multirun), the same as zoo train -m", file=sys.stderr, flush=True)
        return _sweep(overrides, print_cfg, resolve, config_dirs, config_name)
    cfg = run.compose(overrides, config_name=config_name, config_dirs=config_dirs)
    _note_config_sweep(sweep_keys)
    if print_cfg:
        _print_config(cfg, resolve)
        return 0
    try:
        result = run.train(cfg, config_name=config_name, config_dirs=config_dirs)
    except SystemExit as stop:
        if not _terminated(stop):
            raise
        run_dir = Path(str(cfg.get("run_dir")))  # set by run.train before it trains
        where = run.resume_hint(run_dir, run.primary_config_flags(config_name, config_dirs))
        from lightning.pytorch.utilities import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:  # under DDP every process gets the signal: one line, not one each
            print(f"zoo train: terminated (SIGTERM) during the run in {run_dir}; {where}", file=sys.stderr,
                  flush=True)
        return _SIGTERM_EXIT
    if result.get("global_zero", True):  # in DDP only global rank 0 prints the summary
        _print_summary(result)
    return 0


def _print_config(cfg, resolve: bool) -> None:
    """Print the composed config (``--cfg``); with ``resolve``, the checks training makes of what the interpolations
    read come first (a model reading a key the data lacks, ``${hydra:...}``), and another interpolation that fails
    is named by its key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, InterpolationToMissingValueError, MissingMandatoryValue

    from zoo.train import run

    if resolve:
        run.check_no_hydra_resolver(cfg)
    try:
        if resolve:
            run._check_model_fits_data(cfg)  # "model X reads data.Y, which data Z does not have", as training says
        text = OmegaConf.to_yaml(cfg, resolve=resolve)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as error:  # a ${...} of a required (???) key
        key = str(error).splitlines()[0].rsplit(": ", 1)[-1]
        raise ValueError(f"--resolve: {key} is required (???) and other keys read it: set {key}=..., or print "
                         f"the config without --resolve") from None
    except InterpolationResolutionError as error:
        run.check_groups_present(cfg)  # a deleted group (~data) named as such
        key = getattr(error, "full_key", None) or "?"
        first = str(error).strip().splitlines()[0]
        raise ValueError(f"--resolve: {key} does not resolve: {first}; print the config without --resolve to see "
                         f"what it reads") from None
    print(text)


def _note_config_sweep(keys: Sequence[str]) -> None:
    """One line on stderr when the config holds a sweep (``hydra.sweeper.params``) and zoo train runs one config: a
    ``@hydra.main`` app without ``--multirun`` (and without ``hydra.mode: MULTIRUN`` in its config) ignores the
    sweeper and its params (Hydra runs one job with the config's own values), and so does zoo train; -m runs the
    sweep. Printed once under DDP: the other ranks re-run the command line with LOCAL_RANK (and, on other nodes,
    NODE_RANK or, under SLURM, SLURM_PROCID) set."""
    import os

    if keys and all(os.environ.get(name, "0") == "0" for name in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")):
        print(f"zoo train: note: the config defines a sweep (hydra.sweeper.params: {', '.join(keys)}), which zoo train "
              f"-m runs; without -m this is one run with the config's own values, as in Hydra", file=sys.stderr,
              flush=True)


def _sweep(argv: list[str], print_cfg: bool, resolve: bool, config_dirs: Sequence[str] = (),
           config_name: str = "train") -> int:
    """``zoo train -m``: the jobs of a Hydra sweep (zoo.train.sweep), run one after another; exit 1 if any failed,
    143 when stopped by SIGTERM, 130 when interrupted (Ctrl-C). With --cfg, each job's config is printed (headed by
    its number and overrides) and nothing runs; a job whose config does not compose shows its error in its place,
    and the exit status is then 1."""
    from zoo.train import run, sweep

    overrides, sweep_dir = sweep.split_sweep_arguments(argv)
    if print_cfg:
        root, jobs = sweep.plan(overrides, sweep_dir, config_dirs, config_name=config_name)
        broken = []
        for job in jobs:
            print(f"# job {job.number}: {' '.join(job.overrides)} (run_dir={job.run_dir})", flush=True)
            error = job.error
            if error is None:
                try:
                    _print_config(run.compose(job.run_overrides(), config_name=config_name, config_dirs=config_dirs),
                                  resolve)
                except Exception as problem:  # noqa: BLE001 -- shown in place; the other jobs are still printed
                    if not _is_user_error(problem) or _debugging():
                        raise
                    error = _one_line(problem)
            if error is not None:
                broken.append(job.number)
                print(f"# job {job.number}: error: {error}\n", flush=True)
        if broken:
            print(f"zoo train -m: {len(broken)} of {len(jobs)} job(s) do not compose (job "
                  f"{', '.join(map(str, broken))}); their errors are printed in place above", file=sys.stderr)
            return 1
        return 0
    try:
        root, records = sweep.run(overrides, sweep_dir, config_dirs, config_name=config_name)
    except KeyboardInterrupt:  # Ctrl-C between Lightning's fits (composing, the checks before a job trains)
        return _INTERRUPT_EXIT  # sweep.run has said where the sweep stopped and how to continue it
    except SystemExit as stop:  # Lightning turns Ctrl-C into sys.exit(1), and SIGTERM into SIGTERMException
        return _SIGTERM_EXIT if _terminated(stop) else _INTERRUPT_EXIT
    sweep.print_table(root, records)
    return 1 if any(record["status"] != "ok" for record in records) else 0


#: the exit status of a run stopped by SIGTERM, as a shell reports a process killed by it (128 + 15)
_SIGTERM_EXIT = 143
#: the exit status of a sweep stopped by Ctrl-C (SIGINT: 128 + 2, as a shell reports an interrupted process), apart
#: from 1 (a job failed), so that a script can tell "rerun to continue" from "a job failed"
_INTERRUPT_EXIT = 130


def _debugging() -> bool:
    """ZOO_DEBUG=1 (or zoo's test hook): errors are raised with their traceback instead of printed in one line."""
    import os

    return bool(getattr(sys, "_zoo_debug", False) or os.environ.get("ZOO_DEBUG"))


def _terminated(stop: SystemExit) -> bool:
    """Whether zoo train stopped on SIGTERM (a cluster's scheduler, ``kill``, ``docker stop``): Lightning catches it
    and raises SIGTERMException, a SystemExit without a code, after which the process exited 0 as if the run had
    ended; a scheduler would take the run for done. It now exits 143, as a process killed by SIGTERM does."""
    from zoo.train import sweep

    return sweep._is_sigterm(stop)


# Hydra's command-line flags (hydra/_internal/utils.py get_args_parser) that zoo train does not take, and why
_UNSUPPORTED_FLAGS = {
    # Hydra: "Overrides the config_path specified in hydra.main() ... absolute or relative to the Python file
    # declaring @hydra.main()": it replaces the application's own config folder (the "main" entry of the search
    # path), which for zoo train is the installed zoo.configs, where train.yaml and every packaged option live; taken
    # as Hydra takes it, no packaged config would be found; taken as --config-dir, it would mean something else than
    # in Hydra. So it is refused, naming the two flags that do what a Hydra user wants from it.
    "--config-path": "Hydra's --config-path replaces the application's config folder, which for zoo train is the "
                     "installed zoo.configs (train.yaml and every packaged option); keep it and add your folder with "
                     "--config-dir DIR, and pick a primary config of yours there with --config-name NAME (its "
                     "defaults list starting with - train and - _self_)",
    "--info": "Hydra's --info is not supported; zoo train --help lists the config groups and their options, and "
              "zoo train ... --cfg job prints the composed config",
    "--package": "Hydra's --package applies to --cfg's printed node, which is always the whole config here",
    "--hydra-help": "zoo train --help describes zoo train",
    "--shell-completion": "shell completion is not supported",
    "--experimental-rerun": "rerun a run with its own overrides, or resume it with ckpt_path=<run_dir>/checkpoints/"
                            "last.ckpt",
    "--run": "zoo train runs one config by default (-m runs a sweep)",
}
_SHORT_FLAGS = {"-cn": "--config-name", "-cp": "--config-path", "-i": "--info", "-p": "--package",
                "-sc": "--shell-completion", "-r": "--run", "-cd": "--config-dir", "-c": "--cfg"}
_SUPPORTED_FLAGS = ("--cfg job|all [--resolve], --config-dir DIR (-cd DIR), --config-name NAME (-cn NAME), "
                    "-m/--multirun; overrides are key=value, group=option, +key=value, ~key (zoo train --help)")


def _print_config_flags(argv: Sequence[str]) -> tuple[bool, bool, list[str], Optional[str], list[str]]:
    """(print the config?, resolved?, the user's config folders, the primary config's name or None, the overrides)
    from ``zoo train`` arguments, with Hydra's spellings of its flags (hydra/_internal/utils.py get_args_parser):
    ``--cfg job|all``, ``--cfg=job``, ``-c job``, ``--resolve`` (interpolations resolved in the printed config),
    ``--config-dir DIR`` / ``--config-dir=DIR`` / ``-cd DIR`` (a folder of the user's own configs, searched after
    zoo.configs as Hydra searches it; given several times, each is added) and ``--config-name NAME`` /
    ``--config-name=NAME`` / ``-cn NAME`` (the primary config, NAME.yaml on that search path, in place of
    train.yaml; given twice it is refused, where Hydra's argparse keeps the last silently). ``--cfg`` alone prints
    too. The zoo config is the job's config: ``--cfg hydra`` (Hydra's own node) is refused in one line, as are
    Hydra's flags zoo train does not take (--config-path, --info, ...), naming what it supports."""
    print_cfg, resolve, config_dirs, config_name, overrides = False, False, [], None, []
    tokens = list(argv)
    while tokens:
        token = tokens.pop(0)
        flag, has_value, value = token.partition("=")
        long_flag = _SHORT_FLAGS.get(flag, flag)
        if long_flag == "--cfg":
            print_cfg = True
            if not has_value and tokens and tokens[0] in ("job", "hydra", "all"):
                value, has_value = tokens.pop(0), True
            if has_value and value not in ("job", "all"):
                what = ("zoo train composes without Hydra's app runner, so its config has no hydra node"
                        if value == "hydra" else f"{value!r} is not one of Hydra's job, hydra, all")
                raise ValueError(f"{flag} {value}: {what}; {flag} job (or all) prints the composed config")
        elif token == "--resolve":
            resolve = True
        elif long_flag == "--config-dir":
            config_dirs.append(_flag_folder(flag, has_value, value, tokens))
        elif long_flag == "--config-name":
            if not has_value:
                if not tokens or not tokens[0] or tokens[0].startswith("-"):
                    raise ValueError(f"{flag} needs a name: {flag} NAME (your primary config, NAME.yaml in a "
                                     f"--config-dir folder)")
                value = tokens.pop(0)
            if not value:
                raise ValueError(f"{flag}= is empty: give the name of your primary config ({flag} NAME)")
            name = value
            if config_name is not None:
                raise ValueError(f"the primary config is named twice (--config-name {config_name}, then {flag} "
                                 f"{name}): give --config-name (-cn) once")
            config_name = name
        elif long_flag in _UNSUPPORTED_FLAGS:
            raise ValueError(f"{token}: {_UNSUPPORTED_FLAGS[long_flag]}; zoo train supports {_SUPPORTED_FLAGS}")
        elif token.startswith("-") and token not in ("-m", "--multirun"):
            raise ValueError(f"{token} is not a zoo train flag; zoo train supports {_SUPPORTED_FLAGS}")
        else:
            overrides.append(token)
    if resolve and not print_cfg:
        raise ValueError("--resolve resolves the config that --cfg prints: add --cfg job (training always resolves it)")
    return print_cfg, resolve, config_dirs, config_name, overrides


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"zoo train: {result['run_dir']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(result["metrics"].items()):
        # (small values, e.g. a fine-tuning lr of 6e-6, printed as 0.0000 with 4 decimals)
        table.add_row(key, f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3e}")
    table.add_row("train seconds", f"{result['seconds']:.1f}")
    Console().print(table)
    if result.get("last_ckpt"):
        print(f"last checkpoint: {result['last_ckpt']}")
    if result.get("released"):
        print(f"released weights: {result['released']}")


def _config_dir_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the ``--config-dir`` folders, the other arguments) of a command that takes no other flag (zoo eval), with
    Hydra's spellings ``--config-dir DIR``, ``--config-dir=DIR`` and ``-cd DIR``."""
    folders, rest, tokens = [], [], list(argv)
    while tokens:
        token = tokens.pop(0)
        flag, has_value, value = token.partition("=")
        if _SHORT_FLAGS.get(flag, flag) != "--config-dir":
            rest.append(token)
            continue
        folders.append(_flag_folder(flag, has_value, value, tokens))
    return folders, rest


def _flag_folder(flag: str, has_value: bool, value: str, tokens: list[str]) -> str:
    """The folder of a ``--config-dir`` flag: ``--config-dir=DIR``'s value, else the next token (taken from
    ``tokens``); a missing or empty one is refused, naming the flag as written."""
    if not has_value:
        if not tokens or not tokens[0] or tokens[0].startswith("-"):
            raise ValueError(f"{flag} needs a folder: {flag} DIR (the folder of your own configs)")
        value = tokens.pop(0)
    if not value:
        raise ValueError(f"{flag}= is empty: give the folder of your own configs ({flag} DIR)")
    return value


def _cmd_eval(argv: list[str]) -> int:
    from zoo.train import run

    if _wants_help(argv):
        print(EVAL_HELP)
        return 0
    config_dirs, argv = _config_dir_flags(argv)
    values, overrides = _key_values(argv, ("ckpt", "split", "data"), "eval", passthrough_dotted=True)
    if "ckpt" not in values:
        raise UsageError("zoo eval: ckpt=<.ckpt or released directory> is required")
    if config_dirs and "data" not in values:
        raise ValueError("zoo eval: --config-dir is where data=GROUP looks for your own data config "
                         "(<DIR>/data/GROUP.yaml); give data=GROUP with it")
    if "data" in values:  # another data config of the model's domain, before its data.* overrides
        overrides = [f"data={values['data'][-1]}", *overrides]
    metrics = run.evaluate(values["ckpt"][-1], overrides, split=values.get("split", ["test"])[-1],
                           config_dirs=config_dirs)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _cmd_predict(argv: list[str]) -> int:
    from zoo.train import run

    if _wants_help(argv):
        print(PREDICT_HELP)
        return 0
    values, _ = _key_values(argv, ("ckpt", "input", "topk", "json", "batch_size", "device"), "predict")
    if "ckpt" not in values or "input" not in values:
        raise UsageError("zoo predict: ckpt=<checkpoint> and input=<image|folder|digits:N> (graph models: "
                         "input=<nodes:S|graphs:S|graph.pt>) are required")
    try:
        topk = int(values.get("topk", ["5"])[-1])
    except ValueError:
        raise UsageError(f"zoo predict: topk must be an integer, got {values['topk'][-1]!r}") from None
    as_json = values.get("json", ["false"])[-1].lower()
    if as_json not in ("1", "true", "yes", "0", "false", "no"):
        raise UsageError(f"zoo predict: json must be true or false, got {values['json'][-1]!r}")
    try:
        batch_size = int(values.get("batch_size", ["64"])[-1])
    except ValueError:
        raise UsageError(f"zoo predict: batch_size must be an integer, got {values['batch_size'][-1]!r}") from None
    results = run.predict(values["ckpt"][-1], values["input"], topk=topk, batch_size=batch_size,
                          device=values.get("device", ["cpu"])[-1])
    if as_json in ("1", "true", "yes"):
        print(json.dumps(results, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    shown = max((len(row["top"]) for row in results), default=topk)  # topk beyond the class count: every class
    table = Table(title=f"top-{shown} predictions")
    table.add_column("input")
    labelled = any("label" in row for row in results)  # graph data with classes: the true one beside the top-k
    if labelled:
        table.add_column("label")
    for rank in range(1, shown + 1):
        table.add_column(f"#{rank}", justify="right")
    for row in results:
        label = [row.get("label", "")] if labelled else []
        table.add_row(row["input"], *label, *[f"{name} ({prob:.3f})" for name, prob in row["top"]])
    console = Console()
    if not console.is_terminal:  # piped or redirected: Rich's 80 columns would cut the paths and the cells
        console = Console(width=max(80, 12 + max((len(r["input"]) for r in results), default=0) + 22 * shown
                                    + 8 * labelled))
    console.print(table)
    return 0


def _cmd_list(argv: list[str]) -> int:
    import argparse

    import zoo

    parser = argparse.ArgumentParser(prog="zoo list", description=LIST_HELP.split("\n\n", 1)[1])
    parser.add_argument("patterns", nargs="*", default=["*"])
    parser.add_argument("--task", default=None)
    parser.add_argument("--json", action="store_true", help="print a JSON list of names")
    args = parser.parse_args(argv)
    if args.task is not None:
        tasks = sorted({zoo.get_model_entry(name).task for name in zoo.list_models("*")})
        if args.task not in tasks:
            raise UsageError(f"zoo list: unknown task {args.task!r} for --task{_did_you_mean(args.task, tasks)}; "
                             f"tasks: {', '.join(tasks)}")
    names = zoo.list_models(args.patterns or ["*"], task=args.task)
    if args.json:
        print(json.dumps(names))
        return 0
    if not names:
        close = difflib.get_close_matches(args.patterns[0].strip("*"), zoo.list_models("*"), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else "; zoo list shows them all"
        print(f"zoo list: no model matches {' '.join(args.patterns)}"
              + (f" in task {args.task}" if args.task else "") + hint, file=sys.stderr)
        return 1
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(names)} registered models")
    for column in ("name", "task", "family", "input size"):
        table.add_column(column)
    for name in names:
        entry = zoo.get_model_entry(name)
        size = entry.default_cfg.get("input_size")
        table.add_row(name, entry.task, entry.family, "x".join(map(str, size)) if size else "")
    Console().print(table)
    return 0 if names else 1


def _load_entry(spec: str, what: str) -> Callable[[list[str]], int]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise SystemExit(f"{what}: {module_name} is not available in this installation ({error})") from None
        raise
    fn = getattr(module, attr or "main", None)
    if not callable(fn):
        raise SystemExit(f"{what}: {module_name} has no {attr or 'main'}(argv) function")
    return fn


def _bench_names() -> list[str]:
    import pkgutil

    import zoo.bench

    return sorted(m.name for m in pkgutil.iter_modules(zoo.bench.__path__) if m.name != "timing" and not m.name.startswith("_"))


def _cmd_bench(argv: list[str]) -> int:
    available = _bench_names()
    if not argv or _wants_help(argv[:1]):
        print(f"usage: zoo bench <name> [args]   (runs zoo.bench.<name>.main(args))\navailable: {', '.join(available)}")
        return 0 if argv else 2
    name = argv[0]
    if name not in available:
        raise UsageError(f"zoo bench: unknown benchmark {name!r}{_did_you_mean(name, available)}; available: "
                         f"{', '.join(available)}")
    return int(_load_entry(f"zoo.bench.{name}:main", f"zoo bench {name}")(argv[1:]) or 0)


def _cmd_viz(argv: list[str]) -> int:
    if not argv or _wants_help(argv[:1]):
        print("usage: zoo viz <kind> [key=value ...]   (zoo viz <kind> --help for its keys)\nkinds: " + ", ".join(VIZ_COMMANDS))
        return 0 if argv else 2
    kind = argv[0]
    if kind not in VIZ_COMMANDS:
        raise UsageError(f"zoo viz: unknown kind {kind!r}{_did_you_mean(kind, list(VIZ_COMMANDS))}; kinds: "
                         f"{', '.join(VIZ_COMMANDS)}")
    if kind in VISION_VIZ:
        _require_vision_model(f"zoo viz {kind}", VISION_VIZ[kind], argv[1:], "zoo viz graph draws graph attention")
    return int(_load_entry(VIZ_COMMANDS[kind], f"zoo viz {kind}")(argv[1:]) or 0)


# the viz kinds that draw a vision model, and what each needs (checked before the drawing code runs)
VISION_VIZ = {"rollout": "a vision transformer (ViT)", "maxvit": "a MaxViT vision model", "agent": "an Agent-ViT vision model"}


def _checkpoint_model_name(path: str) -> Optional[str]:
    """The registered model name stored in a released directory / .safetensors / zoo train .ckpt; None if unknown."""
    from pathlib import Path

    p = Path(path).expanduser()
    try:
        if p.suffix == ".ckpt":
            if not p.is_file():
                return None
            import torch

            # mmap: the weights stay on disk (only the name is read here; the command loads the file itself)
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            name = ((ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}).get("model_name")
            return name if isinstance(name, str) else None
        from zoo.hub import read_config

        config = read_config(p) if p.exists() else None
        return config.get("model_name") if config else None
    except Exception:  # unreadable: the command itself reports it
        return None


def _require_vision_model(command: str, needs: str, argv: Sequence[str], hint: str) -> None:
    """One line when model=/ckpt= names a registered model of another task (graph, ...)."""
    import zoo

    for token in argv:
        key, _, value = token.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if key not in ("model", "ckpt") or not value:
            continue
        name = value if key == "model" else _checkpoint_model_name(value)
        if name and zoo.is_model(name):
            task = zoo.get_model_entry(name).task
            if task != "vision":
                held = f"model={name} is" if key == "model" else f"{value} holds {name},"
                raise SystemExit(f"{command} needs {needs}; {held} a {task} model ({hint})")


def _check_export_argv(argv: list[str]) -> None:
    """zoo export of a graph checkpoint is refused here (one line); zoo.export.main checks its own keys."""
    _require_vision_model("zoo export", "a vision model (it exports image classifiers to ONNX)",
                          [t for t in argv if t.partition("=")[0].lstrip("-") == "ckpt"], "graph models are not exported")


def _cmd_export(argv: list[str]) -> int:
    if not _wants_help(argv):
        _check_export_argv(argv)
    return int(_load_entry("zoo.export:main", "zoo export")(argv) or 0)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "predict": _cmd_predict,
    "list": _cmd_list,
    "bench": _cmd_bench,
    "viz": _cmd_viz,
    "export": _cmd_export,
}


def _quiet_third_party() -> None:
    import os
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")  # Lightning's "possible user warning" hints

    import logging

    class _NoTips(logging.Filter):  # Lightning advertises a cloud logger on every run
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


def _one_line(error: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker ("Caught ValueError in DataLoader worker
    process 0. Original Traceback ..."), the worker's own message, its traceback's last line."""
    text = str(error)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
        name = type(error).__name__ + ": "
        return last[len(name):] if last.startswith(name) else last
    return text


def _is_user_error(error: BaseException) -> bool:
    """Errors that describe bad input (printed as one line): ours, and Lightning's MisconfigurationException
    (e.g. trainer.devices larger than the machine has)."""
    if isinstance(error, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          PermissionError, TypeError, KeyError)):
        return True
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    return lightning_errors is not None and isinstance(error, lightning_errors.MisconfigurationException)


def version_report() -> str:
    """``zoo --version``: the zoo's version and those of the libraries its results depend on (for bug reports)."""
    import importlib.metadata
    import platform

    import torch

    import zoo

    lines = [f"zoo {zoo.__version__}", f"python {platform.python_version()} ({platform.machine()}, {platform.system()})"]
    for package in ("torch", "triton", "torchvision", "torchaudio", "lightning", "timm", "torch_geometric",
                    "hydra-core", "safetensors", "numpy"):
        try:
            lines.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{package} not installed")
    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
            else f"no CUDA device (torch built for CUDA {torch.version.cuda})" if torch.version.cuda else "CPU-only torch")
    lines.append(f"device: {cuda}; torch threads {torch.get_num_threads()}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(argv)
    except UsageError as error:  # exit status 2 (its code), the message on stderr
        print(error, file=sys.stderr)
        raise
    except BrokenPipeError:
        # the reader went away (`zoo list --json | head -c 10`, `zoo --help | true`): stop quietly, as Unix tools do,
        # with the exit status of SIGPIPE; stdout is pointed at /dev/null so that the interpreter's final flush does
        # not raise again
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_third_party()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(TOP_HELP)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("--version", "-V", "version"):
        print(version_report())
        return 0
    if command not in COMMANDS:
        raise UsageError(f"zoo: unknown command {command!r}{_did_you_mean(command, list(COMMANDS))}; commands: "
                         f"{', '.join(COMMANDS)} (zoo --help)")
    try:
        return COMMANDS[command](rest)
    except BrokenPipeError:
        raise
    except Exception as error:  # user errors: one clear line
        if not _is_user_error(error) or _debugging():
            raise
        print(f"zoo {command}: error: {_one_line(error)}\n(set ZOO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
