"""Step `data`: the datasets and three disjoint, seeded splits.

* exit-train: what the demo backbone and every exit are trained on;
* search: held out from the training images, the only data the configuration search sees;
* test: the official test set, used for the report and the bank's test figures only.

Fashion-MNIST (the demo) is read from the real IDX files of Debian's ``dataset-fashion-mnist``
package, or downloaded through torchvision where that package is absent. User data is any
torchvision ``ImageFolder`` tree with ``train/`` and ``test/`` sub-folders, read with the
backbone's own preprocessing.

Files: ``<root>/data.json`` (DataManifest) and ``<root>/splits.npz`` (``exit_train``,
``search``, ``test``: int64 indices; the first two into the training images, ``test`` into the
test images).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset, Subset, TensorDataset

from dyce.preprocess import FASHION_MNIST, PreprocessSpec

from .layout import OfflineLayout
from .provenance import write_step_manifest

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLITS = ("exit_train", "search", "test")
Split = Literal["exit_train", "search", "test"]


class DataManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: Literal["fashion-mnist", "image-folder"]
    path: str = Field(description="IDX directory, torchvision download root, or ImageFolder root")
    labels: tuple[str, ...]
    seed: int
    sizes: dict[str, int]


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic 0x0000 <type> <ndim>, big-endian sizes, data."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype, ndim = np.dtype(dtypes[raw[2]]), raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        for candidate in (directory / name, directory / "FashionMNIST" / "raw" / name):
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist_arrays(
    directory: str | Path = FASHION_MNIST_DIR, download: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images uint8 (60000, 28, 28), labels), "test": (10000, ...)} from IDX files.

    With ``download``, a directory without the files is filled by torchvision's downloader
    (which stores the same IDX files under ``FashionMNIST/raw``).
    """
    directory = Path(directory)
    stems = {"train": "train", "test": "t10k"}
    if download and _find_idx(directory, "train-images-idx3-ubyte") is None:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(directory), train=train, download=True)
    arrays = {}
    for split, stem in stems.items():
        images = _find_idx(directory, f"{stem}-images-idx3-ubyte")
        labels = _find_idx(directory, f"{stem}-labels-idx1-ubyte")
        if images is None or labels is None:
            raise FileNotFoundError(
                f"Fashion-MNIST IDX files not found in {directory}: install the Debian package "
                "dataset-fashion-mnist or pass --download"
            )
        arrays[split] = (read_idx(images), read_idx(labels).astype(np.int64))
    return arrays


def normalised_tensor(images: np.ndarray, spec: PreprocessSpec = FASHION_MNIST) -> torch.Tensor:
    """uint8 (M, H, W) grey images -> float32 (M, 1, H, W), scaled and normalised like ``spec``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255)
    return x.sub_(spec.mean[0]).div_(spec.std[0])


def make_splits(num_train: int, num_test: int, search_size: int, seed: int) -> dict[str, np.ndarray]:
    if not 0 < search_size < num_train:
        raise ValueError(f"search split of {search_size} does not fit {num_train} training images")
    permutation = np.random.default_rng(seed).permutation(num_train)
    return {
        "exit_train": np.sort(permutation[search_size:]),
        "search": np.sort(permutation[:search_size]),
        "test": np.arange(num_test),
    }


def subsample(splits: dict[str, np.ndarray], sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Keep a seeded random subset of each split (for quick demos and tests)."""
    rng = np.random.default_rng(seed + 1)
    return {
        name: np.sort(rng.choice(idx, size=min(sizes.get(name, len(idx)), len(idx)), replace=False))
        for name, idx in splits.items()
    }


def data_recipe(
    source: str = "fashion-mnist",
    path: str | Path | None = None,
    search_size: int = 10_000,
    seed: int = 0,
    limit: dict[str, int] | None = None,
) -> dict:
    """The settings that decide the splits, as the data step records them."""
    if source == "fashion-mnist":
        path = path or FASHION_MNIST_DIR
    return {
        "source": source,
        "path": None if path is None else str(Path(path)),
        "search_size": search_size,
        "seed": seed,
        "limit": dict(sorted(limit.items())) if limit else None,
    }


def prepare_data(
    layout: OfflineLayout,
    source: Literal["fashion-mnist", "image-folder"] = "fashion-mnist",
    path: str | Path | None = None,
    search_size: int = 10_000,
    seed: int = 0,
    limit: dict[str, int] | None = None,
    download: bool = False,
) -> DataManifest:
    """Fix the splits and write ``data.json`` + ``splits.npz``."""
    if source == "fashion-mnist":
        path = Path(path or FASHION_MNIST_DIR)
        arrays = load_fashion_mnist_arrays(path, download=download)
        num_train, num_test, labels = len(arrays["train"][1]), len(arrays["test"][1]), FASHION_MNIST_LABELS
    else:
        from torchvision.datasets import ImageFolder

        if path is None:
            raise ValueError("an ImageFolder root (with train/ and test/) is required")
        path = Path(path)
        train, test = ImageFolder(str(path / "train")), ImageFolder(str(path / "test"))
        if train.classes != test.classes:
            raise ValueError(f"{path}: train/ and test/ have different class folders")
        num_train, num_test, labels = len(train), len(test), tuple(train.classes)
    splits = make_splits(num_train, num_test, search_size, seed)
    if limit:
        splits = subsample(splits, limit, seed)
    layout.root.mkdir(parents=True, exist_ok=True)
    np.savez(layout.splits, **splits)
    manifest = DataManifest(
        source=source,
        path=str(path),
        labels=labels,
        seed=seed,
        sizes={name: int(len(idx)) for name, idx in splits.items()},
    )
    layout.data_manifest.write_text(manifest.model_dump_json(indent=1))
    write_step_manifest(layout, "data", "data", data_recipe(source, path, search_size, seed, limit), {})
    return manifest


def load_manifest(layout: OfflineLayout) -> DataManifest:
    return DataManifest.model_validate_json(layout.data_manifest.read_text())


def load_split(layout: OfflineLayout, split: Split, preprocess: PreprocessSpec = FASHION_MNIST) -> Dataset:
    """One split as a dataset of (normalised image tensor, label).

    Fashion-MNIST is small enough to be held as one tensor; ImageFolder data is decoded lazily.
    """
    manifest = load_manifest(layout)
    indices = np.load(layout.splits)[split]
    part = "test" if split == "test" else "train"
    if manifest.source == "fashion-mnist":
        images, labels = load_fashion_mnist_arrays(manifest.path)[part]
        return TensorDataset(normalised_tensor(images[indices], preprocess), torch.from_numpy(labels[indices]))
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(Path(manifest.path) / part), transform=preprocess.transform())
    return Subset(folder, indices.tolist())


def split_labels(dataset: Dataset) -> torch.Tensor:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    assert isinstance(dataset, Subset)
    targets = dataset.dataset.targets  # type: ignore[attr-defined]
    return torch.as_tensor([targets[i] for i in dataset.indices])
