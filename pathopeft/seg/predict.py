"""``pathopeft segment predict CHECKPOINT INPUT... --out DIR``: masks (and overlays) for new images.

The network is rebuilt from the checkpoint alone (see :mod:`pathopeft.seg.checkpoint`), inference
is the same as at evaluation (sliding window or resize, as trained), and each mask is written as
``<stem>.png`` at the input's own size: binary masks as 0/255, multi-class masks as label values
(``data.label_values`` when configured). ``--overlay`` adds ``<stem>_overlay.png``: the image with
each class tinted and outlined, for a quick visual check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pathopeft.config import ConfigError
from pathopeft.files import atomic_write_bytes
from pathopeft.seg.checkpoint import load_segmentation_checkpoint
from pathopeft.seg.data import IMAGE_SUFFIXES, LabelMap, SegDataError, find_images, read_image, rescale_pair
from pathopeft.seg.datamodule import eval_transform
from pathopeft.seg.metrics import predict_logits

__all__ = ["collect_inputs", "overlay_image", "predict_masks", "write_png"]

log = logging.getLogger(__name__)

# class colours for overlays (RGB); class 0 (background) is never drawn
_PALETTE = np.array(
    [[0, 0, 0], [0, 220, 0], [230, 40, 40], [40, 110, 255], [255, 200, 0], [200, 0, 200], [0, 200, 200]],
    dtype=np.uint8,
)


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files from folders (their direct images) and file arguments; stems must be unique."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = find_images(item)
            if not found:
                raise SegDataError(f"{item}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_SUFFIXES:
                raise SegDataError(f"{item}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.append(item)
        else:
            raise SegDataError(f"{item}: no such file or folder")
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise SegDataError(f"{seen[path.stem]} and {path} would both write {path.stem}.png")
        seen[path.stem] = path
    return files


def write_png(path: Path, array: np.ndarray) -> None:
    """Encode in memory, then write atomically (RGB arrays are converted to OpenCV's BGR)."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


def overlay_image(image: np.ndarray, classes: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """The image with every foreground class tinted and its outline drawn."""
    out = image.astype(np.float32)
    colours = _PALETTE[np.arange(int(classes.max()) + 1) % len(_PALETTE)]
    colours[0] = 0
    tint = colours[classes].astype(np.float32)
    foreground = (classes > 0)[..., None]
    out = np.where(foreground, (1 - alpha) * out + alpha * tint, out).astype(np.uint8)
    for label in range(1, int(classes.max()) + 1):
        contours, _ = cv2.findContours(
            (classes == label).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE
        )
        colour = tuple(int(c) for c in _PALETTE[label % len(_PALETTE)])
        cv2.drawContours(out, contours, -1, colour, 1)
    return out


def _device(name: str) -> torch.device:
    """``--device`` as a torch device, refused up front (exit 2) when this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a torch device (auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def predict_masks(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    overlay: bool = False,
    device: str = "auto",
    sw_batch_size: int | None = None,
) -> list[Path]:
    """Write one mask PNG per input image (plus overlays); return the mask paths."""
    files = collect_inputs(inputs)
    out_dir = Path(out_dir)
    targets = {(out_dir / f"{p.stem}.png").resolve() for p in files}
    clash = [p for p in files if p.resolve() in targets]
    if clash:
        raise SegDataError(f"{clash[0]}: --out would overwrite this input; choose another output folder")
    torch_device = _device(device)
    model, cfg, meta = load_segmentation_checkpoint(checkpoint, map_location=torch_device)
    data = cfg.data
    labels = LabelMap(data.num_classes, tuple(data.label_values) if data.label_values else None)
    transform = eval_transform(meta["mean"], meta["std"])
    written: list[Path] = []
    for path in files:
        image = read_image(path)
        height, width = image.shape[:2]
        work, _ = rescale_pair(image, None, data.rescale)
        tensor = transform(image=work)["image"][None].to(torch_device)
        logits = predict_logits(
            model,
            tensor,
            mode=data.mode,
            img_size=cfg.model.img_size,
            overlap=data.overlap,
            sw_batch_size=sw_batch_size or data.sw_batch_size,
        )
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        classes = logits.argmax(1)[0].cpu().numpy().astype(np.int64)
        mask_path = out_dir / f"{path.stem}.png"
        write_png(mask_path, labels.to_values(classes))
        if overlay:
            write_png(out_dir / f"{path.stem}_overlay.png", overlay_image(image, classes))
        written.append(mask_path)
        log.info("%s -> %s", path, mask_path)
    return written
