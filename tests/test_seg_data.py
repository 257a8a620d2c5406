"""Segmentation data: discovery, label maps, splits, transforms, and every bad input named by file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pathopeft.config import ConfigError, load_config
from pathopeft.config.segment import SegAugmentConfig, SegmentTrainConfig
from pathopeft.seg.data import (
    LabelMap,
    SegDataError,
    check_samples,
    discover_samples,
    read_image,
    read_mask,
    split_samples,
)
from pathopeft.seg.datamodule import EvalDataset, TrainDataset, eval_transform, train_transform
from pathopeft.seg.synth import make_shapes_dataset

BINARY = LabelMap(2)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _pair(root: Path, stem: str, size=(20, 30), mask_value=255, image_ext=".png") -> None:
    _png(root / "images" / f"{stem}{image_ext}", np.full((*size, 3), 120, np.uint8))
    mask = np.zeros(size, np.uint8)
    mask[2:8, 3:9] = mask_value
    _png(root / "masks" / f"{stem}.png", mask)


def test_folder_pairs_by_stem_and_reads_tiff_png_jpeg(tmp_path: Path) -> None:
    import tifffile

    _pair(tmp_path, "a")
    _pair(tmp_path, "b", image_ext=".jpg")
    tifffile.imwrite(tmp_path / "images" / "c.tif", np.full((20, 30, 3), 7, np.uint8))
    _png(tmp_path / "masks" / "c.png", np.zeros((20, 30), np.uint8))
    (tmp_path / "images" / ".a.png.partial-123").write_bytes(b"junk")  # a killed writer's leftover
    samples = discover_samples(tmp_path)
    assert [s.name for s in samples] == ["a", "b", "c"]
    check_samples(samples, BINARY)
    assert read_image(samples[2].image).shape == (20, 30, 3)
    mask = read_mask(samples[0].mask, BINARY)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}


def test_label_maps_binary_multiclass_and_explicit_values(tmp_path: Path) -> None:
    raw01 = np.array([[0, 1], [1, 0]], np.uint8)
    assert (BINARY.to_classes(raw01 * 255, tmp_path) == raw01).all()
    assert (BINARY.to_classes(raw01, tmp_path) == raw01).all()
    three = LabelMap(3)
    assert (three.to_classes(np.array([[0, 2]], np.uint8), tmp_path) == [[0, 2]]).all()
    explicit = LabelMap(3, (0, 128, 255))
    assert (explicit.to_classes(np.array([[0, 128, 255]], np.uint8), tmp_path) == [[0, 1, 2]]).all()
    assert (explicit.to_values(np.array([[0, 1, 2]])) == [[0, 128, 255]]).all()
    assert (BINARY.to_values(np.array([[0, 1]])) == [[0, 255]]).all()


def test_csv_layout_with_given_split(tmp_path: Path) -> None:
    for stem in ("a", "b", "c"):
        _pair(tmp_path, stem)
    csv = tmp_path / "list.csv"
    csv.write_text(
        "image,mask,split\nimages/a.png,masks/a.png,train\nimages/b.png,masks/b.png,val\n"
        "images/c.png,masks/c.png,test\n"
    )
    splits = split_samples(discover_samples(None, csv), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert [s.name for s in splits["val"]] == ["b"] and [s.name for s in splits["test"]] == ["c"]

    csv.write_text("image,mask,split\nimages/a.png,masks/a.png,training\n")
    with pytest.raises(SegDataError, match=r"list\.csv line 2: split 'training'"):
        discover_samples(None, csv)
    csv.write_text("image,mask\nimages/a.png,masks/zzz.png\n")
    with pytest.raises(SegDataError, match="zzz.png not found"):
        discover_samples(None, csv)


def test_seeded_split_is_reproducible_and_disjoint(tmp_path: Path) -> None:
    for i in range(10):
        _pair(tmp_path, f"s{i}")
    samples = discover_samples(tmp_path)
    one = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=3)
    two = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=3)
    other = split_samples(samples, val_fraction=0.2, test_fraction=0.2, seed=4)
    assert one == two and one != other
    assert [len(one[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    names = [s.name for k in one for s in one[k]]
    assert sorted(names) == sorted(s.name for s in samples)


# ------------------------------------------------------------------------------------ bad input
def test_image_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    _png(tmp_path / "images" / "a.png", np.zeros((20, 30, 3), np.uint8))
    _png(tmp_path / "masks" / "a.png", np.zeros((20, 31), np.uint8))
    with pytest.raises(
        SegDataError, match=r"masks/a\.png: mask size 31x20 differs from image .*images/a\.png"
    ):
        check_samples(discover_samples(tmp_path), BINARY)


def test_mask_without_image_and_image_without_mask(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    _png(tmp_path / "masks" / "orphan.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(SegDataError, match=r"mask without an image: .*masks/orphan\.png"):
        discover_samples(tmp_path)
    (tmp_path / "masks" / "orphan.png").unlink()
    _png(tmp_path / "images" / "lonely.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SegDataError, match=r"image without a mask: .*images/lonely\.png"):
        discover_samples(tmp_path)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _png(tmp_path / "masks" / "broken.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(SegDataError, match=r"images/broken\.png: cannot read image"):
        check_samples(discover_samples(tmp_path), BINARY)
    with pytest.raises(SegDataError, match=r"broken\.png: cannot read image"):
        read_image(tmp_path / "images" / "broken.png")


def test_labels_outside_the_configured_classes(tmp_path: Path) -> None:
    _pair(tmp_path, "a", mask_value=3)
    samples = discover_samples(tmp_path)
    with pytest.raises(SegDataError, match=r"masks/a\.png: mask holds labels \[3\] outside .* 0\.\.2"):
        check_samples(samples, LabelMap(3))
    with pytest.raises(SegDataError, match=r"masks/a\.png: a binary mask must hold 0/1 or 0/255"):
        check_samples(samples, BINARY)
    with pytest.raises(SegDataError, match=r"masks/a\.png: mask holds values \[3\] outside the configured"):
        check_samples(samples, LabelMap(2, (0, 255)))
    colour = np.zeros((20, 30, 3), np.uint8)
    colour[..., 2] = 255
    _png(tmp_path / "masks" / "a.png", colour)
    with pytest.raises(SegDataError, match="one channel of labels"):
        check_samples(samples, BINARY)


def test_empty_split_is_an_error(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    _pair(tmp_path, "b")
    with pytest.raises(SegDataError, match="split 'train' is empty"):
        split_samples(discover_samples(tmp_path), val_fraction=0.2, test_fraction=0.2, seed=0)
    csv = tmp_path / "l.csv"
    csv.write_text("image,mask,split\nimages/a.png,masks/a.png,train\nimages/b.png,masks/b.png,val\n")
    with pytest.raises(SegDataError, match="split 'test' is empty"):
        split_samples(discover_samples(None, csv), val_fraction=0.2, test_fraction=0.2, seed=0)


def test_missing_data_and_config_errors(tmp_path: Path) -> None:
    with pytest.raises(SegDataError, match="set data.root"):
        discover_samples(None)
    with pytest.raises(SegDataError, match="folder not found"):
        discover_samples(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="label_values lists 2 values"):
        load_config(SegmentTrainConfig, None, ["data.num_classes=3", "data.label_values=[0,255]"])
    with pytest.raises(ConfigError, match="max_epoch"):
        load_config(SegmentTrainConfig, None, ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match="adapter.options must set lora_rank"):
        load_config(SegmentTrainConfig, None, ["adapter.options={rank: 4}"])
    with pytest.raises(ConfigError, match="unknown option"):
        load_config(SegmentTrainConfig, None, ["adapter.method=lora", "adapter.options={r: 4}"])


# ------------------------------------------------------------------------------------ transforms
def test_train_crops_and_eval_keeps_full_images(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path, 3, size=(40, 70), seed=0)
    samples = discover_samples(tmp_path)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for mode in ("tile", "resize"):
        transform = train_transform(SegAugmentConfig(), img_size=32, mode=mode, mean=mean, std=std, seed=0)
        data = TrainDataset(samples, BINARY, transform, samples_per_image=2)
        assert len(data) == 6
        item = data[5]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0, 1}
    full = EvalDataset(samples, BINARY, eval_transform(mean, std), rescale=0.5)[0]
    assert full["image"].shape == (3, 20, 35) and full["mask"].shape == (1, 20, 35)
    # evaluation is deterministic: normalisation only
    again = EvalDataset(samples, BINARY, eval_transform(mean, std), rescale=0.5)[0]
    assert torch.equal(full["image"], again["image"])


def test_group_column_keeps_a_patient_in_one_split_and_duplicates_are_refused(tmp_path: Path) -> None:
    """Issue 14: tiles of one patient/slide never land in train and test; a path listed twice
    (which could) is refused, naming both lines."""
    stems = [f"p{p}_{t}" for p in range(6) for t in range(3)]  # 6 patients x 3 tiles
    for stem in stems:
        _pair(tmp_path, stem)
    csv = tmp_path / "list.csv"
    rows = "".join(f"images/{s}.png,masks/{s}.png,{s.split('_')[0]}\n" for s in stems)
    csv.write_text("image,mask,group\n" + rows)
    for seed in range(5):
        splits = split_samples(discover_samples(None, csv), val_fraction=0.2, test_fraction=0.2, seed=seed)
        owners = {name: {s.name.split("_")[0] for s in items} for name, items in splits.items()}
        assert not owners["train"] & owners["test"] and not owners["train"] & owners["val"]
        assert not owners["val"] & owners["test"] and all(owners.values())
        assert sum(len(v) for v in splits.values()) == len(stems)
    csv.write_text(
        "image,mask,group,split\nimages/p0_0.png,masks/p0_0.png,A,train\n"
        "images/p0_1.png,masks/p0_1.png,A,test\nimages/p1_0.png,masks/p1_0.png,B,val\n"
    )
    with pytest.raises(SegDataError, match=r"group 'A' has images in test and train"):
        split_samples(discover_samples(None, csv), val_fraction=0.2, test_fraction=0.2, seed=0)
    csv.write_text(
        "image,mask\nimages/p0_0.png,masks/p0_0.png\nimages/p0_1.png,masks/p0_1.png\n"
        "images/p0_0.png,masks/p1_0.png\n"
    )
    with pytest.raises(SegDataError, match=r"line 4: image .*p0_0\.png is already listed on line 2"):
        discover_samples(None, csv)
    csv.write_text("image,mask,group\nimages/p0_0.png,masks/p0_0.png,A\nimages/p0_1.png,masks/p0_1.png,\n")
    with pytest.raises(SegDataError, match="group column is filled for some rows only"):
        discover_samples(None, csv)
