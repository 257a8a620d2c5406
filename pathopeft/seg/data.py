"""Segmentation data: find image/mask pairs, read them, check them, split them.

Two layouts are accepted: a folder with ``images/`` and ``masks/`` whose files pair up by stem
(PNG, TIFF, JPEG), or a CSV with ``image``, ``mask`` and optional ``split`` and ``group`` columns
(``group``: the patient or slide an image comes from; the seeded split then assigns whole groups,
so tiles of one patient never land in both train and test). A path listed twice is refused. Every problem a
user can fix — a mask without an image, sizes that differ, an unreadable file, a label outside the
configured classes, an empty split — raises :class:`SegDataError` naming the file, before training
starts rather than an hour into it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pathopeft.suffixes import IMAGE_SUFFIXES

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "LabelMap",
    "Sample",
    "SegDataError",
    "check_samples",
    "discover_samples",
    "find_images",
    "image_shape",
    "read_image",
    "read_mask",
    "rescale_pair",
    "split_samples",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_TIFF = (".tif", ".tiff")


class SegDataError(ValueError):
    """Bad segmentation input; the message names the file (or the CSV row) to fix."""


@dataclass(frozen=True)
class Sample:
    """One image and its mask (``mask`` is None for prediction inputs)."""

    image: Path
    mask: Path | None = None
    split: str | None = None
    group: str | None = None  # patient / slide: a group's images always share one split

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass(frozen=True)
class LabelMap:
    """How mask pixel values map to class indices (and back, for written predictions)."""

    num_classes: int
    label_values: tuple[int, ...] | None = None

    def to_classes(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """Class-index mask (uint8 or int32) from raw pixel values; bad values name the file."""
        values = np.unique(mask)
        if self.label_values is not None:
            allowed = np.asarray(self.label_values)
            bad = np.setdiff1d(values, allowed)
            if bad.size:
                raise SegDataError(
                    f"{path}: mask holds values {_few(bad)} outside the configured label_values "
                    f"{list(self.label_values)}"
                )
            lut = np.zeros(int(max(values.max(), allowed.max())) + 1, dtype=np.int32)
            lut[allowed] = np.arange(len(allowed))
            return lut[mask].astype(_index_dtype(self.num_classes))
        if self.num_classes == 2:
            if np.isin(values, (0, 1)).all():
                return mask.astype(np.uint8)
            if np.isin(values, (0, 255)).all():
                return (mask > 0).astype(np.uint8)
            raise SegDataError(
                f"{path}: a binary mask must hold 0/1 or 0/255, found values {_few(values)} "
                "(set data.num_classes for a multi-class mask, or data.label_values)"
            )
        bad = values[values >= self.num_classes]
        if bad.size:
            raise SegDataError(
                f"{path}: mask holds labels {_few(bad)} outside the configured classes "
                f"0..{self.num_classes - 1} (data.num_classes={self.num_classes})"
            )
        return mask.astype(_index_dtype(self.num_classes))

    def to_values(self, classes: np.ndarray) -> np.ndarray:
        """Pixel values to write for a predicted class map (binary: 0/255, visible in any viewer)."""
        if self.label_values is not None:
            values = np.asarray(self.label_values)
            dtype = np.uint8 if values.max() <= 255 else np.uint16
            return values[classes].astype(dtype)
        if self.num_classes == 2:
            return (classes > 0).astype(np.uint8) * 255
        return classes.astype(np.uint8 if self.num_classes <= 256 else np.uint16)


def _index_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 256 else np.int32


def _few(values: np.ndarray, n: int = 6) -> str:
    items = [int(v) for v in values[:n]]
    return str(items)[:-1] + (", ...]" if len(values) > n else "]")


# ----------------------------------------------------------------------------------------- reading
def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey is repeated, alpha dropped, 16-bit scaled down."""
    path = Path(path)
    array = _decode(path, colour=True)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise SegDataError(f"{path}: expected an RGB or grey image, got an array of shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise SegDataError(f"{path}: unsupported pixel type {array.dtype} (expected 8- or 16-bit)")
    return np.ascontiguousarray(array)


def read_mask(path: str | Path, labels: LabelMap) -> np.ndarray:
    """Class-index mask (H, W) from a single-channel (or grey-as-RGB) label image."""
    path = Path(path)
    array = _decode(path, colour=False)
    if array.ndim == 3:
        if (
            array.shape[-1] in (3, 4)
            and all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, 3))
        ) or array.shape[-1] == 1:
            array = array[..., 0]
        else:
            raise SegDataError(
                f"{path}: a mask must have one channel of labels (got shape {array.shape}; "
                "colour-coded masks are not supported — store class labels as grey values)"
            )
    if not np.issubdtype(array.dtype, np.integer):
        raise SegDataError(f"{path}: mask pixel type {array.dtype} is not an integer label type")
    return labels.to_classes(array, path)


def image_shape(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the file header where possible (no full decode)."""
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
        from PIL import Image

        with Image.open(path) as img:
            width, height = img.size
            return int(height), int(width)
    except Exception as exc:
        raise SegDataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc


def _decode(path: Path, *, colour: bool) -> np.ndarray:
    if not path.is_file():
        raise SegDataError(f"{path}: file not found")
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            return np.asarray(tifffile.imread(path, key=0))
        flags = cv2.IMREAD_UNCHANGED
        array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), flags)
    except Exception as exc:
        raise SegDataError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from exc
    if array is None:
        raise SegDataError(f"{path}: cannot read image (not a valid PNG/JPEG/TIFF file)")
    if array.ndim == 3 and array.shape[-1] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[-1] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    return array


def rescale_pair(
    image: np.ndarray, mask: np.ndarray | None, factor: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample an image (area/linear) and its mask (nearest) by ``factor``."""
    if factor == 1.0:
        return image, mask
    height, width = image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, size, interpolation=interp)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return image, mask


# --------------------------------------------------------------------------------------- discovery
def find_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (hidden and partial files skipped), sorted."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def discover_samples(
    root: str | Path | None,
    csv: str | Path | None = None,
    *,
    images_dir: str = "images",
    masks_dir: str = "masks",
    mask_suffix: str = "",
) -> list[Sample]:
    """Image/mask pairs from a CSV (``image, mask[, split]``) or a folder of ``images/`` + ``masks/``."""
    if csv is not None:
        return _from_csv(Path(csv))
    if root is None:
        raise SegDataError("no data given: set data.root (a folder with images/ and masks/) or data.csv")
    root = Path(root)
    image_root, mask_root = root / images_dir, root / masks_dir
    for folder, key in ((image_root, "images_dir"), (mask_root, "masks_dir")):
        if not folder.is_dir():
            raise SegDataError(f"{folder}: folder not found (data.root={root}, data.{key})")
    images = _by_stem(find_images(image_root))
    masks = _by_stem(find_images(mask_root), strip=mask_suffix)
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        files = [str(masks[s]) for s in lonely_masks]
        raise SegDataError(f"mask without an image: {_few_paths(files)} (no {image_root}/<stem>.*)")
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        files = [str(images[s]) for s in lonely_images]
        raise SegDataError(
            f"image without a mask: {_few_paths(files)} (no {mask_root}/<stem>{mask_suffix}.*)"
        )
    if not images:
        raise SegDataError(f"{image_root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Sample(images[s], masks[s]) for s in sorted(images)]


def _by_stem(files: Sequence[Path], strip: str = "") -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in files:
        stem = path.stem
        if strip:
            if not stem.endswith(strip):
                raise SegDataError(f"{path}: mask name does not end with data.mask_suffix={strip!r}")
            stem = stem[: -len(strip)]
        if stem in out:
            raise SegDataError(f"{out[stem]} and {path} share the stem {stem!r}; keep one")
        out[stem] = path
    return out


def _few_paths(files: list[str], n: int = 3) -> str:
    return ", ".join(files[:n]) + (f" and {len(files) - n} more" if len(files) > n else "")


def _from_csv(csv: Path) -> list[Sample]:
    import pandas as pd

    if not csv.is_file():
        raise SegDataError(f"{csv}: CSV not found")
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise SegDataError(f"{csv}: cannot read CSV ({exc})") from exc
    missing = {"image", "mask"} - set(frame.columns)
    if missing:
        raise SegDataError(f"{csv}: missing column(s) {sorted(missing)} (need image, mask[, split, group])")
    if frame.empty:
        raise SegDataError(f"{csv}: no rows")
    samples = []
    seen: dict[Path, int] = {}
    for row_no, row in enumerate(frame.itertuples(index=False), start=2):
        image, mask = (csv.parent / row.image).resolve(), (csv.parent / row.mask).resolve()
        for path, what in ((image, "image"), (mask, "mask")):
            if not path.is_file():
                raise SegDataError(f"{csv} line {row_no}: {what} file {path} not found")
        for path, what in ((image, "image"), (mask, "mask")):
            if path in seen:
                raise SegDataError(
                    f"{csv} line {row_no}: {what} {path} is already listed on line {seen[path]}; "
                    "an image listed twice could land in train and test"
                )
            seen[path] = row_no
        split = getattr(row, "split", "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise SegDataError(f"{csv} line {row_no}: split {split!r} is not one of {', '.join(SPLITS)}")
        group = getattr(row, "group", "").strip() or None
        samples.append(Sample(image, mask, split, group))
    for column in ("split", "group"):
        given = {getattr(s, column) is not None for s in samples}
        if given == {True, False}:
            raise SegDataError(f"{csv}: the {column} column is filled for some rows only; fill all or none")
    return samples


# ---------------------------------------------------------------------------------- checks, split
def check_samples(samples: Sequence[Sample], labels: LabelMap) -> None:
    """Every image readable, every mask readable with valid labels and the image's size.

    Images are decoded in full, not just their headers: a truncated file must fail here, named,
    not in a DataLoader worker an epoch into training.
    """
    for sample in samples:
        height, width = read_image(sample.image).shape[:2]
        if sample.mask is None:
            continue
        mask = read_mask(sample.mask, labels)
        if mask.shape != (height, width):
            raise SegDataError(
                f"{sample.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{sample.image} ({width}x{height})"
            )


def split_samples(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Use the given split column, or draw a seeded split (of whole groups when a ``group``
    column is given); a group spread over splits, or an empty split, is an error."""
    grouped = bool(samples) and all(s.group is not None for s in samples)
    if samples and all(s.split is not None for s in samples):
        out = {name: [s for s in samples if s.split == name] for name in SPLITS}
    elif grouped:
        out = _split_groups(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    else:
        order = np.random.default_rng(seed).permutation(len(samples))
        n_val = max(1, round(len(samples) * val_fraction))
        n_test = max(1, round(len(samples) * test_fraction))
        shuffled = [samples[i] for i in order]
        out = {
            "val": sorted(shuffled[:n_val], key=_key),
            "test": sorted(shuffled[n_val : n_val + n_test], key=_key),
            "train": sorted(shuffled[n_val + n_test :], key=_key),
        }
    if grouped:
        where: dict[str, set[str]] = {}
        for name in SPLITS:
            for sample in out[name]:
                where.setdefault(str(sample.group), set()).add(name)
        spread = {g: sorted(n) for g, n in where.items() if len(n) > 1}
        if spread:
            group, names = next(iter(spread.items()))
            raise SegDataError(
                f"group {group!r} has images in {' and '.join(names)} (split column): one patient/slide "
                "must stay in one split"
            )
    for name in SPLITS:
        if not out[name]:
            raise SegDataError(
                f"split {name!r} is empty ({len(samples)} image(s) in all; "
                "add images, change data.val_fraction/test_fraction, or fix the CSV's split column)"
            )
    return out


def _split_groups(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Whole groups in seeded order: val until it holds its share of images, then test, then train."""
    groups = sorted({str(s.group) for s in samples})
    order = [groups[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    members = {g: [s for s in samples if s.group == g] for g in groups}
    targets = {
        "val": max(1, round(len(samples) * val_fraction)),
        "test": max(1, round(len(samples) * test_fraction)),
    }
    out: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for group in order:
        name = next((n for n in ("val", "test") if len(out[n]) < targets[n]), "train")
        out[name] += members[group]
    return {name: sorted(items, key=_key) for name, items in out.items()}


def _key(sample: Sample) -> str:
    return str(sample.image)
