"""Local weight files for every stage: read without unpickling code, unwrap, convert, check, load.

One loader serves the tile feature extractor (:mod:`pathopeft.features.backbones`) and the
segmentation encoders (:mod:`pathopeft.seg.encoders`), so a file that works in one stage works in
the other. Steps, each needed by checkpoints seen in the wild:

1. :func:`read_weight_file` — safetensors, or ``torch.load(weights_only=True)`` for .pth/.pt/.bin;
   nested containers are unwrapped (Lightning ``state_dict``, DINO/iBOT ``teacher``, timm's
   ``state_dict_ema``, ``model``, ``module``).
2. :func:`fit_state_dict` — wrapper prefixes (``module.``, ``backbone.``, ``teacher.`` ...) are
   stripped while that makes more keys match; foreign layouts with a known converter are renamed
   (EfficientNet-PyTorch → timm, :func:`efficientnet_pytorch_to_timm`); the model family's own
   timm ``checkpoint_filter_fn`` runs (SAM / MedSAM keys, old ViT layouts); classifier tensors the
   model does not have are dropped; then every key and shape must match — a half-loaded encoder
   gives features that look fine and are garbage.

The EfficientNet-PyTorch conversion works by explicit rules (module names and the stage layout of
the target timm model), never by key order, and refuses a key no rule maps.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "PREFIXES",
    "WRAPPER_KEYS",
    "WeightsError",
    "efficientnet_pytorch_to_timm",
    "fit_state_dict",
    "is_efficientnet_pytorch",
    "load_state_into",
    "read_weight_file",
    "strip_prefixes",
    "timm_filter",
]

log = logging.getLogger(__name__)

# Checkpoint wrappers: Lightning ("state_dict"), plain dicts ("model"), DINO/iBOT ("teacher"),
# timm train script ("state_dict_ema"), some DDP saves ("module"). Unwrapped in this order.
WRAPPER_KEYS = ("state_dict", "model", "teacher", "state_dict_ema", "module")
# Prefixes added by DDP / Lightning / SSL frameworks around the encoder, stripped when that helps.
PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.", "teacher.", "student.", "net.")


class WeightsError(ValueError):
    """A weights file that cannot be read, or whose tensors do not fit the model."""


# ------------------------------------------------------------------------------------- reading
def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` dict from safetensors or a torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"{path}: cannot read weights ({type(exc).__name__}: {_short(exc, 300)}); expected "
            "safetensors or a torch state dict of tensors (.pth/.pt/.bin, loaded with weights_only=True)"
        ) from None
    for _ in range(3):  # nested containers, e.g. {"model": {"teacher": {...}}}
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: not a state dict (got {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path}: the file holds no tensors")
    return state


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from the keys when that makes more keys match ``expected``.

    A prefix is stripped when it raises the number of matching keys, or when every key carries it
    (``module.model.x``: stripping ``module.`` alone matches nothing yet); the result is kept only
    if it matches more keys than the input did.
    """
    original_hits = sum(k in expected for k in state)
    current = state
    for _ in range(4):
        hits = sum(k in expected for k in current)
        best, best_hits = None, hits
        for prefix in PREFIXES:
            stripped = {k.removeprefix(prefix): v for k, v in current.items()}
            new_hits = sum(k in expected for k in stripped)
            if new_hits > best_hits:
                best, best_hits = stripped, new_hits
        if best is None:
            shared = next((p for p in PREFIXES if all(k.startswith(p) for k in current)), None)
            if shared is None:
                break
            best = {k.removeprefix(shared): v for k, v in current.items()}
        current = best
    return current if sum(k in expected for k in current) > original_hits else state


# ---------------------------------------------------------------------- EfficientNet-PyTorch
# lukemelas/EfficientNet-PyTorch (and EfficientNet-Lite ports of it) name modules with a leading
# underscore and number blocks flat (``_blocks.7``); timm groups blocks by stage (``blocks.2.1``)
# and names the convolutions by role. The renames below are the two implementations' own
# definitions side by side (efficientnet_pytorch.model.MBConvBlock vs timm's
# DepthwiseSeparableConv / InvertedResidual).
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block with an expansion conv is timm's InvertedResidual; without, DepthwiseSeparableConv.
_EFFNET_EXPAND = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_NO_EXPAND = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LEAF = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_EFFNET_BLOCK = re.compile(r"_blocks\.(\d+)\.(_[a-z_]+\d?)\." + _LEAF)
_EFFNET_TOP_KEY = re.compile(r"(_[a-z_]+\d?)\." + _LEAF)


def is_efficientnet_pytorch(state: Mapping[str, torch.Tensor]) -> bool:
    """The EfficientNet-PyTorch layout: ``_conv_stem.weight`` and flat ``_blocks.N.*`` keys."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def _stage_layout(model: nn.Module, source: str) -> list[tuple[int, int]]:
    """``(stage, index)`` of every block of a timm EfficientNet, in forward order."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(s, nn.Sequential) for s in blocks):
        raise WeightsError(
            f"{source}: EfficientNet-PyTorch weights need a timm EfficientNet-family model (blocks "
            f"grouped by stage), not {_arch(model)}: e.g. tf_efficientnet_b0, tf_efficientnet_lite0"
        )
    return [(s, i) for s, stage in enumerate(blocks) for i in range(len(stage))]


def efficientnet_pytorch_to_timm(
    state: Mapping[str, torch.Tensor], model: nn.Module, *, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch keys to timm's by the rules above; refuse any key without a rule.

    Flat block ``N`` becomes ``blocks.<stage>.<index>`` of the target model's own stage layout
    (EfficientNet-PyTorch repeats blocks stage by stage in the same order, so the N-th block of one
    is the N-th block of the other); whether a block is an inverted residual is read from the
    checkpoint itself (an ``_expand_conv`` present), and shapes are checked afterwards.
    """
    layout = _stage_layout(model, source)
    matches = [m for k in state if (m := _EFFNET_BLOCK.fullmatch(k))]
    expands = {int(m.group(1)) for m in matches if m.group(2) == "_expand_conv"}
    _warn_padding(model, source)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if block := _EFFNET_BLOCK.fullmatch(key):
            index, module, leaf = int(block.group(1)), block.group(2), block.group(3)
            rules = _EFFNET_EXPAND if index in expands else _EFFNET_NO_EXPAND
            if index >= len(layout):
                raise WeightsError(
                    f"{source}: key {key!r} is block {index}, but the model has {len(layout)} blocks "
                    "(another EfficientNet variant? check --backbone / model.encoder)"
                )
            if module not in rules:
                raise WeightsError(
                    f"{source}: key {key!r} does not map to timm (no rule for {module!r} in a block)"
                )
            stage, position = layout[index]
            new = f"blocks.{stage}.{position}.{rules[module]}.{leaf}"
        elif (top := _EFFNET_TOP_KEY.fullmatch(key)) and top.group(1) in _EFFNET_TOP:
            new = f"{_EFFNET_TOP[top.group(1)]}.{top.group(2)}"
        else:
            raise WeightsError(f"{source}: key {key!r} does not map to timm (EfficientNet-PyTorch rules)")
        out[new] = value
    return out


def _warn_padding(model: nn.Module, source: str) -> None:
    """EfficientNet-PyTorch pads like TensorFlow ("same") with BatchNorm eps 1e-3: timm's ``tf_*``
    variants do the same; the others load the same tensors but compute different outputs."""
    stem = getattr(model, "conv_stem", None)
    if stem is not None and type(stem).__name__ != "Conv2dSame":
        log.warning(
            "%s: EfficientNet-PyTorch weights use TensorFlow 'same' padding and BatchNorm eps 1e-3; "
            "this timm model pads symmetrically, so its outputs differ from the checkpoint's own "
            "architecture. Use the tf_ variant (e.g. tf_efficientnet_lite0, tf_efficientnet_b0).",
            source,
        )


# name → (detector, converter) for layouts that are not timm's own
_Detector = Callable[[Mapping[str, torch.Tensor]], bool]
_CONVERTERS: dict[str, tuple[_Detector, Callable[..., dict[str, torch.Tensor]]]] = {
    "EfficientNet-PyTorch": (is_efficientnet_pytorch, efficientnet_pytorch_to_timm),
}


def timm_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Apply the ``checkpoint_filter_fn`` of the model's timm module (SAM keys, old ViT layouts)."""
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except TypeError:
        return filter_fn(state)


# ------------------------------------------------------------------------------------ fitting
def fit_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    adjust: Callable[[dict[str, torch.Tensor], Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    | None = None,
) -> dict[str, torch.Tensor]:
    """``state`` in ``model``'s key layout, every key and shape checked (raises :class:`WeightsError`).

    ``adjust(state, expected)`` runs after conversion and before the check (segmentation resizes
    SAM's positional tables there). ``model`` may live on the meta device: only names and shapes
    are read.
    """
    expected = model.state_dict()
    state = strip_prefixes(dict(state), set(expected))
    for name, (detect, convert) in _CONVERTERS.items():
        if not any(k in expected for k in state) and detect(state):
            log.info("%s: %s layout, converting keys to timm's", source, name)
            state = convert(state, model, source=source)
            break
    state = timm_filter(state, model)
    if adjust is not None:
        state = adjust(state, expected)
    classifier = _classifier_prefixes(model)
    dropped = [k for k in state if k not in expected and k.startswith(classifier)]
    for key in dropped:
        del state[key]
    if dropped:
        log.info("%s: ignoring %d classifier-head tensors the model does not have", source, len(dropped))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:5])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) (e.g. {'; '.join(mismatched[:3])})")
    if problems:
        raise WeightsError(
            f"{source}: the weights do not fit {_arch(model)}: {'; '.join(problems)}. "
            "Check that the model name (and its options) match the checkpoint."
        )
    return state


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """:func:`fit_state_dict`, then a strict ``load_state_dict``."""
    model.load_state_dict(fit_state_dict(model, state, source=source), strict=True)


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or ("head", "fc")
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."
