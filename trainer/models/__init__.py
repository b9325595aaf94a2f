"""Models: timm backbones with MoE layers placed by name.

Public API: :class:`InputSpec`, :class:`MoEModel`, :func:`build_model` (parameter
accounting lives in :mod:`trainer.models.accounting`).

``trainer.config`` imports ``trainer.models.registry`` to validate study YAML, and that
runs this file first. The orchestrator must be able to validate a study without paying
for torch and timm (seconds), so the torch-backed names are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.models.build import MoEModel, build_model

__all__ = ["InputSpec", "MoEModel", "build_model"]


@dataclass(frozen=True)
class InputSpec:
    """What the dataset tells the model.

    Attributes:
        img_size: square image side in pixels.
        in_chans: image channels.
        num_classes: classifier outputs.
    """

    img_size: int
    in_chans: int
    num_classes: int


def __getattr__(name: str) -> Any:
    if name in ("MoEModel", "build_model"):
        return getattr(importlib.import_module("trainer.models.build"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
