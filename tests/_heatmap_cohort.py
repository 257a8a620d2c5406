"""Builds the small trained model the heatmap tests share (imported by tests/test_heatmap_*.py).

Synthetic slides with planted lesions (``pathopeft.wsi.synth``); tiles on a regular 128-px level-0
grid over tissue; per-tile features = colour statistics read from the slide's level 2 (mean and
spread of RGB, share of dark "nuclear" pixels), written as feature bags like ``pathopeft tile``
writes them; an ABMIL trained on the bag labels only (Adam, full batch of bags, a few hundred
steps, ~2 s). The model is really trained and is never told where the lesions are: localisation
is what its attention learnt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import shapely
import torch
import torch.nn.functional as F

from pathopeft.bags import FeatureBag, write_bag
from pathopeft.mil.module import MILModule
from pathopeft.wsi.synth import SyntheticSlideInfo, make_synthetic_slide

TILE = 128
LEVEL = 2
TRAIN = ["s0", "s1", "s2", "s3", "s4", "s5"]
HELD_OUT = ["t0", "t1"]  # t0 tumour, t1 normal


@dataclass
class Cohort:
    root: Path
    slides: Path
    features: Path
    checkpoint: Path
    infos: dict[str, SyntheticSlideInfo]


def tile_features(path: Path, coords: np.ndarray) -> np.ndarray:
    slide = openslide.OpenSlide(str(path))
    ds = round(slide.level_downsamples[LEVEL])
    w, h = slide.level_dimensions[LEVEL]
    img = np.asarray(slide.read_region((0, 0), LEVEL, (w, h)).convert("RGB"), dtype=np.float32) / 255.0
    slide.close()
    s = TILE // ds
    feats = []
    for x, y in coords // ds:
        patch = img[y : y + s, x : x + s].reshape(-1, 3)
        gray = patch.mean(axis=1)
        feats.append(
            np.concatenate([patch.mean(0), patch.std(0), [(gray < 0.45).mean(), (gray < 0.3).mean()]])
        )
    f = np.asarray(feats, dtype=np.float32)
    return (f - 0.4) * 4.0


def build_cohort(root: Path, *, steps: int = 300) -> Cohort:
    slides = root / "slides"
    features = root / "features"
    infos: dict[str, SyntheticSlideInfo] = {}
    for i, sid in enumerate(TRAIN + HELD_OUT):
        tumour = sid in ("s0", "s1", "s2", "t0")
        infos[sid] = make_synthetic_slide(
            slides / f"{sid}.tiff",
            width=4096,
            height=4096,
            seed=100 + i,
            n_tissue=1,
            lesions=int(tumour),
            tile=256,
        )
        tissue = shapely.union_all([shapely.Polygon(p) for p in infos[sid].tissue_polygons])
        xs, ys = np.meshgrid(np.arange(0, 4096 - TILE + 1, TILE), np.arange(0, 4096 - TILE + 1, TILE))
        grid = np.stack([xs.ravel(), ys.ravel()], 1)
        centres = shapely.points(grid + TILE / 2)
        coords = grid[shapely.contains(tissue, centres)].astype(np.int64)
        attrs = {"backbone": "colorstats", "patch_size_level0": TILE, "mpp": 0.5}
        bag = FeatureBag(sid, tile_features(slides / f"{sid}.tiff", coords), coords, attrs)
        write_bag(features / f"{sid}.h5", bag)
    torch.manual_seed(0)
    module = MILModule(
        model={"name": "abmil", "in_dim": 8, "embed_dim": 16, "dropout": 0.0, "attn_hidden": 8},
        tasks=[{"name": "camelyon16", "classes": ["normal", "tumor"]}],
        bppl={"enabled": False},
    )
    from pathopeft.bags import read_bag

    bags = [read_bag(features / f"{sid}.h5") for sid in TRAIN]
    xs_t = [torch.as_tensor(b.features) for b in bags]
    ys_t = torch.tensor([int(bool(infos[b.slide_id].lesion_polygons)) for b in bags])
    opt = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    module.model.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = torch.cat([module.model(x, task="camelyon16").logits for x in xs_t])
        loss = F.cross_entropy(logits, ys_t)
        loss.backward()
        opt.step()
    module.model.eval()
    ckpt = root / "run" / "best.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, ckpt)
    return Cohort(root, slides, features, ckpt, infos)
