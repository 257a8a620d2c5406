"""Instance grouping for GDAT: which of the G agent tokens summarises each tile.

METHODS.md (CoMEL, GDAT "Grouping"): instances are split into G groups, each summarised by one
agent token (the mean of its members). Two orders are offered:

* ``order``  — position in file order, as in the published code;
* ``coords`` — spatial: tiles are sorted along a Hilbert curve over their level-0 coordinates and
  the curve is cut into G consecutive runs, so neighbouring tiles share a group (a Hilbert curve
  keeps runs compact in both directions; a raster or Z-order scan would cut long thin strips).

Either way a bag of ``n`` valid instances gets ``G_b = min(G, n)`` groups of ``n/G_b`` (±1)
instances: the instance with rank ``r`` in the chosen order joins group ``⌊r·G_b/n⌋``, so every
group is non-empty and a bag with ``n < G`` gets one group per instance. Ranks, and therefore the
groups, are computed over each bag's valid instances only: padding never changes a real bag's
grouping (padded positions go to a dummy slot that is dropped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GROUPINGS", "GroupIndex", "assign_groups", "hilbert_index", "spatial_keys"]

_HILBERT_BITS = 16  # 65536 cells per side: far finer than any tile grid


@dataclass
class GroupIndex:
    """Group membership of a batch: computed once per forward, shared by every GDAT block."""

    index: Tensor  # (B, N) long, group id per instance; padding → n_groups (a dummy slot)
    counts: Tensor  # (B, n_groups) members per group (0 for a bag's unused slots)
    agent_mask: Tensor  # (B, n_groups) bool, True where the bag has that group
    instance_mask: Tensor | None  # (B, N) bool, None when the batch has no padding
    n_groups: int

    def group_mean(self, x: Tensor) -> Tensor:
        """Mean of each group's members: ``x`` (B, H, N, d) → (B, H, n_groups, d), in float32.

        A scatter-add over the group index: O(N·d) memory, no (N × G) one-hot matrix.
        """
        b, h, n, d = x.shape
        index = self.index.view(b, 1, n, 1).expand(b, h, n, d)
        sums = x.new_zeros((b, h, self.n_groups + 1, d), dtype=torch.float32)
        sums = sums.scatter_add(2, index, x.float())[:, :, : self.n_groups]
        counts = self.counts.clamp_min(1).to(sums.dtype).view(b, 1, self.n_groups, 1)
        return (sums / counts).to(x.dtype)


def hilbert_index(xy: Tensor, bits: int = _HILBERT_BITS) -> Tensor:
    """Position of integer points ``xy`` (..., 2) in [0, 2**bits) along a Hilbert curve (int64).

    The classic iterative xy→d mapping, vectorised over points (one loop step per bit).
    """
    side = 1 << bits
    x = xy[..., 0].long().clone()
    y = xy[..., 1].long().clone()
    d = torch.zeros_like(x)
    s = side >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        flip = (~ry) & rx
        x = torch.where(flip, side - 1 - x, x)
        y = torch.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s >>= 1
    return d


def spatial_keys(coords: Tensor, mask: Tensor | None) -> Tensor:
    """Hilbert keys (B, N) of each bag's tiles, scaled per bag to the curve's grid (same scale on x, y)."""
    coords = coords.long()
    valid = torch.ones(coords.shape[:2], dtype=torch.bool, device=coords.device) if mask is None else mask
    big = torch.iinfo(torch.long).max
    v = valid.unsqueeze(-1)
    lo = coords.masked_fill(~v, big).amin(dim=1, keepdim=True)  # (B, 1, 2)
    hi = coords.masked_fill(~v, -big).amax(dim=1, keepdim=True)
    span = (hi - lo).amax(dim=-1, keepdim=True).clamp_min(1)  # (B, 1, 1)
    grid = ((coords - lo).clamp_min(0) * ((1 << _HILBERT_BITS) - 1)) // span
    return hilbert_index(grid.clamp(0, (1 << _HILBERT_BITS) - 1))


def _order_keys(coords: Tensor | None, mask: Tensor | None, n: int, b: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).expand(b, n)


def _coords_keys(coords: Tensor | None, mask: Tensor | None, n: int, b: int, device: torch.device) -> Tensor:
    if coords is None:
        raise ValueError(
            "GDAT grouping 'coords' needs tile coordinates, but the bag has none "
            "(use model.grouping=order, or give the bags coordinates)"
        )
    if coords.shape[:2] != (b, n) or coords.shape[-1] != 2:
        raise ValueError(f"coords shape {tuple(coords.shape)} does not match the batch ({b}, {n}, 2)")
    return spatial_keys(coords, mask)


# grouping name -> function giving per-instance sort keys (B, N); lower key = earlier rank.
GROUPINGS: dict[str, Callable[..., Tensor]] = {"order": _order_keys, "coords": _coords_keys}


def assign_groups(
    n_groups: int,
    batch: int,
    length: int,
    device: torch.device,
    *,
    grouping: str = "order",
    coords: Tensor | None = None,
    mask: Tensor | None = None,
) -> GroupIndex:
    """Assign each valid instance to one of ``min(n_groups, n_valid)`` balanced groups per bag."""
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown GDAT grouping {grouping!r}; choose from {sorted(GROUPINGS)}")
    if n_groups < 1:
        raise ValueError(f"the number of groups must be positive, got {n_groups}")
    keys = GROUPINGS[grouping](coords, mask, length, batch, device)
    if mask is None:
        n_valid = torch.full((batch,), length, dtype=torch.long, device=device)
        if grouping == "order":
            rank = keys.long()
        else:
            rank = _ranks(keys)
    else:
        n_valid = mask.sum(dim=1)
        keys = keys.masked_fill(~mask, torch.iinfo(torch.long).max)
        rank = _ranks(keys)
    per_bag = n_valid.clamp(max=n_groups)  # G_b
    g_max = int(per_bag.max())
    index = (rank * per_bag.unsqueeze(1)) // n_valid.unsqueeze(1)
    if mask is not None:
        index = index.masked_fill(~mask, g_max)
    counts = torch.zeros((batch, g_max + 1), dtype=torch.long, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    counts = counts[:, :g_max]
    agent_mask = torch.arange(g_max, device=device).unsqueeze(0) < per_bag.unsqueeze(1)
    return GroupIndex(index=index, counts=counts, agent_mask=agent_mask, instance_mask=mask, n_groups=g_max)


def _ranks(keys: Tensor) -> Tensor:
    """Rank of each key within its row (stable: ties keep file order)."""
    order = torch.argsort(keys, dim=1, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return rank.scatter_(1, order, positions)
