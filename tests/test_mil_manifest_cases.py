"""Splits by case (patient): TCGA default, explicit case_id, grouped carve-out/folds, conflicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pathopeft.config import ConfigError
from pathopeft.mil.manifest import (
    assign_splits,
    build_manifest,
    case_ids,
    read_manifest,
    stratified_folds,
    stratified_split,
)

CLASSES = ["normal", "tumor"]


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def _tcga_rows(n_patients: int = 12, per_patient: int = 3) -> list[str]:
    rows = []
    for p in range(n_patients):
        label = CLASSES[p % 2]
        for s in range(per_patient):
            rows.append(f"TCGA-A1-{p:04d}-01Z-00-DX{s + 1},{label}")
    return rows


def test_tcga_default_case_is_first_12_characters(tmp_path):
    path = _write(tmp_path / "m.csv", "slide_id,label", ["TCGA-A1-0001-01Z-00-DX1,tumor", "slide_7,normal"])
    df = read_manifest(path, CLASSES)
    assert df["case_id"].tolist() == ["TCGA-A1-0001", "slide_7"]
    assert case_ids(["tcga-a1-0001-01z", "TCGA-A1-000", "TCGAX-A1-0001"]) == [
        "TCGA-A1-0001",
        "TCGA-A1-000",
        "TCGAX-A1-0001",
    ]


def test_explicit_case_column_wins_and_blank_falls_back(tmp_path):
    path = _write(
        tmp_path / "m.csv",
        "slide_id,label,case_id",
        ["a,tumor,P1", "b,tumor,P1", "TCGA-A1-0002-01Z,normal,", "c,normal,"],
    )
    df = read_manifest(path, CLASSES)
    assert df["case_id"].tolist() == ["P1", "P1", "TCGA-A1-0002", "c"]


@pytest.mark.parametrize("seed", range(6))
def test_val_carve_out_keeps_cases_together(tmp_path, seed):
    path = _write(tmp_path / "m.csv", "slide_id,label", _tcga_rows())
    df = assign_splits(read_manifest(path, CLASSES), fold=None, val_fraction=0.25, seed=seed)
    per_case = df.groupby("case_id")["split"].nunique()
    assert (per_case == 1).all()
    val_cases = df.loc[df["split"] == "val", "case_id"].unique()
    assert len(val_cases) == 4  # 25% of 6 cases per class = 1.5 -> 2 per class
    assert set(df.loc[df["split"] == "val", "label_name"]) == set(CLASSES)


@pytest.mark.parametrize("seed", range(6))
def test_folds_keep_cases_together_and_stratify(seed):
    groups = [f"P{p}" for p in range(10) for _ in range(1 + p % 3)]
    labels = [p % 2 for p in range(10) for _ in range(1 + p % 3)]
    folds = stratified_folds(labels, 5, seed, groups)
    frame = pd.DataFrame({"g": groups, "f": folds, "y": labels})
    assert (frame.groupby("g")["f"].nunique() == 1).all()
    case_folds = frame.drop_duplicates("g")
    assert sorted(case_folds["f"].value_counts()) == [2] * 5  # 10 cases dealt evenly over 5 folds
    for cls in (0, 1):  # each class spread over the folds
        assert case_folds.loc[case_folds["y"] == cls, "f"].nunique() == 5


def test_mixed_label_case_is_stratified_by_majority():
    groups = ["A", "A", "A", "B", "C", "D"]
    labels = [1, 1, 0, 0, 1, 0]
    for seed in range(5):
        chosen = stratified_split(labels, 0.5, seed, groups)
        assert len(set(chosen[:3])) == 1  # case A moves as one
        # classes by case: A->1, C->1 ; B->0, D->0 : one case of each class is drawn
        drawn = {g for g, c in zip(groups, chosen, strict=True) if c}
        assert len(drawn & {"A", "C"}) == 1 and len(drawn & {"B", "D"}) == 1


def test_conflicting_split_in_a_case_is_refused_naming_case_slides_and_files(tmp_path):
    train = _write(tmp_path / "train.csv", "slide_id,label,split", ["TCGA-A1-0001-01Z-00-DX1,tumor,train"])
    test = _write(tmp_path / "test.csv", "slide_id,label,split", ["TCGA-A1-0001-01Z-00-DX2,tumor,test"])
    with pytest.raises(ConfigError) as err:
        read_manifest([train, test], CLASSES)
    text = str(err.value)
    assert "TCGA-A1-0001" in text and "DX1" in text and "DX2" in text
    assert "train.csv" in text and "test.csv" in text


def test_conflicting_fold_and_blank_split_are_refused(tmp_path):
    folds = _write(tmp_path / "f.csv", "slide_id,label,fold,case_id", ["a,tumor,0,P9", "b,tumor,1,P9"])
    with pytest.raises(ConfigError, match="case 'P9' appears in more than one fold"):
        read_manifest(folds, CLASSES)
    blank = _write(tmp_path / "s.csv", "slide_id,label,split,case_id", ["a,tumor,val,P3", "b,tumor,,P3"])
    with pytest.raises(ConfigError, match="case 'P3' appears in more than one split"):
        read_manifest(blank, CLASSES)


def test_non_tcga_ids_draw_as_before():
    labels = np.array([0, 1] * 15)
    ids = [f"slide_{i}" for i in range(30)]
    for seed in range(4):
        assert np.array_equal(
            stratified_split(labels, 0.2, seed), stratified_split(labels, 0.2, seed, case_ids(ids))
        )
        assert np.array_equal(
            stratified_folds(labels, 3, seed), stratified_folds(labels, 3, seed, case_ids(ids))
        )


def test_build_manifest_writes_case_id_for_tcga_and_labels_column(tmp_path):
    labels = _write(tmp_path / "labels.csv", "slide_id,label", _tcga_rows(10, 2))
    for kw in ({"val_fraction": 0.2, "test_fraction": 0.2}, {"folds": 5}):
        for seed in range(3):
            df = build_manifest(labels, seed=seed, **kw)
            assert list(df.columns[:2]) == ["slide_id", "case_id"]
            column = "fold" if "folds" in kw else "split"
            assert (df.groupby("case_id")[column].nunique() == 1).all()
    patients = _write(
        tmp_path / "p.csv",
        "slide_id,label,patient",
        ["s1,tumor,P1", "s2,tumor,P1", "s3,normal,P2", "s4,normal,P3"],
    )
    df = build_manifest(patients, val_fraction=0.5, seed=0)
    assert df["case_id"].tolist() == ["P1", "P1", "P2", "P3"]
    assert df.loc[df["case_id"] == "P1", "split"].nunique() == 1
    plain = _write(tmp_path / "plain.csv", "slide_id,label", ["s1,tumor", "s2,normal"])
    assert "case_id" not in build_manifest(plain, val_fraction=0.5).columns
    out = tmp_path / "manifest.csv"
    df.to_csv(out, index=False)
    assert read_manifest(out, CLASSES)["case_id"].tolist() == ["P1", "P1", "P2", "P3"]


def test_datamodule_splits_carry_case_id(tmp_path):
    from pathopeft.bags import FeatureBag, write_bag
    from pathopeft.config.train import DataConfig
    from pathopeft.mil.data import MILDataModule

    rows = _tcga_rows(6, 2)
    _write(tmp_path / "manifest.csv", "slide_id,label", rows)
    feats = tmp_path / "features"
    attrs = {"patch_size": 256, "downsample": 1.0, "patch_size_level0": 256}
    coords = np.array([[0, 0], [256, 0], [0, 256]], dtype=np.int64)
    for row in rows:
        sid = row.split(",")[0]
        write_bag(
            feats / f"{sid}.h5", FeatureBag(sid, np.random.rand(3, 4).astype(np.float32), coords, attrs)
        )
    cfg = DataConfig(
        manifest=[str(tmp_path / "manifest.csv")], features_dir=str(feats), coords_dir=None, val_fraction=0.34
    )
    dm = MILDataModule(cfg)
    dm.prepare()
    assert list(dm.splits.columns) == ["slide_id", "case_id", "label", "split"]
    assert (dm.splits.groupby("case_id")["split"].nunique() == 1).all()
    assert (dm.splits["split"] == "val").sum() == 4  # one case of each class, two slides each


def test_manifest_command_writes_case_id(tmp_path):
    from click.testing import CliRunner

    from pathopeft.cli import main

    labels = _write(tmp_path / "labels.csv", "slide_id,label", _tcga_rows(6, 2))
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        main, ["manifest", "--labels", str(labels), "--folds", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "12 slides, 6 cases" in result.output
    df = read_manifest(out, CLASSES)
    assert (df.groupby("case_id")["fold"].nunique() == 1).all()
