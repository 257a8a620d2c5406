"""Feature bags (pathopeft.bags): our layout round trip, CLAM / TRIDENT layouts, malformed files."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

from pathopeft.bags import BagError, FeatureBag, bag_shape, find_bag, read_bag, write_bag
from pathopeft.files import PARTIAL_MARKER


def _bag(n: int = 7, d: int = 5, slide_id: str = "s1") -> FeatureBag:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(n, 2))
    return FeatureBag(
        slide_id, feats, coords, {"backbone": "resnet18", "mpp": 0.5, "patch_size": 256, "x": None}
    )


def test_round_trip_and_plain_h5py_layout(tmp_path) -> None:
    bag = _bag()
    path = write_bag(tmp_path / "feats" / "s1.h5", bag)
    assert not [p for p in path.parent.iterdir() if PARTIAL_MARKER in p.name]
    back = read_bag(path)
    assert back.slide_id == "s1" and back.n_tiles == 7 and back.dim == 5
    np.testing.assert_array_equal(back.features, bag.features)
    np.testing.assert_array_equal(back.coords, bag.coords)
    assert back.attrs["backbone"] == "resnet18" and back.attrs["patch_size"] == 256
    assert back.attrs["x"] == "none"
    # what a CLAM / TRIDENT user does with our file
    with h5py.File(path, "r") as f:
        assert f["features"][:].shape == (7, 5) and f["features"].dtype == np.float32
        assert f["coords"][:].shape == (7, 2) and f["coords"].dtype == np.int64
        assert f["coords"].attrs["patch_size"] == 256 and f.attrs["mpp"] == 0.5
    assert bag_shape(path) == (7, 5)
    assert find_bag(tmp_path / "feats", "s1") == path


def test_float16_storage(tmp_path) -> None:
    path = write_bag(tmp_path / "s.h5", _bag(), dtype="float16")
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float16
    np.testing.assert_allclose(read_bag(path).features, _bag().features, atol=2e-3)


def test_clam_h5_and_trident_layouts(tmp_path) -> None:
    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]], dtype=np.int32)
    clam = tmp_path / "h5_files" / "slideA.h5"
    clam.parent.mkdir()
    with h5py.File(clam, "w") as f:
        f.create_dataset("features", data=feats)
        dset = f.create_dataset("coords", data=coords)
        dset.attrs["patch_size"] = 256
        dset.attrs["patch_level"] = 0
    bag = read_bag(clam)
    assert bag.slide_id == "slideA" and bag.coords.dtype == np.int64
    assert bag.attrs["patch_level"] == 0
    np.testing.assert_array_equal(bag.features, feats)
    assert find_bag(tmp_path, "slideA") == clam

    trident = tmp_path / "slideB.h5"
    with h5py.File(trident, "w") as f:
        f.create_dataset("features", data=feats[None])  # (1, N, D)
        f.create_dataset("coords", data=coords)
    assert bag_shape(trident) == (4, 3)
    np.testing.assert_array_equal(read_bag(trident).features, feats)


def test_clam_pt_files(tmp_path) -> None:
    feats = torch.randn(6, 4)
    pt = tmp_path / "pt_files" / "slideC.pt"
    pt.parent.mkdir()
    torch.save(feats, pt)
    bag = read_bag(pt)
    assert bag.coords is None and bag.slide_id == "slideC"
    np.testing.assert_allclose(bag.features, feats.numpy())
    assert bag_shape(pt) == (6, 4)
    assert find_bag(tmp_path, "slideC") == pt

    as_dict = tmp_path / "slideD.pt"
    torch.save({"features": feats, "coords": torch.zeros(6, 2, dtype=torch.long)}, as_dict)
    assert read_bag(as_dict).coords.shape == (6, 2)


class _Evil:
    def __reduce__(self):  # pragma: no cover - must never run
        return (print, ("unpickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malformed_bags_name_the_file(tmp_path) -> None:
    with pytest.raises(BagError, match="not found"):
        read_bag(tmp_path / "missing.h5")
    assert find_bag(tmp_path, "missing") is None

    no_feats = tmp_path / "nofeats.h5"
    with h5py.File(no_feats, "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2)))
    with pytest.raises(BagError, match=r"nofeats\.h5.*no 'features'"):
        read_bag(no_feats)
    with pytest.raises(BagError, match="no 'features'"):
        bag_shape(no_feats)

    bad_shape = tmp_path / "bad3d.h5"
    with h5py.File(bad_shape, "w") as f:
        f.create_dataset("features", data=np.zeros((2, 3, 4)))
    with pytest.raises(BagError, match=r"\(N, D\) or \(1, N, D\)"):
        read_bag(bad_shape)

    mismatch = tmp_path / "mismatch.h5"
    with h5py.File(mismatch, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 4)))
        f.create_dataset("coords", data=np.zeros((2, 2)))
    with pytest.raises(BagError, match="3 feature rows but 2 coordinates"):
        read_bag(mismatch)

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(BagError, match=r"corrupt\.h5.*unreadable"):
        read_bag(corrupt)
    with pytest.raises(BagError, match="unreadable"):
        bag_shape(corrupt)

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"features": _Evil()}, fh)
    with pytest.raises(BagError, match="unreadable"):
        read_bag(evil)

    no_key = tmp_path / "nokey.pt"
    torch.save({"feats": torch.zeros(2, 2)}, no_key)
    with pytest.raises(BagError, match="without a 'features' entry"):
        read_bag(no_key)

    not_tensor = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensor)
    with pytest.raises(BagError, match="expected a feature tensor"):
        read_bag(not_tensor)


def test_feature_bag_validates_shapes() -> None:
    with pytest.raises(BagError, match=r"\(N, D\)"):
        FeatureBag("s", np.zeros(5))
    with pytest.raises(BagError, match="does not match"):
        FeatureBag("s", np.zeros((3, 2)), np.zeros((2, 2)))
