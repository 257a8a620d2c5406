"""Config loading: YAML + overrides + strict validation, with errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathopeft.config import ConfigError, StrictModel, apply_overrides, dump_config, load_config, read_yaml


class Inner(StrictModel):
    rank: int = 8
    targets: str = ".*"


class Schema(StrictModel):
    name: str = "run"
    lr: float = 1e-3
    inner: Inner = Inner()
    sweep: list[float] = [1e-3, 1e-4]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ninner:\n  rank: 4\n")
    cfg = load_config(Schema, path, ["inner.rank=16", "lr=5e-4", "sweep.1=0.5"])
    assert cfg.name == "a"
    assert cfg.inner.rank == 16
    assert cfg.lr == pytest.approx(5e-4)
    assert cfg.sweep == [1e-3, 0.5]


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    cfg = load_config(Schema, write(tmp_path, "name: a\n"), ["inner.targets=qkv"])
    assert cfg.inner.targets == "qkv"
    assert cfg.inner.rank == 8


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "name: a\ninner:\n  rnak: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(Schema, path)
    assert str(path) in str(info.value)
    assert "inner.rnak: unknown key" in str(info.value)


def test_unknown_override_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inner.nope: unknown key"):
        load_config(Schema, write(tmp_path, "{}\n"), ["inner.nope=1"])


def test_a_yaml_boolean_where_text_is_expected_says_to_quote_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"inner.targets: .*read the value as a bool: quote it"):
        load_config(Schema, write(tmp_path, "{}\n"), ["inner.targets=off"])  # YAML 1.1: off = False
    assert load_config(Schema, write(tmp_path, "{}\n"), ['inner.targets="off"']).inner.targets == "off"


def test_wrong_type_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inner.rank"):
        load_config(Schema, write(tmp_path, "inner:\n  rank: many\n"))


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", "lr.x=1"])
def test_malformed_overrides(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        load_config(Schema, write(tmp_path, "lr: 0.1\n"), [bad])


def test_list_index_out_of_range() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides({"sweep": [1]}, ["sweep.3=2"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="not found"):
        read_yaml(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        read_yaml(write(tmp_path, "- 1\n- 2\n"))


def test_dump_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Schema, None, ["inner.rank=3"])
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(Schema, out) == cfg
