"""docs/configuration.md is what scripts/gen_config_docs.py generates from the schemas (it cannot drift)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_config_docs"] = module
    spec.loader.exec_module(module)
    return module


def _keys(model: type[BaseModel], gen, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for section in gen._models_in(field.annotation):
            keys += _keys(section, gen, f"{prefix}{name}.")
        item = gen._list_model(field.annotation)
        if item is not None:
            keys += _keys(item, gen, f"{prefix}{name}[].")
    return keys


def test_committed_reference_matches_the_generator() -> None:
    gen = _generator()
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"


def test_every_key_is_listed_with_a_meaning() -> None:
    gen = _generator()
    text = gen.render()
    for command in gen.COMMANDS:
        rows = {
            key: (type_name, default, meaning)
            for key, type_name, default, meaning in gen._rows(command.schema)
        }
        for key in _keys(command.schema, gen):
            assert key in rows, f"{command.title}: {key} missing"
            assert rows[key][2].strip(), (
                f"{command.title}: {key} has no description (add a comment or Field description)"
            )
            assert f"| `{key}` |" in text


def test_reference_shows_types_defaults_and_comments() -> None:
    gen = _generator()
    rows = {key: rest for key, *rest in gen._rows(gen.TileConfig)}
    assert rows["grid.target_mpp"][:2] == ["float", "`0.5`"]
    assert "20×" in rows["grid.target_mpp"][2]  # the comment above the field in config/wsi.py
    train = {key: rest for key, *rest in gen._rows(gen.TrainConfig)}
    assert train["data.features_dir"][2].startswith("folder of bags")  # a Field description
    assert train["model.name"][0] == '"comel" \\| "abmil" \\| "abmil_gated" \\| "transmil"'
    pipeline = {key: rest for key, *rest in gen._rows(gen.PipelineConfig)}
    assert pipeline["tasks"][1] == "**required**" and "tasks[].config" in pipeline


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    gen = _generator()
    stale = tmp_path / "configuration.md"
    stale.write_text(gen.render().replace("grid.target_mpp", "grid.target_um"), encoding="utf-8")
    assert gen.main(["--check", "--out", str(stale)]) == 1
    stale.write_text(gen.render(), encoding="utf-8")
    assert gen.main(["--check", "--out", str(stale)]) == 0


def test_every_table_row_has_four_cells() -> None:
    """A '|' in a default (a regex) or a meaning must not split the Markdown table row."""
    import re

    rows = [line for line in _generator().render().splitlines() if line.startswith("| `")]
    assert rows
    for line in rows:
        assert len(re.split(r"(?<!\\)\|", line.strip())[1:-1]) == 4, line
