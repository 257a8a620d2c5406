"""The tile command's schema, its shipped YAML, fingerprints and the manifest merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pathopeft.config import ConfigError, load_config
from pathopeft.config.tile import TileConfig
from pathopeft.features.fingerprint import features_fingerprint, source_size, tiling_fingerprint
from pathopeft.features.manifest import (
    MANIFEST_COLUMNS,
    SlideRecord,
    merge_records,
    read_manifest,
    write_manifest,
)

YAML = Path(__file__).resolve().parents[1] / "configs" / "tile_default.yaml"


def _keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "model_kwargs":
            out |= _keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_shipped_yaml_lists_every_key_with_the_schema_defaults() -> None:
    shipped = yaml.safe_load(YAML.read_text(encoding="utf-8"))
    defaults = TileConfig().model_dump(mode="json")
    assert _keys(shipped) == _keys(defaults)
    assert load_config(TileConfig, YAML) == TileConfig()


def test_schema_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TileConfig, None, ["features.backbon=x"])
    with pytest.raises(ConfigError, match="resize_to"):
        load_config(TileConfig, None, ["features.resize_to=4"])
    with pytest.raises(ConfigError, match="name"):
        load_config(TileConfig, None, ["features.name=../x"])
    with pytest.raises(ConfigError, match="devices"):
        load_config(TileConfig, None, ["run.devices=0"])
    cfg = load_config(TileConfig, None, ["features.resize_to=224", "slides.mpp=0.25"])
    assert cfg.features.resize_to == 224 and cfg.slides.mpp == 0.25


def test_fingerprints_change_with_what_changes_the_output(tmp_path) -> None:
    cfg = TileConfig()
    tissue, grid = cfg.tissue.model_dump(mode="json"), cfg.grid.model_dump(mode="json")
    base = tiling_fingerprint(tissue, grid, 0.5, 1000)
    assert base == tiling_fingerprint(dict(tissue), dict(grid), 0.5, 1000)
    assert base != tiling_fingerprint(tissue, {**grid, "tile_px": 224}, 0.5, 1000)
    assert base != tiling_fingerprint({**tissue, "threshold": 20}, grid, 0.5, 1000)
    assert base != tiling_fingerprint(tissue, grid, 0.25, 1000)
    assert base != tiling_fingerprint(tissue, grid, 0.5, 1001)  # the slide file was replaced
    enc = {"backbone": "resnet18", "weights": "random:0"}
    assert features_fingerprint(base, enc) != features_fingerprint(base, {**enc, "weights": "random:1"})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.dcm").write_bytes(b"12345")
    (tmp_path / "d" / "b.dcm").write_bytes(b"123")
    assert source_size(tmp_path / "d") == 8 and source_size(tmp_path / "missing") == -1


def test_manifest_round_trip_and_merge(tmp_path) -> None:
    path = tmp_path / "manifest.csv"
    old = [SlideRecord("b", "b.svs", "ok", 10, 0.5, 0.5, 0, 256, "r18", 1.5), SlideRecord("c", "c.svs")]
    write_manifest(path, old)
    assert path.read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    back = read_manifest(path)
    assert [(r.slide_id, r.status, r.n_tiles, r.mpp, r.level) for r in back] == [
        ("b", "ok", 10, 0.5, 0),
        ("c", "error", 0, None, None),
    ]
    new = [
        SlideRecord("a", "a.svs", "empty", error='no tissue, "really"'),
        SlideRecord("c", "c.svs", "ok", 3),
    ]
    merged = merge_records(back, new)
    assert [(r.slide_id, r.status) for r in merged] == [("a", "empty"), ("b", "ok"), ("c", "ok")]
    write_manifest(path, merged)
    assert read_manifest(path)[0].error == 'no tissue, "really"'
    (tmp_path / "junk.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert read_manifest(tmp_path / "junk.csv") == []


def test_single_device_runtime_spawns_nothing() -> None:
    from pathopeft.features.runtime import Runtime, resolve_precision

    rt = Runtime(accelerator="cpu", devices=1)
    rt.launch()
    assert rt.world_size == 1 and rt.rank == 0 and rt.is_zero and rt.device.type == "cpu"
    assert rt.gather({"a": 1}) == [{"a": 1}] and rt.shard([1, 2, 3]) == [1, 2, 3]
    assert rt.precision == "32-true" and resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    rt.barrier()  # no-op without a process group
    with rt.autocast():
        pass


def test_impossible_devices_are_a_usage_error() -> None:
    import torch

    from pathopeft.features.runtime import make_runtime

    with pytest.raises(ConfigError, match="cannot set up"):  # one more GPU than there is
        make_runtime(accelerator="cuda", devices=torch.cuda.device_count() + 1, precision="32-true")


def test_summary_counts_and_exit_codes(tmp_path) -> None:
    from pathopeft.features.pipeline import TileSummary

    errors = [SlideRecord(f"bad{i}", "p", "error", error="broken") for i in range(25)]
    fine = [
        SlideRecord("ok", "p", "ok", 7, reused=True),
        SlideRecord("glass", "p", "empty", error="no tissue"),
    ]
    summary = TileSummary(errors + fine, 2.0, tmp_path)
    text = summary.describe()
    assert "27 slide(s)" in text and "1 ok (1 reused), 1 empty, 25 error; 7 tiles" in text
    assert "... and 6 more" in text  # long failure lists are cut; the manifest has them all
    assert summary.exit_code() == 0 and summary.exit_code(strict=True) == 1
    assert TileSummary(errors, 1.0, tmp_path).exit_code() == 1  # every slide failed
    assert TileSummary(fine, 1.0, tmp_path).exit_code(strict=True) == 0  # empty is not a failure
