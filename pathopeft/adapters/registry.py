"""Method registry and typed configs, so a YAML config can name a method and its options.

Each method module defines an :class:`AdapterConfig` subclass decorated with
:func:`register_method`; unknown option names or out-of-range values fail validation before any
layer is touched.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, ValidationError, model_validator

from pathopeft.adapters.base import AdapterError
from pathopeft.config import StrictModel

if TYPE_CHECKING:
    from pathopeft.adapters.base import AdapterModule, LayerGeometry

__all__ = [
    "AdapterConfig",
    "AdapterSpec",
    "available_methods",
    "get_method",
    "make_config",
    "register_method",
]

_METHODS: dict[str, type[AdapterConfig]] = {}
NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")


class AdapterConfig(StrictModel):
    """Base of every method's options. Subclasses set the class variables below."""

    method: ClassVar[str] = ""
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)  # which LayerGeometry kinds it can wrap
    module_cls: ClassVar[type[AdapterModule]]
    uses_svd: ClassVar[bool] = False

    def build(
        self,
        geometry: LayerGeometry,
        layer_name: str,
        weight: Any = None,
        meta: dict[str, Any] | None = None,
        svd: Any = None,
    ) -> AdapterModule:
        """Create this method's module for one layer (from the base weight, or from saved ``meta``).

        ``svd``: the weight's precomputed :func:`float32_svd` (methods with ``uses_svd`` only).
        """
        if geometry.kind not in self.layer_kinds:
            raise AdapterError(
                f"{layer_name}: method {self.method!r} does not support {geometry.kind} layers "
                f"(supported: {', '.join(self.layer_kinds)})"
            )
        try:
            extra = {"svd": svd} if self.uses_svd else {}
            return self.module_cls(geometry, self, weight=weight, meta=meta, **extra)
        except AdapterError as exc:
            raise AdapterError(f"{layer_name}: {exc}") from None


def register_method(config_cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``config_cls.method`` available to :func:`attach` and configs."""
    if not config_cls.method:
        raise TypeError(f"{config_cls.__name__} must set the class variable `method`")
    _METHODS[config_cls.method] = config_cls
    return config_cls


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(method: str) -> type[AdapterConfig]:
    try:
        return _METHODS[method]
    except KeyError:
        raise AdapterError(
            f"unknown adapter method {method!r}; available: {', '.join(available_methods())}"
        ) from None


def make_config(method: str, **options: Any) -> AdapterConfig:
    """Validate ``options`` against ``method``'s config; errors name the method and the option."""
    cls = get_method(method)
    try:
        return cls(**options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '?'}: "
            f"{'unknown option' if err['type'] == 'extra_forbidden' else err['msg']}"
            for err in exc.errors()
        )
        raise AdapterError(f"invalid options for adapter method {method!r}: {problems}") from None


class AdapterSpec(StrictModel):
    """What a YAML config says about an adapter: ``{method, targets, exclude, name, options}``.

    ``options`` is checked against the method's own config when the spec is validated, so a typo
    fails at config-load time, not after the model is built.
    """

    method: str = "lora"  # one of available_methods()
    targets: str | list[str] = r".*blocks\.\d+\.attn\.(qkv|proj)"  # full-match regex(es) over module names
    exclude: str | list[str] | None = None  # full-match regex(es) of module names to skip
    name: str = "default"  # adapter name (several can live on one model)
    options: dict[str, Any] = Field(default_factory=dict)  # method options, see the method's config

    @model_validator(mode="after")
    def _check_options(self) -> AdapterSpec:
        try:
            make_config(self.method, **self.options)
        except AdapterError as exc:
            raise ValueError(str(exc)) from None
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"adapter name {self.name!r} may only use letters, digits, '_' and '-'")
        return self

    def config(self) -> AdapterConfig:
        return make_config(self.method, **self.options)

    def attach(self, model: Any) -> list[str]:
        from pathopeft.adapters.model import attach

        return attach(model, self.config(), targets=self.targets, exclude=self.exclude, name=self.name)
