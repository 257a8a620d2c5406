"""Segmentation checkpoints: what they record and how a model is rebuilt from one.

A ``segment train`` checkpoint is a Lightning ``.ckpt`` whose ``state_dict`` holds only the
adapter, the decoder and any trained norms (see :func:`pathopeft.seg.model.persistent_keys`), plus
a ``pathopeft`` block (plain data, so ``torch.load(weights_only=True)`` reads it)::

    format: "pathopeft-segment", version: 1
    config: the resolved run config (data, model, adapter, loss, ...)
    encoder: {name, weights, weights_path, weights_sha256, seed, img_size, kwargs, fingerprint}
    decoder, num_classes, label_values, mean, std, trainable: {trainable, total, share, ...}

The frozen encoder is rebuilt from ``encoder``: a local weights file must still exist and have the
recorded SHA-256; hub weights are fetched by timm again; a random-init encoder is rebuilt from the
recorded seed. In every case the rebuilt encoder's fingerprint (SHA-256 of its tensors) must equal
the recorded one, so a checkpoint never silently runs on another encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pathopeft.config.segment import SegmentTrainConfig
from pathopeft.files import sha256_file
from pathopeft.runs import load_checkpoint

__all__ = ["FORMAT", "check_encoder", "checkpoint_meta", "load_segmentation_checkpoint"]

FORMAT = "pathopeft-segment"
VERSION = 1


def checkpoint_meta(model: Any, cfg: SegmentTrainConfig) -> dict[str, Any]:
    """The ``pathopeft`` block written into every checkpoint (plain JSON-like data only)."""
    from pathopeft.seg.model import trainable_summary

    return {
        "format": FORMAT,
        "version": VERSION,
        "config": cfg.model_dump(mode="json"),
        "encoder": model.encoder.record.to_dict(),
        "decoder": model.decoder_name,
        "num_classes": cfg.data.num_classes,
        "label_values": cfg.data.label_values,
        "mean": list(model.encoder.mean),
        "std": list(model.encoder.std),
        "trainable": trainable_summary(model),
    }


def check_encoder(meta: dict[str, Any] | None, model: Any, *, source: str) -> None:
    """Refuse a checkpoint that is not ours or was trained on another encoder."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{source}: not a pathopeft segmentation checkpoint (no 'pathopeft' block)")
    saved, current = meta.get("encoder", {}), model.encoder.record
    if saved.get("name") != current.name:
        raise ValueError(
            f"{source}: trained on encoder {saved.get('name')!r}, refusing to load it onto {current.name!r}"
        )
    if saved.get("fingerprint") != current.fingerprint:
        raise ValueError(
            f"{source}: the encoder weights differ from the ones it was trained on "
            f"(fingerprint {str(saved.get('fingerprint'))[:12]}… recorded, {current.fingerprint[:12]}… now; "
            f"weights {saved.get('weights')!r} → {current.weights!r})"
        )


def load_segmentation_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[Any, SegmentTrainConfig, dict[str, Any]]:
    """Rebuild the trained network from a checkpoint: ``(model (eval mode), config, meta)``."""
    from pathopeft.seg.model import build_model

    path = Path(path)
    checkpoint = load_checkpoint(path)
    meta = checkpoint.get("pathopeft")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pathopeft segmentation checkpoint (no 'pathopeft' block)")
    cfg = SegmentTrainConfig.model_validate(meta["config"])
    encoder = meta["encoder"]
    if encoder.get("weights_path"):
        weights = Path(encoder["weights_path"])
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path}: its encoder weights {weights} are gone; the frozen encoder is not stored "
                "in the checkpoint, so they are needed to rebuild it"
            )
        digest = sha256_file(weights)
        if digest != encoder.get("weights_sha256"):
            raise ValueError(
                f"{path}: encoder weights {weights} changed since training "
                f"(sha256 {digest[:12]}…, recorded {str(encoder.get('weights_sha256'))[:12]}…)"
            )
        cfg.model.weights = str(weights)
    model = build_model(cfg, verbose=False)
    check_encoder(meta, model, source=str(path))
    saved = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    state = model.state_dict()
    unknown = sorted(set(saved) - set(state))
    if unknown:
        raise ValueError(f"{path}: holds tensors this model lacks ({unknown[:5]}); adapter settings differ?")
    state.update(saved)
    model.load_state_dict(state)
    return model.to(map_location).eval(), cfg, meta
