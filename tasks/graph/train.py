"""Runner of the graph experiments through the same pipeline as ``zoo train`` (zoo.train.run), and the
DictionaryLookup table.

``zoo train experiment=graph_dictlookup model=gatv2 data.k=10`` is the CLI way. :func:`fit` runs exactly
that (``zoo.train.run.compose`` + ``zoo.train.run.train``: same configs, same builder, same Trainer), with
no logger, no checkpoint callbacks and no export, into a run directory (a temporary one by default), and
returns the figures the table needs. The table command:

    python -m zoo.tasks.graph.train --table 10 [--out docs/graph.md] [--runs gatv2:1,gat:1,gat:8]
                                    [--max-epochs N] [overrides ...]

trains GATv2 with 1 head, GAT with 1 head and GAT with 8 heads on DictionaryLookup(k) one after the
other (each run is the ``zoo train`` command printed in the table's comment) and prints a markdown table
(k, model, heads, train / test accuracy, epochs, time). With ``--out`` the table replaces the block
between ``<!-- dictlookup-table:start -->`` and ``<!-- dictlookup-table:end -->`` of that file (appended
when the markers are absent), with the date, the machine, the load average and the commands. ``--max-epochs N``
and any ``overrides`` (``data.batch_size=256``, ``trainer.max_epochs=20``) apply to every run of the table and are
written into its ``zoo train`` command lines; overrides of what the table sets itself (``experiment``, ``data``,
``data.k``, ``model``, ``model.name``, ``model.heads``: use ``--table`` / ``--runs``) are refused.

    python -m zoo.tasks.graph.train experiment=graph_karate trainer.max_epochs=50   # any one run, as JSON

One run takes ``--max-epochs N`` as ``trainer.max_epochs=N``; ``--runs`` and ``--out`` are refused there (only with
``--table``), as is ``--max-epochs`` together with a ``trainer.max_epochs=`` override.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
from typing import Optional, Sequence

import torch

__all__ = ["compose", "fit", "main", "dictlookup_table", "write_table", "TABLE_RUNS"]

def compose(overrides: Sequence[str]):
    """The ``zoo train`` config for ``overrides`` (zoo.train.run.compose)."""
    from zoo.train import run

    return run.compose(list(overrides))


def fit(cfg, *, verbose: bool = True, run_dir: Optional[str] = None) -> dict:
    """``zoo train`` for a composed config (zoo.train.run.train) without loggers, checkpoint callbacks or
    export (``run_dir``: a temporary directory unless given); progress bar only when ``verbose``. Returns
    {"model", "heads", "train_acc", "test_acc", "test_graph_acc", "epochs", "seconds", "run_dir"}:
    train_acc is ``train/acc1`` (mini-batch runs: the mean training accuracy of the last epoch; node
    classification: the eval-mode accuracy on the training nodes at the last validation), test accuracies
    are those of the final weights on the test split. run_dir is None when the run went to a temporary
    directory: that directory is deleted on return, so its path would name nothing."""
    from omegaconf import OmegaConf

    from zoo.train import run

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.logger, cfg.callbacks, cfg.export = None, None, False
    if not verbose:
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    kept_dir = run_dir or cfg.get("run_dir")
    with tempfile.TemporaryDirectory(prefix="zoo-graph-") as tmp:
        cfg.run_dir = kept_dir or os.path.join(tmp, "run")
        result = run.train(cfg)
    metrics = result["metrics"]
    nan = float("nan")
    return {
        "model": cfg.model.name, "heads": cfg.model.get("heads"), "epochs": result["epoch"],
        "seconds": result["seconds"], "train_acc": metrics.get("train/acc1", nan),
        "test_acc": metrics.get("test/acc1", nan), "test_graph_acc": metrics.get("test/graph_acc"),
        "run_dir": result["run_dir"] if kept_dir else None,
    }


TABLE_RUNS = (("gatv2", 1), ("gat", 1), ("gat", 8))
_START, _END = "<!-- dictlookup-table:start -->", "<!-- dictlookup-table:end -->"


def _load() -> str:
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1/5/15 min)"
    except OSError:  # pragma: no cover
        return "load average unknown"


def _table_command(k: int, max_epochs: Optional[int], runs, overrides: Sequence[str] = ()) -> str:
    """The table command that trains these runs (the block's record when no command line is given)."""
    command = f"python -m zoo.tasks.graph.train --table {k}"
    if max_epochs is not None:
        command += f" --max-epochs {max_epochs}"
    if tuple(runs) != TABLE_RUNS:
        command += " --runs " + ",".join(f"{conv}:{heads}" for conv, heads in runs)
    return " ".join([command, *map(shlex.quote, overrides)])


# what each table run sets itself, and the option of the table command that chooses it
_TABLE_KEYS = {"experiment": "--table", "data": "--table", "data.k": "--table K", "model": "--runs",
               "model.name": "--runs", "model.heads": "--runs"}


def _override_key(override: str) -> str:
    """The config key of a Hydra override (``+a.b=1``, ``++a.b=1``, ``~a.b`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def _max_epochs_conflict(overrides: Sequence[str], max_epochs: Optional[int]) -> Optional[str]:
    """A ``trainer.max_epochs=`` override given with ``--max-epochs``: the message, else None."""
    given = [o for o in overrides if _override_key(o) == "trainer.max_epochs"]
    if max_epochs is None or not given:
        return None
    return f"--max-epochs {max_epochs} and {given[0]} both set trainer.max_epochs: give one of them"


def _table_override_conflict(overrides: Sequence[str], max_epochs: Optional[int]) -> Optional[str]:
    """An override that would change what the table's rows name (their k, model, heads) or set trainer.max_epochs
    twice: the message, else None."""
    for override in overrides:
        option = _TABLE_KEYS.get(_override_key(override))
        if option is not None:
            return (f"{override} would change what the table sets for each run (experiment=graph_dictlookup, data.k, "
                    f"model, model.heads): use {option} for it")
    return _max_epochs_conflict(overrides, max_epochs)


def dictlookup_table(k: int, max_epochs: Optional[int] = None, runs=TABLE_RUNS, verbose: bool = False,
                     command: Optional[str] = None, overrides: Sequence[str] = ()) -> str:
    """Train each (conv, heads) of ``runs`` on DictionaryLookup(k) with ``zoo train`` and return a
    markdown block: the command that ran (``command``: the command line as typed, which :func:`main` passes;
    else the table command for these arguments), the ``zoo train`` commands, the machine, the load, and the
    table. ``overrides`` (Hydra ``key=value``) are appended to every run's, after ``trainer.max_epochs`` of
    ``max_epochs``; those that set what the table sets (experiment, data, data.k, model, model.name, model.heads,
    or trainer.max_epochs with ``max_epochs``) are refused with a ValueError."""
    from zoo.bench.timing import machine_description

    overrides = list(overrides)
    conflict = _table_override_conflict(overrides, max_epochs)
    if conflict is not None:
        raise ValueError(conflict)
    commands, rows = [], []
    header = ["| k | model | heads | train acc (last epoch) | test acc | test graph acc | epochs | time (s) | "
              "load avg after |", "|---|---|---|---|---|---|---|---|---|"]
    start = datetime.datetime.now(datetime.timezone.utc)
    for conv, heads in runs:
        run_overrides = ["experiment=graph_dictlookup", f"model={conv}", f"model.heads={heads}", f"data.k={k}"]
        if max_epochs is not None:
            run_overrides.append(f"trainer.max_epochs={max_epochs}")
        run_overrides += overrides
        commands.append("zoo train " + " ".join(map(shlex.quote, run_overrides)))
        r = fit(compose(run_overrides), verbose=verbose)
        graph_acc = "-" if r["test_graph_acc"] is None else f"{r['test_graph_acc']:.3f}"
        rows.append(f"| {k} | {conv} | {heads} | {r['train_acc']:.3f} | {r['test_acc']:.3f} | {graph_acc} | "
                    f"{r['epochs']} | {r['seconds']:.0f} | {os.getloadavg()[0]:.1f} |")
        print(rows[-1], flush=True)
    lines = [f"`{command or _table_command(k, max_epochs, runs, overrides)}` ran, one after the other:", ""]
    lines += [f"    {c}" for c in commands]
    lines += ["", f"date: {start:%Y-%m-%d %H:%M} UTC; machine: {machine_description()}; torch threads "
              f"{torch.get_num_threads()}; {_load()} at the end.", ""]
    return "\n".join(lines + header + rows)


def write_table(path: str, block: str) -> None:
    """Replace the marked DictionaryLookup block of ``path`` (or append it)."""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    marked = f"{_START}\n{block}\n{_END}"
    if _START in text and _END in text:
        text = re.sub(re.escape(_START) + r".*?" + re.escape(_END), lambda _m: marked, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + marked + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


_PROG = "python -m zoo.tasks.graph.train"


def main(argv: Optional[list[str]] = None) -> int:
    """The command line (see the module docstring). Bad settings end as ``zoo train``'s do: one line naming the
    problem and the ZOO_DEBUG hint (zoo.cli's own handling of user errors), not a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except Exception as error:
        from zoo.cli import _debugging, _is_user_error, _one_line

        if not _is_user_error(error) or _debugging():
            raise
        print(f"{_PROG}: error: {_one_line(error)}\n(set ZOO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=_PROG, description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--table", type=int, default=None, metavar="K", help="DictionaryLookup table for size K")
    parser.add_argument("--out", default=None,
                        help="with --table: write the table into this markdown file (marked block)")
    parser.add_argument("--max-epochs", type=int, default=None, metavar="N",
                        help="trainer.max_epochs=N of every table run, or of the one run")
    parser.add_argument("--runs", default=None, help="with --table: conv:heads list, conv one of gatv2, gat, transformer (default gatv2:1,gat:1,gat:8)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("overrides", nargs="*", help="experiment=... group=choice a.b=value (with --table: appended to "
                        "every run's)")
    args = parser.parse_args(argv)
    if args.table is None:  # one run: the table's options would be dropped without a word
        for option, value in (("--runs", args.runs), ("--out", args.out)):
            if value is not None:
                parser.error(f"{option} applies only with --table (one run prints its figures as JSON)")
        conflict = _max_epochs_conflict(args.overrides, args.max_epochs)
        if conflict is not None:
            parser.error(conflict)
    else:
        conflict = _table_override_conflict(args.overrides, args.max_epochs)
        if conflict is not None:
            parser.error(conflict)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.table is not None:
        runs = TABLE_RUNS
        if args.runs:
            try:
                runs = tuple((r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(","))
            except (IndexError, ValueError):
                raise SystemExit(f"{_PROG}: error: --runs must look like gatv2:1,gat:8, got {args.runs!r}") from None
        block = dictlookup_table(args.table, args.max_epochs, runs, command=" ".join([_PROG, *map(shlex.quote, argv)]),
                                 overrides=args.overrides)
        print(block)
        if args.out:
            write_table(args.out, block)
        return 0
    overrides = list(args.overrides)
    if args.max_epochs is not None:
        overrides.append(f"trainer.max_epochs={args.max_epochs}")
    result = fit(compose(overrides))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
