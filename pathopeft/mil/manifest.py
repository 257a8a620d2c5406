"""Training manifests: ``slide_id,label[,split|fold]`` CSVs — read, validated, split, and built.

Schema (see ``data_manifests/README.md``): ``slide_id`` (matches the bag's file stem), ``label``
(a class name from the config, case-insensitive, or a class index), optional ``split``
(``train``/``val``/``test``) and/or ``fold`` (an integer). Several manifests can be concatenated.

:func:`build_manifest` is what ``pathopeft manifest`` runs: it joins a labels CSV (``slide_id,label``
with a header, or CAMELYON16's official header-less ``reference.csv``) with the slides found in a
tiles / features / slide folder, and assigns a seeded stratified split or folds.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pathopeft.config import ConfigError
from pathopeft.wsi.discovery import SLIDE_SUFFIXES, slide_id_for

__all__ = [
    "SPLITS",
    "assign_splits",
    "build_manifest",
    "parse_label",
    "read_labels",
    "read_manifest",
    "slides_in",
    "stratified_folds",
    "stratified_split",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_BAG_SUFFIXES = {".h5", ".hdf5", ".pt"}


# --- reading ----------------------------------------------------------------------------------
def parse_label(value: object, classes: Sequence[str]) -> int:
    """A label cell → class index; class names match case-insensitively, integers index ``classes``."""
    text = str(value).strip()
    lowered = [c.lower() for c in classes]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"label {text!r} is not one of the classes {list(classes)}") from None
    if number.is_integer() and 0 <= int(number) < len(classes):
        return int(number)
    raise ValueError(f"label {text!r} is not a class index 0..{len(classes) - 1} or a class {list(classes)}")


def read_manifest(paths: str | Path | Sequence[str | Path], classes: Sequence[str]) -> pd.DataFrame:
    """Concatenate manifests into columns slide_id, label (int), label_name, split, fold, source.

    Every problem (missing columns, unknown labels, duplicate slides, bad splits) is collected and
    raised as one :class:`ConfigError` naming the file, row and slide.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames, problems = [], []
    for path in map(Path, paths):
        if not path.is_file():
            problems.append(f"{path}: manifest not found (paths are relative to the current directory)")
            continue
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        frame.columns = [c.strip().lower() for c in frame.columns]
        missing = [c for c in ("slide_id", "label") if c not in frame.columns]
        if missing:
            problems.append(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
            continue
        frame["source"] = [f"{path}:{i + 2}" for i in range(len(frame))]
        frames.append(frame)
    if problems:
        raise ConfigError("\n".join(problems))
    df = pd.concat(frames, ignore_index=True)
    df["slide_id"] = df["slide_id"].str.strip()
    labels, names = [], []
    for row in df.itertuples():
        try:
            index = parse_label(row.label, classes)
        except ValueError as exc:
            problems.append(f"{row.source}: slide {row.slide_id!r}: {exc}")
            index = -1
        labels.append(index)
        names.append(classes[index] if index >= 0 else "")
    df["label"], df["label_name"] = labels, names
    if "split" in df.columns:
        df["split"] = df["split"].str.strip().str.lower().replace("", None)
        bad = df[df["split"].notna() & ~df["split"].isin(SPLITS)]
        problems += [
            f"{r.source}: slide {r.slide_id!r}: split {r.split!r} is not one of {SPLITS}"
            for r in bad.itertuples()
        ]
    else:
        df["split"] = None
    if "fold" in df.columns:
        folds = pd.to_numeric(df["fold"].replace("", None), errors="coerce")
        bad = df[df["fold"].ne("") & folds.isna()]
        problems += [
            f"{r.source}: slide {r.slide_id!r}: fold {r.fold!r} is not an integer" for r in bad.itertuples()
        ]
        df["fold"] = folds.astype("Int64")
    else:
        df["fold"] = pd.array([pd.NA] * len(df), dtype="Int64")
    dupes = df[df["slide_id"].duplicated(keep=False)]
    for sid, group in dupes.groupby("slide_id"):
        problems.append(f"slide {sid!r} is listed more than once ({', '.join(group['source'])})")
    empty = df[df["slide_id"] == ""]
    problems += [f"{r.source}: empty slide_id" for r in empty.itertuples()]
    if problems:
        raise ConfigError("invalid manifest:\n  - " + "\n  - ".join(problems))
    return df[["slide_id", "label", "label_name", "split", "fold", "source"]]


# --- splitting --------------------------------------------------------------------------------
def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask choosing ``round(fraction · n_c)`` items of every class c (seeded)."""
    labels = np.asarray(labels)
    chosen = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        k = round(fraction * len(idx))
        if fraction > 0 and k == 0 and len(idx) >= 2:
            k = 1  # every class appears in the held-out part when it has 2+ members
        chosen[rng.permutation(idx)[:k]] = True
    return chosen


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> np.ndarray:
    """Fold index 0..k-1 per item, classes spread evenly over folds (seeded)."""
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    labels = np.asarray(labels)
    folds = np.zeros(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    offset = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return folds


def assign_splits(df: pd.DataFrame, *, fold: int | None, val_fraction: float, seed: int) -> pd.DataFrame:
    """Resolve every row's split to train/val/test.

    With ``fold``: rows of that fold are val, rows of other folds train (rows marked ``split=test``
    stay test). Otherwise the ``split`` column is used; rows without one are train. When no row is
    val, a stratified ``val_fraction`` of train is carved out (seeded). No training or no validation
    slide at the end is a :class:`ConfigError` that says why.
    """
    df = df.copy()
    split = df["split"].fillna("train").astype(object)
    if fold is not None:
        if df["fold"].isna().all():
            raise ConfigError(f"data.fold={fold} but no manifest has a 'fold' column")
        if not (df["fold"] == fold).any():
            raise ConfigError(
                f"data.fold={fold}: no slide has that fold (folds: {sorted(df['fold'].dropna().unique())})"
            )
        in_fold = (df["fold"] == fold).fillna(False).to_numpy(bool)
        split = np.where(split == "test", "test", np.where(in_fold, "val", "train")).astype(object)
    df["split"] = split
    if not (df["split"] == "train").any():
        raise ConfigError("no training slides after splitting the manifest")
    if not (df["split"] == "val").any():
        train = np.flatnonzero(df["split"].to_numpy() == "train")
        if val_fraction > 0:
            carve = stratified_split(df["label"].to_numpy()[train], val_fraction, seed)
            df.loc[df.index[train[carve]], "split"] = "val"
        if not (df["split"] == "val").any():
            raise ConfigError(_no_validation_message(df.iloc[train], fold, val_fraction))
    return df


def _no_validation_message(train: pd.DataFrame, fold: int | None, val_fraction: float) -> str:
    """Why no slide ended up in validation, and what the user can do about it."""
    if fold is not None:
        return f"no validation slides: every slide of fold {fold} has split=test; choose another data.fold"
    fixes = "add split=val rows to the manifest, or a fold column and data.fold"
    if val_fraction <= 0:
        return (
            "no validation slides: the manifest has no split=val rows and data.val_fraction is 0; "
            f"{fixes}, or set data.val_fraction > 0 (e.g. 0.2)"
        )
    counts = train["label_name"].value_counts().sort_index()
    per_class = ", ".join(f"{name}: {count}" for name, count in counts.items())
    return (
        f"no validation slides: the manifest has no split=val rows, and data.val_fraction={val_fraction:g} "
        f"carves none out of its {len(train)} training slide(s) ({per_class}): a class with a single "
        f"training slide keeps it for training; {fixes}, or list more training slides"
    )


# --- building ---------------------------------------------------------------------------------
def read_labels(path: str | Path) -> pd.DataFrame:
    """slide_id,label from a labels CSV with a header, or CAMELYON16's header-less ``reference.csv``.

    ``reference.csv`` rows look like ``test_001,Tumor,Macro,`` (id, class, metastasis size, …); the
    id may carry a ``.tif`` suffix, which is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: labels file not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [[c.strip() for c in row] for row in csv.reader(fh) if any(c.strip() for c in row)]
    if not rows:
        raise ConfigError(f"{path}: empty labels file")
    header = [c.lower() for c in rows[0]]
    if "slide_id" in header and "label" in header:
        sid, lab = header.index("slide_id"), header.index("label")
        body = rows[1:]
    elif len(rows[0]) >= 2 and "slide_id" not in header:
        sid, lab, body = 0, 1, rows  # header-less: first column id, second label (reference.csv)
        if header[0] in {"image", "id", "slide", "name"}:
            body = rows[1:]
    else:
        raise ConfigError(f"{path}: expected columns slide_id,label; found {rows[0]}")
    short = [i + 1 for i, r in enumerate(body) if len(r) <= max(sid, lab)]
    if short:
        raise ConfigError(f"{path}: row(s) {short[:10]} have fewer than {max(sid, lab) + 1} columns")
    ids = [_strip_suffix(r[sid]) for r in body]
    return pd.DataFrame({"slide_id": ids, "label": [r[lab] for r in body]})


def slides_in(source: str | Path) -> list[str]:
    """Slide ids in a ``pathopeft tile`` output folder, a folder of bags, or a folder of slides."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        if "slide_id" not in frame.columns:
            raise ConfigError(f"{source}: no slide_id column")
        if "status" in frame.columns:
            frame = frame[frame["status"].str.lower() == "ok"]
        return sorted(frame["slide_id"].str.strip())
    if not source.is_dir():
        raise ConfigError(f"{source}: not a folder or CSV")
    if (source / "manifest.csv").is_file():  # a `pathopeft tile` output folder
        return slides_in(source / "manifest.csv")
    files = [p for p in source.rglob("*") if p.is_file() and not p.name.startswith(".")]
    bags = {p.stem for p in files if p.suffix.lower() in _BAG_SUFFIXES}
    slides = {slide_id_for(p) for p in files if p.suffix.lower() in SLIDE_SUFFIXES}
    found = sorted(bags | slides)
    if not found:
        raise ConfigError(f"{source}: no slides, feature bags or tiles/manifest.csv found")
    return found


def build_manifest(
    labels: str | Path,
    source: str | Path | None = None,
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    folds: int | None = None,
    split: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A manifest (slide_id,label,split | slide_id,label,fold) for the labelled slides of ``source``."""
    table = read_labels(labels)
    dupes = sorted(table.loc[table["slide_id"].duplicated(), "slide_id"])
    if dupes:
        raise ConfigError(f"{labels}: slides labelled more than once: {dupes[:10]}")
    if source is not None:
        present = set(slides_in(source))
        unlabelled = sorted(present - set(table["slide_id"]))
        if unlabelled:
            log.warning(
                "%d slide(s) in %s have no label and are left out: %s",
                len(unlabelled),
                source,
                unlabelled[:10],
            )
        table = table[table["slide_id"].isin(present)]
        if table.empty:
            raise ConfigError(f"none of the slides in {source} has a label in {labels}")
    table = table.sort_values("slide_id").reset_index(drop=True)
    codes = pd.factorize(table["label"].str.lower())[0]
    if split is not None:
        if split not in SPLITS:
            raise ConfigError(f"--split must be one of {SPLITS}, got {split!r}")
        table["split"] = split
    elif folds:
        table["fold"] = stratified_folds(codes, folds, seed)
    else:
        if val_fraction + test_fraction >= 1:
            raise ConfigError("val and test fractions must leave some slides for training")
        out = np.full(len(table), "train", dtype=object)
        test = (
            stratified_split(codes, test_fraction, seed) if test_fraction > 0 else np.zeros(len(table), bool)
        )
        out[test] = "test"
        rest = np.flatnonzero(~test)
        val = stratified_split(codes[rest], val_fraction / (1 - test_fraction), seed + 1)
        out[rest[val]] = "val"
        table["split"] = out
    return table


def _strip_suffix(name: str) -> str:
    """A slide id as ``pathopeft tile`` names it, from a file name (bag or slide) or a bare id."""
    path = Path(name)
    suffix = path.suffix.lower()
    if suffix in _BAG_SUFFIXES:
        return path.stem
    return slide_id_for(path) if suffix in SLIDE_SUFFIXES else name
