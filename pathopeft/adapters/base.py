"""The common machinery every adapter method shares.

* :class:`LayerGeometry` hides whether the wrapped layer is an ``nn.Linear`` or an ``nn.Conv2d``:
  a Conv2d kernel is treated as the matrix ``out × (in·kh·kw)``, its "down" projection is a
  convolution with the layer's own stride/padding/dilation and its "up" projection a 1×1
  convolution, so every method's factored forward works on both without materialising ``W'``.
* :class:`AdapterModule` is one method's parameters and buffers on one layer (``delta(x)`` is its
  additive output term, ``delta_weight()`` the matrix ``ΔW`` used by ``merge``).
* :class:`AdaptedLayer` wraps the frozen base layer and holds any number of named adapters
  (HF-PEFT's layout: the original module lives on as ``<name>.base_layer``).
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pathopeft.adapters.registry import AdapterConfig

__all__ = [
    "AdaptedLayer",
    "AdapterError",
    "AdapterModule",
    "LayerGeometry",
    "check_svd",
    "float32_svd",
    "float32_svd_many",
    "kaiming_uniform",
    "layer_hash",
]


class AdapterError(ValueError):
    """A problem with how an adapter is configured, attached, merged, saved or loaded."""


def float32_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(s) Vh`` in float32 (s descending), computed on the weight's device."""
    matrix = matrix.detach().float()
    if matrix.shape[0] < matrix.shape[1]:  # LAPACK's gesdd is ~2x faster on tall matrices
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
        return uh.T.contiguous(), s.contiguous(), v.T.contiguous()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u.contiguous(), s.contiguous(), vh.contiguous()


def _single_threaded_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`float32_svd` in a pool thread, with that thread's own OpenMP/MKL team limited to 1.

    OpenMP and MKL thread counts are per thread: a new thread starts from the process default
    (all cores, or OMP_NUM_THREADS), not from the caller's ``torch.set_num_threads(1)``. Without
    this, N pool threads each run LAPACK on N threads (N² on N cores: measured 7× slower with
    2 workers × 4 threads on 2 cores; 16 × 16 on a 16-core GPU host).
    """
    torch.set_num_threads(1)
    return float32_svd(matrix)


def float32_svd_many(matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`float32_svd` of many matrices; on CPU one layer per thread, largest first.

    LAPACK's own threading scales poorly at ViT sizes and collapses when the cores are shared
    (measured here: 48 ViT-B SVDs took 21–83 s with 2 intra-op threads, 14–17 s as 2 threads of
    1). Torch's intra-op thread count is set to 1 during the pool (in every pool thread too) and
    restored afterwards; the pool has ``torch.get_num_threads()`` workers.
    """
    workers = torch.get_num_threads()
    if len(matrices) < 2 or workers < 2 or any(m.device.type != "cpu" for m in matrices):
        return [float32_svd(m) for m in matrices]
    order = sorted(range(len(matrices)), key=lambda i: -matrices[i].numel())
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(matrices))) as pool:
            results = list(pool.map(_single_threaded_svd, [matrices[i] for i in order]))
    finally:
        torch.set_num_threads(workers)
    out: list[Any] = [None] * len(matrices)
    for i, result in zip(order, results):
        out[i] = result
    return out


def check_svd(weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> str | None:
    """Is ``(u, s, vh)`` (top k triplets) an SVD of ``weight``? Checked on a few random probes.

    A true thin SVD has ``W V = U diag(s)`` and ``Uᵀ W = diag(s) Vᵀ`` up to float32 rounding
    (≈ 1e-6·s_max); any consistent sign choice passes, a replaced or foreign factor does not.
    """
    w = weight.detach().float()
    u, s, vh = (
        u.detach().float().to(w.device),
        s.detach().float().to(w.device),
        vh.detach().float().to(w.device),
    )
    if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
        return "the saved SVD factors are not finite"
    if bool((s[:-1] < s[1:]).any()) or bool((s < 0).any()):
        return "the saved singular values S are not non-negative and sorted descending"
    scale = float(s.max()) if s.numel() else 0.0
    if scale == 0.0:
        return None
    probes = torch.randn(s.numel(), 4, generator=torch.Generator().manual_seed(0)).to(w.device)
    right = torch.linalg.matrix_norm(w @ (vh.T @ probes) - u @ (s[:, None] * probes))
    left = torch.linalg.matrix_norm(probes.T @ (u.T @ w) - (probes.T * s) @ vh)
    error = float(max(right, left)) / (scale * float(torch.linalg.matrix_norm(probes)))
    if error > 1e-3:
        return (
            f"the saved SVD factors U, S, Vh are not an SVD of this layer's base weight (error {error:.2e})"
        )
    return None


def _is_timm_conv2d_same(module: nn.Module) -> bool:
    """timm's ``Conv2dSame`` (by class, without importing timm): forward = TF "same" pad + conv, padding 0."""
    cls = type(module)
    return cls.__name__ == "Conv2dSame" and cls.__module__.startswith("timm.")


def pad_same(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> torch.Tensor:
    """TensorFlow's "same" zero padding for a convolution, as timm's ``pad_same`` computes it.

    Per side: total ``max((ceil(size / stride) − 1)·stride + (k − 1)·dilation + 1 − size, 0)``,
    split with the extra pixel at the end (bottom/right).
    """
    pads = []
    for size, k, s, d in zip(x.shape[-2:], kernel, stride, dilation):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom)) if top or bottom or left or right else x


def kaiming_uniform(rows: int, cols: int) -> torch.Tensor:
    """``rows × cols`` matrix initialised exactly like HF PEFT's ``lora_A`` (Kaiming-uniform, a=√5)."""
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


@dataclass(frozen=True)
class LayerGeometry:
    """Shape and call signature of a wrapped layer, seen as the matrix ``W ∈ R^{m×n}``.

    ``n`` (``in_features``) is the fan-in: ``in_channels·kh·kw`` for a Conv2d.
    """

    kind: str
    out_features: int
    in_features: int
    weight_shape: tuple[int, ...]
    conv: tuple[Any, ...] | None = None  # (in_channels, kernel_size, stride, padding, dilation)
    pad_same: bool = False  # timm's Conv2dSame: TensorFlow "same" padding computed from the input size

    SUPPORTED = ("linear", "conv2d")

    @classmethod
    def from_module(cls, module: nn.Module, name: str) -> LayerGeometry:
        if isinstance(module, nn.Linear):
            return cls("linear", module.out_features, module.in_features, tuple(module.weight.shape))
        if isinstance(module, nn.Conv2d):
            overridden = [
                method
                for method in ("forward", "_conv_forward")
                if getattr(type(module), method) is not getattr(nn.Conv2d, method)
            ]
            pad_same = _is_timm_conv2d_same(module)
            if overridden and not pad_same:
                raise AdapterError(
                    f"{name}: {type(module).__name__} is an nn.Conv2d subclass that overrides "
                    f"{' and '.join(overridden)} (its own padding or convolution); the adapter's convolution "
                    "would use the plain padding attribute and lose that logic, so it is refused "
                    "(timm's Conv2dSame is supported: its TensorFlow 'same' padding is reproduced)"
                )
            if module.groups != 1:
                raise AdapterError(
                    f"{name}: grouped/depthwise Conv2d (groups={module.groups}) is not supported"
                )
            if module.padding_mode != "zeros":
                raise AdapterError(f"{name}: Conv2d padding_mode={module.padding_mode!r} is not supported")
            kh, kw = module.kernel_size
            conv = (module.in_channels, module.kernel_size, module.stride, module.padding, module.dilation)
            return cls(
                "conv2d",
                module.out_channels,
                module.in_channels * kh * kw,
                tuple(module.weight.shape),
                conv,
                pad_same,
            )
        raise AdapterError(
            f"{name}: layer type {type(module).__name__} is not supported "
            "(adapters wrap nn.Linear and nn.Conv2d)"
        )

    @property
    def rank_limit(self) -> int:
        """``R = min(m, n)``: the largest rank a factorisation of ``W`` can have."""
        return min(self.out_features, self.in_features)

    @property
    def feature_dim(self) -> int:
        """Where the channels of an activation live: last axis for Linear, axis 1 for Conv2d."""
        return -1 if self.kind == "linear" else 1

    def as_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(self.out_features, self.in_features)

    def as_weight(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.weight_shape)

    def base(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own computation, called functionally (no hooks, no extra module call)."""
        if type(layer) is nn.Linear:
            return F.linear(x, layer.weight, layer.bias)
        if type(layer) is nn.Conv2d:
            return layer._conv_forward(x, layer.weight, layer.bias)
        return layer(x)  # a subclass may override forward: respect it

    def down(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Apply ``matrix ∈ R^{k×n}`` on the input side, the way the layer applies ``W``."""
        if self.kind == "linear":
            return F.linear(x, matrix)
        cin, (kh, kw), stride, padding, dilation = self.conv  # type: ignore[misc]
        kernel = matrix.reshape(matrix.shape[0], cin, kh, kw)
        if self.pad_same:
            x, padding = pad_same(x, (kh, kw), stride, dilation), 0
        return F.conv2d(x, kernel, None, stride, padding, dilation)

    def up(self, h: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Apply ``matrix ∈ R^{m×k}`` pointwise (a 1×1 convolution for Conv2d)."""
        if self.kind == "linear":
            return F.linear(h, matrix)
        return F.conv2d(h, matrix[:, :, None, None])

    def scale(self, h: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """Multiply each channel of ``h`` by ``vector`` (a diagonal matrix, applied pointwise)."""
        if self.kind == "linear":
            return h * vector
        return h * vector[:, None, None]

    def with_weight(self, layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's computation with another weight of its shape (the folded forward)."""
        if self.kind == "linear":
            return F.linear(x, weight, layer.bias)
        return layer._conv_forward(x, weight, layer.bias)

    def tokens(self, x: torch.Tensor) -> int:
        """How many vectors the layer maps in this call (rows of the GEMM; input positions for a Conv2d)."""
        return x.numel() // max(1, x.shape[self.feature_dim])

    def full(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        """Apply a full ``m×n`` matrix as the layer would (used where a method builds ΔW anyway)."""
        if self.kind == "linear":
            return F.linear(x, matrix)
        return self.down(x, matrix)


class AdapterModule(nn.Module):
    """One method's trainable parameters and frozen buffers on one layer.

    Subclasses are built either from the base weight (``weight=``: attach time, SVDs computed here)
    or from ``meta`` (load time: the buffers are allocated empty and filled from the saved file,
    because an SVD recomputed elsewhere can differ in signs or order).
    """

    def __init__(self, geometry: LayerGeometry, config: AdapterConfig) -> None:
        super().__init__()
        self.geometry = geometry
        self.config = config  # this layer's options (per-layer overrides applied)
        self.adapter_config = config  # the adapter-wide options, as saved (set by AdapterConfig.build)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to the layer output, ``ΔW x``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """``ΔW`` as an ``m×n`` float32 matrix (for ``merge``/``unmerge``)."""
        raise NotImplementedError

    def forward_costs(self, tokens: int, backward: bool) -> tuple[float, float] | None:
        """Multiply-adds of this adapter's share of one call: ``(residual form, folded form)``.

        ``None`` (the default) means the method has no folded form. Methods whose residual form
        rotates every token through large frozen factors (SALT, SVFit) return both, and the layer
        folds ``ΔW`` into ``W`` for the call when that is cheaper (METHODS.md § SALT).
        ``backward``: the call will be back-propagated (adds the gradient GEMMs).
        """
        return None

    def fold_weight(self) -> torch.Tensor:
        """``ΔW`` as an ``m×n`` matrix in the adapter's dtype, differentiable (the folded forward).

        Must be exactly zero at initialisation, so that ``W + ΔW`` is ``W`` bit for bit.
        """
        raise NotImplementedError

    def check_factors(self, weight: torch.Tensor) -> str | None:
        """After loading: why the saved frozen factors do not belong to ``weight`` (``m×n``), or None.

        Only methods that keep factors derived from the base weight (SVD) check anything.
        """
        return None

    def meta(self) -> dict[str, Any]:
        """Per-layer facts (JSON) needed to rebuild this module's shapes without the base weight."""
        return {}

    def regularization(self) -> torch.Tensor | None:
        """The method's training penalty on this layer, if it has one (SALT's reg, OWLoRA's λ-term)."""
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the adapter's parameters (read on every forward: own parameters first, no module walk)."""
        for tensor in self._parameters.values():
            if tensor is not None:
                return tensor.dtype
        for tensor in self.parameters():
            return tensor.dtype
        return torch.float32


def layer_hash(layer: nn.Module) -> str:
    """SHA-256 of a layer's base weights, independent of device and dtype.

    Defined as sha256 over: ``"weight"``, the shape as text, the float32 little-endian bytes of the
    C-contiguous weight; then the same for ``"bias"`` when the layer has one. Computed once when a
    layer is first wrapped, i.e. on the weights the adapter was attached to (merge/unmerge do not
    change it).
    """
    digest = hashlib.sha256()
    for key in ("weight", "bias"):
        tensor = getattr(layer, key, None)
        if tensor is None:
            continue
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}{tuple(data.shape)}".encode())
        digest.update(data.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


FOLD_MODES = ("auto", "never", "always")


class AdaptedLayer(nn.Module):
    """A frozen base layer plus named adapters: ``y = base(x) + Σ_active ΔW_a x``.

    Merged adapters are skipped in forward (their ΔW is inside ``base_layer.weight``); when no
    active adapter is left unmerged, forward is just the base layer's functional call.

    ``fold_mode``: ``"auto"`` (default) folds the ΔW of adapters whose cost model says so into the
    weight for the call (``(W + ΔW) x``, one GEMM, autograd through the build); ``"never"`` keeps
    every adapter in residual form; ``"always"`` folds every adapter that has a folded form. Both
    forms give ``W x`` exactly at initialisation (ΔW is exactly zero there).
    """

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.geometry = LayerGeometry.from_module(base_layer, name)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.base_hash = layer_hash(base_layer)
        # hash of the base weights as merge/unmerge last left them: save() compares against it, so an
        # edit behind the adapters' back is caught also after merge/unmerge cycles
        self.weights_hash = self.base_hash
        self.base_edited = False  # sticky: an edit seen at a merge/unmerge is not forgotten by re-recording
        self.touched_by_merge = False  # kept for callers of the old attribute; no longer consulted
        self.disabled = False
        self.fold_mode = "auto"
        self._foldable = type(base_layer) in (nn.Linear, nn.Conv2d)
        self._live: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Any:
        """Fall back to the base layer's attributes (``weight``, ``in_features`` ...), as HF PEFT does,
        so model code that reads e.g. ``self.qkv.bias`` directly keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self.base_layer, name)

    def _refresh(self) -> None:
        self._live = () if self.disabled else tuple(n for n in self.active if n not in self.merged)

    def add(self, name: str, module: AdapterModule, *, active: bool = True) -> None:
        self.adapters[name] = module
        if active and name not in self.active:
            self.active.append(name)
        self._refresh()

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.adapters[name]
        self.active = [n for n in self.active if n != name]
        self._refresh()

    def set_active(self, names: list[str], layer_name: str) -> None:
        wanted = [n for n in names if n in self.adapters]
        dropped = [n for n in self.merged if n not in wanted]
        if dropped:
            raise AdapterError(
                f"{layer_name}: adapter(s) {dropped} are merged into the weights; unmerge before deactivating"
            )
        self.active = wanted
        self._refresh()

    def _folded(self, x: torch.Tensor) -> tuple[str, ...]:
        """Live adapters whose ΔW goes into the weight for this call (cost model or ``fold_mode``)."""
        if not self._foldable or self.fold_mode == "never":
            return ()
        tokens = self.geometry.tokens(x)
        grad = torch.is_grad_enabled()
        chosen = []
        for name in self._live:
            adapter: AdapterModule = self.adapters[name]  # type: ignore[assignment]
            backward = grad and (
                x.requires_grad or any(p.requires_grad for p in adapter._parameters.values())
            )
            costs = adapter.forward_costs(tokens, backward)
            if costs is not None and (self.fold_mode == "always" or costs[1] < costs[0]):
                chosen.append(name)
        return tuple(chosen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _modules lookup: skips the __getattr__ fallback chain (this runs once per layer per call)
        layer = self._modules["base_layer"]
        if not self._live:
            return self.geometry.base(layer, x)
        autocast = torch.is_autocast_enabled(x.device.type)
        folded = self._folded(x)
        if folded:
            weight = layer.weight
            for name in folded:
                delta = self.geometry.as_weight(self.adapters[name].fold_weight())  # type: ignore[operator]
                weight = weight + (
                    delta if autocast or delta.dtype == weight.dtype else delta.to(weight.dtype)
                )
            out = self.geometry.with_weight(layer, x, weight)
        else:
            out = self.geometry.base(layer, x)
        for name in self._live:
            if name in folded:
                continue
            adapter: AdapterModule = self.adapters[name]  # type: ignore[assignment]
            dtype = adapter.dtype
            delta = adapter.delta(x if autocast or x.dtype == dtype else x.to(dtype))
            out = out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))
        return out

    def merge(self, names: list[str]) -> list[str]:
        """Add each adapter's ΔW into the base weight (in float32); return the names merged."""
        done = []
        for name in names:
            if name not in self.adapters or name in self.merged:
                continue
            if not done:
                self._note_edits()
            self._add_delta(self.adapters[name], sign=1.0)  # type: ignore[arg-type]
            self.merged.append(name)
            done.append(name)
        if done:
            self.touched_by_merge = True
            self.weights_hash = layer_hash(self.base_layer)
        self._refresh()
        return done

    def unmerge(self, names: list[str] | None = None) -> list[str]:
        """Subtract merged adapters' ΔW again (in reverse merge order); return the names unmerged."""
        targets = [n for n in reversed(self.merged) if names is None or n in names]
        if targets:
            self._note_edits()
        for name in targets:
            self._add_delta(self.adapters[name], sign=-1.0)  # type: ignore[arg-type]
            self.merged.remove(name)
        if targets:  # float32 round trips leave the weights a rounding away from before: re-record
            self.weights_hash = layer_hash(self.base_layer)
        self._refresh()
        return targets

    def _note_edits(self) -> None:
        self.base_edited = self.base_edited or layer_hash(self.base_layer) != self.weights_hash

    def base_changed(self) -> bool:
        """True when the base weights were changed other than by this layer's own merge/unmerge."""
        return self.base_edited or layer_hash(self.base_layer) != self.weights_hash

    @torch.no_grad()
    def _add_delta(self, adapter: AdapterModule, sign: float) -> None:
        weight = self.base_layer.weight
        delta = adapter.delta_weight().to(device=weight.device, dtype=torch.float32)
        merged = weight.float() + sign * self.geometry.as_weight(delta)
        weight.copy_(merged.to(weight.dtype))

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, merged={self.merged}"
