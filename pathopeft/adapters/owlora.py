"""OWLoRA: one weighted low-rank adapter per continual task (METHODS.md § OWLoRA).

``ΔW_t = B_t diag(w_t) A_t`` (no α/r scaling), keyed by adapter name = task. Attaching a new
OWLoRA adapter freezes every earlier one and records, per layer, orthonormal bases of what must
not be disturbed: the row space of all earlier ``A_p`` and the column space of all earlier
``B_p`` (for the first adapter with ``protect_base``: the base weight's top singular subspaces
holding ``base_energy`` of ``Σ s²``). Training code then calls, after each backward,

    pa.owlora.project_gradients(model, "task2")        # or: pa.owlora.projection_hook(opt, model, "task2")
    loss = task_loss + pa.owlora.orthogonality_penalty(model, "task2")

The hook projects gradients in an optimizer step pre-hook, i.e. after DDP has averaged them and
after AMP unscaling (both commute with the linear projection), and by default also projects the
step's change to A_t/B_t in a post-hook: with Adam, projected gradients alone do not keep the
update in the allowed subspace (per-element normalisation), see :func:`projection_hook`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn
from torch.utils.hooks import RemovableHandle

from pathopeft.adapters.base import (
    AdapterError,
    AdapterModule,
    LayerGeometry,
    float32_svd,
    float32_svd_many,
    kaiming_uniform,
)
from pathopeft.adapters.model import adapted_layers, adapter_modules
from pathopeft.adapters.registry import AdapterConfig, register_method
from pathopeft.adapters.svfit import energy_rank

__all__ = [
    "OwloraConfig",
    "OwloraModule",
    "earlier_adapters",
    "orthogonality_penalty",
    "project_gradients",
    "projection_hook",
    "refresh_projection",
]


class OwloraModule(AdapterModule):
    def __init__(
        self,
        geometry: LayerGeometry,
        config: OwloraConfig,
        weight: torch.Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(geometry, config)
        r, m, n = config.rank, geometry.out_features, geometry.in_features
        if r > geometry.rank_limit:
            raise AdapterError(
                f"OWLoRA rank {r} is larger than the layer allows (min(out, in) = {geometry.rank_limit})"
            )
        self.A = nn.Parameter(kaiming_uniform(r, n))
        self.B = nn.Parameter(torch.zeros(m, r))
        self.w = nn.Parameter(torch.ones(r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # orthonormal bases of the protected spaces (input side n×k, output side m×k'); not saved
        self.register_buffer("row_basis", torch.zeros(n, 0), persistent=False)
        self.register_buffer("col_basis", torch.zeros(m, 0), persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return g.up(g.scale(g.down(self.dropout(x), self.A), self.w), self.B)

    def delta_weight(self) -> torch.Tensor:
        return (self.B.float() * self.w.float()) @ self.A.float()

    def penalty(self) -> torch.Tensor:
        """``(‖A Aᵀ − I‖²_F + ‖Bᵀ B − I‖²_F) / r²`` for this layer (without λ)."""
        r = self.A.shape[0]
        eye = torch.eye(r, device=self.A.device, dtype=self.A.dtype)
        return ((self.A @ self.A.T - eye).square().sum() + (self.B.T @ self.B - eye).square().sum()) / r**2

    def regularization(self) -> torch.Tensor | None:
        return self.config.ortho_lambda * self.penalty()  # type: ignore[attr-defined]

    @torch.no_grad()
    def project(self) -> None:
        """Remove from ∂A its component in the protected row space, from ∂B the column-space part."""
        if self.A.grad is not None and self.row_basis.shape[1]:
            q = self.row_basis.to(self.A.grad.dtype)
            self.A.grad.sub_((self.A.grad @ q) @ q.T)
        if self.B.grad is not None and self.col_basis.shape[1]:
            q = self.col_basis.to(self.B.grad.dtype)
            self.B.grad.sub_(q @ (q.T @ self.B.grad))


def _orthonormal_basis(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """Orthonormal basis of the column space (``side="cols"``) or row space (``"rows"``) of a matrix."""
    if matrix.numel() == 0:
        size = matrix.shape[0] if side == "cols" else matrix.shape[1]
        return matrix.new_zeros(size, 0)
    u, s, vh = float32_svd(matrix)
    tol = s.max() * max(matrix.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    keep = int((s > tol).sum())
    return (u[:, :keep] if side == "cols" else vh[:keep].T).contiguous()


def earlier_adapters(layer: nn.Module, name: str) -> list[str]:
    """OWLoRA adapters attached to ``layer`` before ``name`` (the earlier tasks)."""
    names = list(layer.adapters)
    return [n for n in names[: names.index(name)] if isinstance(layer.adapters[n], OwloraModule)]


@torch.no_grad()
def refresh_projection(model: nn.Module, name: str) -> None:
    """(Re)compute the protected bases of adapter ``name`` from the earlier adapters / base weight."""
    entries = list(adapter_modules(model, name))
    if not entries:
        raise AdapterError(f"no adapter named {name!r} on this model")
    if any(not isinstance(module, OwloraModule) for _, _, module in entries):
        raise AdapterError(f"adapter {name!r} is not an OWLoRA adapter")
    first = [  # layers where the base weight stands in for the (absent) earlier tasks
        (layer, module)
        for _, layer, module in entries
        if not earlier_adapters(layer, name) and module.config.protect_base  # type: ignore[attr-defined]
    ]
    base_svds = float32_svd_many([layer.geometry.as_matrix(layer.base_layer.weight) for layer, _ in first])
    base_svd = {id(module): svd for (_, module), svd in zip(first, base_svds)}
    for _, layer, module in entries:
        earlier = [layer.adapters[n] for n in earlier_adapters(layer, name)]
        if earlier:
            rows = _orthonormal_basis(torch.cat([e.A.detach().float() for e in earlier], dim=0), "rows")
            cols = _orthonormal_basis(torch.cat([e.B.detach().float() for e in earlier], dim=1), "cols")
        elif id(module) in base_svd:
            u, s, vh = base_svd[id(module)]
            k = energy_rank(s, module.config.base_energy)  # type: ignore[attr-defined]
            rows, cols = vh[:k].T.contiguous(), u[:, :k].contiguous()
        else:
            rows = module.A.new_zeros(module.A.shape[1], 0)
            cols = module.B.new_zeros(module.B.shape[0], 0)
        module.row_basis = rows.to(module.A.device)
        module.col_basis = cols.to(module.B.device)


def project_gradients(model: nn.Module, name: str) -> int:
    """Project the gradients of adapter ``name`` off the protected subspaces; returns #layers."""
    count = 0
    for _, _, module in adapter_modules(model, name):
        if isinstance(module, OwloraModule):
            module.project()
            count += 1
    return count


class _ProjectionHandle:
    """Removes both optimizer hooks of :func:`projection_hook` at once."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def projection_hook(
    optimizer: torch.optim.Optimizer, model: nn.Module, name: str, *, project_updates: bool = True
) -> _ProjectionHandle:
    """Project adapter ``name``'s gradients before every ``optimizer.step()``; returns a handle.

    Projecting gradients alone keeps SGD's steps in the allowed subspace but not Adam's, whose
    per-element normalisation mixes directions back in. With ``project_updates`` (default) the
    change each step makes to A_t and B_t is projected too, so the accumulated update provably
    stays orthogonal to the earlier tasks' subspaces whatever the optimizer.
    """
    modules = [m for _, _, m in adapter_modules(model, name) if isinstance(m, OwloraModule)]
    if not modules:
        raise AdapterError(f"no OWLoRA adapter named {name!r} on this model")
    before: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre_step(*_: Any) -> None:
        project_gradients(model, name)
        if project_updates:
            before[:] = [(m.A.detach().clone(), m.B.detach().clone()) for m in modules]

    @torch.no_grad()
    def post_step(*_: Any) -> None:
        for module, (a_prev, b_prev) in zip(modules, before):
            if module.row_basis.shape[1]:
                q = module.row_basis.to(a_prev.dtype)
                step = module.A - a_prev
                module.A.sub_((step @ q) @ q.T)
            if module.col_basis.shape[1]:
                q = module.col_basis.to(b_prev.dtype)
                step = module.B - b_prev
                module.B.sub_(q @ (q.T @ step))
        before.clear()

    handles = [optimizer.register_step_pre_hook(pre_step)]
    if project_updates:
        handles.append(optimizer.register_step_post_hook(post_step))
    return _ProjectionHandle(handles)


def orthogonality_penalty(model: nn.Module, name: str, lam: float | None = None) -> torch.Tensor:
    """``λ · Σ_layers (‖A Aᵀ − I‖²_F + ‖Bᵀ B − I‖²_F) / r²`` for adapter ``name`` (λ: config default)."""
    terms, weight = [], lam
    for _, _, module in adapter_modules(model, name):
        if isinstance(module, OwloraModule):
            terms.append(module.penalty())
            weight = module.config.ortho_lambda if weight is None else weight  # type: ignore[attr-defined]
    if not terms:
        raise AdapterError(f"no OWLoRA adapter named {name!r} on this model")
    return float(weight) * torch.stack(terms).sum()


@register_method
class OwloraConfig(AdapterConfig):
    """OWLoRA options. Trainable per layer: ``r·(m + n) + r`` (A, B and the weights w)."""

    method: ClassVar[str] = "owlora"
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    module_cls: ClassVar[type[AdapterModule]] = OwloraModule
    rank_field: ClassVar[str | None] = "rank"
    # orthogonality_penalty applies one λ to the whole adapter
    adapter_level_options: ClassVar[tuple[str, ...]] = ("ortho_lambda",)

    rank: int = Field(16, gt=0)  # r per task
    protect_base: bool = True  # first adapter: project off the base weight's top singular subspaces
    base_energy: float = Field(0.99, gt=0.0, le=1.0)  # energy those protected subspaces hold
    ortho_lambda: float = Field(1.0, ge=0.0)  # λ of the orthogonality penalty
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # dropout on the adapter's input

    def after_attach(self, model: nn.Module, name: str) -> None:
        """Freeze the earlier OWLoRA adapters and record what task ``name`` must not disturb."""
        for _, layer in adapted_layers(model):
            for other, module in layer.adapters.items():
                if other != name and isinstance(module, OwloraModule):
                    module.requires_grad_(False)
        refresh_projection(model, name)

    def after_load(self, model: nn.Module, name: str) -> None:
        """Recompute the protected bases (they are derived data, not saved)."""
        refresh_projection(model, name)
