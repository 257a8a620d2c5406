"""MIL models: the shared interface, padding invariance, GDAT grouping and cost, Nyström attention."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pathopeft.config.train import MODEL_SECTIONS
from pathopeft.mil import create_model, list_models
from pathopeft.mil.base import minmax_scores
from pathopeft.mil.gdat import GDAT
from pathopeft.mil.grouping import assign_groups, hilbert_index
from pathopeft.mil.transmil import NystromAttention, moore_penrose_pinv

TASKS = [{"name": "camelyon16", "classes": ["normal", "tumor"]}]
SMALL = {
    "comel": {"embed_dim": 32, "heads": 4, "groups": 8},
    "abmil": {"embed_dim": 32},
    "abmil_gated": {"embed_dim": 32},
    "transmil": {"embed_dim": 32, "heads": 4, "landmarks": 8},
}


def _model(name: str, in_dim: int = 12, **extra) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, in_dim=in_dim, tasks=TASKS, **{**SMALL[name], **extra}).eval()


def _grid_coords(n: int, seed: int = 0) -> torch.Tensor:
    side = int(n**0.5) + 1
    cells = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(
        -1, 2
    )
    perm = torch.randperm(len(cells), generator=torch.Generator().manual_seed(seed))[:n]
    return cells[perm] * 256


def test_registry_matches_config_and_rejects_unknown_names():
    assert set(list_models()) == set(MODEL_SECTIONS)
    with pytest.raises(ValueError, match="unknown MIL model 'nope'"):
        create_model("nope", in_dim=4, tasks=TASKS)
    with pytest.raises(ValueError, match="fixes gated"):
        create_model("abmil_gated", in_dim=4, tasks=TASKS, gated=False)


@pytest.mark.parametrize("name", ["comel", "abmil", "abmil_gated", "transmil"])
def test_interface_shapes_and_normalisation(name):
    model = _model(name)
    x = torch.randn(1, 30, 12)
    coords = _grid_coords(30)[None]
    out = model(x, coords=coords)
    assert out.logits.shape == (1, 2)
    assert out.attention.shape == out.scores.shape == (1, 30)
    assert out.features.shape == (1, 30, 32) and out.embedding.shape == (1, 32)
    assert torch.allclose(out.attention.sum(-1), torch.ones(1), atol=1e-5)
    assert out.scores.min() == 0 and out.scores.max() == 1
    h = model.forward_features(x, coords=coords)
    a = model.forward_attention(h)
    assert torch.allclose(a, out.attention, atol=1e-6)
    assert torch.allclose(model.forward_head(out.embedding), out.logits, atol=1e-6)
    with pytest.raises(ValueError, match="expects 12"):
        model(torch.randn(1, 5, 7))


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("comel", {"grouping": "order"}),
        ("comel", {"grouping": "coords"}),
        ("abmil", {}),
        ("abmil_gated", {}),
        ("transmil", {}),
    ],
)
def test_bag_alone_equals_bag_in_padded_batch(name, extra):
    """Padding never changes a real bag's result (grouping, softmaxes and min–max are masked)."""
    model = _model(name, **extra)
    lengths = [37, 5, 23]  # 5 < G=8: fewer instances than groups
    n_max = max(lengths)
    bags = [torch.randn(n, 12) for n in lengths]
    coords = [_grid_coords(n, seed=i) for i, n in enumerate(lengths)]
    x = torch.zeros(len(bags), n_max, 12)
    c = torch.zeros(len(bags), n_max, 2, dtype=torch.long)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    for i, (bag, xy) in enumerate(zip(bags, coords)):
        x[i, : len(bag)] = bag
        x[i, len(bag) :] = 100.0  # garbage in the padding must not leak
        c[i, : len(bag)] = xy
        c[i, len(bag) :] = 10**6
        mask[i, : len(bag)] = True
    with torch.no_grad():
        batch = model(x, coords=c, mask=mask)
        for i, (bag, xy) in enumerate(zip(bags, coords)):
            alone = model(bag[None], coords=xy[None])
            n = len(bag)
            torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.attention[i, :n], alone.attention[0], atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(batch.scores[i, :n], alone.scores[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.embedding[i], alone.embedding[0], atol=1e-5, rtol=1e-4)
            assert torch.all(batch.attention[i, n:] == 0) and torch.all(batch.scores[i, n:] == 0)


def test_order_grouping_chunks_file_order_and_handles_few_instances():
    groups = assign_groups(4, 1, 10, torch.device("cpu"), grouping="order")
    assert groups.index[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert groups.counts[0].tolist() == [3, 2, 3, 2]
    few = assign_groups(256, 1, 3, torch.device("cpu"), grouping="order")
    assert few.n_groups == 3 and few.index[0].tolist() == [0, 1, 2]


def test_spatial_grouping_makes_compact_groups_and_order_grouping_does_not():
    """16×16 grid in shuffled file order, 16 groups: Hilbert runs are exactly the 4×4 blocks."""
    cells = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="xy"), -1).reshape(-1, 2)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    coords = (cells[perm] * 512 + 1000)[None]
    spatial = assign_groups(16, 1, 256, torch.device("cpu"), grouping="coords", coords=coords)
    order = assign_groups(16, 1, 256, torch.device("cpu"), grouping="order", coords=coords)

    def extents(groups):
        tiles = cells[perm]
        return [
            tuple((tiles[groups.index[0] == g].amax(0) - tiles[groups.index[0] == g].amin(0) + 1).tolist())
            for g in range(16)
        ]

    assert all(e == (4, 4) for e in extents(spatial))
    assert sum(a * b for a, b in extents(order)) > 16 * 100  # file-order groups sprawl over the slide
    assert spatial.counts[0].tolist() == [16] * 16


def test_hilbert_index_is_a_bijection_with_unit_steps():
    side = 8
    xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
    d = hilbert_index(xy, bits=3)
    assert sorted(d.tolist()) == list(range(side * side))
    path = xy[torch.argsort(d)]
    assert torch.all((path[1:] - path[:-1]).abs().sum(-1) == 1)  # consecutive cells are neighbours


def test_coords_grouping_without_coordinates_is_a_clear_error():
    model = _model("comel", grouping="coords")
    with pytest.raises(ValueError, match="needs tile coordinates"):
        model(torch.randn(1, 10, 12))


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.attention_calls: list[tuple[int, int]] = []  # (query length, key length)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func) and "backward" not in str(func):
            self.attention_calls.append((args[0].shape[-2], args[1].shape[-2]))
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("padded", [False, True])
def test_gdat_never_builds_an_n_by_n_tensor(padded):
    """Every tensor of forward + backward (incl. inside attention) is linear in N, none is N×N."""
    n, groups = 2048, 16
    torch.manual_seed(0)
    encoder = GDAT(8, dim=32, heads=4, groups=groups).train()
    x = torch.randn(1, n, 8, requires_grad=True)
    mask = None
    if padded:
        x = torch.randn(2, n, 8, requires_grad=True)
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, n // 2 :] = False
    with _ShapeRecorder() as rec:
        encoder(x, mask=mask).sum().backward()
    assert rec.shapes, "the dispatch recorder saw no operations"
    assert not [s for s in rec.shapes if list(s[1]).count(n) >= 2]
    # the largest tensors are the MLP's hidden activations, B·N·(4·dim); a G×N attention map is
    # B·heads·G·N = B·N·64; an N×N one would be 16× (B=1) or 32× (B=2) larger than this bound
    assert rec.largest <= x.shape[0] * n * 4 * 32
    # fused attention kernels hide their score matrix: check each call pairs N with at most G
    assert rec.attention_calls and all(min(lq, lk) <= groups for lq, lk in rec.attention_calls)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_minmax_scores_over_valid_instances_only():
    a = torch.tensor([[0.1, 0.3, 0.6, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    scores = minmax_scores(a, mask)
    torch.testing.assert_close(scores[0], torch.tensor([0.0, 0.4, 1.0, 0.0]))
    torch.testing.assert_close(scores[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # no contrast → 0.5


def test_moore_penrose_pinv_matches_linalg():
    torch.manual_seed(0)
    kernel = torch.softmax(torch.randn(3, 16, 16), dim=-1)
    torch.testing.assert_close(
        moore_penrose_pinv(kernel, 40), torch.linalg.pinv(kernel), atol=1e-3, rtol=1e-3
    )


def test_nystrom_attention_is_exact_when_every_token_is_a_landmark():
    torch.manual_seed(0)
    attn = NystromAttention(16, heads=2, landmarks=12, pinv_iterations=40, dropout=0.0).eval()
    nn.init.zeros_(attn.res_conv.weight)
    x = torch.randn(1, 12, 16)
    q, k, v = attn.qkv(x).view(1, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    expected = attn.proj(exact.transpose(1, 2).reshape(1, 12, 16))
    torch.testing.assert_close(attn(x), expected, atol=2e-4, rtol=1e-3)
    exact_row = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)[:, :, 3].mean(1)  # token 3's row
    torch.testing.assert_close(attn.attention_row(x, 3), exact_row, atol=1e-4, rtol=1e-3)


def test_adapter_targets_exclude_heads_and_the_attention_score():
    model = _model("comel")
    model.add_task({"name": "paip_liver", "classes": ["normal", "tumor"]})
    pattern = re.compile(model.adapter_targets())
    linear = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    matched = {name for name in linear if pattern.fullmatch(name)}
    assert matched == linear - {"heads.camelyon16", "heads.paip_liver", "pool.score"}
    assert "encoder.blocks.1.attn.qkv" in matched and "pool.proj" in matched
    assert all(isinstance(dict(model.named_modules())[n], nn.Linear) for n in matched)


def test_heads_per_task_concatenate_without_a_task():
    model = _model("abmil")
    model.add_task({"name": "subtype", "classes": ["a", "b", "c"]})
    out = model(torch.randn(1, 9, 12))
    assert out.logits.shape == (1, 5)
    assert model(torch.randn(1, 9, 12), task="subtype").logits.shape == (1, 3)
    with pytest.raises(KeyError, match="unknown task"):
        model(torch.randn(1, 9, 12), task="nope")
    with pytest.raises(ValueError, match="already has a task"):
        model.add_task({"name": "subtype", "classes": ["a", "b"]})


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    """Recomputed blocks (chunked MLP included) match the stored-activation path exactly.

    Dropout is off: chunking the MLP draws its dropout masks chunk by chunk, i.e. different (still
    i.i.d.) masks than one whole-bag draw; checkpoint itself replays the RNG state on recompute.
    """
    import pathopeft.mil.gdat as gdat

    monkeypatch.setattr(gdat, "MLP_CHUNK", 16)  # several MLP chunks in a 50-tile bag
    grads = []
    for mode in (False, True):
        torch.manual_seed(0)
        encoder = GDAT(8, dim=32, heads=4, groups=8, dropout=0.0, block_dropout=0.0, grad_checkpointing=mode)
        encoder.train()
        x = torch.randn(1, 50, 8, requires_grad=True)
        torch.manual_seed(1)
        encoder(x).square().sum().backward()
        grads.append((x.grad.clone(), encoder.blocks[0].mlp.fc1.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="grad_checkpointing"):
        GDAT(8, grad_checkpointing="sometimes")
