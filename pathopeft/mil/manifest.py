"""Training manifests: ``slide_id,label[,split|fold]`` CSVs — read, validated, split, and built.

Schema (see ``data_manifests/README.md``): ``slide_id`` (matches the bag's file stem), ``label``
(a class name from the config, case-insensitive, or a class index), optional ``split``
(``train``/``val``/``test``) and/or ``fold`` (an integer), optional ``case_id`` (the patient).
Several manifests can be concatenated.

Splits are drawn per case, not per slide, so that slides of one patient never sit on both sides of
a split (TCGA cohorts have several slides per patient; per-slide splits would be optimistic). When
``case_id`` is absent or empty, a TCGA barcode (``TCGA-XX-XXXX-…``) gives its first 12 characters
(the patient); any other slide is its own case. A case whose slides have different labels is
stratified by its majority label (ties: the lowest class index); a case whose explicit ``split`` or
``fold`` values disagree is refused.

:func:`build_manifest` is what ``pathopeft manifest`` runs: it joins a labels CSV (``slide_id,label``
with a header, or CAMELYON16's official header-less ``reference.csv``) with the slides found in a
tiles / features / slide folder, and assigns a seeded stratified split or folds.
"""

from __future__ import annotations

import csv
import logging
import re
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
    "case_ids",
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
_TCGA = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}(?![A-Z0-9])", re.IGNORECASE)
_CASE_COLUMNS = ("case_id", "patient", "case_submitter_id")


def case_ids(slide_ids: Sequence[str], explicit: Sequence[str] | None = None) -> list[str]:
    """The case (patient) of every slide: the explicit value, else the TCGA patient, else the slide.

    A TCGA barcode's first 12 characters (``TCGA-TSS-PPPP``) name the patient; the rest names the
    sample, portion and slide, so slides sharing that prefix come from one person.
    """
    out = []
    for i, sid in enumerate(slide_ids):
        given = str(explicit[i]).strip() if explicit is not None else ""
        if given:
            out.append(given)
        elif _TCGA.match(sid):
            out.append(sid[:12].upper())
        else:
            out.append(sid)
    return out


def _case_conflicts(df: pd.DataFrame, column: str, missing: str) -> list[str]:
    """One message per case whose slides carry different ``column`` values (blank → ``missing``).

    Blank splits count as ``train`` (what :func:`assign_splits` makes of them), so a case with one
    ``val`` slide and one unmarked slide is refused too.
    """
    problems = []
    values = df[column].astype(object).where(df[column].notna(), missing).astype(str)
    for case, group in df.assign(value_=values).groupby("case_id", sort=True):
        seen = sorted(set(group["value_"]))
        if len(seen) > 1:
            slides = ", ".join(f"{r.slide_id} ({column}={r.value_}, {r.source})" for r in group.itertuples())
            problems.append(
                f"case {case!r} appears in more than one {column} ({', '.join(seen)}): {slides}; "
                f"all slides of a case (patient) must share one {column}"
            )
    return problems


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
    explicit = df["case_id"].tolist() if "case_id" in df.columns else None
    df["case_id"] = case_ids(df["slide_id"].tolist(), explicit)
    if not problems:
        problems += _case_conflicts(df, "split", "train") + _case_conflicts(df, "fold", "none")
    dupes = df[df["slide_id"].duplicated(keep=False)]
    for sid, group in dupes.groupby("slide_id"):
        problems.append(f"slide {sid!r} is listed more than once ({', '.join(group['source'])})")
    empty = df[df["slide_id"] == ""]
    problems += [f"{r.source}: empty slide_id" for r in empty.itertuples()]
    if problems:
        raise ConfigError("invalid manifest:\n  - " + "\n  - ".join(problems))
    return df[["slide_id", "case_id", "label", "label_name", "split", "fold", "source"]]


# --- splitting --------------------------------------------------------------------------------
def _by_case(labels: Sequence[int], groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(label of every case, case index of every item); a case's label is its majority label.

    Cases are numbered in order of first appearance, so with one slide per case the draw is the
    same as the per-slide one (seeded results of non-TCGA manifests do not change).
    """
    codes, uniques = pd.factorize(pd.Series(list(groups), dtype=object), sort=False)
    labels = np.asarray(labels)
    case_labels = np.empty(len(uniques), dtype=labels.dtype if len(labels) else np.int64)
    for c in range(len(uniques)):
        values, counts = np.unique(labels[codes == c], return_counts=True)
        case_labels[c] = values[np.argmax(counts)]  # np.unique sorts: ties go to the lowest label
    return case_labels, codes


def stratified_split(
    labels: Sequence[int], fraction: float, seed: int, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Boolean mask choosing ``round(fraction · n_c)`` items of every class c (seeded).

    With ``groups`` (a case id per item) whole cases are chosen, stratified by case label, so the
    fraction counts cases; every item of a chosen case is chosen.
    """
    if groups is not None:
        case_labels, codes = _by_case(labels, groups)
        return stratified_split(case_labels, fraction, seed)[codes]
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


def stratified_folds(
    labels: Sequence[int], k: int, seed: int, groups: Sequence[str] | None = None
) -> np.ndarray:
    """Fold index 0..k-1 per item, classes spread evenly over folds (seeded).

    With ``groups`` whole cases are dealt out to folds (stratified by case label).
    """
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    if groups is not None:
        case_labels, codes = _by_case(labels, groups)
        return stratified_folds(case_labels, k, seed)[codes]
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
    val, a stratified ``val_fraction`` of train is carved out (seeded), by whole case when the frame
    has a ``case_id`` column. No training or no validation
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
            groups = df["case_id"].to_numpy()[train] if "case_id" in df.columns else None
            carve = stratified_split(df["label"].to_numpy()[train], val_fraction, seed, groups)
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
    """slide_id,label[,case_id] from a labels CSV with a header, or CAMELYON16's ``reference.csv``.

    A ``case_id``, ``patient`` or ``case_submitter_id`` column (first found) becomes ``case_id``.

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
    case = None
    if "slide_id" in header and "label" in header:
        sid, lab = header.index("slide_id"), header.index("label")
        body = rows[1:]
        case = next((header.index(c) for c in _CASE_COLUMNS if c in header), None)
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
    table = pd.DataFrame({"slide_id": ids, "label": [r[lab] for r in body]})
    if case is not None:
        table["case_id"] = [r[case] if len(r) > case else "" for r in body]
    return table


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
    """A manifest (slide_id,[case_id,]label,split|fold) for the labelled slides of ``source``.

    Splits and folds are drawn per case. A ``case_id`` column is written when the labels file has
    one or some slide id is a TCGA barcode; otherwise every slide is its own case and the column
    would only repeat the slide id.
    """
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
    explicit = table["case_id"].tolist() if "case_id" in table.columns else None
    cases = case_ids(table["slide_id"].tolist(), explicit)
    if explicit is not None or any(_TCGA.match(s) for s in table["slide_id"]):
        table = table.drop(columns="case_id", errors="ignore")
        table.insert(1, "case_id", cases)
    codes = pd.factorize(table["label"].str.lower())[0]
    if split is not None:
        if split not in SPLITS:
            raise ConfigError(f"--split must be one of {SPLITS}, got {split!r}")
        table["split"] = split
    elif folds:
        table["fold"] = stratified_folds(codes, folds, seed, cases)
    else:
        if val_fraction + test_fraction >= 1:
            raise ConfigError("val and test fractions must leave some slides for training")
        out = np.full(len(table), "train", dtype=object)
        test = (
            stratified_split(codes, test_fraction, seed, cases)
            if test_fraction > 0
            else np.zeros(len(table), bool)
        )
        out[test] = "test"
        rest = np.flatnonzero(~test)
        rest_cases = [cases[i] for i in rest]
        val = stratified_split(codes[rest], val_fraction / (1 - test_fraction), seed + 1, rest_cases)
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
