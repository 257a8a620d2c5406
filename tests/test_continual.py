"""Continual task addition: add-task, tasks, pipelines, OWLoRA's guarantees, bad input (METHODS.md)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pathopeft.cli import main
from pathopeft.config import ConfigError, load_config
from pathopeft.config.train import TrainConfig
from pathopeft.mil.continual.add_task import add_task, extend_module
from pathopeft.mil.continual.evaluation import task_mode
from pathopeft.mil.continual.pipeline import run_pipeline, transfer_metrics
from pathopeft.mil.data import MILDataModule
from pathopeft.mil.module import MILModule
from pathopeft.mil.synthetic import make_task_sequence
from pathopeft.mil.train import train
from pathopeft.runs import load_checkpoint

ORGANS = ("breast", "liver", "colon")
SMALL = [
    "model.comel.embed_dim=32", "model.comel.heads=2", "model.comel.groups=8", "model.comel.attn_hidden=32",
    "model.abmil.embed_dim=32", "continual.rank=2", "trainer.max_epochs=2", "optimizer.lr=1e-3",
]  # fmt: skip
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_task.yaml"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return make_task_sequence(root, ORGANS, dim=16, n_bags=(8, 4, 4), tiles=(30, 60), signal=4.0)


def _sets(cohort, organ: str, root: Path, name: str, *extra: str) -> list[str]:
    return [
        f"data.manifest={cohort.manifest}", f"data.features_dir={cohort.root / 'features'}",
        f"data.annotations={cohort.annotations_dir}", f"data.task={organ}",
        f"data.classes=[{organ}_normal,{organ}_tumor]", f"run.root={root}", f"run.name={name}",
        *SMALL, *extra,
    ]  # fmt: skip


def _cfg(cohort, organ, root, name, *extra) -> TrainConfig:
    return load_config(TrainConfig, CONFIG, _sets(cohort, organ, root, name, *extra))


@pytest.fixture(scope="module")
def sequence(cohorts, tmp_path_factory):
    """breast trained, then liver and colon added with OWLoRA (separate run folders)."""
    root = tmp_path_factory.mktemp("runs")
    first = train(_cfg(cohorts[0], "breast", root, "t0"))
    sha0 = _sha(first / "best.ckpt")
    second = add_task(first / "best.ckpt", _cfg(cohorts[1], "liver", root, "t1"))
    third = add_task(second / "best.ckpt", _cfg(cohorts[2], "colon", root, "t2"))
    return {"root": root, "runs": [first, second, third], "sha0": sha0}


def _bag(cohort, slide: str = "test_001"):
    from pathopeft.bags import read_bag

    prefix = cohort.slide_ids[0].split("_")[0]
    bag = read_bag(cohort.features_dir / f"{prefix}_{slide}.h5")
    return torch.from_numpy(bag.features), torch.from_numpy(bag.coords)


def test_checkpoint_holds_every_task_and_rebuilds_without_pickle(sequence, cohorts):
    ckpt = load_checkpoint(sequence["runs"][2] / "best.ckpt")
    hp = ckpt["hyper_parameters"]
    assert [t["name"] for t in hp["tasks"]] == list(ORGANS)
    assert [a["task"] for a in hp["adapters"]] == ["liver", "colon"]
    assert all(a["method"] == "owlora" for a in hp["adapters"])
    module = MILModule.from_checkpoint(sequence["runs"][2] / "best.ckpt")
    assert [t.name for t in module.tasks] == list(ORGANS)
    x, c = _bag(cohorts[2])
    with torch.no_grad():
        out = module.model(x, coords=c)  # class-incremental: every class seen
    assert out.logits.shape == (1, 6)


def test_task_aware_outputs_of_the_first_task_are_bit_identical(sequence, cohorts):
    x, c = _bag(cohorts[0])
    before = MILModule.from_checkpoint(sequence["runs"][0] / "best.ckpt")
    after = MILModule.from_checkpoint(sequence["runs"][2] / "best.ckpt")
    with torch.no_grad():
        ref = before.model(x, coords=c, task="breast")
        with task_mode(after, "breast"):
            got = after.model(x, coords=c, task="breast")
        with task_mode(after, "liver"):  # liver's view: its adapter on, colon's off
            liver = after.model(x, coords=c, task="liver")
        mid = MILModule.from_checkpoint(sequence["runs"][1] / "best.ckpt")
        liver_then = mid.model(x, coords=c, task="liver")
    assert torch.equal(ref.logits, got.logits) and torch.equal(ref.attention, got.attention)
    assert torch.equal(liver.logits, liver_then.logits)


def test_input_checkpoint_is_unchanged_and_added_tasks_train_few_parameters(sequence, cohorts):
    assert _sha(sequence["runs"][0] / "best.ckpt") == sequence["sha0"]
    cfg = _cfg(cohorts[1], "liver", sequence["root"], "probe")
    data = MILDataModule(cfg.data, seed=0, task=1)
    data.prepare()
    module = extend_module(load_checkpoint(sequence["runs"][0] / "best.ckpt"), cfg, data)
    total = sum(p.numel() for p in module.parameters())
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    share = sum(p.numel() for p in module.parameters() if p.requires_grad) / total
    assert share <= 0.10, share
    assert trainable and all(".adapters.liver." in n or n.startswith("model.heads.liver.") for n in trainable)
    report = json.loads((sequence["runs"][1] / "test_metrics.json").read_text())
    assert report["method"] == "owlora" and "parameters train" in report["trainable"]


def _span(matrix: torch.Tensor) -> torch.Tensor:
    u, sv, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, sv > sv.max() * 1e-4] if sv.numel() and sv.max() > 0 else u[:, :0]


def test_owlora_strategy_projects_each_step_off_the_earlier_adapters(sequence, cohorts):
    """The optimizer Lightning gets moves colon's A/B only outside liver's row/column spaces."""
    import pathopeft.adapters as pa

    cfg = _cfg(cohorts[2], "colon", sequence["root"], "probe2")
    data = MILDataModule(cfg.data, seed=0, task=2)
    data.prepare()
    module = extend_module(load_checkpoint(sequence["runs"][1] / "best.ckpt"), cfg, data)
    optimizer = module.configure_optimizers()["optimizer"]
    layers = [layer for _, layer in pa.adapted_layers(module.model)]
    before = [
        (layer.adapters["colon"].A.detach().clone(), layer.adapters["colon"].B.detach().clone())
        for layer in layers
    ]
    torch.manual_seed(1)
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    moved = 0.0
    for layer, (a0, b0) in zip(layers, before):
        liver, colon = layer.adapters["liver"], layer.adapters["colon"]
        rows = _span(liver.A.detach().T)  # liver's row space (n × k)
        cols = _span(liver.B.detach())  # its column space (directions B really uses)
        step_a = colon.A.detach() - a0
        moved += float(step_a.abs().sum())
        assert (step_a @ rows).abs().max() < 1e-5
        if cols.shape[1]:
            assert (cols.T @ (colon.B.detach() - b0)).abs().max() < 1e-5
    assert moved > 0  # the step did change the new adapter
    loss = module.strategy.extra_losses(module, None, {})
    assert set(loss) == {"ortho"} and loss["ortho"].requires_grad


def test_tasks_command_lists_what_was_trained(sequence):
    result = CliRunner().invoke(main, ["tasks", str(sequence["runs"][2] / "best.ckpt")])
    assert result.exit_code == 0, result.output
    for organ in ORGANS:
        assert organ in result.output
    assert "owlora:liver(r=2)" in result.output and "after colon" in result.output
    csv = CliRunner().invoke(main, ["tasks", str(sequence["runs"][2] / "best.ckpt"), "--csv"])
    lines = csv.output.strip().splitlines()
    assert lines[0].startswith("task,classes,negative_class,manifest,adapters") and len(lines) == 4
    table = pd.read_csv(__import__("io").StringIO(csv.output))
    assert list(table["router_bags"]) == [8, 8, 8]


@pytest.mark.parametrize(
    ("extra", "organ_classes", "message"),
    [
        (["data.task=breast"], None, "already has a task"),
        ([], "[liver_normal,breast_tumor]", "already name classes"),
        (["model.name=abmil"], None, "model.name"),
    ],
)
def test_bad_add_task_requests_fail_before_anything_is_written(
    sequence, cohorts, extra, organ_classes, message
):
    root = sequence["root"] / "bad"
    sets = _sets(cohorts[1], "liver", root, "bad", *extra)
    if organ_classes:
        sets.append(f"data.classes={organ_classes}")
    with pytest.raises(ConfigError, match=message):
        add_task(sequence["runs"][0] / "best.ckpt", load_config(TrainConfig, CONFIG, sets))
    assert not (root / "bad").exists()


def test_feature_size_mismatch_and_missing_bags_are_clear_errors(sequence, tmp_path):
    other = make_task_sequence(tmp_path / "wide", ("liver",), dim=24, n_bags=(4, 2, 2), tiles=(20, 30))[0]
    with pytest.raises(ConfigError, match="24-dimensional"):
        add_task(sequence["runs"][0] / "best.ckpt", _cfg(other, "liver", tmp_path, "wide_run"))
    (tmp_path / "empty").mkdir()
    cfg = load_config(TrainConfig, CONFIG, [*_sets(other, "liver", tmp_path, "nobags"),
                                            f"data.features_dir={tmp_path / 'empty'}"])  # fmt: skip
    with pytest.raises(ConfigError):
        add_task(sequence["runs"][0] / "best.ckpt", cfg)
    assert not (tmp_path / "nobags").exists() and not (tmp_path / "wide_run").exists()


def _pipeline(tmp_path: Path, cohorts, method: str, name: str, n: int = 2, epochs: int = 2) -> Path:
    tasks = []
    for organ, cohort in zip(ORGANS[:n], cohorts):
        sets = [s for s in _sets(cohort, organ, tmp_path, "x") if not s.startswith("run.")]
        tasks.append({"config": str(CONFIG), "set": [*sets, f"trainer.max_epochs={epochs}"]})
    path = tmp_path / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"method": method, "seed": 0, "tasks": tasks,
                                    "run": {"name": name, "root": str(tmp_path / "runs")}}))  # fmt: skip
    return path


def test_pipeline_writes_result_matrices_and_a_missing_config_is_refused(cohorts, tmp_path):
    path = _pipeline(tmp_path, cohorts, "owlora", "p")
    out = run_pipeline(path, ("forward_transfer=true",))
    # forward transfer: the added task was also trained alone, and FWT is R[1,1] minus that run
    ref = json.loads((out / "reference" / "task1_liver" / "evaluation.json").read_text())
    scratch = ref["results"]["liver"]["task_aware"]["bag_auc"]
    matrix = pd.read_csv(out / "results" / "task_aware_bag_auc.csv", index_col=0)
    table = pd.read_csv(out / "results" / "summary.csv")
    row = table[(table["mode"] == "task_aware") & (table["metric"] == "bag_auc")].iloc[0]
    assert row["FWT"] == pytest.approx(matrix.loc["after liver", "liver"] - scratch, abs=1e-4)
    costs = pd.read_csv(out / "results" / "task_costs.csv")
    assert list(costs["run"]) == ["reference/task1_liver", "task0_breast", "task1_liver"]
    assert (costs["fit_seconds"] > 0).all()
    for mode in ("class_incremental", "task_aware", "routed"):
        for metric in ("bag_accuracy", "bag_auc", "instance_auc", "tile_dice"):
            assert (out / "results" / f"{mode}_{metric}.csv").is_file()
            assert (out / "results" / f"{mode}_{metric}.png").stat().st_size > 1000
    routing = pd.read_csv(out / "results" / "routed_routing_accuracy.csv", index_col=0)
    assert routing.loc["after liver"].notna().all()
    summary = (out / "results" / "summary.md").read_text()
    assert "BWT" in summary and "owlora" in summary
    import yaml

    data = yaml.safe_load(path.read_text())
    data["tasks"][1]["config"] = str(tmp_path / "nope.yaml")
    data["run"]["name"] = "missing"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="nope.yaml not found"):
        run_pipeline(path)
    assert not (tmp_path / "runs" / "missing").exists()


@pytest.mark.slow
def test_killed_add_task_leaves_the_input_and_a_resumed_pipeline_equals_an_uninterrupted_one(
    cohorts, tmp_path
):
    path = _pipeline(tmp_path, cohorts, "owlora", "full", epochs=4)
    full = run_pipeline(path)
    killed = _pipeline(tmp_path, cohorts, "owlora", "killed", epochs=4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pathopeft", "train", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = tmp_path / "runs" / "killed" / "task0_breast" / "best.ckpt"
    second = tmp_path / "runs" / "killed" / "task1_liver" / "metrics.csv"
    deadline = time.monotonic() + 600
    while not second.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before it could be killed during task 2"
    sha = _sha(first)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _sha(first) == sha  # add-task only reads its input checkpoint
    resumed = run_pipeline(killed, resume=True)
    a = json.loads((full / "task1_liver" / "evaluation.json").read_text())["results"]
    b = json.loads((resumed / "task1_liver" / "evaluation.json").read_text())["results"]
    assert a == b


def test_transfer_metrics_by_hand():
    import numpy as np

    r = np.array([[0.9, np.nan, np.nan], [0.8, 0.7, np.nan], [0.6, 0.75, 0.5]])
    m = transfer_metrics(r)
    assert m["ACC"] == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    assert m["BWT"] == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.7 - 0.75)) / 2)
    assert np.isnan(m["FWT"])  # no from-scratch reference
    m = transfer_metrics(r, np.array([np.nan, 0.6, 0.55]))
    assert m["FWT"] == pytest.approx(((0.7 - 0.6) + (0.5 - 0.55)) / 2)


def test_heatmap_scores_of_an_earlier_task_use_its_task_aware_view(sequence, cohorts):
    """`pathopeft heatmap --task breast` on the 3-task checkpoint scores as the breast-only model did."""
    from pathopeft.heatmaps.scoring import score_bag

    x, c = _bag(cohorts[0])
    before = MILModule.from_checkpoint(sequence["runs"][0] / "best.ckpt")
    after = MILModule.from_checkpoint(sequence["runs"][2] / "best.ckpt")
    a = score_bag(before, x.numpy(), c.numpy(), "breast")
    b = score_bag(after, x.numpy(), c.numpy(), "breast")
    assert (a.attention == b.attention).all() and (a.bag_probs == b.bag_probs).all()
    liver = score_bag(after, x.numpy(), c.numpy(), "liver")
    assert liver.classes == ("liver_normal", "liver_tumor")


@pytest.mark.parametrize("method", ["replay", "ewc"])
def test_strategies_that_remember_keep_their_memory_in_the_checkpoint(cohorts, tmp_path, method):
    out = run_pipeline(_pipeline(tmp_path, cohorts, method, method, epochs=1))
    state = load_checkpoint(out / "task1_liver" / "best.ckpt")["pathopeft_strategy"]
    assert state["tasks_done"] == ["breast", "liver"]
    if method == "replay":
        tasks = {b["task"] for b in state["buffer"]}
        assert tasks == {0, 1} and len(state["buffer"]) <= 30 and state["seen"] == 16  # 8 + 8 train bags
        # the buffer's bags live in the run folder: the earlier task's feature folder may go away
        run = out / "task1_liver"
        assert sorted(p.name for p in (run / "replay").glob("*.h5")) == sorted(
            Path(b["bag"]).name for b in state["buffer"]
        )
        assert all(not Path(b["bag"]).is_absolute() for b in state["buffer"])
        breast = cohorts[0].root / "features"
        breast.rename(cohorts[0].root / "features_gone")
        try:
            cfg = _cfg(cohorts[2], "colon", tmp_path, "t2", "continual.method=replay", "trainer.max_epochs=1")
            third = add_task(run / "best.ckpt", cfg)
        finally:
            (cohorts[0].root / "features_gone").rename(breast)
        evaluation = json.loads((third / "evaluation.json").read_text())["results"]
        assert "error" in evaluation["breast"] and "error" not in evaluation["colon"]
        later = load_checkpoint(third / "best.ckpt")["pathopeft_strategy"]
        assert {b["task"] for b in later["buffer"]} == {0, 1, 2}
        assert all((third / b["bag"]).is_file() for b in later["buffer"])
    else:
        assert state["fisher"] and set(state["fisher"]) <= set(state["anchor"])
        assert all(bool((f >= 0).all()) for f in state["fisher"].values())
        assert any(float(f.sum()) > 0 for f in state["fisher"].values())


def test_adapter_lr_applies_to_added_tasks_only(sequence):
    """continual.adapter_lr sets the added task's optimizer; the first task keeps optimizer.lr."""
    first = MILModule.from_checkpoint(sequence["runs"][0] / "best.ckpt")
    second = MILModule.from_checkpoint(sequence["runs"][1] / "best.ckpt")
    for module in (first, second):
        module.strategy.options["adapter_lr"] = 5e-3
    assert first.strategy.learning_rate(first, 1e-3) == 1e-3
    assert second.strategy.learning_rate(second, 1e-3) == 5e-3
    optimizer = second.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert optimizer.param_groups[0]["lr"] == 5e-3


def test_bags_of_another_encoder_are_refused_whatever_their_folder_is_called(tmp_path):
    """Same feature size, folder names that say nothing: the bags' own backbone/weights attributes
    (written by `pathopeft tile`) decide, so an auto-resolved other encoder is caught."""
    from types import SimpleNamespace

    import numpy as np

    from pathopeft.bags import FeatureBag, write_bag
    from pathopeft.mil.continual.add_task import check_features
    from pathopeft.mil.train import bag_identity

    def bag(name: str, backbone: str, weights: str) -> Path:
        path = tmp_path / name / "s.h5"
        attrs = {"backbone": backbone, "weights": weights, "patch_size": 256}
        write_bag(path, FeatureBag("s", np.zeros((3, 8), np.float32), np.zeros((3, 2), np.int64), attrs))
        return path

    first = bag("a", "resnet50", "hub:resnet50.tv_in1k")
    ckpt = {"hyper_parameters": {"model": {"in_dim": 8}, "tasks": [
        {"backbone": "features", "features_identity": bag_identity(first)}]}}  # fmt: skip

    def data(path: Path) -> SimpleNamespace:
        return SimpleNamespace(in_dim=8, features_dir=path.parent, cfg=SimpleNamespace(backbone=None),
                               items=[SimpleNamespace(bag=path)])  # fmt: skip

    check_features(ckpt, tmp_path / "x.ckpt", data(bag("b", "resnet50", "hub:resnet50.tv_in1k")))
    with pytest.raises(ConfigError, match=r"weights='hub:resnet50.a1_in1k'.*weights='hub:resnet50.tv_in1k'"):
        check_features(ckpt, tmp_path / "x.ckpt", data(bag("c", "resnet50", "hub:resnet50.a1_in1k")))
    with pytest.raises(ConfigError, match="backbone='vit_small"):
        check_features(ckpt, tmp_path / "x.ckpt", data(bag("d", "vit_small_patch16_224", "x")))


@pytest.mark.slow
def test_owlora_forgets_clearly_less_than_finetuning_on_the_synthetic_sequence(tmp_path):
    """The benchmark's 3-task sequence (seed 2 of benchmarks/bench_continual.py, the shipped
    synthetic task config): bag-accuracy BWT, OWLoRA 0.000 against fine-tuning −0.208 there, both
    task-aware and without a task id through the router (``routed``). The concatenated-heads
    class-incremental BWT does not separate them (both ≤ −0.3, see RESULTS.md)."""
    import yaml

    cohorts = make_task_sequence(tmp_path / "data", ORGANS, seed=2, dim=32, n_bags=(24, 8, 12),
                                 tiles=(60, 120), signal=4.0, lesion_share=(0.05, 0.15))  # fmt: skip
    bwt = {}
    for method in ("owlora", "finetune"):
        tasks = [
            {"config": str(CONFIG), "set": [
                f"data.manifest={c.manifest}", f"data.features_dir={c.root / 'features'}",
                f"data.annotations={c.annotations_dir}", f"data.task={organ}",
                f"data.classes=[{organ}_normal,{organ}_tumor]"]}
            for organ, c in zip(ORGANS, cohorts)
        ]  # fmt: skip
        path = tmp_path / f"{method}.yaml"
        run = {"name": method, "root": str(tmp_path / "runs")}
        path.write_text(yaml.safe_dump({"method": method, "seed": 2, "tasks": tasks, "run": run}))
        out = run_pipeline(path)
        table = pd.read_csv(out / "results" / "summary.csv").set_index(["mode", "metric"])
        for mode in ("task_aware", "routed"):
            bwt[(method, mode)] = float(table.loc[(mode, "bag_accuracy"), "BWT"])
        assert table.loc[("routed", "routing_accuracy"), "ACC"] == 1.0  # distinct organs by construction
    for mode in ("task_aware", "routed"):
        assert bwt[("owlora", mode)] >= -0.05, bwt
        assert bwt[("finetune", mode)] <= -0.1, bwt
        assert bwt[("owlora", mode)] - bwt[("finetune", mode)] >= 0.1, bwt


def test_router_is_fitted_per_task_stored_without_pickle_and_never_refitted(sequence, cohorts):
    from pathopeft.mil.continual.router import ROUTER_KEY

    states = [load_checkpoint(run / "best.ckpt")[ROUTER_KEY] for run in sequence["runs"]]
    assert [[t["name"] for t in s["tasks"]] for s in states] == [list(ORGANS[: i + 1]) for i in range(3)]
    first, last = states[0]["tasks"][0], states[2]["tasks"][0]
    assert torch.equal(first["mean"], last["mean"]) and torch.equal(first["var"], last["var"])
    assert first["count"] == 8 and first["mean"].shape == (16,)  # 8 training bags of 16-dim features
    module = MILModule.from_checkpoint(sequence["runs"][2] / "best.ckpt")
    for i, cohort in enumerate(cohorts):
        x, _ = _bag(cohort)
        post = module.router.posterior(x.mean(dim=0, keepdim=True), list(ORGANS))
        assert int(post.argmax()) == i, post


def test_routed_mode_answers_with_the_routed_task_and_needs_no_task_id(sequence, cohorts):
    from pathopeft.mil.continual.evaluation import evaluate_task

    evaluation = json.loads((sequence["runs"][2] / "evaluation.json").read_text())["results"]
    for organ in ORGANS:
        routed, aware = evaluation[organ]["routed"], evaluation[organ]["task_aware"]
        assert routed["routing_accuracy"] == 1.0  # the organs' backgrounds differ by construction
        # routed to its own task every time: the task-aware answer, over every class seen
        assert routed["bag_accuracy"] == aware["bag_accuracy"]
        assert routed["bag_auc"] == pytest.approx(aware["bag_auc"], abs=1e-6)
        assert routed["instance_auc"] == pytest.approx(aware["instance_auc"], abs=1e-6)
    # a model whose router lacks a task (trained before the router existed): routed is NaN, rest kept
    module = MILModule.from_checkpoint(sequence["runs"][2] / "best.ckpt")
    del module.router.tasks["colon"]
    cfg = _cfg(cohorts[0], "breast", sequence["root"], "probe_router")
    data = MILDataModule(cfg.data, seed=0, task=0)
    data.prepare()
    result = evaluate_task(module, "breast", data.test_dataloader())
    assert all(v != v for v in result["routed"].values())
    assert result["task_aware"]["bag_accuracy"] == evaluation["breast"]["task_aware"]["bag_accuracy"]


def test_router_misroutes_when_told_a_bag_is_elsewhere(sequence, cohorts):
    """Routing decides the answer: a bag forced onto another task gets that task's classes."""
    from pathopeft.mil.continual.evaluation import _routed
    from pathopeft.mil.continual.router import TaskRouter

    module = MILModule.from_checkpoint(sequence["runs"][2] / "best.ckpt")
    x, c = _bag(cohorts[0])
    batch = {"features": x[None], "coords": c[None], "mask": torch.ones(1, len(x), dtype=torch.bool)}
    log_joint, _, _, route = _routed(module, list(ORGANS), batch)
    assert int(route) == 0 and int(log_joint.argmax()) in (0, 1)
    moved = TaskRouter.from_state(module.router.state())
    moved.tasks["breast"]["mean"] = moved.tasks["breast"]["mean"] + 100.0  # breast's statistics moved away
    module.router = moved
    log_joint, _, _, route = _routed(module, list(ORGANS), batch)
    assert int(route) != 0 and int(log_joint.argmax()) not in (0, 1)


def test_task_router_unit():
    from pathopeft.mil.continual.router import TaskRouter, bag_descriptor

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 4, generator=gen), torch.randn(20, 4, generator=gen) + 3.0
    router = TaskRouter()
    router.fit_task("a", a)
    router.fit_task("b", b[:1])  # one bag: variances come from the shrinkage floor, not zero
    assert torch.isfinite(router.tasks["b"]["var"]).all() and (router.tasks["b"]["var"] > 0).all()
    with pytest.raises(ValueError, match="size 5"):
        router.fit_task("c", torch.randn(3, 5))
    with pytest.raises(KeyError, match="'z'"):
        router.log_likelihood(a, ["a", "z"])
    state = router.state()
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = TaskRouter.from_state(torch.load(buffer, weights_only=True))
    assert torch.equal(again.log_likelihood(a, ["a", "b"]), router.log_likelihood(a, ["a", "b"]))
    assert (router.posterior(a, ["a", "b"]).argmax(1) == 0).float().mean() > 0.9
    feats = torch.randn(2, 5, 4, generator=gen)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    desc = bag_descriptor(feats, mask)
    assert torch.allclose(desc[1], feats[1, :2].mean(0)) and torch.allclose(desc[0], feats[0].mean(0))


def test_heatmap_task_auto_routes_each_slide_to_its_organ(sequence, cohorts, tmp_path):
    """`pathopeft heatmap --task auto`: slides of unknown organ, each scored by its routed task."""
    import shutil

    from pathopeft.config.heatmap import HeatmapConfig
    from pathopeft.heatmaps.processor import run_heatmaps
    from pathopeft.wsi.synth import make_synthetic_slide

    slides, features = tmp_path / "slides", tmp_path / "features"
    features.mkdir()
    for organ, cohort in zip(ORGANS, cohorts):
        sid = f"{organ}_test_001"
        shutil.copy(cohort.features_dir / f"{sid}.h5", features / f"{sid}.h5")
        make_synthetic_slide(slides / f"{sid}.tiff", width=2048, height=2048, seed=1, lesions=False)
    checkpoint = sequence["runs"][2] / "best.ckpt"
    cli = CliRunner().invoke(main, [
        "heatmap", str(checkpoint), "--slides", str(slides), "--features", str(features),
        "--out", str(tmp_path / "out"), "--task", "auto", "--formats", "geojson"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    rows = {r["slide_id"]: r for r in pd.read_csv(tmp_path / "out" / "manifest.csv").to_dict("records")}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    module = MILModule.from_checkpoint(checkpoint)
    for organ in ORGANS:
        sid = f"{organ}_test_001"
        meta = json.loads((tmp_path / "out" / f"{sid}.json").read_text())
        assert rows[sid]["task"] == meta["task"] == organ
        assert meta["class"] == f"{organ}_tumor" and max(meta["routing"]["task_posterior"].values()) > 0.99
        named = run_heatmaps(checkpoint, slides, features, tmp_path / f"named_{organ}", HeatmapConfig(
            task=organ, formats=("geojson",)))  # fmt: skip
        same = next(r for r in named.rows if r["slide_id"] == sid)
        assert same["bag_probability"] == pytest.approx(rows[sid]["bag_probability"], rel=1e-6)
        assert same["bag_probability"] == meta["bag_probability"]
    del module.router.tasks["colon"]
    from pathopeft.heatmaps.scoring import TaskError, check_routable

    with pytest.raises(TaskError, match="lacks \\['colon'\\]"):
        check_routable(module, None)
    with pytest.raises(TaskError, match="class_name"):
        check_routable(MILModule.from_checkpoint(checkpoint), "breast_tumor")
