"""The Lightning module that trains and evaluates any registered MIL model, on one or many tasks.

Loss per step (METHODS.md, CoMEL "Total loss"): ``CE_bag + bppl.weight · L_BPPL`` plus the
continual strategy's terms (OWLoRA's ``L_ortho``, EWC's penalty; :mod:`pathopeft.mil.continual`).
With several tasks the bag loss is a cross-entropy over the logits of every head seen so far with
the labels offset by the task's first class (the authors' class-incremental setup); with one task
that is the plain cross-entropy of its head.

τ₂ for BPPL is a buffer (checkpointed, so a resumed run keeps it), recomputed after every training
epoch from ``q`` = mean over the epoch's bags of (confidence × correct), synced over DDP ranks.
So is ``val_threshold``: the bag-probability threshold that maximises balanced accuracy on the
validation split of a two-class task, stored with the checkpoint chosen on validation and reported
next to the 0.5 threshold on test (a model can rank every bag right and still put them all on one
side of 0.5).

Hyperparameters are plain dicts/lists/numbers only, and the checkpoint records the ordered adapter
list (name, method, options, targets) and task list, so :meth:`MILModule.from_checkpoint` rebuilds
a continual model with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import CatMetric, MeanMetric, SumMetric

from pathopeft.mil.base import MILOutput, Task
from pathopeft.mil.bppl import bppl_loss, confidence_correct, tau2_from_q
from pathopeft.mil.continual.router import ROUTER_KEY, TaskRouter
from pathopeft.mil.metrics import BagMetrics, InstanceMetrics, best_threshold
from pathopeft.mil.predictions import PredictionWriter
from pathopeft.mil.registry import create_model

__all__ = ["MILModule", "TaskRecord"]

log = logging.getLogger(__name__)

BPPL_STATS = ("selected", "kept", "candidates", "kept_pos", "true_pos", "labelled_kept", "tumour_tiles")


class TaskRecord(dict):
    """A task as the checkpoint records it: name, classes, negative class (index or None), offset."""

    @property
    def task(self) -> Task:
        return Task(self["name"], tuple(self["classes"]))


def _task_records(tasks: list[Mapping[str, Any]], negative_class: int | None) -> list[TaskRecord]:
    records, offset = [], 0
    for i, t in enumerate(tasks):
        task = Task.from_dict(t)
        neg = t.get("negative_class", negative_class if i == len(tasks) - 1 else 0)
        record = TaskRecord({**t, "name": task.name, "classes": list(task.classes)})
        record["negative_class"] = neg
        record["offset"] = offset
        offset += task.num_classes
        records.append(record)
    return records


def _warn_uncalibrated(metrics: Mapping[str, Tensor], task: str) -> None:
    """Say so when the bags are ranked but not separated at 0.5: every probability on one side of it.

    Seen with ABMIL at lr 1e-4 after 15 epochs (bag AUC 1.0, accuracy 0.5): the model is still
    under-trained, its probabilities sit in a narrow band (e.g. 0.42–0.51, on the training bags
    too) whose centre has drifted from 0.5, so the ranking is right and the fixed threshold is not.
    """
    at_half = float(metrics["bag_balanced_accuracy"])
    at_val = float(metrics["bag_balanced_accuracy_at_val_threshold"])
    lo, hi = float(metrics["bag_probability_min"]), float(metrics["bag_probability_max"])
    if at_val - at_half >= 0.15 and (hi < 0.5 or lo >= 0.5 or hi - lo < 0.2):
        log.warning(
            "task %s: bag probabilities on test lie in [%.3f, %.3f]; balanced accuracy is %.3f at 0.5 "
            "but %.3f at the validation threshold %.3f. The model ranks bags but is not calibrated, "
            "which usually means it is under-trained (train loss near ln 2): train longer or use "
            "val_threshold from test_metrics.json.",
            task, lo, hi, at_half, at_val, float(metrics["val_threshold"]),
        )  # fmt: skip


class MILModule(lightning.LightningModule):
    """Trains ``create_model(model["name"], ...)`` on the last of ``tasks`` (earlier ones are kept)."""

    def __init__(
        self,
        model: Mapping[str, Any],
        tasks: list[Mapping[str, Any]],
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        bppl: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        negative_class: int | None = 0,
        adapters: list[Mapping[str, Any]] | None = None,
        strategy: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        options = dict(model)
        name = options.pop("name")
        self.records = _task_records(list(tasks), negative_class)
        self.model = create_model(name, tasks=[r.task for r in self.records], **options)
        self.task = self.model.tasks[-1]
        self.negative_class = self.records[-1]["negative_class"]
        self.optimizer_cfg = {"name": "adam", "lr": 1e-4, "weight_decay": 1e-5, **(optimizer or {})}
        self.schedule_cfg = {"name": "cosine", "warmup_epochs": 0, "min_lr": 0.0, **(schedule or {})}
        self.bppl_cfg = {
            "enabled": True, "weight": 1.0, "tau1": 0.95, "temperature": 1.0, "center": False, "keep": "both",
            **(bppl or {}),
        }  # fmt: skip
        self.bppl_cfg.pop("preset", None)
        self.eval_cfg = {"instance_threshold": 0.5, "write_predictions": True, **(evaluation or {})}
        from pathopeft.mil.continual.strategies import create_strategy  # continual builds on this module

        self.adapter_records = [dict(a) for a in adapters or []]
        self.strategy = create_strategy(dict(strategy or {"name": "none"}))
        self.strategy.rebuild(self)  # re-attach recorded adapters, set what trains
        self.register_buffer("tau2", torch.tensor(tau2_from_q(0.0)))
        self.register_buffer("val_threshold", torch.tensor(0.5))
        n = self.task.num_classes
        self.q_meter = MeanMetric()
        self.train_loss = MeanMetric()
        self.bags_seen = SumMetric()  # bags per epoch over all ranks (DDP splits them, not repeats)
        self.bppl_stats = torch.nn.ModuleDict({k: SumMetric() for k in BPPL_STATS})
        self.val_loss = MeanMetric()
        self.val_bag = BagMetrics(n)
        self.test_bag = BagMetrics(n)
        self.val_probs, self.val_labels = CatMetric(), CatMetric()
        self.test_probs, self.test_labels = CatMetric(), CatMetric()
        self.val_instance = InstanceMetrics(self.eval_cfg["instance_threshold"])
        self.test_instance = InstanceMetrics(self.eval_cfg["instance_threshold"])
        self.predictions_dir: Path | None = None  # set by the training entry point (not a hyperparameter)
        self._writer: PredictionWriter | None = None
        self.test_results: dict[str, float] = {}
        # evaluations recorded in the checkpoint: {"after": task, "task", "mode", metrics...}
        self.history: list[dict[str, Any]] = []
        # per-task bag statistics for inference without a task id (fitted after each task's training)
        self.router = TaskRouter()

    @property
    def tasks(self) -> list[Task]:
        return self.model.tasks

    def record(self, name: str) -> TaskRecord:
        for r in self.records:
            if r["name"] == name:
                return r
        raise KeyError(f"unknown task {name!r}; this model has {[r['name'] for r in self.records]}")

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MILModule:
        """Rebuild a trained module (every task and adapter) without unpickling code.

        Hyperparameters (model options, tasks, adapters, loss settings) come from the checkpoint
        itself; ``torch.load(weights_only=True)`` via :func:`pathopeft.runs.load_checkpoint`.
        """
        from pathopeft.runs import load_checkpoint

        ckpt = load_checkpoint(path)
        if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{path}: not a pathopeft MIL checkpoint (no hyper_parameters/state_dict)")
        module = cls(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
        module.on_load_checkpoint(ckpt)
        module.strategy.after_load(module)
        return module.eval()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pathopeft_history"] = list(self.history)
        checkpoint["pathopeft_strategy"] = dict(self.strategy.state)
        checkpoint[ROUTER_KEY] = self.router.state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("pathopeft_history", []))
        self.strategy.state = dict(checkpoint.get("pathopeft_strategy", {}))
        self.router = TaskRouter.from_state(checkpoint.get(ROUTER_KEY))

    def on_train_start(self) -> None:
        self.strategy.after_load(self)  # derived data (projection bases) from the weights now loaded

    # --- forward and losses -------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], task: str | None = None) -> MILOutput:
        """Logits of ``task``'s head (default: the training task); every head while training several tasks."""
        mask = batch["mask"]
        head: str | None = task or self.task.name
        if task is None and len(self.records) > 1 and self.training:
            head = None  # class-incremental training: all heads' logits, labels offset per task
        return self.model(
            batch["features"],
            coords=batch.get("coords"),
            mask=None if bool(mask.all()) else mask,
            task=head,
        )

    def _global_labels(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """(task index, label in the concatenated class space) per bag."""
        labels = batch["labels"]
        tasks = batch.get("tasks")
        if tasks is None:
            tasks = torch.full_like(labels, len(self.records) - 1)
        offsets = torch.tensor([r["offset"] for r in self.records], device=labels.device)
        return tasks, labels + offsets[tasks]

    def _losses(self, out: MILOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        logits = out.logits.float()
        tasks, global_labels = self._global_labels(batch)
        ce_labels = global_labels if logits.shape[1] != self.task.num_classes else batch["labels"]
        losses = {"ce": F.cross_entropy(logits, ce_labels)}
        if self.bppl_cfg["enabled"] and self.bppl_cfg["weight"] > 0:
            losses["bppl"] = self.bppl_cfg["weight"] * self._bppl(out, batch, tasks)
        losses.update(self.strategy.extra_losses(self, out, batch))
        return losses

    def _bppl(self, out: MILOutput, batch: Mapping[str, Any], tasks: Tensor) -> Tensor:
        """BPPL per task present in the batch, confidence from each bag's own head."""
        cfg, total = self.bppl_cfg, out.logits.new_zeros(())
        for t in torch.unique(tasks).tolist():
            rec = self.records[t]
            rows = (tasks == t).nonzero().squeeze(1)
            logits = out.logits.float()[rows]
            if logits.shape[1] != len(rec["classes"]):
                logits = logits[:, rec["offset"] : rec["offset"] + len(rec["classes"])]
            result = bppl_loss(
                out.features[rows], out.attention[rows], out.scores[rows], logits, batch["labels"][rows],
                out.mask[rows], tau1=cfg["tau1"], tau2=float(self.tau2), negative_class=rec["negative_class"],
                temperature=cfg["temperature"], center=cfg["center"], keep=cfg["keep"],
            )  # fmt: skip
            total = total + result.loss * len(rows) / len(tasks)
            self._count_pseudo_labels(result, out.mask[rows], batch["tile_labels"][rows])
        return total

    def _count_pseudo_labels(self, result: Any, mask: Tensor, tile_labels: Tensor) -> None:
        """Epoch sums behind the BPPL diagnostics (precision/recall only where tile labels exist)."""
        pseudo = result.pseudo_labels
        kept = pseudo >= 0
        known = tile_labels >= 0
        sel = result.selected.unsqueeze(1) & mask & known
        values = {
            "selected": result.selected.sum(),
            "kept": kept.sum(),
            "candidates": (mask & result.selected.unsqueeze(1)).sum(),
            "kept_pos": ((pseudo == 1) & known).sum(),
            "true_pos": ((pseudo == 1) & (tile_labels == 1)).sum(),
            "labelled_kept": (kept & known).sum(),
            "tumour_tiles": (sel & (tile_labels == 1)).sum(),
        }
        for key, value in values.items():
            self.bppl_stats[key].update(value.float())

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        losses = self._losses(out, batch)
        loss = sum(losses.values())
        size = len(batch["labels"])
        _tasks, global_labels = self._global_labels(batch)
        labels = global_labels if out.logits.shape[1] != self.task.num_classes else batch["labels"]
        self.q_meter.update(confidence_correct(out.logits, labels))
        self.train_loss.update(loss.detach(), weight=size)
        self.bags_seen.update(float(size))
        for key, value in losses.items():
            self.log(
                f"train/{key}", value.detach(), on_step=False, on_epoch=True, batch_size=size, sync_dist=True
            )
        return loss

    def on_train_epoch_end(self) -> None:
        q = self.q_meter.compute()
        self.q_meter.reset()
        self.log("train/loss", self.train_loss.compute(), prog_bar=True)
        self.train_loss.reset()
        self.log("train/q", q)
        self.log("train/bags", self.bags_seen.compute())
        self.bags_seen.reset()
        self.log("train/tau2", self.tau2.clone())
        if self.bppl_cfg["enabled"]:
            self._log_bppl_diagnostics()
        self.tau2.fill_(tau2_from_q(float(q.clamp(0.0, 1.0))))  # used from the next epoch on

    def _log_bppl_diagnostics(self) -> None:
        s = {k: float(m.compute()) for k, m in self.bppl_stats.items()}
        for m in self.bppl_stats.values():
            m.reset()
        nan = float("nan")
        stats = {
            "train/bppl_bags_selected": s["selected"],
            "train/bppl_instances_kept": s["kept"],
            "train/bppl_kept_share": s["kept"] / s["candidates"] if s["candidates"] else 0.0,
            "train/bppl_precision": s["true_pos"] / s["kept_pos"] if s["kept_pos"] else nan,
            "train/bppl_recall": s["true_pos"] / s["tumour_tiles"] if s["tumour_tiles"] else nan,
        }
        self.log_dict(stats)
        if s["selected"] > 0 and s["kept"] == 0 and self.trainer.is_global_zero:
            log.warning(
                "epoch %d: BPPL selected %d bag(s) but kept no pseudo-label (τ₂=%.3f); with "
                "bppl.temperature=%g "
                "and bppl.center=%s the two cosines are too close: lower the temperature or centre",
                self.current_epoch, int(s["selected"]), float(self.tau2), self.bppl_cfg["temperature"],
                self.bppl_cfg["center"],
            )  # fmt: skip

    # --- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, batch: Mapping[str, Any], bag: Any, instance: InstanceMetrics) -> MILOutput:
        out = self(batch, task=self.task.name)
        probs = torch.softmax(out.logits.float(), dim=-1)
        bag.update(probs, batch["labels"])
        instance.update(out.scores, batch["tile_labels"], out.mask, bag_positive=1 - probs[:, 0])
        return out

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self._evaluate(batch, self.val_bag, self.val_instance)
        loss = F.cross_entropy(out.logits.float(), batch["labels"], reduction="sum")
        self.val_loss.update(loss / len(batch["labels"]), weight=len(batch["labels"]))
        self.val_probs.update(torch.softmax(out.logits.float(), dim=-1)[:, -1])
        self.val_labels.update(batch["labels"].float())

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{k}": v for k, v in self.val_bag.compute().items()}
        metrics.update({f"val/{k}": v for k, v in self.val_instance.compute().items()})
        metrics["val/loss"] = self.val_loss.compute()
        if self.task.num_classes == 2:
            threshold, balanced = best_threshold(self.val_probs.compute(), self.val_labels.compute())
            self.val_threshold.fill_(threshold)
            metrics["val/threshold"] = torch.tensor(threshold)
            metrics["val/bag_balanced_accuracy_at_threshold"] = torch.tensor(balanced)
        shown = {"val/loss", "val/bag_auc", "val/instance_auc"}  # on the progress bar
        self.log_dict({k: v for k, v in metrics.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown})
        for m in (self.val_bag, self.val_instance, self.val_loss, self.val_probs, self.val_labels):
            m.reset()

    def on_test_epoch_start(self) -> None:
        if self.eval_cfg["write_predictions"] and self.predictions_dir is not None:
            self._writer = PredictionWriter(self.predictions_dir, self.task)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self._evaluate(batch, self.test_bag, self.test_instance)
        self.test_probs.update(torch.softmax(out.logits.float(), dim=-1)[:, -1])
        self.test_labels.update(batch["labels"].float())
        if self._writer is not None:
            self._writer.write_batch(batch, out)

    def on_test_epoch_end(self) -> None:
        metrics = {k: v for k, v in self.test_bag.compute().items()}
        metrics.update(self.test_instance.compute())
        if self.task.num_classes == 2:
            threshold = float(self.val_threshold)
            probs = self.test_probs.compute()
            _, balanced = best_threshold(probs, self.test_labels.compute(), fixed=threshold)
            metrics["val_threshold"] = torch.tensor(threshold)
            metrics["bag_balanced_accuracy_at_val_threshold"] = torch.tensor(balanced)
            metrics["bag_probability_min"], metrics["bag_probability_max"] = probs.min(), probs.max()
            _warn_uncalibrated(metrics, self.task.name)
        self.log_dict({f"test/{k}": v for k, v in metrics.items()})
        self.test_results = {k: float(v) for k, v in metrics.items()}
        for m in (self.test_bag, self.test_instance, self.test_probs, self.test_labels):
            m.reset()
        if self._writer is not None:
            self._writer.finish(self.trainer)
            self._writer = None

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter of the model is frozen")
        optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["name"]]
        lr = self.strategy.learning_rate(self, float(cfg["lr"]))
        optimizer = optim_cls(params, lr=lr, weight_decay=cfg["weight_decay"])
        self.strategy.on_optimizer(self, optimizer)
        sched = self.schedule_cfg
        if sched["name"] == "constant" and not sched["warmup_epochs"]:
            return optimizer
        epochs = max(int(self.trainer.max_epochs or 1), 1) if self._trainer is not None else 1
        warmup = min(int(sched["warmup_epochs"]), max(epochs - 1, 0))
        schedulers, milestones = [], []
        if warmup:
            schedulers.append(
                torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (warmup + 1), total_iters=warmup)
            )
            milestones.append(warmup)
        if sched["name"] == "cosine":
            schedulers.append(
                torch.optim.lr_scheduler.CosineAnnealingLR(
                    optimizer, T_max=max(epochs - warmup, 1), eta_min=sched["min_lr"]
                )
            )
        else:
            schedulers.append(torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0))
        scheduler = (
            schedulers[0]
            if len(schedulers) == 1
            else torch.optim.lr_scheduler.SequentialLR(optimizer, schedulers, milestones=milestones)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
