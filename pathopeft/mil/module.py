"""The Lightning module that trains and evaluates any registered MIL model.

Loss per step (METHODS.md, CoMEL "Total loss"): ``CE_bag + bppl.weight · L_BPPL``; the
``extra_losses`` hook is where the continual-learning issue adds ``L_ortho`` from task 1 on.
τ₂ for BPPL is a buffer of the module (checkpointed, so a resumed run keeps it), recomputed after
every training epoch from ``q`` = mean over the epoch's bags of (confidence × correct), synced over
DDP ranks by torchmetrics.

Validation/test: bag metrics (accuracy, balanced accuracy, macro AUC, macro F1) and, for slides with
tile labels, tile metrics (pooled instance AUC, tile accuracy/F1, per-slide Dice/IoU), all
torchmetrics so DDP ranks are combined correctly. Test predictions go to ``predictions/``
(:mod:`pathopeft.mil.predictions`).

Hyperparameters are plain dicts/lists/numbers only, so checkpoints load with
``torch.load(weights_only=True)`` (:func:`pathopeft.runs.load_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.aggregation import MeanMetric, SumMetric

from pathopeft.mil.base import MILOutput, Task
from pathopeft.mil.bppl import bppl_loss, confidence_correct, tau2_from_q
from pathopeft.mil.metrics import BagMetrics, InstanceMetrics
from pathopeft.mil.predictions import PredictionWriter
from pathopeft.mil.registry import create_model

__all__ = ["MILModule"]


class MILModule(lightning.LightningModule):
    """Trains ``create_model(model["name"], ...)`` on one task (the last of ``tasks``)."""

    def __init__(
        self,
        model: Mapping[str, Any],
        tasks: list[Mapping[str, Any]],
        optimizer: Mapping[str, Any] | None = None,
        schedule: Mapping[str, Any] | None = None,
        bppl: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        negative_class: int | None = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        options = dict(model)
        name = options.pop("name")
        self.model = create_model(name, tasks=tasks, **options)
        self.task = self.model.tasks[-1]
        self.optimizer_cfg = {"name": "adam", "lr": 1e-4, "weight_decay": 1e-5, **(optimizer or {})}
        self.schedule_cfg = {"name": "cosine", "warmup_epochs": 0, "min_lr": 0.0, **(schedule or {})}
        self.bppl_cfg = {"enabled": True, "weight": 1.0, "tau1": 0.95, **(bppl or {})}
        self.eval_cfg = {"instance_threshold": 0.5, "write_predictions": True, **(evaluation or {})}
        self.negative_class = negative_class
        self.register_buffer("tau2", torch.tensor(tau2_from_q(0.0)))
        n = self.task.num_classes
        self.q_meter = MeanMetric()
        self.train_loss = MeanMetric()
        self.bags_seen = SumMetric()  # bags per epoch over all ranks (DDP splits them, not repeats)
        self.val_loss = MeanMetric()
        self.val_bag = BagMetrics(n)
        self.test_bag = BagMetrics(n)
        self.val_instance = InstanceMetrics(self.eval_cfg["instance_threshold"])
        self.test_instance = InstanceMetrics(self.eval_cfg["instance_threshold"])
        self.predictions_dir: Path | None = None  # set by the training entry point (not a hyperparameter)
        self._writer: PredictionWriter | None = None
        self.test_results: dict[str, float] = {}

    @property
    def tasks(self) -> list[Task]:
        return self.model.tasks

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MILModule:
        """Rebuild a trained module from ``best.ckpt`` / ``last.ckpt`` without unpickling code.

        Hyperparameters (model options, tasks with class names, loss settings) come from the
        checkpoint itself; ``torch.load(weights_only=True)`` via :func:`pathopeft.runs.load_checkpoint`.
        """
        from pathopeft.runs import load_checkpoint

        ckpt = load_checkpoint(path)
        if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{path}: not a pathopeft MIL checkpoint (no hyper_parameters/state_dict)")
        module = cls(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()

    # --- forward and losses -------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any]) -> MILOutput:
        mask = batch["mask"]
        return self.model(
            batch["features"],
            coords=batch.get("coords"),
            mask=None if bool(mask.all()) else mask,
            task=self.task.name,
        )

    def extra_losses(self, out: MILOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Additional named loss terms (the continual-learning issue adds ``ortho`` here)."""
        return {}

    def _losses(self, out: MILOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        logits = out.logits.float()
        losses = {"ce": F.cross_entropy(logits, batch["labels"])}
        if self.bppl_cfg["enabled"] and self.bppl_cfg["weight"] > 0:
            result = bppl_loss(
                out.features,
                out.attention,
                out.scores,
                logits,
                batch["labels"],
                out.mask,
                tau1=self.bppl_cfg["tau1"],
                tau2=float(self.tau2),
                negative_class=self.negative_class,
            )
            losses["bppl"] = self.bppl_cfg["weight"] * result.loss
            size = len(batch["labels"])
            stats = {
                "train/bppl_selected": result.selected.float().mean(),  # share of bags pseudo-labelled
                "train/bppl_kept": (result.kept.float() / out.mask.sum(dim=1)).mean(),  # kept/N
            }
            self.log_dict(stats, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        losses.update(self.extra_losses(out, batch))
        return losses

    # --- training -----------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        out = self(batch)
        losses = self._losses(out, batch)
        loss = sum(losses.values())
        size = len(batch["labels"])
        self.q_meter.update(confidence_correct(out.logits, batch["labels"]))
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
        self.tau2.fill_(tau2_from_q(float(q.clamp(0.0, 1.0))))  # used from the next epoch on

    # --- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, batch: Mapping[str, Any], bag: Any, instance: InstanceMetrics) -> MILOutput:
        out = self(batch)
        probs = torch.softmax(out.logits.float(), dim=-1)
        bag.update(probs, batch["labels"])
        instance.update(out.scores, batch["tile_labels"], out.mask)
        return out

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self._evaluate(batch, self.val_bag, self.val_instance)
        loss = F.cross_entropy(out.logits.float(), batch["labels"], reduction="sum")
        self.val_loss.update(loss / len(batch["labels"]), weight=len(batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        metrics = {f"val/{k}": v for k, v in self.val_bag.compute().items()}
        metrics.update({f"val/{k}": v for k, v in self.val_instance.compute().items()})
        metrics["val/loss"] = self.val_loss.compute()
        shown = {"val/loss", "val/bag_auc", "val/instance_auc"}  # on the progress bar
        self.log_dict({k: v for k, v in metrics.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in metrics.items() if k not in shown})
        self.val_bag.reset()
        self.val_instance.reset()
        self.val_loss.reset()

    def on_test_epoch_start(self) -> None:
        if self.eval_cfg["write_predictions"] and self.predictions_dir is not None:
            self._writer = PredictionWriter(self.predictions_dir, self.task)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        out = self._evaluate(batch, self.test_bag, self.test_instance)
        if self._writer is not None:
            self._writer.write_batch(batch, out)

    def on_test_epoch_end(self) -> None:
        metrics = {k: v for k, v in self.test_bag.compute().items()}
        metrics.update(self.test_instance.compute())
        self.log_dict({f"test/{k}": v for k, v in metrics.items()})
        self.test_results = {k: float(v) for k, v in metrics.items()}
        self.test_bag.reset()
        self.test_instance.reset()
        if self._writer is not None:
            self._writer.finish(self.trainer)
            self._writer = None

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["name"]]
        optimizer = optim_cls(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
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
