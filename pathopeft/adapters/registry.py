"""Method registry and typed configs, so a YAML config can name a method and its options.

Each method module defines an :class:`AdapterConfig` subclass decorated with
:func:`register_method`; unknown option names or out-of-range values fail validation before any
layer is touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError, model_validator

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


PATTERN_FIELDS = ("rank_pattern", "alpha_pattern", "layer_options")


def name_matches(pattern: str, name: str) -> bool:
    """The target rule for one pattern: a full-match regex over the module name, or a dotted suffix."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


class AdapterConfig(StrictModel):
    """Base of every method's options. Subclasses set the class variables below.

    Per-layer options (HF PEFT's ``rank_pattern``/``alpha_pattern``, generalised): each key is a
    pattern matched against the adapted layer's name like a target list entry (full-match regex or
    dotted name suffix), each value overrides the adapter-wide option on the layers it matches.
    ``rank_pattern`` sets the method's rank option (:attr:`rank_field`: ``rank``; SVFit: the cap
    ``max_rank``), ``alpha_pattern`` its scaling ``alpha`` (LoRA, WaRA), ``layer_options`` any other
    option by name (``{"blocks\\.0\\..*": {"rank": 16, "dropout": 0.1}}``). A pattern that matches
    no adapted layer, or two patterns giving one layer different values for an option, is an error:
    both are typos that would otherwise silently train another model than the one configured.
    """

    method: ClassVar[str] = ""
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)  # which LayerGeometry kinds it can wrap
    module_cls: ClassVar[type[AdapterModule]]
    uses_svd: ClassVar[bool] = False
    rank_field: ClassVar[str | None] = None  # the option rank_pattern sets
    alpha_field: ClassVar[str | None] = None  # the option alpha_pattern sets
    adapter_level_options: ClassVar[tuple[str, ...]] = ()  # options read once per adapter, not per layer

    rank_pattern: dict[str, PositiveInt] = Field(default_factory=dict)  # layer pattern -> rank
    alpha_pattern: dict[str, PositiveFloat] = Field(default_factory=dict)  # layer pattern -> alpha
    layer_options: dict[str, dict[str, Any]] = Field(default_factory=dict)  # layer pattern -> {option: value}

    @model_validator(mode="after")
    def _check_patterns(self) -> AdapterConfig:
        if self.rank_pattern and self.rank_field is None:
            raise ValueError(f"rank_pattern: method {self.method!r} has no rank option")
        if self.alpha_pattern and self.alpha_field is None:
            raise ValueError(f"alpha_pattern: method {self.method!r} has no alpha option")
        for field in PATTERN_FIELDS:
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{field}: pattern {pattern!r} is not a valid regex: {exc}") from None
        options = set(type(self).model_fields) - set(PATTERN_FIELDS)
        for pattern, override in self.layer_options.items():
            unknown = sorted(set(override) - options)
            if unknown:
                raise ValueError(f"layer_options[{pattern!r}]: unknown option(s) {unknown}")
            fixed = sorted(set(override) & set(self.adapter_level_options))
            if fixed:
                raise ValueError(
                    f"layer_options[{pattern!r}]: {fixed} apply to the whole adapter, not per layer"
                )
        for pattern, override in self._overrides():
            try:  # the override must be a valid value of the option (checked once, here)
                type(self).model_validate({**self._plain(), **override})
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"per-layer options for {pattern!r}: {problems}") from None
        return self

    def _plain(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(PATTERN_FIELDS))

    def _overrides(self) -> list[tuple[str, dict[str, Any]]]:
        """``(pattern, {option: value})`` for every per-layer entry, in the documented field order."""
        entries = [(p, dict(o)) for p, o in self.layer_options.items()]
        if self.rank_field is not None:
            entries += [(p, {self.rank_field: v}) for p, v in self.rank_pattern.items()]
        if self.alpha_field is not None:
            entries += [(p, {self.alpha_field: v}) for p, v in self.alpha_pattern.items()]
        return entries

    def has_layer_patterns(self) -> bool:
        return any(getattr(self, field) for field in PATTERN_FIELDS)

    def check_patterns(self, layer_names: Iterable[str]) -> None:
        """Raise when a per-layer pattern matches none of the adapter's layers (a typo or a stale name)."""
        names = list(layer_names)
        for field in PATTERN_FIELDS:
            unused = [p for p in getattr(self, field) if not any(name_matches(p, n) for n in names)]
            if unused:
                shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
                raise AdapterError(
                    f"{field}: pattern(s) {unused} match none of the adapted layers ({shown}); "
                    "a pattern is a full-match regex or a dotted name suffix, like a target"
                )

    def for_layer(self, layer_name: str) -> AdapterConfig:
        """This config with the per-layer overrides for ``layer_name`` applied (``self`` when none apply)."""
        if not self.has_layer_patterns():
            return self
        chosen: dict[str, tuple[str, Any]] = {}
        for pattern, override in self._overrides():
            if not name_matches(pattern, layer_name):
                continue
            for option, value in override.items():
                if option in chosen and chosen[option][1] != value:
                    raise AdapterError(
                        f"{layer_name}: per-layer patterns {chosen[option][0]!r} and {pattern!r} both set "
                        f"{option!r} ({chosen[option][1]!r} vs {value!r}); make the patterns exclusive"
                    )
                chosen[option] = (pattern, value)
        if not chosen:
            return self
        try:
            return type(self).model_validate({**self._plain(), **{k: v for k, (_, v) in chosen.items()}})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise AdapterError(f"{layer_name}: per-layer options do not combine: {problems}") from None

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
        The module gets the layer's resolved options as ``config`` (per-layer overrides applied) and
        this adapter-wide config as ``adapter_config`` (what is saved and compared).
        """
        if geometry.kind not in self.layer_kinds:
            raise AdapterError(
                f"{layer_name}: method {self.method!r} does not support {geometry.kind} layers "
                f"(supported: {', '.join(self.layer_kinds)})"
            )
        try:
            layer_config = self.for_layer(layer_name)
            extra = {"svd": svd} if self.uses_svd else {}
            module = self.module_cls(geometry, layer_config, weight=weight, meta=meta, **extra)
        except AdapterError as exc:
            message = str(exc)
            raise AdapterError(
                message if message.startswith(layer_name) else f"{layer_name}: {message}"
            ) from None
        module.adapter_config = self
        return module


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
            (f"{'.'.join(str(p) for p in err['loc'])}: " if err["loc"] else "")
            + (
                "unknown option"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ")
            )
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
    modules_to_save: str | list[str] | None = None  # modules trained whole and saved with the adapter
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

        return attach(
            model,
            self.config(),
            targets=self.targets,
            exclude=self.exclude,
            name=self.name,
            modules_to_save=self.modules_to_save,
        )
