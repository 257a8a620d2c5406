"""Tile dataset / loader / normalisation / extraction, on a tiny in-memory slide (no file, no WSI code)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pathopeft.features.backbones import build_backbone
from pathopeft.features.dataset import Preprocess, TileDataset, TileLoaderPool, make_tile_loader
from pathopeft.features.extract import FeatureExtractor
from pathopeft.wsi.slide import Slide


class ArraySlide(Slide):
    """A two-level pyramid held in memory; picklable, so DataLoader workers can read it."""

    backend = "array"

    def __init__(self, image: np.ndarray, mpp: float = 0.5) -> None:
        super().__init__("memory.tiff", slide_id="memory", mpp=mpp)
        self.levels = [image, image[::2, ::2].copy()]
        self.closed = 0

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(a.shape[1], a.shape[0]) for a in self.levels]

    @property
    def level_downsamples(self) -> list[float]:
        return [1.0, 2.0]

    @property
    def native_mpp(self) -> float | None:
        return None

    def read_region(self, location, level, size):
        ds = self.level_downsamples[level]
        x, y = int(location[0] / ds), int(location[1] / ds)
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        src = self.levels[level][y : y + size[1], x : x + size[0]]
        out[: src.shape[0], : src.shape[1]] = src
        return out

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def slide() -> ArraySlide:
    rng = np.random.default_rng(0)
    return ArraySlide(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))


COORDS = np.array([[0, 0], [64, 0], [128, 64], [256, 192], [300, 240]])  # last one crosses the edge
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_dataset_returns_exact_regions(slide) -> None:
    ds = TileDataset(slide, COORDS, level=0, read_size=32, tile_size=32)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds[2].numpy(), slide.levels[0][64:96, 128:160])
    batch = ds.__getitems__([0, 2, 4])
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == torch.uint8
    np.testing.assert_array_equal(batch[1].numpy(), ds[2].numpy())
    assert (batch[2][16:, :] == 255).all()  # outside the slide is white


def test_dataset_resizes_to_tile_then_to_model_input(slide) -> None:
    assert TileDataset(slide, COORDS, 1, 32, 16)[0].shape == (16, 16, 3)  # integer area reduction
    assert TileDataset(slide, COORDS, 1, 48, 20)[0].shape == (20, 20, 3)  # area 2x, then bicubic
    assert TileDataset(slide, COORDS, 0, (16, 16), (40, 40))[1].shape == (40, 40, 3)  # upsampling
    flat = np.full((64, 64, 3), 77, np.uint8)
    const = TileDataset(ArraySlide(flat), COORDS[:1], 0, 64, 32, input_size=24)[0]
    assert const.shape == (24, 24, 3) and (const == 77).all()  # resizing keeps flat colour exact

    # the worker-side resize (uint8, CPU runs) and the device-side one (float, GPU runs) agree
    tiles = TileDataset(slide, COORDS, 0, 32, 32).__getitems__([0, 1, 2])
    device_side = Preprocess(MEAN, STD)(tiles, (24, 24))
    worker_side = Preprocess(MEAN, STD)(
        TileDataset(slide, COORDS, 0, 32, 32, input_size=24).__getitems__([0, 1, 2])
    )
    assert device_side.shape == worker_side.shape == (3, 3, 24, 24)
    # torch's uint8 kernel uses fixed-point weights: on this worst case (random noise) a few pixels
    # differ by a few grey levels, the mean difference is tiny
    diff = (worker_side - device_side).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.25


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_in_grid_order(slide, workers) -> None:
    ds = TileDataset(slide, COORDS, level=0, read_size=32, tile_size=32)
    batches = list(make_tile_loader(ds, batch_size=2, num_workers=workers))
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (32, 32, 3) for b in batches)
    got = torch.cat(batches).numpy()
    np.testing.assert_array_equal(got, np.stack([ds[i].numpy() for i in range(len(ds))]))


def test_preprocess_matches_reference_normalisation() -> None:
    tiles = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    ref = (tiles.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    out = Preprocess(MEAN, STD)(tiles)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert tiles.dtype == torch.uint8  # the input batch is not modified
    same = Preprocess(MEAN, STD)(tiles, (8, 8))
    torch.testing.assert_close(same, ref, rtol=1e-5, atol=1e-5)


def test_extract_equals_direct_forward(slide) -> None:
    bb = build_backbone("resnet18", pretrained=False, seed=1)
    ex = FeatureExtractor(bb, batch_size=2, num_workers=0, resize_to="tile")
    assert ex.out_size(32) == (32, 32)
    feats = ex.extract(slide, COORDS, level=0, read_size=32, tile_px=32)
    assert feats.shape == (5, 512) and feats.dtype == np.float32
    tiles = TileDataset(slide, COORDS, 0, 32, 32).__getitems__(list(range(5)))
    with torch.inference_mode():
        ref = bb.model(Preprocess(bb.mean, bb.std)(tiles)).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-5)
    # workers and batch size do not change the numbers
    ex2 = FeatureExtractor(bb, batch_size=3, num_workers=2, resize_to="tile")
    np.testing.assert_allclose(ex2.extract(slide, COORDS, 0, 32, 32), feats, rtol=1e-5, atol=1e-5)


def test_small_slides_are_split_across_all_workers() -> None:
    bb = build_backbone("resnet18", pretrained=False, seed=1)
    ex = FeatureExtractor(bb, batch_size=256, num_workers=12)
    assert ex.loader_batch_size(900) == 75  # 12 batches: every worker reads
    assert ex.loader_batch_size(50_000) == 256  # big slides: full batches
    assert ex.loader_batch_size(5) == 1
    assert FeatureExtractor(bb, batch_size=64, num_workers=0).loader_batch_size(900) == 64


def test_extract_resizes_to_model_input(slide) -> None:
    bb = build_backbone("vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 48})
    ex = FeatureExtractor(bb, batch_size=4, num_workers=0)  # resize_to="model"
    assert ex.out_size(32) == (48, 48)
    seen = []
    feats = ex.extract(slide, COORDS, level=0, read_size=32, tile_px=32, on_batch=seen.append)
    assert feats.shape == (5, 192) and seen == [4, 1]
    fp = ex.fingerprint(32)
    assert fp["input_px"] == [48, 48] and fp["weights"] == "random:0" and fp["precision"] == "32-true"
    assert ex.extract(slide, COORDS[:0], 0, 32, 32).shape == (0, 192)
    # the device-side path (as on a GPU: uint8 tiles resized + normalised in Preprocess) agrees
    tiles = TileDataset(slide, COORDS, 0, 32, 32).__getitems__(list(range(5)))
    gpu_like = np.concatenate([ex.encode(tiles[:4], (48, 48)), ex.encode(tiles[4:], (48, 48))])
    np.testing.assert_allclose(gpu_like, feats, atol=0.05, rtol=0)


class BrokenSlide(ArraySlide):
    """Tiles right of x=128 are corrupt (like unreadable.svs, failing only when pixels are read)."""

    def read_region(self, location, level, size):
        if location[0] >= 128:
            raise OSError("corrupt tile")
        return super().read_region(location, level, size)


def test_read_failure_propagates_from_workers(slide) -> None:
    bad = BrokenSlide(slide.levels[0])
    bb = build_backbone("resnet18", pretrained=False)
    ex = FeatureExtractor(bb, batch_size=2, num_workers=1, resize_to="tile")
    with pytest.raises(Exception, match="corrupt tile"):
        ex.extract(bad, COORDS, 0, 32, 32)


def test_worker_pool_is_kept_across_slides_and_replaced_after_a_failure(slide) -> None:
    """One set of reader processes serves every slide (no per-slide start-up); a slide whose tiles
    fail stops them, and the next slide gets fresh ones and correct features."""
    bb = build_backbone("resnet18", pretrained=False, seed=1)
    reference = FeatureExtractor(bb, batch_size=2, num_workers=0, resize_to="tile")
    rng = np.random.default_rng(1)
    slides = [slide, ArraySlide(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8))]
    with FeatureExtractor(bb, batch_size=2, num_workers=2, resize_to="tile") as ex:
        pids = []
        for s in (*slides, slides[0]):  # back to the first slide: workers must not serve stale tiles
            feats = ex.extract(s, COORDS, 0, 32, 32)
            np.testing.assert_allclose(feats, reference.extract(s, COORDS, 0, 32, 32), rtol=1e-5, atol=1e-5)
            assert ex._pool is not None
            pids.append(ex._pool.worker_pids)
        assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]

        with pytest.raises(Exception, match="corrupt tile"):
            ex.extract(BrokenSlide(slide.levels[0]), COORDS, 0, 32, 32)
        assert ex._pool is None  # stopped, not left half-way through the broken slide
        feats = ex.extract(slides[1], COORDS, 0, 32, 32)
        np.testing.assert_allclose(
            feats, reference.extract(slides[1], COORDS, 0, 32, 32), rtol=1e-5, atol=1e-5
        )
        assert ex._pool is not None and set(ex._pool.worker_pids).isdisjoint(pids[0])
        pool = ex._pool
    assert ex._pool is None and pool.worker_pids == []  # the context manager stopped them


def _gone(pids: list[int]) -> bool:
    """True once none of ``pids`` is a live process (bounded poll; not a speed assertion)."""
    for _ in range(100):
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to see the worker processes")
def test_pool_close_falls_back_when_dataloader_internals_change(slide, monkeypatch) -> None:
    """close() uses DataLoader's private _shutdown_workers; a torch release without it must still
    get its workers stopped, with no AttributeError out of close()."""
    from torch.utils.data import dataloader

    pool = TileLoaderPool(2)
    dataset = TileDataset(slide, COORDS, 0, 32, 32)
    assert sum(len(b) for b in pool.batches(dataset, 2)) == len(COORDS)
    pids = pool.worker_pids
    assert len(pids) == 2
    # the iterator's own __del__ calls it too: keep a no-op there so only close() is being tested
    monkeypatch.delattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers")
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__del__", lambda self: None)
    pool.close()
    assert pool.worker_pids == [] and _gone(pids)
    pool.close()  # idempotent
