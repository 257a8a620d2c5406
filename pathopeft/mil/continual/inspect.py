"""What a (continual) MIL checkpoint holds: one row per task, for ``pathopeft tasks``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pathopeft.mil.continual.router import ROUTER_KEY
from pathopeft.runs import load_checkpoint

__all__ = ["task_table"]

SHOWN = ("task_aware/bag_accuracy", "task_aware/bag_auc", "task_aware/instance_auc",
         "class_incremental/bag_accuracy", "routed/bag_accuracy", "routed/routing_accuracy")  # fmt: skip


def _adapter_sizes(state: dict[str, Any], name: str) -> int:
    marker = f".adapters.{name}."
    return sum(int(v.numel()) for k, v in state.items() if marker in k)


def task_table(checkpoint: str | Path) -> pd.DataFrame:
    """Name, classes, negative class, manifest, adapters and their size, parameters added, the
    number of training bags behind the task router's statistics (0: the task cannot be routed), metrics.

    ``metrics`` lists the task's test metrics recorded when it was trained and after each later
    task (from the checkpoint's history), as ``after <task>: key=value, ...``.
    """
    ckpt = load_checkpoint(checkpoint)
    hp = ckpt.get("hyper_parameters") or {}
    if "tasks" not in hp:
        raise ValueError(f"{checkpoint}: not a pathopeft MIL checkpoint")
    state = ckpt["state_dict"]
    adapters = hp.get("adapters") or []
    history = ckpt.get("pathopeft_history", [])
    router = {t["name"]: int(t["count"]) for t in (ckpt.get(ROUTER_KEY) or {}).get("tasks", [])}
    rows = []
    for i, task in enumerate(hp["tasks"]):
        mine = [a for a in adapters if a.get("task") == task["name"]]
        adapter_params = sum(_adapter_sizes(state, a["name"]) for a in mine)
        head = sum(int(v.numel()) for k, v in state.items() if k.startswith(f"model.heads.{task['name']}."))
        neg = task.get("negative_class")
        if i == 0:
            added = sum(
                int(v.numel())
                for k, v in state.items()
                if ".adapters." not in k and not k.startswith("model.heads.") and k.startswith("model.")
            )
            added += head  # the first task trains the base model (and its head)
        else:
            added = adapter_params + head
        evaluations = [h for h in history if h.get("task") == task["name"]]
        metrics = "; ".join(
            f"after {h['after']}: " + (h["error"] if "error" in h else
                                       ", ".join(f"{k.split('/')[0][:2]}/{k.split('/')[1]}={h[k]:.3f}"
                                                 for k in SHOWN if k in h))
            for h in evaluations
        )  # fmt: skip
        rows.append(
            {
                "task": task["name"],
                "classes": ",".join(task["classes"]),
                "negative_class": "" if neg is None else task["classes"][int(neg)],
                "manifest": ",".join(task.get("manifest") or []),
                "adapters": ",".join(f"{a['method']}:{a['name']}(r={a['options'].get('rank')})" for a in mine)
                or "-",
                "adapter_params": adapter_params,
                "params_added": added,
                # bags the task router's statistics came from (inference without a task id)
                "router_bags": router.get(task["name"], 0),
                "metrics": metrics or "-",
            }
        )
    return pd.DataFrame(rows)
