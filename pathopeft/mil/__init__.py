"""Multiple-instance learning on feature bags: CoMEL (GDAT + ABMIL pooling + BPPL), ABMIL, TransMIL.

Models: ``create_model(name, in_dim=..., tasks=[...], **options)`` (:mod:`pathopeft.mil.registry`);
training: :func:`pathopeft.mil.train.train` (what ``pathopeft train`` runs) with
:class:`pathopeft.mil.module.MILModule` and :class:`pathopeft.mil.data.MILDataModule`.
"""

from pathopeft.mil.base import MILModel, MILOutput, Task
from pathopeft.mil.registry import create_model, list_models, register_model

__all__ = ["MILModel", "MILOutput", "Task", "create_model", "list_models", "register_model"]
