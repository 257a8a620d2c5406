"""MIL data: manifests, splits, bag layouts (ours, CLAM h5/.pt, TRIDENT), errors, tile labels, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pathopeft.bags import FeatureBag, write_bag
from pathopeft.cli import main
from pathopeft.config import ConfigError, load_config
from pathopeft.config.train import DataConfig, TrainConfig
from pathopeft.mil.data import BagDataset, MILDataModule, collate_bags, resolve_features_dir
from pathopeft.mil.manifest import build_manifest, read_labels, read_manifest

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["normal", "tumor"]


def _coords(n: int, step: int = 256) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    return np.array([[(i % side) * step, (i // side) * step] for i in range(n)], dtype=np.int64)


def _manifest(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text("slide_id,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    return path


def _data(tmp_path: Path, **kw) -> DataConfig:
    base = {"manifest": [str(tmp_path / "manifest.csv")], "features_dir": str(tmp_path / "features")}
    base.update({"coords_dir": None, **kw})
    return DataConfig(**base)


def _ours(folder: Path, sid: str, n: int = 6, d: int = 8) -> None:
    attrs = {"patch_size": 256, "downsample": 1.0, "patch_size_level0": 256}
    write_bag(
        folder / f"{sid}.h5", FeatureBag(sid, np.random.rand(n, d).astype(np.float32), _coords(n), attrs)
    )


# --- manifests ------------------------------------------------------------------------------
def test_manifest_labels_by_name_or_index_case_insensitive(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slide_id,label,split\na,Tumor,train\nb,0,val\nc,NORMAL,\nd,1,test\n")
    df = read_manifest(path, CLASSES)
    assert df["label"].tolist() == [1, 0, 0, 1]
    assert df["split"].tolist()[:2] == ["train", "val"] and df["split"].isna().tolist()[2]


def test_manifest_problems_are_reported_together_naming_file_row_and_slide(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("slide_id,label,split\na,tumour,train\nb,7,train\nc,normal,holdout\na,normal,val\n")
    with pytest.raises(ConfigError) as err:
        read_manifest(path, CLASSES)
    text = str(err.value)
    assert "m.csv:2: slide 'a'" in text and "'tumour' is not one of the classes" in text
    assert "slide 'b'" in text and "slide 'c'" in text and "holdout" in text
    assert "'a' is listed more than once" in text
    with pytest.raises(ConfigError, match="missing column"):
        (tmp_path / "bad.csv").write_text("id,label\nx,normal\n")
        read_manifest(tmp_path / "bad.csv", CLASSES)


def test_shipped_camelyon16_training_manifest():
    df = read_manifest(REPO / "data_manifests" / "camelyon16_train.csv", CLASSES)
    assert len(df) == 160 + 111
    normal = df[df["slide_id"].str.startswith("normal_")]
    tumor = df[df["slide_id"].str.startswith("tumor_")]
    assert sorted(normal["slide_id"]) == [f"normal_{i:03d}" for i in range(1, 161)]
    assert sorted(tumor["slide_id"]) == [f"tumor_{i:03d}" for i in range(1, 112)]
    assert set(normal["label"]) == {0} and set(tumor["label"]) == {1}
    counts = df.groupby(["label", "split"]).size().to_dict()
    assert counts == {(0, "train"): 128, (0, "val"): 32, (1, "train"): 89, (1, "val"): 22}


def test_camelyon16_reference_csv_conversion(tmp_path):
    """The official reference.csv has no header: id, class, metastasis type, ..."""
    ref = tmp_path / "reference.csv"
    ref.write_text("test_001,Tumor,Macro,\ntest_002,Tumor,Micro,\ntest_003,Normal,,\ntest_004.tif,Normal,,\n")
    assert read_labels(ref)["slide_id"].tolist() == ["test_001", "test_002", "test_003", "test_004"]
    out = tmp_path / "camelyon16_test.csv"
    result = CliRunner().invoke(
        main, ["manifest", "--labels", str(ref), "--split", "test", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    df = read_manifest(out, CLASSES)
    assert df["slide_id"].tolist() == ["test_001", "test_002", "test_003", "test_004"]
    assert df["label"].tolist() == [1, 1, 0, 0] and set(df["split"]) == {"test"}
    again = CliRunner().invoke(main, ["manifest", "--labels", str(ref), "--split", "test", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_manifest_command_from_tile_output_with_split_and_folds(tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    ids = [f"s{i:02d}" for i in range(20)]
    rows = [f"{s},x.svs,{'error' if s == 's19' else 'ok'},10" for s in ids]
    (tiles / "manifest.csv").write_text("slide_id,path,status,n_tiles\n" + "\n".join(rows) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label\n" + "".join(f"{s},{'tumor' if i % 2 else 'normal'}\n" for i, s in enumerate(ids))
    )
    df = build_manifest(labels, tiles, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert "s19" not in set(df["slide_id"]) and len(df) == 19  # failed slides are not listed
    for _, group in df.groupby("label"):
        assert set(group["split"]) == {"train", "val", "test"}  # stratified
    assert build_manifest(labels, tiles, seed=1).equals(build_manifest(labels, tiles, seed=1))  # seeded
    folds = build_manifest(labels, tiles, folds=4)
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3]
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(main, ["manifest", str(tiles), "--labels", str(labels), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote 19 slides" in result.output


def test_fold_selection_and_val_carving(tmp_path):
    path = tmp_path / "m.csv"
    rows = [f"s{i},{'tumor' if i % 2 else 'normal'},{i % 3}" for i in range(12)]
    path.write_text("slide_id,label,fold\n" + "\n".join(rows) + "\n")
    from pathopeft.mil.manifest import assign_splits

    df = read_manifest(path, CLASSES)
    by_fold = assign_splits(df, fold=1, val_fraction=0.2, seed=0)
    assert set(by_fold.loc[df["fold"] == 1, "split"]) == {"val"}
    assert set(by_fold.loc[df["fold"] != 1, "split"]) == {"train"}
    carved = assign_splits(df, fold=None, val_fraction=0.34, seed=0)
    assert (carved["split"] == "val").sum() == 4  # round(0.34 · 6) = 2 of each class
    assert set(carved.loc[carved["split"] == "val", "label"]) == {0, 1}
    with pytest.raises(ConfigError, match="no slide has that fold"):
        assign_splits(df, fold=9, val_fraction=0.2, seed=0)


def test_no_validation_slides_says_why(tmp_path):
    from pathopeft.mil.manifest import assign_splits

    path = tmp_path / "m.csv"
    path.write_text("slide_id,label\na,normal\nb,tumor\n")
    df = read_manifest(path, CLASSES)
    # one slide per class rounds to no validation slide: the message gives the counts, not "> 0"
    with pytest.raises(
        ConfigError, match=r"val_fraction=0.2 carves none .* 2 training slide\(s\) \(normal: 1, tumor: 1\)"
    ):
        assign_splits(df, fold=None, val_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match=r"data.val_fraction is 0"):
        assign_splits(df, fold=None, val_fraction=0.0, seed=0)


# --- bags -----------------------------------------------------------------------------------
def _square_annotations(folder: Path, *slides: str) -> Path:
    folder.mkdir(exist_ok=True)
    square = [[0, 0], [512, 0], [512, 512], [0, 512], [0, 0]]
    for sid in slides:
        geo = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]}, "properties": {}}
        (folder / f"{sid}.geojson").write_text(json.dumps(geo))
    return folder


def _load(tmp_path: Path, **kw) -> dict[str, dict]:
    dm = MILDataModule(_data(tmp_path, **kw))
    dm.prepare()
    dataset = BagDataset(dm.items, coords_dir=kw.get("coords_dir"), tile_labels=dm.tile_labels)
    return {dataset[i]["slide_id"]: dataset[i] for i in range(len(dataset))}


def test_clam_h5_and_trident_bags_load_without_conversion(tmp_path):
    feats = tmp_path / "features"
    (feats / "h5_files").mkdir(parents=True)
    # CLAM h5_files: features (N, D) + coords, no tile-size attributes (inferred from the grid)
    with h5py.File(feats / "h5_files" / "clam.h5", "w") as h5:
        h5["features"] = np.random.rand(9, 8).astype(np.float32)
        h5["coords"] = _coords(9, step=512)
    # TRIDENT: (1, N, D) features, coords with patch_size_level0 on the coords dataset
    with h5py.File(feats / "trident.h5", "w") as h5:
        h5["features"] = np.random.rand(1, 5, 8).astype(np.float32)
        h5["coords"] = _coords(5, step=448)
        h5["coords"].attrs["patch_size_level0"] = 448
    _manifest(tmp_path / "manifest.csv", [("clam", "tumor", "train"), ("trident", "tumor", "val")])
    loaded = _load(tmp_path, annotations=str(_square_annotations(tmp_path / "ann", "clam", "trident")))
    assert loaded["trident"]["features"].shape == (5, 8) and loaded["clam"]["features"].shape == (9, 8)
    assert loaded["clam"]["tile_labels"].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0]  # 512-px grid
    assert loaded["trident"]["tile_labels"].tolist() == [1, 0, 0, 0, 0]  # tile 1 holds only 64·448 px


def test_tile_size_on_level_0_from_attributes_or_grid():
    from pathopeft.mil.data import tile_size_level0

    grid = _coords(9, step=300)
    assert tile_size_level0({"tile_size_level0": 512.0, "patch_size_level0": 7}, grid) == 512.0
    assert tile_size_level0({"patch_size_level0": 448}, grid) == 448.0  # TRIDENT
    assert tile_size_level0({"patch_size_level0": 0, "patch_size": 256, "downsample": 2.0}, grid) == 512.0
    assert tile_size_level0({"patch_size": 256, "downsample": [4.0, 4.0]}, grid) == 1024.0  # CLAM
    assert tile_size_level0({}, grid) == 300.0  # the coordinate grid's step
    assert tile_size_level0({}, None) is None


def test_clam_pt_bags_take_coordinates_from_the_patch_files(tmp_path):
    clam = tmp_path / "clam"
    (clam / "pt_files").mkdir(parents=True)
    (clam / "patches").mkdir()
    for sid, n in (("a", 4), ("b", 6)):
        torch.save(torch.rand(n, 8), clam / "pt_files" / f"{sid}.pt")  # a bare tensor, no coordinates
        with h5py.File(clam / "patches" / f"{sid}.h5", "w") as h5:  # CLAM create_patches output
            h5["coords"] = _coords(n, step=512)
            h5["coords"].attrs["patch_size"] = 256
            h5["coords"].attrs["patch_level"] = 0
            h5["coords"].attrs["downsample"] = np.array([2.0, 2.0])
    _manifest(tmp_path / "manifest.csv", [("a", "tumor", "train"), ("b", "normal", "val")])
    loaded = _load(
        tmp_path,
        features_dir=str(clam / "pt_files"),
        coords_dir=str(clam / "patches"),
        annotations=str(_square_annotations(tmp_path / "ann", "a")),
    )
    assert loaded["a"]["features"].shape == (4, 8)
    assert loaded["a"]["coords"].tolist() == _coords(4, step=512).tolist()
    assert loaded["a"]["tile_labels"].tolist() == [1, 0, 0, 0]  # tile = 256 · downsample 2
    assert loaded["b"]["tile_labels"].tolist() == [0] * 6  # normal, no file → all negative


def test_missing_and_unreadable_bags_are_listed_together(tmp_path, caplog):
    feats = tmp_path / "features"
    feats.mkdir()
    _ours(feats, "ok1")
    _ours(feats, "ok2")
    (feats / "corrupt.h5").write_bytes(b"not an hdf5 file")
    rows = [("ok1", "normal", "train"), ("gone1", "tumor", "train"), ("corrupt", "tumor", "train")]
    _manifest(tmp_path / "manifest.csv", [*rows, ("gone2", "normal", "val"), ("ok2", "tumor", "val")])
    with pytest.raises(ConfigError) as err:
        MILDataModule(_data(tmp_path)).prepare()
    text = str(err.value)
    assert "2 slide(s) have no feature bag" in text and "gone1, gone2" in text
    assert "corrupt.h5" in text and "allow_missing" in text
    with caplog.at_level(logging.WARNING):
        dm = MILDataModule(_data(tmp_path, allow_missing=True))
        dm.prepare()
    assert [i.slide_id for i in dm.items] == ["ok1", "ok2"]
    assert "gone1" in caplog.text


def test_feature_size_mismatch_is_a_clear_error(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    _ours(feats, "a", d=8)
    _ours(feats, "b", d=8)
    _ours(feats, "c", d=16)
    _manifest(
        tmp_path / "manifest.csv", [("a", "normal", "train"), ("b", "tumor", "val"), ("c", "tumor", "train")]
    )
    with pytest.raises(ConfigError, match="most bags = 8, but 16-d: c"):
        MILDataModule(_data(tmp_path)).prepare()
    _manifest(tmp_path / "manifest.csv", [("a", "normal", "train"), ("b", "tumor", "val")])
    with pytest.raises(ConfigError, match="model.in_dim = 1024, but 8-d: a, b"):
        MILDataModule(_data(tmp_path), in_dim=1024).prepare()


def test_features_dir_finds_the_single_backbone_subfolder(tmp_path):
    _ours(tmp_path / "features" / "resnet50.tv_in1k", "a")
    assert resolve_features_dir(tmp_path / "features").name == "resnet50.tv_in1k"
    _ours(tmp_path / "features" / "uni", "a")
    with pytest.raises(ConfigError, match=r"several backbones \(resnet50.tv_in1k, uni\).*data.backbone"):
        resolve_features_dir(tmp_path / "features")
    assert resolve_features_dir(tmp_path / "features", "uni").name == "uni"
    with pytest.raises(ConfigError, match="not found"):
        resolve_features_dir(tmp_path / "nowhere")


def test_tumour_slide_without_annotation_has_no_tile_labels(tmp_path):
    feats = tmp_path / "features"
    for sid in ("n", "t", "v"):
        _ours(feats, sid)
    _manifest(
        tmp_path / "manifest.csv", [("n", "normal", "train"), ("t", "tumor", "train"), ("v", "tumor", "val")]
    )
    (tmp_path / "ann").mkdir()
    dm = MILDataModule(_data(tmp_path, annotations=str(tmp_path / "ann")))
    dm.prepare()
    assert set(dm.tile_labels) == {"n"} and dm.tile_labels["n"].tolist() == [0] * 6
    batch = collate_bags([BagDataset(dm.items, tile_labels=dm.tile_labels)[i] for i in range(2)])
    assert batch["tile_labels"][1].tolist() == [-1] * 6  # unknown, ignored by the metrics
    assert dm.test_split == "val"  # no test rows: evaluated on validation


def test_collate_pads_and_subsampling_keeps_tiles_aligned(tmp_path):
    feats = tmp_path / "features"
    _ours(feats, "big", n=40)
    _ours(feats, "small", n=7)
    _manifest(tmp_path / "manifest.csv", [("big", "tumor", "train"), ("small", "normal", "val")])
    dm = MILDataModule(_data(tmp_path))
    dm.prepare()
    labels = {"big": (np.arange(40) % 2).astype(np.int8), "small": np.zeros(7, np.int8)}
    full = BagDataset(dm.items, tile_labels=labels)[0]
    sub = BagDataset(dm.items, tile_labels=labels, max_instances=10)[0]
    assert sub["features"].shape == (10, 8)
    rows = [int(np.flatnonzero((full["features"] == f).all(1))[0]) for f in sub["features"]]
    assert rows == sorted(rows)  # file order kept
    assert sub["coords"].tolist() == full["coords"][rows].tolist()
    assert sub["tile_labels"].tolist() == full["tile_labels"][rows].tolist()
    batch = collate_bags([BagDataset(dm.items)[0], BagDataset(dm.items)[1]])
    assert batch["features"].shape == (2, 40, 8) and batch["mask"].sum(1).tolist() == [40, 7]
    assert batch["labels"].tolist() == [1, 0] and batch["slide_ids"] == ["big", "small"]


def test_train_config_validation_errors():
    with pytest.raises(ConfigError, match="negative_class 'cancer'"):
        load_config(TrainConfig, None, ["data.negative_class=cancer"])
    with pytest.raises(ConfigError, match="unknown lightning.Trainer argument"):
        load_config(TrainConfig, None, ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match=r"model.abmil.groups: unknown key"):
        load_config(TrainConfig, None, ["model.name=abmil", "model.abmil.groups=3"])
    cfg = load_config(TrainConfig, None, ["model.name=transmil", "trainer.devices=2"])
    assert cfg.model.options()["dropout"] == 0.1 and cfg.trainer["max_epochs"] == 100
    for name in ("camelyon_comel", "abmil", "transmil"):
        shipped = load_config(TrainConfig, REPO / "configs" / f"{name}.yaml")
        assert shipped.data.features_dir == "tiles/features" and shipped.data.coords_dir == "tiles/coords"


def test_pandas_reads_manifest_written_by_the_command(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,normal\nb,tumor\n")
    table = build_manifest(labels, None, val_fraction=0.5)
    assert isinstance(table, pd.DataFrame) and set(table.columns) == {"slide_id", "label", "split"}


def test_slide_ids_from_a_folder_match_pathopeft_tile_naming(tmp_path):
    from pathopeft.mil.manifest import slides_in

    for name in ("a.ome.tiff", "b.svs", "c.qptiff", "d.h5", "notes.txt", ".hidden.svs"):
        (tmp_path / name).write_bytes(b"")
    assert slides_in(tmp_path) == ["a", "b", "c", "d"]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na.ome.tiff,tumor\nb.svs,normal\nc,normal\n")
    assert read_labels(labels)["slide_id"].tolist() == ["a", "b", "c"]
