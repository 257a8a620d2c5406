"""Per-tile and per-slide test predictions, for heatmaps and error analysis.

Layout under ``runs/<name>/predictions/``:

* ``<slide_id>.csv`` — one row per tile, in bag order: ``tile`` (index in the bag), ``x``, ``y``
  (level-0 top-left; empty when the bag has no coordinates), ``score`` (min–max-normalised
  attention in [0, 1], the localization score), ``attention`` (raw attention, sums to 1 over the
  slide), ``label`` (tile label 1/0, empty when unknown);
* ``slides.csv`` — one row per slide: ``slide_id``, ``task``, ``label``, ``prediction``,
  ``prob_<class>`` per class, ``n_tiles``.

Every file is written atomically; under DDP each rank writes its own slides' CSVs and rank 0
writes ``slides.csv`` after gathering the rows of all ranks.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from pathopeft.files import atomic_write_text
from pathopeft.mil.base import MILOutput, Task

__all__ = ["PredictionWriter", "read_tile_predictions"]


class PredictionWriter:
    """Collects a test epoch's predictions and writes them (see the module docstring)."""

    def __init__(self, folder: str | Path, task: Task) -> None:
        self.folder = Path(folder)
        self.task = task
        self.rows: list[dict[str, Any]] = []
        self.folder.mkdir(parents=True, exist_ok=True)

    def write_batch(self, batch: Mapping[str, Any], out: MILOutput) -> None:
        probs = torch.softmax(out.logits.detach().float(), dim=-1).cpu().numpy()
        scores = out.scores.detach().float().cpu().numpy()
        attention = out.attention.detach().float().cpu().numpy()
        mask = out.mask.cpu().numpy()
        coords = batch.get("coords")
        coords = None if coords is None else coords.cpu().numpy()
        tile_labels = batch["tile_labels"].cpu().numpy()
        for i, slide_id in enumerate(batch["slide_ids"]):
            valid = mask[i]
            n = int(valid.sum())
            unknown = pd.array([pd.NA] * n, dtype="Int64")
            frame = pd.DataFrame(
                {
                    "tile": np.arange(n),
                    "x": coords[i, valid, 0] if coords is not None else unknown,
                    "y": coords[i, valid, 1] if coords is not None else unknown,
                    "score": scores[i, valid],
                    "attention": attention[i, valid],
                    "label": pd.Series(tile_labels[i, valid], dtype="Int64").mask(tile_labels[i, valid] < 0),
                }
            )
            buffer = io.StringIO()
            frame.to_csv(buffer, index=False, float_format="%.6g")
            atomic_write_text(self.folder / f"{slide_id}.csv", buffer.getvalue())
            label = int(batch["labels"][i])
            row = {
                "slide_id": slide_id,
                "task": self.task.name,
                "label": self.task.classes[label],
                "prediction": self.task.classes[int(probs[i].argmax())],
            }
            row.update({f"prob_{c}": float(p) for c, p in zip(self.task.classes, probs[i])})
            row["n_tiles"] = n
            self.rows.append(row)

    def finish(self, trainer: Any = None) -> None:
        """Gather the slide rows of every rank; rank 0 writes ``slides.csv``."""
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if trainer is not None and not trainer.is_global_zero:
            return
        frame = pd.DataFrame(rows).sort_values("slide_id") if rows else pd.DataFrame()
        atomic_write_text(self.folder / "slides.csv", frame.to_csv(index=False, float_format="%.6g"))


def read_tile_predictions(path: str | Path) -> pd.DataFrame:
    """Read one ``predictions/<slide_id>.csv`` (tile, x, y, score, attention, label)."""
    return pd.read_csv(path, dtype={"x": "Int64", "y": "Int64", "label": "Int64"})
