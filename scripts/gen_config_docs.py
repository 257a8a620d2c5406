"""Generate docs/configuration.md from the typed pydantic configs (the reference cannot drift).

    python scripts/gen_config_docs.py            # rewrite docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 if the committed file is out of date

Every key of every command's config is listed with its dotted name, type, default and meaning.
The meaning is the field's ``description`` when it has one, otherwise the comment written next
to the field in the schema's source (the line(s) right above it, or at the end of its line): the
schemas are documented where they are defined, and this script only collects what is there.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: document this checkout's schemas
    sys.path.insert(0, str(REPO))

from pathopeft.config.heatmap import HeatmapConfig  # noqa: E402
from pathopeft.config.segment import SegmentCompareConfig, SegmentTrainConfig  # noqa: E402
from pathopeft.config.tile import TileConfig  # noqa: E402
from pathopeft.config.train import TrainConfig  # noqa: E402
from pathopeft.config.wsi import SynthConfig  # noqa: E402
from pathopeft.mil.continual.pipeline import PipelineConfig  # noqa: E402

OUTPUT = REPO / "docs" / "configuration.md"


@dataclass(frozen=True)
class Command:
    """One config schema and how it is used."""

    title: str
    schema: type[BaseModel]
    usage: str
    example: str  # a shipped YAML file that uses the schema, or ""


COMMANDS = (
    Command("pathopeft tile", TileConfig, "`pathopeft tile SLIDES... --config FILE --set key=value`",
            "configs/tile_default.yaml"),
    Command("pathopeft train / add-task", TrainConfig,
            "`pathopeft train CONFIG`, `pathopeft add-task CKPT CONFIG`", "configs/camelyon_comel.yaml"),
    Command("pathopeft train PIPELINE", PipelineConfig,
            "`pathopeft train PIPELINE.yaml` (a file with `tasks:`)", "pipelines/synthetic_3task.yaml"),
    Command("pathopeft heatmap", HeatmapConfig, "`pathopeft heatmap CKPT ... --config FILE --set key=value`",
            "configs/heatmap_default.yaml"),
    Command("pathopeft segment train", SegmentTrainConfig, "`pathopeft segment train CONFIG`",
            "configs/seg_salt.yaml"),
    Command("pathopeft segment compare", SegmentCompareConfig, "`pathopeft segment compare CONFIG` "
            "(every `segment train` key, plus `compare`)", "configs/seg_compare.yaml"),
    Command("pathopeft synth", SynthConfig, "`pathopeft synth OUT --config FILE --set key=value`", ""),
)  # fmt: skip


# --- descriptions from the schema source ---------------------------------------------------------------


def _source_comments(cls: type) -> dict[str, str]:
    """Field name → the comment above it (contiguous ``#`` lines) or at the end of its line."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    tree = ast.parse(source)
    node = tree.body[0]
    assert isinstance(node, ast.ClassDef)
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 2
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        trailing = ""
        last = lines[(stmt.end_lineno or stmt.lineno) - 1]
        match = re.search(r"\)?\s+#\s?(.*)$", last)
        if match and not _inside_string(last, match.start()):
            trailing = match.group(1).strip()
        text = " ".join(part for part in [" ".join(above), trailing] if part)
        out[stmt.target.id] = re.sub(r"\s*#\s*fmt:\s*skip\s*", "", text).strip()
    return out


def _inside_string(line: str, index: int) -> bool:
    """Whether ``index`` of ``line`` is inside a quoted string (a ``#`` in a regex default)."""
    quote = None
    for ch in line[:index]:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
    return quote is not None


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Comments of a model and its bases (a subclass inherits its parents' documented fields)."""
    merged: dict[str, str] = {}
    for base in reversed(model.__mro__):
        if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
            merged.update({k: v for k, v in _source_comments(base).items() if v})
    return merged


# --- types and defaults --------------------------------------------------------------------------------


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple, dict, set):
        name = {list: "list", tuple: "tuple", dict: "mapping", set: "set"}[origin]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list[{_type_name(args[0])}]"
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{name}[{inner}]" if inner else name
    if origin is typing.Annotated:
        return _type_name(args[0])
    if _is_model(tp):
        return "section"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, tuple):
        value = list(value)
    text = json.dumps(value, ensure_ascii=False, default=str).replace("|", "\\|")  # GFM table cell
    return f"`{text}`"


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """Models a field holds (``X``, ``X | None``); lists of models are handled as ``key[]``."""
    if _is_model(tp):
        return [tp]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [a for a in typing.get_args(tp) if _is_model(a)]
    return []


def _list_model(tp: Any) -> type[BaseModel] | None:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp) or (None,)
        return inner if _is_model(inner) else None
    return None


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    comments = _comments(model)
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        text = (field.description or comments.get(name, "")).replace("|", "\\|").replace("\n", " ")
        sections = _models_in(field.annotation)
        item = _list_model(field.annotation)
        if sections and len(sections) == 1 and field.annotation is sections[0]:
            doc = inspect.getdoc(sections[0]) or ""
            rows.append((key, "section", "", (text or doc.split("\n\n")[0]).replace("\n", " ")))
            rows += _rows(sections[0], f"{key}.")
        elif item is not None:
            rows.append((key, f"list of {item.__name__}", _default(field), text))
            rows += _rows(item, f"{key}[].")
        else:
            rows.append((key, _type_name(field.annotation), _default(field), text))
            for section in sections:  # X | None: document X's keys too
                rows += _rows(section, f"{key}.")
    return rows


def render() -> str:
    """The whole of docs/configuration.md."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_docs.py from the pydantic schemas in pathopeft/config/ "
        "(and the pipeline schema); do not edit by hand. tests/test_config_docs.py fails when this "
        "file differs from what the script writes. -->",
        "",
        "Every command reads one YAML file (`--config FILE` or its positional CONFIG) and `--set "
        "key=value` overrides with the dotted keys below (values are YAML: `--set "
        "'data.classes=[normal,tumor]'`). An unknown key is an error that names it. Defaults are "
        "what a key takes when neither the file nor `--set` gives it; `**required**` keys have none.",
        "",
        "Commands: " + ", ".join(f"[{c.title}](#{_anchor(c.title)})" for c in COMMANDS) + ".",
        "",
    ]
    for command in COMMANDS:
        out += [f"## {command.title}", ""]
        doc = (inspect.getdoc(command.schema) or "").split("\n\n")[0].replace("\n", " ")
        if doc:
            out += [doc, ""]
        out.append(
            f"Used by {command.usage}." + (f" Example: `{command.example}`." if command.example else "")
        )
        out += ["", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, type_name, default, text in _rows(command.schema):
            out.append(f"| `{key}` | {type_name} | {default} | {text} |")
        out.append("")
    return "\n".join(out)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            sys.stderr.write(f"{args.out} is out of date: run python scripts/gen_config_docs.py\n")
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
