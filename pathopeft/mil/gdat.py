"""GDAT: the Grouped Double Attention Transformer, CoMEL's instance encoder (METHODS.md, CoMEL).

``Linear(D→512) + ReLU + dropout 0.25``, then 2 pre-norm transformer blocks (8 heads, MLP ratio 4,
GELU, dropout 0.1) whose token mixer is *grouped double attention*, then a final LayerNorm (the
usual closing norm of a pre-norm stack, as in timm's ViT and TransMIL).

Grouped double attention, per head, with ``Q, K, V`` the instance projections and ``A`` the G
agent tokens. An agent token is the mean of its group's members (:mod:`pathopeft.mil.grouping`)
taken in query space: the mean of the members' queries, which equals the query projection of the
members' mean token because the projection is affine. Then:

1. ``V_A = softmax(A Kᵀ/√d) V``  — the G agent queries attend over all N instance keys/values;
2. ``O   = softmax(Q Aᵀ/√d) V_A`` — the N instance queries attend over the G agent keys.

Both steps run through ``F.scaled_dot_product_attention`` (fused/flash kernels on CPU and GPU), so
the largest attention object is G×N and on the fused paths not even that is materialised: time and
memory are O(N·G·d), never O(N²). Padded instances are masked out of step 1's keys and padded
agents (bags with fewer than G groups) out of step 2's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pathopeft.mil.grouping import GROUPINGS, GroupIndex, assign_groups

__all__ = ["CHECKPOINT_MIN_INSTANCES", "GDAT", "GDATBlock", "GroupedDoubleAttention"]

# grad_checkpointing="auto" recomputes blocks for bags of at least this many tiles (training only):
# below it activations are small and recomputation would only cost time.
CHECKPOINT_MIN_INSTANCES = 16_384
MLP_CHUNK = 16_384  # instances per MLP chunk when checkpointing


class GroupedDoubleAttention(nn.Module):
    """Multi-head grouped double attention (agent attention over G group-mean agent tokens)."""

    def __init__(self, dim: int, heads: int = 8, proj_drop: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, groups: GroupIndex) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        agents = groups.group_mean(q)  # (B, H, G, d)
        key_mask = None if groups.instance_mask is None else groups.instance_mask[:, None, None, :]
        agent_values = F.scaled_dot_product_attention(agents, k, v, attn_mask=key_mask)
        agent_mask = None if bool(groups.agent_mask.all()) else groups.agent_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, agents, agent_values, attn_mask=agent_mask)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class GDATBlock(nn.Module):
    """Pre-norm block: ``x + GDA(LN(x))`` then ``x + MLP(LN(x))``.

    With ``checkpointing`` the two sub-layers are recomputed in the backward pass instead of
    storing their activations, and the position-wise MLP (the largest activations: N × 4·dim,
    three times over) is also run in chunks of :data:`MLP_CHUNK` instances, so its recomputation
    never holds the whole bag's hidden layer. Recomputation replays the RNG state, so dropout masks
    match the forward pass (chunking draws the MLP's masks chunk by chunk: different, equally random
    masks than a whole-bag draw).
    """

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GroupedDoubleAttention(dim, heads=heads, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=dropout)

    def _attention(self, x: Tensor, groups: GroupIndex) -> Tensor:
        return self.attn(self.norm1(x), groups)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: Tensor, groups: GroupIndex, checkpointing: bool = False) -> Tensor:
        if not checkpointing:
            x = x + self._attention(x, groups)
            return x + self._feed_forward(x)
        x = x + checkpoint(self._attention, x, groups, use_reentrant=False)
        chunks = [checkpoint(self._feed_forward, c, use_reentrant=False) for c in x.split(MLP_CHUNK, dim=1)]
        return x + torch.cat(chunks, dim=1)


class GDAT(nn.Module):
    """The GDAT instance encoder: tile features (B, N, D) → instance embeddings (B, N, dim).

    ``grad_checkpointing`` (training only): ``True`` recomputes each block's sub-layers in the
    backward pass instead of storing their activations, ``False`` never does, ``"auto"`` (default)
    does it for bags of ≥ :data:`CHECKPOINT_MIN_INSTANCES` tiles. A bag of 10^5 tiles then trains
    in a fraction of the memory for ~1.3× the time (see ``benchmarks/RESULTS.md``).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int = 512,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.25,
        block_dropout: float = 0.1,
        groups: int = 256,
        grouping: str = "order",
        grad_checkpointing: bool | str = "auto",
    ) -> None:
        super().__init__()
        if grad_checkpointing not in (True, False, "auto"):
            raise ValueError(f"grad_checkpointing must be true, false or 'auto', got {grad_checkpointing!r}")
        self.n_groups = groups
        self.grouping = grouping
        self.grad_checkpointing = grad_checkpointing
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown GDAT grouping {grouping!r}; choose from {sorted(GROUPINGS)}")
        self.fc = nn.Linear(in_dim, dim)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [GDATBlock(dim, heads=heads, mlp_ratio=mlp_ratio, dropout=block_dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)

    def group(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> GroupIndex:
        """The batch's group assignment (exposed for tests and for the grouping comparison)."""
        b, n = x.shape[:2]
        return assign_groups(self.n_groups, b, n, x.device, grouping=self.grouping, coords=coords, mask=mask)

    def forward(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: take the unmasked (fastest) attention kernels
        groups = self.group(x, coords, mask)
        h = self.drop(self.act(self.fc(x)))
        recompute = (
            self.training
            and torch.is_grad_enabled()
            and (
                self.grad_checkpointing is True
                or (self.grad_checkpointing == "auto" and x.shape[1] >= CHECKPOINT_MIN_INSTANCES)
            )
        )
        for block in self.blocks:
            h = block(h, groups, checkpointing=recompute)
        return self.norm(h)
