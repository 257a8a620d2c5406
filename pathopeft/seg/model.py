"""Encoder + tuning mode + decoder = the segmentation network.

Tuning modes (``adapter.mode``), one function each in :data:`TUNING_MODES`:

* ``adapter`` — ``pathopeft.adapters.attach`` a PEFT method to the encoder; everything else in the
  encoder is frozen (optionally its norm layers and named extras train too);
* ``frozen`` — the encoder is frozen, only the decoder trains (the linear-probe-like baseline);
* ``full`` — every encoder weight trains (the full fine-tuning baseline).

:func:`persistent_keys` decides what a checkpoint must hold: everything that training can change
or that the adapter created (its factors), but not the frozen encoder weights, which are rebuilt
from the encoder's name and weights when a checkpoint is loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pathopeft.config.segment import SegAdapterConfig, SegmentTrainConfig
from pathopeft.seg.decoders import build_decoder
from pathopeft.seg.encoders import SegEncoder, build_encoder

__all__ = ["TUNING_MODES", "SegmentationModel", "build_model", "persistent_keys", "trainable_summary"]

log = logging.getLogger(__name__)

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


class SegmentationModel(nn.Module):
    """``decoder(image, encoder(image))`` → logits ``(B, num_classes, H, W)``."""

    def __init__(
        self, encoder: SegEncoder, decoder: nn.Module, *, num_classes: int, decoder_name: str
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.decoder_name = decoder_name
        self.base_pointers: set[int] = set()  # storages of the frozen encoder as built
        self.base_buffers: dict[str, torch.Tensor] = {}  # copies of the encoder's buffers as built

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.decoder(image, self.encoder(image))

    def train(self, mode: bool = True) -> SegmentationModel:
        """Frozen norm layers of the encoder keep their pretrained statistics (eval mode)."""
        super().train(mode)
        if mode:
            self.freeze_norm_stats()
        return self

    def freeze_norm_stats(self) -> None:
        """Put every encoder BatchNorm without trainable parameters in eval mode.

        Why a method of its own: Lightning restores each module's ``training`` flag one by one
        after validation instead of calling :meth:`train`, which put "frozen" BatchNorms back in
        train mode; their running statistics then drifted and were never saved (issue 16). The
        LightningModule calls this before every training batch.
        """
        for module in self.encoder.modules():
            if (
                isinstance(module, nn.modules.batchnorm._BatchNorm)
                and module.training
                and not any(p.requires_grad for p in module.parameters(recurse=False))
            ):
                module.eval()

    def changed_buffers(self) -> set[str]:
        """Encoder buffers whose values differ from the encoder as built (checkpoints keep them)."""
        current = dict(self.named_buffers())
        return {
            key
            for key, base in self.base_buffers.items()
            if key in current
            and (current[key].shape != base.shape or not torch.equal(current[key].detach().cpu(), base))
        }


def _tune_adapter(encoder: SegEncoder, cfg: SegAdapterConfig) -> None:
    import pathopeft.adapters as pa

    if not hasattr(pa, "attach"):
        raise RuntimeError("pathopeft.adapters provides no attach(); adapter.mode=adapter is unavailable")
    try:
        names = pa.attach(encoder.model, cfg.method, targets=cfg.targets, name="default", **cfg.options)
    except pa.AdapterError as exc:
        # the adapter library knows no config keys; say which section of the run config to change
        raise ValueError(
            f"{encoder.record.name}: cannot attach adapter.method={cfg.method!r} (adapter.targets): {exc}"
        ) from exc
    log.info("adapter %s attached to %d layer(s) of %s", cfg.method, len(names), encoder.record.name)


def _tune_frozen(encoder: SegEncoder, cfg: SegAdapterConfig) -> None:
    encoder.requires_grad_(False)


def _tune_full(encoder: SegEncoder, cfg: SegAdapterConfig) -> None:
    encoder.requires_grad_(True)


TUNING_MODES: dict[str, Callable[[SegEncoder, SegAdapterConfig], None]] = {
    "adapter": _tune_adapter,
    "frozen": _tune_frozen,
    "full": _tune_full,
}


def _train_extras(encoder: SegEncoder, cfg: SegAdapterConfig, *, verbose: bool = True) -> None:
    """Unfreeze norm layers (``train_norms``) and parameters matching ``extra_trainable``."""
    if cfg.train_norms:
        for module in encoder.model.modules():
            if isinstance(module, _NORMS):
                module.requires_grad_(True)
    if cfg.extra_trainable:
        patterns = [re.compile(p) for p in cfg.extra_trainable]
        hits = {p.pattern: 0 for p in patterns}
        for name, param in encoder.model.named_parameters():
            for pattern in patterns:
                if pattern.fullmatch(name):
                    param.requires_grad_(True)
                    hits[pattern.pattern] += 1
        unused = [p for p, n in hits.items() if n == 0]
        name = encoder.record.name
        if unused and len(unused) == len(hits):
            raise ValueError(
                f"adapter.extra_trainable {unused} match no parameter of {name} (full-match regexes on "
                f"names like {_name_examples(encoder.model)}); train no extra parameters with "
                "--set 'adapter.extra_trainable=[]', or give patterns for this encoder"
            )
        if unused:
            # Shipped configs list alternatives for several encoder families (SAM's ``rel_pos_h/w``
            # next to every ViT's ``pos_embed``): switching encoder must not need a config edit,
            # but a pattern that matches nothing is still said out loud.
            used = {p: n for p, n in hits.items() if n}
            log.log(
                logging.WARNING if verbose else logging.DEBUG,
                "adapter.extra_trainable %s match no parameter of %s and are ignored (%s train); "
                "set adapter.extra_trainable=%s to silence this",
                unused,
                name,
                ", ".join(f"{p!r}: {n} tensor(s)" for p, n in used.items()),
                list(used),
            )


def _name_examples(model: nn.Module, limit: int = 6) -> str:
    """A few parameter names outside the repeated blocks (where positions, tokens and stems live)."""
    names = [n for n, _ in model.named_parameters()]
    outside = [n for n in names if not any(part.isdigit() for part in n.split("."))]
    picked = (outside or names)[:limit]
    return ", ".join(picked) + (" ..." if len(names) > len(picked) else "")


def build_model(cfg: SegmentTrainConfig, *, verbose: bool = True) -> SegmentationModel:
    """Encoder (weights loaded, fingerprinted) → tuning mode → extras → decoder.

    ``verbose=False`` (rebuilding a trained checkpoint) keeps config warnings, already shown at
    training time, out of the log.
    """
    m = cfg.model
    encoder = build_encoder(
        m.encoder,
        m.weights,
        img_size=m.img_size,
        kwargs=m.encoder_kwargs,
        seed=cfg.seed,
        layers=m.feature_layers,
    )
    base_pointers = {t.data_ptr() for t in encoder.state_dict().values() if t.numel()}
    TUNING_MODES[cfg.adapter.mode](encoder, cfg.adapter)
    if cfg.adapter.mode != "full":
        _train_extras(encoder, cfg.adapter, verbose=verbose)
    decoder_name, decoder = build_decoder(m.decoder, encoder, cfg.data.num_classes, m.decoder_channels)
    model = SegmentationModel(encoder, decoder, num_classes=cfg.data.num_classes, decoder_name=decoder_name)
    model.base_pointers = base_pointers
    model.base_buffers = {
        key: tensor.detach().cpu().clone()
        for key, tensor in model.named_buffers()
        if key.startswith("encoder.")
    }
    return model


def persistent_keys(model: SegmentationModel) -> set[str]:
    """State-dict keys a checkpoint must hold (the frozen encoder's own tensors are left out).

    Kept: the decoder; every trainable parameter; every buffer of a module that has trainable
    parameters (e.g. BatchNorm statistics of trained norms); any tensor the tuning created (adapter
    factors, SVD bases); every encoder buffer whose value changed since the encoder was built
    (:meth:`SegmentationModel.changed_buffers`; called again at each save). Left out: tensors
    whose storage and value are the encoder's as built and frozen.
    """
    trainable_modules = {
        name
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(False))
    }
    params = dict(model.named_parameters())
    keep = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if (
            key.startswith("decoder.")
            or (key in params and params[key].requires_grad)
            or (owner in trainable_modules and key not in params)
            or (tensor.numel() and tensor.data_ptr() not in model.base_pointers)
        ):
            keep.add(key)
    return keep | model.changed_buffers()


def trainable_summary(model: SegmentationModel) -> dict[str, Any]:
    """Trainable parameter count and share of the whole network, split by part."""
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in model.decoder.parameters() if p.requires_grad)
    trainable = encoder + decoder
    return {
        "trainable": trainable,
        "total": total,
        "share": trainable / total if total else 0.0,
        "encoder_trainable": encoder,
        "decoder": decoder,
        "encoder_total": sum(p.numel() for p in model.encoder.parameters()),
    }
