"""Every command in README.md is run or checked by the real CLI, so the README cannot rot.

Each ``pathopeft ...`` line of a ```bash block (continuations joined, also inside ``torchrun`` /
``srun`` lines) is handled by the mode of its ``##`` section (``SECTION_MODES``; a new section
with commands must be given one):

* ``run``: executed as written in a scratch folder, with the sizes in ``SMALL`` substituted (every
  substitution must still match the README, so the mapping cannot rot either);
* ``check``: commands with ``--dry-run`` are run with it (arguments parsed, every config key and
  override validated, nothing done); ``tasks`` is run for real (it only reads); ``view`` builds
  its app over the folder; the rest (``synth``, ``manifest``, ``segment predict``, ``demo``) are
  parsed by their real click parser. The real-data paths they name are stand-ins made from the
  synthetic cohort (``_stand_ins``);
* ``demo``: ``pathopeft demo`` runs on the shared tiny demo (tests/_demo_cohort.py: the sizes of
  ``TINY``), its other lines are parsed, ``view`` builds its app over the tiny demo's heatmaps.

The Python example is executed like a doctest.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pathopeft.cli import main
from tests._demo_cohort import tiny_demo

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

SECTION_MODES = {
    "The demo: see everything work in a few minutes": "demo",
    "Step by step on a synthetic cohort": "run",
    "Real data: CAMELYON16": "check",
    "Adding a task": "check",
    "Heatmaps: QuPath and the browser": "check",
    "Segmentation with adapters": "check",
    "Several GPUs and nodes": "check",
    "Configuration reference": "check",
}
# README sizes → test sizes for the executed section (6 slides of 1536² px, one epoch).
SMALL = {"--n 8": "--n 6", "--size 4096": "--size 1536", "trainer.max_epochs=10": "trainer.max_epochs=1"}
# Shell variables the README sets with a non-pathopeft command (a pip package's weights path).
VARIABLES = {"$W": "models/efficientnet_lite0.pth"}


def readme_commands(text: str) -> list[tuple[str, str]]:
    """(section, joined command line) for every line of a bash block that runs pathopeft."""
    out, section, in_bash, pending = [], "", False, ""
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            in_bash = line.strip() == "```bash" and not in_bash
            continue
        if not in_bash:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if "pathopeft" in shlex.split(pending, comments=True):
            out.append((section, pending.strip()))
        pending = ""
    return out


def _argv(line: str) -> list[str]:
    tokens = shlex.split(line, comments=True)
    argv = tokens[tokens.index("pathopeft") + 1 :]
    return [VARIABLES.get(a, a) for a in argv]


def _resolve(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The click command ``argv`` names and its own arguments (subcommands of groups resolved)."""
    command: click.Command = main
    while isinstance(command, click.Group):
        ctx = click.Context(command)
        sub = command.get_command(ctx, argv[0])
        assert sub is not None, f"unknown command {argv[0]!r}"
        command, argv = sub, argv[1:]
    return command, argv


def _invoke(argv: list[str]) -> str:
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    assert result.exit_code == 0, f"pathopeft {' '.join(argv)}\n{result.output}"
    return result.output


def _check(argv: list[str]) -> None:
    """A command that is not executed: dry-run it, or parse it with its real parser."""
    command, args = _resolve(argv)
    name = command.name
    if any(p.name == "dry_run" for p in command.params):
        out = _invoke([*argv, "--dry-run"])
        assert "dry run: arguments and config are valid" in out
    elif name == "tasks":
        assert "adapters:" in _invoke(argv)
    elif name == "view":
        from pathopeft.viewer.server import create_app

        ctx = command.make_context(name, args)
        heatmaps = ctx.params["heatmaps_opt"] or ctx.params["heatmaps_arg"]
        create_app(heatmaps, slides=ctx.params["slides"])  # what `view` serves (then serve_forever)
    else:
        command.make_context(name, list(args))  # raises on a bad option, value or argument


def _stand_ins(ws: Path) -> None:
    """Real-data paths the README names, made from the synthetic cohort of the executed section."""
    slides = sorted((ws / "slides").glob("*.tiff"))[:2]
    for folder in ("CAMELYON16/training", "CAMELYON16/testing/images", "../shared/data/wsi"):
        (ws / folder).mkdir(parents=True, exist_ok=True)
        for s in slides:
            target = ws / folder / s.name
            if not target.exists():
                target.symlink_to(s)
    (ws / "CAMELYON16/annotations").mkdir(exist_ok=True)
    (ws / "CAMELYON16/testing/reference.csv").write_text(f"{slides[0].stem},Tumor,Macro,\n")
    (ws / "cohort.csv").write_text(f"path\n{slides[0]}\n")
    for name in ("uni.bin", "sam_vit_b_01ec64.pth", "efficientnet_lite0.pth"):
        (ws / "models").mkdir(exist_ok=True)
        (ws / "models" / name).write_bytes(b"")
    for run in ("comel_camelyon16", "comel_liver"):
        (ws / "runs" / run).mkdir(parents=True, exist_ok=True)
        shutil.copy(ws / "runs" / "quickstart" / "best.ckpt", ws / "runs" / run / "best.ckpt")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch folder with the repository's configs, after the README's executed section."""
    ws = tmp_path_factory.mktemp("readme") / "ws"
    ws.mkdir()
    for folder in ("configs", "pipelines", "data_manifests"):
        shutil.copytree(REPO / folder, ws / folder)
    old = Path.cwd()
    os.chdir(ws)
    try:
        used = set()
        for section, line in readme_commands(README.read_text(encoding="utf-8")):
            if SECTION_MODES.get(section) != "run":
                continue
            for big, small in SMALL.items():
                if big in line:
                    line, used = line.replace(big, small), used | {big}
            argv = _argv(line)
            if argv[0] == "view":
                _check(argv)
            else:
                _invoke(argv)
        assert used == set(SMALL), f"SMALL entries no longer in README.md: {set(SMALL) - used}"
        _stand_ins(ws)
    finally:
        os.chdir(old)
    return ws


def test_every_section_with_commands_has_a_mode() -> None:
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) > 30  # the parser finds the README's commands (not an empty list)
    unknown = {s for s, _ in commands if s not in SECTION_MODES}
    assert not unknown, f"README sections with commands but no test mode: {unknown}"
    assert {SECTION_MODES[s] for s, _ in commands} == {"run", "check", "demo"}


def test_readme_parser_joins_continuations_and_finds_launchers() -> None:
    text = "## S\n```bash\ntorchrun --nnodes 2 \\\n    -m pathopeft train c.yaml  # note\n#SBATCH x\n```\n"
    ((section, line),) = readme_commands(text)
    assert section == "S" and _argv(line) == ["train", "c.yaml"]


@pytest.mark.slow
def test_executed_section_made_its_outputs(workspace: Path) -> None:
    assert (workspace / "runs" / "quickstart" / "test_metrics.json").is_file()
    assert list((workspace / "heatmaps").glob("*.geojson"))


@pytest.mark.slow
def test_checked_commands_parse_and_their_configs_validate(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    checked = 0
    for section, line in readme_commands(README.read_text(encoding="utf-8")):
        if SECTION_MODES.get(section) == "check":
            _check(_argv(line))
            checked += 1
    assert checked > 20


@pytest.mark.slow
def test_demo_commands(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = tiny_demo(tmp_path_factory)  # `pathopeft demo`, at the sizes of tests/_demo_cohort.TINY
    assert (demo / "demo_summary.json").is_file()
    monkeypatch.chdir(demo.parent)
    link = demo.parent / "demo"
    with contextlib.suppress(FileExistsError):  # another xdist worker may have made it
        link.symlink_to(demo, target_is_directory=True)
    lines = [
        line
        for s, line in readme_commands(README.read_text(encoding="utf-8"))
        if SECTION_MODES.get(s) == "demo"
    ]
    assert any(_argv(line) == ["demo"] for line in lines)
    for line in lines:
        _check(_argv(line))


def test_check_fails_on_an_invalid_key_or_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a misspelt config key or an unknown option is caught."""
    monkeypatch.chdir(REPO)
    with pytest.raises(AssertionError, match="unknown key"):
        _check(["train", "configs/camelyon_comel.yaml", "--set", "data.manifests=x.csv"])
    with pytest.raises(click.exceptions.NoSuchOption):
        _check(["synth", str(tmp_path / "s"), "--lesions", "dense"])
    with pytest.raises(AssertionError, match="unknown lightning.Trainer"):
        _check(["segment", "train", "configs/seg_salt.yaml", "--set", "trainer.max_epoch=2"])


def test_readme_adapter_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        # our own README's example, executed like a doctest
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "adapter_out" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_out" / "adapter_model.safetensors").is_file()


def test_dry_run_does_no_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copytree(REPO / "pipelines", tmp_path / "pipelines")
    monkeypatch.chdir(tmp_path)
    out = _invoke(["train", "configs/camelyon_comel.yaml", "--set", "trainer.max_epochs=3", "--dry-run"])
    assert "max_epochs: 3" in out  # the resolved config is printed
    out = _invoke(["train", "pipelines/synthetic_3task.yaml", "--dry-run"])
    assert "task 3: colon" in out  # every task of a pipeline is resolved
    _invoke(["segment", "compare", "configs/seg_compare.yaml", "--dry-run"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_add_task_dry_run_checks_the_request_against_the_checkpoint(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    ckpt = "runs/comel_camelyon16/best.ckpt"  # holds the task camelyon16 (classes normal, tumor)
    before = sorted(p.name for p in (workspace / "runs").iterdir())
    result = CliRunner().invoke(main, ["add-task", ckpt, "configs/camelyon_comel.yaml", "--dry-run"])
    assert result.exit_code == 2 and "already has a task of that name" in result.output
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == before  # nothing written
