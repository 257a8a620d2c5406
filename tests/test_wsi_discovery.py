"""Input discovery: folders, files and CSVs; sidecars ignored; DICOM folders; duplicates refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathopeft.config import ConfigError
from pathopeft.wsi import DiscoveryError, SlideSource, discover_slides


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "slides"
    for rel in (
        "b.svs",
        "a.tiff",
        "sub/c.ndpi",
        "sub/deeper/d.ome.tiff",
        "scan.mrxs",
        "scan/Index.dat",  # MIRAX companion folder: not slides
        "scan/Slidedat.ini",
        "dicom_case/1.dcm",
        "dicom_case/2.dcm",
        # sidecars and non-WSI files: ignored, never reported as broken slides
        "b.json",
        "labels.csv",
        "notes.txt",
        "annotations.xml",
        "tumour.geojson",
        "macro.png",
        ".hidden.svs",
        ".cache/e.svs",
    ):
        _touch(root / rel)
    return root


def test_folder_is_searched_recursively(tree: Path) -> None:
    found = discover_slides([tree])
    ids = [s.slide_id for s in found]
    assert sorted(ids) == ["a", "b", "c", "d", "dicom_case", "scan"]
    by_id = {s.slide_id: s for s in found}
    assert by_id["dicom_case"].path == tree / "dicom_case"  # one slide for the whole DICOM folder
    assert by_id["d"].path.name == "d.ome.tiff"
    assert all(s.mpp is None for s in found)
    assert discover_slides([tree]) == found  # deterministic
    assert found[0].slide_id in {"a", "b", "scan"}  # top-level files before sub-folders, sorted
    assert [s.slide_id for s in found[:3]] == ["a", "b", "scan"]


def test_files_and_duplicates_of_the_same_path(tree: Path) -> None:
    found = discover_slides([tree / "b.svs", tree, str(tree / "macro.png")])
    assert found[0] == SlideSource(tree / "b.svs", "b", None)
    assert [s.slide_id for s in found].count("b") == 1  # named twice, listed once
    assert found[-1].slide_id == "macro"  # explicitly named files are taken whatever the extension


def test_csv_with_relative_paths_ids_mpp_and_missing_files(tmp_path: Path) -> None:
    _touch(tmp_path / "data" / "s1.svs")
    _touch(tmp_path / "elsewhere" / "s2.tiff")
    csv = tmp_path / "data" / "cohort.csv"
    csv.write_text(
        "path,slide_id,mpp,label\n"
        "s1.svs,,,tumor\n"
        f"{tmp_path / 'elsewhere' / 's2.tiff'},case-2,0.25,normal\n"
        "gone.svs,gone,,normal\n"
    )
    found = discover_slides([csv])
    assert found == [
        SlideSource(tmp_path / "data" / "s1.svs", "s1", None),
        SlideSource(tmp_path / "elsewhere" / "s2.tiff", "case-2", 0.25),
        SlideSource(tmp_path / "data" / "gone.svs", "gone", None),  # kept: the processor reports it
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("file,label\na.svs,x\n", "'path' column"),
        ("path,mpp\na.svs,abc\n", "line 2: mpp 'abc' is not a number"),
        ("path,mpp\na.svs,-1\n", "positive"),
        ("path\n\n,\n", "empty 'path'"),
    ],
)
def test_bad_csv_is_a_usage_error(tmp_path: Path, content: str, message: str) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    with pytest.raises(DiscoveryError, match=message) as info:
        discover_slides([csv])
    assert isinstance(info.value, ConfigError) and str(csv) in str(info.value)


def test_duplicate_slide_ids_are_listed(tmp_path: Path) -> None:
    _touch(tmp_path / "site1" / "case.svs")
    _touch(tmp_path / "site2" / "case.svs")
    _touch(tmp_path / "site2" / "other.svs")
    with pytest.raises(DiscoveryError, match="duplicate slide_id") as info:
        discover_slides([tmp_path])
    text = str(info.value)
    assert (
        "case:" in text and str(tmp_path / "site1" / "case.svs") in text and str(tmp_path / "site2") in text
    )
    assert "other" not in text


def test_missing_inputs_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DiscoveryError, match="no such file"):
        discover_slides([tmp_path / "nope"])
    _touch(tmp_path / "only_sidecars" / "a.json")
    with pytest.raises(DiscoveryError, match="no slides found"):
        discover_slides([tmp_path / "only_sidecars"])
