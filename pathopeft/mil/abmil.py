"""ABMIL baseline (Ilse et al., 2018): per-tile MLP embedding → attention pooling → linear head.

Registered as ``abmil`` (tanh attention) and ``abmil_gated`` (gated attention, tanh ⊙ sigmoid),
both with the CLAM-style ``Linear(D→512) + ReLU + dropout 0.25`` tile embedding, so the only
difference from CoMEL is the absence of GDAT's instance mixing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from pathopeft.mil.base import MILModel, Task, valid_mask
from pathopeft.mil.pooling import AttentionPooling
from pathopeft.mil.registry import register_model

__all__ = ["ABMIL", "TileEmbedding"]


class TileEmbedding(nn.Module):
    """``Linear(D→dim) + ReLU + dropout``: each tile embedded on its own (no mixing)."""

    def __init__(self, in_dim: int, dim: int = 512, dropout: float = 0.25) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, dim)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.fc(x)))


@register_model("abmil", gated=False)
@register_model("abmil_gated", gated=True)
class ABMIL(MILModel):
    """Attention-based MIL with plain (tanh) or gated attention."""

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[Task | Mapping[str, Any]],
        embed_dim: int = 512,
        dropout: float = 0.25,
        attn_hidden: int = 256,
        attn_dropout: float = 0.0,
        gated: bool = False,
    ) -> None:
        super().__init__(in_dim, embed_dim, tasks)
        self.encoder = TileEmbedding(in_dim, embed_dim, dropout)
        self.pool = AttentionPooling(embed_dim, hidden=attn_hidden, gated=gated, dropout=attn_dropout)

    def forward_features(self, x: Tensor, coords: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self.encoder(x)

    def forward_attention(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.pool(h, valid_mask(h, mask))
