"""Standalone runner of the graph experiments over the project's Hydra configs (zoo.configs).

``zoo train experiment=graph_dictlookup model=gatv2 data.k=10`` is the CLI way; this module composes
the same root config (``train.yaml``) with the same overrides and instantiates the same objects
(``cfg.model`` -> zoo.create_model, ``cfg.data`` -> a DataModule, ``cfg.task`` -> a LightningModule
given the model), with a quiet Trainer (no logger, no checkpoints). It exists for the DictionaryLookup
table and for tests that must not depend on the CLI:

    python -m zoo.tasks.graph.train experiment=graph_dictlookup model=gatv2 data.k=10
    python -m zoo.tasks.graph.train --table 10 [--out docs/graph.md]   # the DictionaryLookup table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import torch

__all__ = ["compose", "build", "fit", "main", "dictlookup_table"]


def compose(overrides: list[str]):
    """The root config ``train`` of zoo.configs with ``overrides`` (Hydra compose, no working dir change)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def build(cfg):
    """-> (LightningModule, DataModule) instantiated from a composed config."""
    import lightning as L
    from hydra.utils import instantiate

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    module = instantiate(cfg.task, model=model)
    return module, datamodule


def fit(cfg, *, verbose: bool = True) -> dict:
    """Train, then test; returns {"model", "train_acc", "test_acc", "test_graph_acc", "epochs", "seconds"}."""
    import lightning as L
    from omegaconf import OmegaConf

    module, datamodule = build(cfg)
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg.pop("_target_", None)
    tcfg.update(logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=verbose)
    trainer = L.Trainer(**tcfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    seconds = time.perf_counter() - start
    train_acc = trainer.callback_metrics.get("train/acc1")
    test = trainer.test(module, datamodule, verbose=False)[0]
    return {
        "model": cfg.model.name, "heads": cfg.model.get("heads"), "epochs": trainer.current_epoch,
        "seconds": seconds, "train_acc": float("nan") if train_acc is None else float(train_acc),
        "test_acc": float(test.get("test/acc1", float("nan"))),
        "test_graph_acc": float(test["test/graph_acc"]) if "test/graph_acc" in test else None,
    }


TABLE_RUNS = (("gatv2", 1), ("gat", 1), ("gat", 8))


def dictlookup_table(k: int, out: Optional[str] = None, max_epochs: Optional[int] = None,
                     runs=TABLE_RUNS) -> str:
    """Train GATv2-1h, GAT-1h and GAT-8h on DictionaryLookup(k) and return (and write) a markdown table.
    Accuracies are those of the final weights (training stops early once test accuracy >= 0.999)."""
    rows = ["| k | model | heads | train acc | test acc | test graph acc | epochs | time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for conv, heads in runs:
        overrides = ["experiment=graph_dictlookup", f"model={conv}", f"model.heads={heads}", f"data.k={k}"]
        if max_epochs is not None:
            overrides.append(f"trainer.max_epochs={max_epochs}")
        r = fit(compose(overrides), verbose=False)
        rows.append(f"| {k} | {conv} | {heads} | {r['train_acc']:.3f} | {r['test_acc']:.3f} | "
                    f"{r['test_graph_acc']:.3f} | {r['epochs']} | {r['seconds']:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if out:
        with open(out, "a") as f:
            f.write(f"\n<!-- python -m zoo.tasks.graph.train --table {k} -->\n{table}\n")
    return table


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.tasks.graph.train", description=__doc__.split("\n")[0])
    parser.add_argument("--table", type=int, default=None, metavar="K", help="DictionaryLookup table for size K")
    parser.add_argument("--out", default=None, help="append the table to this markdown file")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--runs", default=None, help="with --table: conv:heads list (default gatv2:1,gat:1,gat:8)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("overrides", nargs="*", help="experiment=... group=choice a.b=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.table is not None:
        runs = TABLE_RUNS
        if args.runs:
            runs = tuple((r.split(":")[0], int(r.split(":")[1])) for r in args.runs.split(","))
        print(dictlookup_table(args.table, args.out, args.max_epochs, runs))
        return 0
    result = fit(compose(args.overrides))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
