"""The LightningModule of ``segment train``: loss, whole-image evaluation, AdamW, small checkpoints.

Lightning writes ``model.state_dict()`` into every checkpoint; here :meth:`on_save_checkpoint`
keeps only :func:`~pathopeft.seg.model.persistent_keys` (adapter, decoder, trained norms) and adds
a ``pathopeft`` block (config, encoder name / weights hash / fingerprint). :meth:`on_load_checkpoint`
refuses a checkpoint made on another encoder and fills the frozen encoder back in from the
module itself, so Lightning's strict loading still checks every key.
"""

from __future__ import annotations

import math
from typing import Any

import lightning
import torch

from pathopeft.config.segment import SegmentTrainConfig
from pathopeft.seg.checkpoint import check_encoder, checkpoint_meta
from pathopeft.seg.metrics import METRICS, build_loss, image_scores, predict_logits, summarise_scores
from pathopeft.seg.model import SegmentationModel, persistent_keys

__all__ = ["SegmentationModule"]


class SegmentationModule(lightning.LightningModule):
    """Trains a :class:`SegmentationModel`; logs ``train_loss``, ``val_loss``, ``val_dice``/iou/hd95."""

    def __init__(self, model: SegmentationModel, cfg: SegmentTrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.loss_fn = build_loss(cfg.loss)
        self._persistent = {f"model.{k}" for k in persistent_keys(model)}
        # adapter penalties (SALT's ``reg``) join the loss only when configured
        self._regularised = cfg.adapter.mode == "adapter" and bool(cfg.adapter.options.get("reg"))
        self._scores: dict[str, list[torch.Tensor]] = {"val": [], "test": []}
        self.results: dict[str, dict[str, Any]] = {}  # stage -> summarised scores (every rank)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    # ------------------------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.model.freeze_norm_stats()  # Lightning may have reset their mode after validation

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = self.loss_fn(logits.float(), batch["mask"])
        self.log(
            "train_loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(logits),
            sync_dist=True,
        )
        if self._regularised:
            import pathopeft.adapters as pa

            penalty = pa.regularization(self.model.encoder.model)
            self.log("train_adapter_reg", penalty, on_step=False, on_epoch=True, batch_size=len(logits))
            loss = loss + penalty
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        data = self.cfg.data
        logits = predict_logits(
            self.model,
            batch["image"],
            mode=data.mode,
            img_size=self.cfg.model.img_size,
            overlap=data.overlap,
            sw_batch_size=data.sw_batch_size,
        )
        loss = self.loss_fn(logits, batch["mask"])
        self.log(f"{stage}_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(logits))
        self._scores[stage].append(image_scores(logits, batch["mask"]).cpu())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._scores["val"] = []

    def on_test_epoch_start(self) -> None:
        self._scores["test"] = []

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        """Gather per-image scores from every rank, average, log the same value everywhere."""
        width = self.model.num_classes - 1
        local = torch.cat(self._scores[stage]) if self._scores[stage] else torch.empty(0, len(METRICS), width)
        summary = summarise_scores(self._gather_rows(local.float()).cpu())
        self.results[stage] = summary
        for name in METRICS:
            value = summary[name]
            # identical on every rank already; sync_dist only keeps Lightning from warning
            value_t = torch.tensor(float(value), device=self.device)  # type: ignore[arg-type]
            self.log(f"{stage}_{name}", value_t, prog_bar=name == "dice", sync_dist=True)
        self._scores[stage] = []

    def _gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated. Ranks may hold different numbers of images (evaluation
        shards are not padded), while ``all_gather`` needs equal shapes: pad to the longest, trim."""
        if self.trainer.world_size == 1:
            return local
        counts = self.all_gather(torch.tensor([len(local)], device=self.device)).flatten().tolist()
        padded = local.new_zeros((max(counts), *local.shape[1:]))
        padded[: len(local)] = local
        gathered = self.all_gather(padded.to(self.device))
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])

    # -------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        opt = self.cfg.optimizer
        groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            lr = opt.decoder_lr if (name.startswith("decoder.") and opt.decoder_lr) else opt.lr
            # no decay on vectors: biases, norms, and scale/shift/σ vectors of SVD adapters, which
            # weight decay would pull towards 0 instead of towards their initial value
            decay = opt.weight_decay if param.ndim >= 2 else 0.0
            groups.setdefault((lr, decay), []).append(param)
        if not groups:
            raise ValueError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(
            [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()],
            betas=opt.betas,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(total * opt.warmup_fraction)
        cosine = opt.scheduler == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if not cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        # buffers that changed since the encoder was built are kept too, whatever their module
        keep = self._persistent | {f"model.{k}" for k in self.model.changed_buffers()}
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
        checkpoint["pathopeft"] = checkpoint_meta(self.model, self.cfg)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_encoder(checkpoint.get("pathopeft"), self.model, source="checkpoint")
        full = {k: v for k, v in self.state_dict().items()}
        unknown = sorted(set(checkpoint["state_dict"]) - set(full))
        if unknown:
            raise ValueError(f"checkpoint holds tensors this model lacks: {unknown[:5]}")
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full
