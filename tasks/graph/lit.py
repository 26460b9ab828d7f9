"""Lightning modules of the graph task. Each receives a plain nn.Module (built by Hydra through
``zoo.create_model``) and a batch dict from the graph data modules; they subclass
:class:`zoo.train.module.ZooModule` (model spec in the checkpoint, per-epoch seeding, optional EMA) but
optimise with plain Adam and a constant learning rate, as the GAT and GATv2 papers do.

* :class:`NodeClassificationModule` -- full-batch, transductive: one graph per step, the loss on the
  ``train_mask`` nodes, accuracy on ``val_mask`` / ``test_mask`` (Velickovic et al.'s protocol).
  Batch: {"x" [N, F], "edge_index" [2, E], "y" [N], "train_mask", "val_mask", "test_mask" [N] bool}.
  With ``data.batch_size`` the training batches are sampled subgraphs instead ({"x" [n, F], "edge_index", "y" [n],
  "n_id", "e_id", "batch_size"}, zoo.tasks.graph.sampling): the loss over their ``batch_size`` seed nodes, the
  first rows, as PyG's NeighborLoader examples; validation and test run on the whole graph (exact), in one forward
  or, with ``data.inference_batch_size``, layer by layer in chunks of nodes (the model's ``inference``).
* :class:`GraphTargetsModule` -- mini-batches of small graphs, cross-entropy either on target nodes
  (DictionaryLookup: {"x", "edge_index", "target_index" [Q], "y" [Q], "num_graphs"}) or on whole graphs
  (graph classification: {"x", "edge_index", "batch" [N], "num_graphs", "y" [G]}).

Metrics: ``train/loss``, ``train/acc1``, ``val/acc1``, ``test/acc1`` (top-1 accuracy, the name the default
checkpoint callback monitors); DictionaryLookup adds ``val/graph_acc`` / ``test/graph_acc`` (the fraction of graphs
whose every query is right). Mini-batch runs log ``train/loss`` and ``train/acc1`` as the means over the epoch's
targets (torchmetrics ``MeanMetric``), as the vision module does; sampled node batches (``data.batch_size``) log
``train/loss`` and ``train/acc1_dropout`` as the means over the epoch's seed nodes the same way; a run resumed in the
middle of an epoch starts them from the checkpoint's states of that epoch (:class:`zoo.train.epoch_metrics
.ResumableEpochMetrics`: they covered only the batches after the resume). Full-batch node
classification logs ``train/acc1`` as the accuracy on the ``train_mask`` nodes of the model in eval mode (no
dropout), computed in the validation step's forward over the whole graph, as PyG's examples/gat.py ``test()``
reports it: the figure of the training-mode forward (feature and attention dropout 0.6 in the GAT recipe)
understated the fit (0.75 where the eval-mode model had 1.0), and is kept as ``train/acc1_dropout``. ``train/acc1``
is therefore logged on validation epochs only (``trainer.check_val_every_n_epoch``).
Under DDP (``trainer=ddp_cpu``, ``trainer=ddp``) they are the whole split's, as in one process: the graph
mini-batch metrics are torchmetrics ``MeanMetric`` sums reduced over the processes at the epoch's end, each graph
scored on one process (``zoo.tasks.graph.datasets.evaluation_sampler``); node classification gives every process
the whole graph, so its evaluation metrics are equal on all processes (its sampled training batches are shared out,
their means reduced as the graph mini-batches'; full-batch training is refused on several processes, each would run
the same step: NodeDataModule.check_processes).
``stop_at_acc`` stops training once val/acc1 reaches it (the DictionaryLookup paper stops at 100%); the
sanity-check validation Lightning runs before training does not count. ``trainer.max_epochs=-1`` is refused
unless ``stop_at_acc``, ``trainer.max_steps``, ``trainer.max_time`` or an EarlyStopping callback ends the run
(constant learning rate: nothing else would).
The model's output width is checked against the data's class count at the first step of a run.

Prediction (``trainer.predict(module, datamodule)``): ``predict_step`` returns class probabilities (softmax of the
eval model's logits, the EMA copy when enabled): [N, K] for every node of the graph (node classification), [G, K]
per graph or [Q, K] per target node (graph mini-batches). The data modules' ``predict_dataloader``: the whole graph
(node data), the test split (graph classification).
A batch that holds ``edge_attr`` [E, D] passes it to the model (``edge_attr=``; built with ``edge_dim=D``); none
of the shipped data sets has edge features.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric

from zoo.train.epoch_metrics import ResumableEpochMetrics
from zoo.train.module import ZooModule

__all__ = ["NodeClassificationModule", "GraphTargetsModule"]

# the epoch means of an evaluation split (graph_acc is logged for DictionaryLookup batches only)
_EVAL_METRICS = ("loss", "acc1", "graph_acc")


class _GraphModule(ResumableEpochMetrics, ZooModule):
    def __init__(self, model: nn.Module, lr: float, weight_decay: float, stop_at_acc: Optional[float], seed: int,
                 ema_decay: float = 0.0, torch_compile: bool | str | None = None, **training_options):
        # training_options: ZooModule's ema_warmup, ema_buffers, adaptive_clip_factor (as the vision module takes)
        super().__init__(model, lr=lr, weight_decay=weight_decay, ema_decay=ema_decay, torch_compile=torch_compile,
                         seed=seed, **training_options)
        self.weight_decay = float(weight_decay)  # self.lr is the base module's (Lightning's lr finder sets it)
        if stop_at_acc is not None and (isinstance(stop_at_acc, bool) or not isinstance(stop_at_acc, (int, float))
                                        or not 0.0 < stop_at_acc <= 1.0):
            raise ValueError(f"stop_at_acc must be an accuracy in (0, 1] or null, got {stop_at_acc!r}")
        self.stop_at_acc = None if stop_at_acc is None else float(stop_at_acc)
        self.save_hyperparameters(ignore=["model"])
        self.record_model_spec()
        self._num_classes_checked = False

    def configure_optimizers(self):
        self._check_run_ends()
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def _check_run_ends(self) -> None:
        """trainer.max_epochs=-1 is Lightning's "no limit": with a constant learning rate and no step limit or
        target accuracy, the run would never end."""
        trainer = self.trainer
        if trainer.max_epochs != -1 or trainer.max_steps != -1 or self.stop_at_acc is not None:
            return
        # +trainer.max_time=... (Lightning's Timer callback) or an EarlyStopping callback ends the run too
        from lightning.pytorch.callbacks import EarlyStopping, Timer

        if any(isinstance(callback, (Timer, EarlyStopping)) for callback in trainer.callbacks):
            return
        raise ValueError("trainer.max_epochs=-1 (no limit) never ends a graph run: set trainer.max_epochs, "
                         "+trainer.max_steps=N, +trainer.max_time=DD:HH:MM:SS, or task.stop_at_acc=<accuracy> "
                         "(stop once val/acc1 reaches it)")

    def _check_num_classes(self, logits: torch.Tensor) -> None:
        """Once per run, the logits width against the data's class count: a narrower model fails inside
        cross_entropy ("Target 3 is out of bounds"), a wider one trains silently on classes that never occur."""
        if self._num_classes_checked:
            return
        self._num_classes_checked = True
        datamodule = getattr(self._trainer, "datamodule", None)
        want = getattr(datamodule, "num_classes", None)
        have = int(logits.size(-1))
        if want is not None and have != int(want):
            raise ValueError(f"the model outputs {have} classes (model.num_classes={have}) but the data has {want} "
                             f"(data.num_classes={want}): set model.num_classes={want}, or leave it at "
                             "${data.num_classes}")

    @staticmethod
    def _mean_metrics(names) -> nn.ModuleDict:
        """One torchmetrics ``MeanMetric`` per ``{stage}_{name}`` in ``names``: the epoch metrics as sums over the
        targets (nodes, graphs, queries) of every process, as the vision module's (zoo.tasks.vision.module): under
        DDP a logged per-process mean was rank 0's alone (sync_dist=True would average per-process means, wrong
        when the processes hold different counts). States are not persistent: the model's state_dict is unchanged;
        the training ones are kept under a checkpoint key of their own for a resume in the middle of an epoch
        (zoo.train.epoch_metrics.ResumableEpochMetrics).
        nan_strategy=nan: a diverged model's NaN loss shows instead of being dropped."""
        return nn.ModuleDict({name: MeanMetric(nan_strategy=float("nan")) for name in names})

    def _log_mean(self, stage: str, name: str, values: torch.Tensor, weight: float = 1.0, batch_size: int = 1,
                  prog_bar: bool = False) -> None:
        """Add ``values`` (each with ``weight``) to the epoch mean ``{stage}/{name}`` and log it (on_epoch: the
        mean over the epoch's targets of all processes, reduced at its end, not the last step's value)."""
        metric = self.metrics[f"{stage}_{name}"]
        metric.update(values, weight)
        self.log(f"{stage}/{name}", metric, prog_bar=prog_bar, on_step=False, on_epoch=True, batch_size=batch_size)

    @staticmethod
    def _edge_features(batch) -> dict:
        """``edge_attr=`` for the model when the batch holds edge features (a model built with edge_dim)."""
        return {"edge_attr": batch["edge_attr"]} if batch.get("edge_attr") is not None else {}

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities of the eval model (see the module docstring)."""
        return self(batch, self.eval_model).softmax(dim=-1)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the check before training: stopping there would skip training entirely
            return
        acc = self.trainer.callback_metrics.get("val/acc1")
        if self.stop_at_acc is not None and acc is not None and float(acc) >= self.stop_at_acc:
            self.trainer.should_stop = True


def _takes_layerwise_arguments(model: nn.Module) -> bool:
    """Whether ``model.inference`` is GATNodeClassifier.inference's protocol (x, edge_index, batch_size=, sampler=):
    a model of the user's may offer it too."""
    import inspect

    method = getattr(model, "inference", None)
    if not callable(method):
        return False
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return "batch_size" in parameters and "sampler" in parameters


class NodeClassificationModule(_GraphModule):
    def __init__(self, model: nn.Module, lr: float = 5e-3, weight_decay: float = 5e-4,
                 stop_at_acc: Optional[float] = None, seed: int = 0, ema_decay: float = 0.0,
                 torch_compile: bool | str | None = None, *, ema_warmup: bool | str = True, ema_buffers: str = "copy",
                 adaptive_clip_factor: Optional[float] = None):
        super().__init__(model, lr, weight_decay, stop_at_acc, seed, ema_decay, torch_compile, ema_warmup=ema_warmup,
                         ema_buffers=ema_buffers, adaptive_clip_factor=adaptive_clip_factor)
        # the epoch means of sampled training batches (_sampled_training_step); the full batch is one step an epoch
        self.metrics = self._mean_metrics(("train_loss", "train_acc1_dropout"))

    def forward(self, batch, model: Optional[nn.Module] = None):
        model = model or self.model
        if "inference_batch_size" in batch and not model.training:  # evaluation batches of data.inference_batch_size
            from zoo.tasks.graph.gat import GATNodeClassifier

            inner = getattr(model, "_orig_mod", model)  # under task.torch_compile: the module compiled
            if not (isinstance(inner, GATNodeClassifier) or _takes_layerwise_arguments(inner)):
                # PyG's BasicGNN.inference(loader, ...) is another method (it failed with a TypeError inside it)
                raise ValueError(f"data.inference_batch_size runs the model layer by layer, which "
                                 f"{type(inner).__name__} does not offer here (GATNodeClassifier.inference does): set "
                                 f"data.inference_batch_size=null")
            logits = inner.inference(batch["x"], batch["edge_index"], batch_size=batch["inference_batch_size"],
                                     sampler=batch["neighbor_sampler"], **self._edge_features(batch))
            return logits.to(batch["y"].device)  # the graph stayed on its device (NodeDataModule.transfer_batch_to_device)
        return model(batch["x"], batch["edge_index"], **self._edge_features(batch))

    @staticmethod
    def _acc(logits, batch, mask_name):
        mask = batch[mask_name]
        if int(mask.sum()) == 0:
            return None
        return (logits[mask].argmax(-1) == batch["y"][mask]).float().mean()

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        self._check_num_classes(logits)
        if "batch_size" in batch:
            return self._sampled_training_step(logits, batch)
        mask = batch["train_mask"]
        loss = F.cross_entropy(logits[mask], batch["y"][mask])
        self.log("train/loss", loss, prog_bar=True, batch_size=1)
        # the accuracy of this training-mode forward (with dropout): not the fit, see train/acc1 in _eval
        self.log("train/acc1_dropout", self._acc(logits.detach(), batch, "train_mask"), batch_size=1)
        return loss

    def _sampled_training_step(self, logits, batch):
        """A sampled subgraph (NodeDataModule with data.batch_size): the loss over its seed nodes, the first
        ``batch_size`` rows (the other nodes are there as their neighbourhood, as with PyG's NeighborLoader).
        ``train/loss`` and ``train/acc1_dropout`` are the epoch means over the seeds of all processes, every seed
        weighing alike (logged per step with Lightning's defaults, metrics.json held the last batch's values, a
        3-seed remainder batch, rank 0's alone under DDP)."""
        seeds = int(batch["batch_size"])
        logits, targets = logits[:seeds], batch["y"][:seeds]
        loss = F.cross_entropy(logits, targets)
        self._log_mean("train", "loss", loss.detach(), weight=seeds, batch_size=seeds, prog_bar=True)
        self._log_mean("train", "acc1_dropout", (logits.detach().argmax(-1) == targets).float(), batch_size=seeds)
        return loss

    def _eval(self, batch, splits):
        """Under DDP every process gets the whole graph (NodeDataModule's one-batch loader, which Lightning's
        DistributedSampler hands to every process) and logs the same accuracies: nothing to reduce.
        ``split`` "train" logs ``train/acc1``: the eval-mode accuracy on the training nodes (see the module
        docstring), free here since the forward already covers the whole graph."""
        logits = self(batch, self.eval_model)
        self._check_num_classes(logits)
        for split in splits:
            acc = self._acc(logits, batch, f"{split}_mask")
            if acc is not None:
                self.log(f"{split}/acc1", acc, prog_bar=True, batch_size=1)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, ("val", "train"))

    def test_step(self, batch, batch_idx):
        self._eval(batch, ("test",))


class GraphTargetsModule(_GraphModule):
    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 stop_at_acc: Optional[float] = None, seed: int = 0, ema_decay: float = 0.0,
                 torch_compile: bool | str | None = None, *, ema_warmup: bool | str = True, ema_buffers: str = "copy",
                 adaptive_clip_factor: Optional[float] = None):
        super().__init__(model, lr, weight_decay, stop_at_acc, seed, ema_decay, torch_compile, ema_warmup=ema_warmup,
                         ema_buffers=ema_buffers, adaptive_clip_factor=adaptive_clip_factor)
        self.metrics = self._mean_metrics(
            f"{stage}_{name}"
            for stage, names in (("train", ("loss", "acc1")), ("val", _EVAL_METRICS), ("test", _EVAL_METRICS))
            for name in names
        )

    def forward(self, batch, model: Optional[nn.Module] = None):
        model = model or self.model
        if "target_index" in batch:
            return model(batch["x"], batch["edge_index"], batch["target_index"])
        return model(batch["x"], batch["edge_index"], batch["batch"], batch["num_graphs"],
                     **self._edge_features(batch))

    def _step(self, batch, stage):
        logits = self(batch, self.model if stage == "train" else self.eval_model)
        self._check_num_classes(logits)
        loss = F.cross_entropy(logits, batch["y"])
        correct = logits.detach().argmax(-1) == batch["y"]
        n = batch["y"].numel()
        # the epoch mean over the targets, as train/acc1 beside it (it was the last step's loss in metrics.json)
        self._log_mean(stage, "loss", loss.detach(), weight=n, batch_size=n, prog_bar=stage == "train")
        self._log_mean(stage, "acc1", correct.float(), batch_size=n, prog_bar=True)
        if "target_index" in batch and stage != "train":
            per_graph = correct.view(batch["num_graphs"], -1).all(dim=1).float()
            self._log_mean(stage, "graph_acc", per_graph, batch_size=batch["num_graphs"])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")
