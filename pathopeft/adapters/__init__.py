"""Parameter-efficient adapters (LoRA, SALT, SVFit, WaRA, OWLoRA) on one interface, for any model.

    import pathopeft.adapters as pa
    names = pa.attach(model, "salt", targets=r".*blocks\\.\\d+\\.attn\\.(qkv|proj)", ratio=0.1)
    pa.set_active(model, ["default"])          # which named adapters take part in forward
    pa.trainable_parameters(model)             # {"trainable", "total", "share", "per_adapter"}
    pa.merge(model); pa.unmerge(model)
    pa.save(model, "out_dir", name="default")  # adapter_config.json + adapter_model.safetensors
    pa.load(model, "out_dir")                  # returns the adapter's name
    pa.attach(model, "lora", targets="all-linear", modules_to_save=["head"], rank_pattern={"qkv": 16})

Importing this package pulls in torch, pydantic and safetensors only (no transformers/peft).
"""

from pathopeft.adapters import lora, owlora, salt, svfit, wara  # noqa: F401  (registers the methods)
from pathopeft.adapters.base import AdaptedLayer, AdapterError, AdapterModule, LayerGeometry, layer_hash
from pathopeft.adapters.io import CONFIG_NAME, WEIGHTS_NAME, load, read_adapter_config, save
from pathopeft.adapters.lora import LoraConfig
from pathopeft.adapters.model import (
    active_adapters,
    adapted_layers,
    adapter_modules,
    adapter_names,
    attach,
    detach,
    disable_adapters,
    merge,
    merge_and_unload,
    print_trainable_parameters,
    regularization,
    saved_modules,
    set_active,
    set_trainable,
    trainable_parameters,
    unmerge,
)
from pathopeft.adapters.owlora import OwloraConfig
from pathopeft.adapters.registry import (
    AdapterConfig,
    AdapterSpec,
    available_methods,
    get_method,
    make_config,
    register_method,
)
from pathopeft.adapters.salt import SaltConfig
from pathopeft.adapters.saved import SavedModule
from pathopeft.adapters.svfit import SvfitConfig
from pathopeft.adapters.wara import WaraConfig

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "AdaptedLayer",
    "AdapterConfig",
    "AdapterError",
    "AdapterModule",
    "AdapterSpec",
    "LayerGeometry",
    "LoraConfig",
    "OwloraConfig",
    "SaltConfig",
    "SavedModule",
    "SvfitConfig",
    "WaraConfig",
    "active_adapters",
    "adapted_layers",
    "adapter_modules",
    "adapter_names",
    "attach",
    "available_methods",
    "detach",
    "disable_adapters",
    "get_method",
    "layer_hash",
    "load",
    "make_config",
    "merge",
    "merge_and_unload",
    "owlora",
    "print_trainable_parameters",
    "read_adapter_config",
    "register_method",
    "regularization",
    "salt",
    "save",
    "saved_modules",
    "set_active",
    "set_trainable",
    "svfit",
    "trainable_parameters",
    "unmerge",
    "wara",
]
