"""Image-file datasets beyond the basics: Hugging Face datasets on disk, class ids, OOD sets
(ImageNet-A style 200-class subsets scored with restricted logits, ImageNet-V2 style index
folders) and the preflight ``check_data``. Real files in temporary folders, no mocks."""

from __future__ import annotations

import io
import pkgutil
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Subset

from trainer.config import DataConfig, OODSet
from trainer.data import (
    check_data,
    class_ids,
    input_spec,
    load_datasets,
    load_ood_sets,
    restrict_logits,
    train_size,
)
from trainer.models import InputSpec

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


def image(label: int, size: int = 20) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), COLOURS[label % 3], dtype=np.uint8))


def png_bytes(label: int) -> bytes:
    buffer = io.BytesIO()
    image(label).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, classes: list[str], per_class: int = 1, size: int = 8) -> Path:
    """``root/<class>/<i>.png``: tiny images, class folders in the given names."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image(label, size).save(root / name / f"{i}.png")
    return root


def timm_info(name: str) -> list[str]:
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    assert data is not None
    return data.decode().splitlines()


IMAGENET = timm_info("imagenet_synsets.txt")
# timm ships ImageNet-A's 200 WordNet ids and their 1000-way indices: an independent answer key.
IMAGENET_A = timm_info("imagenet_a_synsets.txt")
IMAGENET_A_INDICES = [int(i) for i in timm_info("imagenet_a_indices.txt")]


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``save_to_disk`` DatasetDict: 3 ClassLabel classes, 6 train / 3 validation PIL images."""
    root = tmp_path_factory.mktemp("hf") / "saved"
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}
    )
    splits = {"train": [0, 1, 2, 0, 1, 2], "validation": [2, 1, 0]}
    datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"image": [image(label) for label in labels], "label": labels}, features=features
            )
            for name, labels in splits.items()
        }
    ).save_to_disk(str(root))
    return root


def hf(root: Path, **fields: Any) -> DataConfig:
    return DataConfig(dataset="hf", root=str(root), img_size=16, **{"num_classes": 3, **fields})


def channel_means(item: tuple[torch.Tensor, int]) -> list[float]:
    return item[0].mean(dim=(1, 2)).tolist()


def test_hf_saved_to_disk_loads_as_tensors_and_labels(hf_disk: Path) -> None:
    cfg = hf(hf_disk)
    assert input_spec(cfg) == InputSpec(img_size=16, in_chans=3, num_classes=3)
    assert train_size(cfg) == 6
    train, val = load_datasets(cfg)
    assert (len(train), len(val)) == (6, 3)
    items = [train[i] for i in range(6)]
    assert all(tuple(x.shape) == (3, 16, 16) and isinstance(y, int) for x, y in items)
    assert [y for _, y in items] == [0, 1, 2, 0, 1, 2] and [val[i][1] for i in range(3)] == [2, 1, 0]
    # Red images are class 0: the label travels with its own image.
    red = channel_means(items[0])
    assert red[0] > red[1] and red[0] > red[2]
    assert class_ids(cfg) == ["cat", "dog", "eel"]


def test_hf_takes_the_callers_transforms_and_a_fixed_subset(hf_disk: Path) -> None:
    def size_of(img: Image.Image) -> torch.Tensor:
        return torch.tensor(img.size)

    def constant(img: Image.Image) -> torch.Tensor:
        return torch.zeros(1)

    train, val = load_datasets(hf(hf_disk), train_transform=size_of, eval_transform=constant)
    assert train[0][0].tolist() == [20, 20] and val[0][0].tolist() == [0.0]
    first, again = (load_datasets(hf(hf_disk, train_samples=4))[0] for _ in range(2))
    assert isinstance(first, Subset) and isinstance(again, Subset)
    assert len(first) == 4 and first.indices == again.indices
    assert train_size(hf(hf_disk, train_samples=4)) == 4


def test_hf_mismatches_are_clear_errors(hf_disk: Path) -> None:
    with pytest.raises(ValueError, match=r"num_classes is 5, but .* has 3 classes \(ClassLabel 'label'\)"):
        load_datasets(hf(hf_disk, num_classes=5))
    with pytest.raises(ValueError, match="val_split is 'test', but .* has the splits train, validation"):
        load_datasets(hf(hf_disk, val_split="test"))
    with pytest.raises(ValueError, match="no column 'img' .* its columns are image, label"):
        load_datasets(hf(hf_disk, image_key="img"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_datasets(hf(hf_disk / "missing"))
    assert train_size(hf(hf_disk, train_split="test")) is None


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``load_dataset`` converts a folder into the Hugging Face cache: keep it in the test's tmp."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_hf_parquet_folder_with_plain_bytes_and_int_labels(tmp_path: Path, hf_cache: Path) -> None:
    """Parquet without Hugging Face metadata: images are {bytes, path} structs, labels plain ints."""
    root = tmp_path / "parquet"
    (root / "data").mkdir(parents=True)
    for split, labels in (("train", [0, 1, 2, 2]), ("validation", [1, 0])):
        table = pa.table(
            {
                "jpg": pa.array([{"bytes": png_bytes(y), "path": None} for y in labels]),
                "cls": pa.array(labels, pa.int64()),
            }
        )
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    cfg = hf(root, image_key="jpg", label_key="cls")
    assert train_size(cfg) == 4  # from the parquet footers, before any conversion
    train, val = load_datasets(cfg)
    assert (len(train), len(val)) == (4, 2)
    assert tuple(train[3][0].shape) == (3, 16, 16) and [train[i][1] for i in range(4)] == [0, 1, 2, 2]
    assert hf_cache.is_dir()  # the conversion went to the cache we chose, not ~/.cache
    # Plain ints: the classes are counted by the largest label, and no ClassLabel names them.
    with pytest.raises(ValueError, match=r"num_classes is 4, but .* has labels 0..2"):
        load_datasets(hf(root, image_key="jpg", label_key="cls", num_classes=4))
    with pytest.raises(ValueError, match="set data.class_map"):
        class_ids(cfg)


def test_hf_parquet_written_by_datasets_keeps_its_features(
    hf_disk: Path, tmp_path: Path, hf_cache: Path
) -> None:
    root = tmp_path / "shards"
    for name, split in datasets.load_from_disk(str(hf_disk)).items():
        split.to_parquet(str(root / f"{name}.parquet"))
    cfg = hf(root)
    train, _ = load_datasets(cfg)
    assert [train[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert class_ids(cfg) == ["cat", "dog", "eel"]


# ---------------------------------------------------------------------------------------------
# Class ids


def test_class_ids_follow_the_map_then_the_folders_then_timm(tmp_path: Path) -> None:
    root = tmp_path / "natural"
    for split in ("train", "val"):
        write_folder(root / split, ["c10", "c2", "c1"])
    cfg = DataConfig(dataset="folder", root=str(root), img_size=16, num_classes=3)
    # timm's natural order: c2 before c10, and the training labels follow it.
    assert class_ids(cfg) == ["c1", "c2", "c10"]
    train, _ = load_datasets(cfg)
    assert sorted((Path(path).parent.name, y) for path, y in train.reader.samples) == [
        ("c1", 0),
        ("c10", 2),
        ("c2", 1),
    ]
    # A class map decides the class indices, of the training labels too.
    class_map = tmp_path / "classes.txt"
    class_map.write_text("c10\nc1\nc2\n\n")
    mapped = cfg.model_copy(update={"class_map": str(class_map)})
    assert class_ids(mapped) == ["c10", "c1", "c2"]
    train, val = load_datasets(mapped)
    for split in (train, val):
        assert {(Path(path).parent.name, y) for path, y in split.reader.samples} == {
            ("c10", 0),
            ("c1", 1),
            ("c2", 2),
        }
    for num_classes, first, count in (
        (1000, "n01440764", 1000),
        (21843, "n00004475", 21843),
        (11821, None, 11821),
    ):
        ids = class_ids(DataConfig(dataset="hf", root="/nowhere", num_classes=num_classes))
        assert len(ids) == count == len(set(ids)) and (first is None or ids[0] == first)
    assert class_ids(DataConfig(dataset="hf", root="/nowhere", num_classes=1000)) == IMAGENET


# ---------------------------------------------------------------------------------------------
# OOD sets


@pytest.fixture(scope="module")
def imagenet_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 class folders named by ImageNet-A's WordNet ids, one 8x8 image each."""
    return write_folder(tmp_path_factory.mktemp("ood") / "imagenet-a", IMAGENET_A)


def imagenet_trial(*ood: OODSet, **fields: Any) -> DataConfig:
    """An ImageNet-1k training config whose class ids are timm's synsets (nothing else names them)."""
    return DataConfig(
        dataset="hf", root="/nowhere/imagenet", img_size=16, num_classes=1000, ood=list(ood), **fields
    )


def test_imagenet_a_folders_map_to_their_1000_way_classes_and_restrict_the_logits(imagenet_a: Path) -> None:
    [ood] = load_ood_sets(imagenet_trial(OODSet(kind="imagenet_a", root=str(imagenet_a))))
    assert ood.name == "a"
    expected = dict(zip(IMAGENET_A, IMAGENET_A_INDICES, strict=True))
    samples = ood.dataset.reader.samples
    assert len(samples) == len(ood.dataset) == 200
    for path, target in samples:
        assert target == expected[Path(path).parent.name] == IMAGENET.index(Path(path).parent.name)
    assert ood.class_indices.tolist() == sorted(IMAGENET_A_INDICES)
    image_tensor, label = ood.dataset[0]
    assert tuple(image_tensor.shape) == (3, 16, 16) and label == IMAGENET_A_INDICES[0]

    present = ood.class_indices
    absent = sorted(set(range(1000)) - set(present.tolist()))
    logits = torch.randn(2, 1000)
    # Absent classes score highest; among present classes, 5 are ranked on purpose.
    logits[:, absent[:6]] = 100.0
    best = present[[7, 3, 150, 42, 199]]
    logits[:, best] = torch.tensor([50.0, 40.0, 30.0, 20.0, 10.0])
    assert logits.argmax(dim=1).tolist() == [absent[0]] * 2
    restricted = restrict_logits(logits, present)
    assert restricted.shape == (2, 1000)
    assert restricted.argmax(dim=1).tolist() == [best[0].item()] * 2
    assert restricted.topk(5, dim=1).indices.tolist() == [best.tolist()] * 2
    assert torch.equal(restricted[:, present], logits[:, present])
    assert torch.isneginf(restricted[:, absent]).all()
    targets = best[[0, 4]]
    loss = F.cross_entropy(restricted, targets)
    assert torch.isfinite(loss) and loss < F.cross_entropy(logits, targets)


def test_imagenet_v2_index_folders_map_numerically(tmp_path: Path) -> None:
    # Sorted as strings these are 0, 1, 10, 11, 2, ...: folder "10" must still be class 10.
    root = write_folder(tmp_path / "v2", [str(i) for i in range(12)])
    [ood] = load_ood_sets(imagenet_trial(OODSet(kind="imagenet_v2", root=str(root))))
    assert ood.name == "v2"
    assert {Path(path).parent.name: target for path, target in ood.dataset.reader.samples} == {
        str(i): i for i in range(12)
    }
    assert ood.class_indices.tolist() == list(range(12))
    # Index folders need no class ids: a 12-class model without any works too.
    small = DataConfig(
        dataset="hf", root="/nowhere", num_classes=12, ood=[OODSet(kind="imagenet_v2", root=str(root))]
    )
    assert load_ood_sets(small)[0].class_indices.tolist() == list(range(12))
    (root / "12").mkdir()
    (root / "cat").mkdir()
    small = small.model_copy(update={"ood": [OODSet(kind="imagenet_v2", root=str(root), name="v2_bad")]})
    with pytest.raises(ValueError, match=r"'v2_bad'.* indices 0..11 .* 2 are not: 12, cat"):
        load_ood_sets(small)


def test_an_ood_folder_of_an_unknown_class_is_an_error(imagenet_a: Path, tmp_path: Path) -> None:
    root = write_folder(tmp_path / "r", ["n01440764", "n99999999"])
    cfg = imagenet_trial(OODSet(kind="imagenet_r", root=str(root)))
    with pytest.raises(
        ValueError, match=r"'r': 1 class folders .*\(timm's ImageNet synsets for 1000 classes\): n99999999"
    ):
        load_ood_sets(cfg)
    assert any("n99999999" in problem for problem in check_data(cfg))


# ---------------------------------------------------------------------------------------------
# Preflight


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good folder dataset (3 classes), a class map, and an OOD set."""
    root = tmp_path_factory.mktemp("tree")
    for split in ("train", "val"):
        write_folder(root / "data" / split, ["a", "b", "c"])
    write_folder(root / "ood", ["c", "a"])
    (root / "classes.txt").write_text("a\nb\nc\n")
    (root / "short.txt").write_text("a\nb\n")
    return root


def folder(tree: Path, **fields: Any) -> DataConfig:
    values: dict[str, Any] = {"root": str(tree / "data"), "num_classes": 3, "img_size": 16, **fields}
    return DataConfig.model_validate({"dataset": "folder", **values})


def test_a_good_tree_has_no_problems_and_mnist_never_has(tree: Path) -> None:
    cfg = folder(tree, class_map=str(tree / "classes.txt"), ood=[{"root": str(tree / "ood"), "name": "mine"}])
    assert check_data(cfg) == []
    assert check_data(DataConfig()) == []
    [ood] = load_ood_sets(cfg)
    assert ood.name == "mine" and ood.class_indices.tolist() == [0, 2]


@pytest.mark.parametrize(
    ("fields", "problem", "error"),
    [
        ({"root": "{tree}/nowhere"}, r"nowhere' \(here .*\) is not a folder", FileNotFoundError),
        ({"root": "{tree}/data/train"}, "has no train/ folder", FileNotFoundError),
        ({"num_classes": 4}, r"num_classes is 4, but .*train has 3 class folders", ValueError),
        (
            {"class_map": "{tree}/short.txt"},
            r"has 2 class ids \(non-empty lines\), but data.num_classes is 3",
            ValueError,
        ),
        ({"class_map": "{tree}/none.txt"}, r"none.txt' \(here .*\) is not a file", FileNotFoundError),
    ],
)
def test_problems_are_reported_and_loading_raises(
    tree: Path, fields: dict[str, Any], problem: str, error: type[Exception]
) -> None:
    cfg = folder(
        tree,
        **{
            key: value.format(tree=tree) if isinstance(value, str) else value for key, value in fields.items()
        },
    )
    problems = check_data(cfg)
    assert len(problems) == 1 and re.search(problem, problems[0]), problems
    with pytest.raises(error, match=problem):
        load_datasets(cfg)


def test_a_missing_val_split_and_an_empty_class_folder(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", ["a", "b"])
    cfg = DataConfig(dataset="folder", root=str(tmp_path), num_classes=2, img_size=16)
    [problem] = check_data(cfg)
    assert "no val/ (or validation/) folder" in problem
    write_folder(tmp_path / "val", ["a"])
    (tmp_path / "val" / "b").mkdir()  # a class folder, but no images: only loading can tell
    assert check_data(cfg) == []
    with pytest.raises(ValueError, match=r"val has no images .* of 1 classes: b"):
        load_datasets(cfg)


def test_ood_problems_are_reported(tree: Path) -> None:
    cfg = folder(
        tree,
        ood=[
            {"root": str(tree / "missing_ood"), "name": "gone"},
            {"root": str(tree / "data"), "name": "top"},  # one level too high: "train" is no class
        ],
    )
    problems = check_data(cfg)
    assert len(problems) == 2
    assert "'gone': root" in problems[0] and "is not a folder" in problems[0]
    assert "'top'" in problems[1] and "train, val" in problems[1]
    with pytest.raises(FileNotFoundError, match="'gone'"):
        load_ood_sets(cfg)


def test_hf_problems_are_reported(hf_disk: Path, tmp_path: Path) -> None:
    assert check_data(hf(hf_disk)) == []
    [missing_split] = check_data(hf(hf_disk, train_split="all"))
    assert "train_split is 'all', but" in missing_split and "train, validation" in missing_split
    [classes] = check_data(hf(hf_disk, num_classes=4))
    assert "num_classes is 4" in classes
    [gone] = check_data(hf(tmp_path / "nowhere"))
    assert "is not a folder" in gone
    (tmp_path / "unsaved").mkdir()
    assert check_data(hf(tmp_path / "unsaved")) == []  # load_dataset folders: only checked to exist


def test_paths_with_an_unset_variable_are_skipped(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNSET_VAR", raising=False)
    elsewhere = "$UNSET_VAR/imagenet"
    cfg = folder(
        tree,
        root=elsewhere,
        ood=[{"root": str(tree / "ood"), "name": "here"}, {"root": "${UNSET_VAR}/a", "name": "there"}],
    )
    assert check_data(cfg) == []  # the OOD folders need the training classes, which live elsewhere
    assert check_data(folder(tree, class_map="$UNSET_VAR/classes.txt")) == []
    assert check_data(hf(Path(elsewhere))) == []
    assert train_size(folder(tree, root=elsewhere)) is None
    with pytest.raises(FileNotFoundError, match=r"names \$UNSET_VAR, which is not set on this machine"):
        load_datasets(cfg)
    # With the variable set, the same study file checks (and loads) here.
    monkeypatch.setenv("UNSET_VAR", str(tree))
    assert check_data(folder(tree, root="$UNSET_VAR/data")) == []
