"""CoMEL's MIL model (METHODS.md, CoMEL): GDAT encoder → ABMIL attention pooling → linear head(s).

Instance scores for localization are the pooling attention min–max normalised per bag
(:func:`pathopeft.mil.base.minmax_scores`). The BPPL loss that trains those scores lives in
:mod:`pathopeft.mil.bppl`; OWLoRA (continual tasks) wraps this model's ``nn.Linear`` layers
named by :meth:`MILModel.adapter_targets`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from pathopeft.mil.base import MILModel, Task, valid_mask
from pathopeft.mil.gdat import GDAT
from pathopeft.mil.pooling import AttentionPooling
from pathopeft.mil.registry import register_model

__all__ = ["CoMEL"]


@register_model("comel")
class CoMEL(MILModel):
    """GDAT (2 grouped-double-attention blocks) + tanh attention pooling (hidden 256) + heads."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[Task | Mapping[str, Any]],
        embed_dim: int = 512,
        depth: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.25,
        block_dropout: float = 0.1,
        groups: int = 256,
        grouping: str = "order",
        attn_hidden: int = 256,
        grad_checkpointing: bool | str = "auto",
    ) -> None:
        super().__init__(in_dim, embed_dim, tasks)
        self.encoder = GDAT(
            in_dim,
            dim=embed_dim,
            depth=depth,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            block_dropout=block_dropout,
            groups=groups,
            grouping=grouping,
            grad_checkpointing=grad_checkpointing,
        )
        self.pool = AttentionPooling(embed_dim, hidden=attn_hidden, gated=False)

    def forward_features(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.encoder(x, coords=coords, mask=mask)

    def forward_attention(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.pool(h, valid_mask(h, mask))
