"""Data sets as in-memory uint8 tensors (N, 3, H, W) with int64 labels, from ``load_splits(name, root)``.

* ``cifar10``: torchvision's ``cifar-10-batches-py`` in ``root``; else an ImageFolder tree (``train/<class>/<image>``,
  ``test/`` or ``val/``) at ``root`` or one folder down, then a ``.tar.gz``/``.tgz``/``.tar`` of one in ``root`` (read,
  never extracted), the first by name; else a download. ``cifar100``, ``stl10``: torchvision's files, else a download.
* ``folder``: the folder or archive at ``root``, labelled (an ImageFolder tree) or not, images of any size; see
  ``simclr_lib.images`` for how folders are read, resized and cached."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from .config import DATASETS
from .errors import DataNotFoundError, UserError
from .images import ImageData, ImageFiles, balanced_indices, balanced_subset, load_tree, one_line, resize_images

__all__ = ["DatasetSplits", "ImageData", "ImageFiles", "balanced_indices", "balanced_subset", "channel_stats",
           "load_splits", "resize_images"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the training images, the values used throughout the SimCLR literature.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


@dataclass
class DatasetSplits:
    """The three splits a SimCLR run needs, with the normalisation statistics of the data set."""

    name: str
    pretrain: ImageData | ImageFiles  # contrastive pretraining images (labels unused; STL-10 adds unlabeled)
    train: ImageData  # labelled training split: kNN bank and linear-probe training data
    test: ImageData  # labelled test split: every reported accuracy
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # where the data came from, for logs and run summaries

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return self.train.image_size

    @property
    def num_classes(self) -> int:
        """Number of labelled classes."""
        return len(self.train.classes)

    @property
    def labelled(self) -> bool:
        """Whether there are labelled images to evaluate on (an unlabelled folder has none)."""
        return len(self.test) > 0


def load_splits(name: str = "cifar10", root: str | Path = "data", image_size: int | None = None,
                download: bool = True, skip_bad_images: bool = False, stream: bool = False) -> DatasetSplits:
    """Load a data set's pretrain/train/test splits into memory (sources: see the module docstring); `stream`: a
    folder's pretraining images stay files, decoded when a batch is read (ImageFiles)."""
    key, root = name.lower().replace("-", "").replace("_", ""), Path(root)  # accept "CIFAR-10", "stl_10"...
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    pickles = root / "cifar-10-batches-py"
    if key == "cifar10" and not pickles.is_dir():  # an ImageFolder tree or archive, else the pickles below
        entries = sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else [root]
        trees = [d for d in [root, *entries] if (d / "train").is_dir()]  # without test/ or val/: skipped below
        for tree in trees + [p for p in entries if p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES)]:
            try:
                _, train, test, note = load_tree(tree, image_size, skip_bad_images, need_test=True)
            except DataNotFoundError:
                continue  # not an ImageFolder tree, e.g. torchvision's own cifar-10-python.tar.gz
            if len(train.classes) != 10:
                raise UserError(f"{tree} was taken for CIFAR-10 but has {len(train.classes)} classes, not 10: "
                                "move it out of the data root or load it with --dataset folder")
            return DatasetSplits("cifar10", train, train, test, CIFAR10_MEAN, CIFAR10_STD, f"{tree} ({note})")
    if key == "cifar10":
        source = _find_or_download(root, pickles.name, "CIFAR-10", download, train=True)
        train, test = _read_cifar(pickles, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta")
        splits = DatasetSplits("cifar10", train, train, test, CIFAR10_MEAN, CIFAR10_STD, source)
    elif key == "cifar100":
        source = _find_or_download(root, "cifar-100-python", "CIFAR-100", download, train=True)
        train, test = _read_cifar(root / "cifar-100-python", ["train"], ["test"], "meta", "fine_")
        splits = DatasetSplits("cifar100", train, train, test, CIFAR100_MEAN, CIFAR100_STD, source)
    elif key == "stl10":
        splits = _load_stl10(root, download)
    else:
        if not root.exists():  # (a file that is no tar archive is reported by the archive reader)
            raise UserError(f"{root} does not exist: expected a folder of images or of train/<class>/<image>")
        pretrain, train, test, note = load_tree(root, image_size, skip_bad_images, stream)
        sample = torch.randperm(len(pretrain), generator=torch.Generator().manual_seed(0))[:10_000].sort().values
        stats = channel_stats(pretrain.subset(sample).images)
        return DatasetSplits("folder", pretrain, train, test, *stats, f"{root} ({note})")
    if image_size is None or image_size == splits.image_size:
        return splits
    old, source = splits, f"{splits.source}, resized to {image_size}x{image_size}"
    pretrain, test = (ImageData(resize_images(d.images, image_size), d.labels, d.classes) for d in (old.pretrain,
                                                                                                 old.test))
    view = ImageData(pretrain.images[: len(old.train)], old.train.labels, old.train.classes)  # STL-10's train
    train = pretrain if old.train is old.pretrain else view  # train is pretrain, or a view of its start
    return DatasetSplits(old.name, pretrain, train, test, old.mean, old.std, source)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale."""
    total, total_sq = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):  # chunked: a float copy of a whole data set can be huge
        x = images[i : i + chunk].double() / 255
        total, total_sq = total + x.sum(dim=(0, 2, 3)), total_sq + (x * x).sum(dim=(0, 2, 3))
    mean = total / (images.shape[0] * images.shape[2] * images.shape[3])
    std = (total_sq / (images.shape[0] * images.shape[2] * images.shape[3]) - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _find_or_download(root: Path, folder: str, title: str, download: bool, **kwargs: object) -> str:
    """Where ``root / folder`` comes from; downloaded by torchvision if missing, else a one-line error."""
    if (root / folder).is_dir():
        return f"{root / folder} (torchvision files)"
    note = " (download is disabled)"
    if download:
        try:
            getattr(torchvision.datasets, title.replace("-", ""))(str(root), download=True, **kwargs)
            return f"torchvision download into {root}"
        except Exception as exc:  # no network, disk full, bad checksum...: all reported the same way
            note = f" (download failed: {one_line(exc)})"
    other = "an ImageFolder tree (train/, test/) or .tar.gz of one" if title == "CIFAR-10" else "use --dataset folder"
    raise DataNotFoundError(f"{title} not found under {os.path.join(root, '')}: put torchvision's {folder} there, "
                            f"or {other}, or enable download with internet access{note}")


def _read_cifar(folder: Path, train: list[str], test: list[str], meta: str, prefix: str = "") -> tuple[ImageData, ...]:
    """CIFAR-10 (``prefix`` "") or CIFAR-100 ("fine_") from torchvision's copy of the Python 2 pickles."""
    batches = {}
    for name in [*train, *test, meta]:
        try:  # latin1 turns the Python 2 byte-string keys into str
            batches[name] = pickle.loads((folder / name).read_bytes(), encoding="latin1")
        except Exception as exc:  # missing, truncated or not a pickle: all mean a broken copy
            raise UserError(f"cannot read {folder / name} ({one_line(exc)}): the {folder.name} folder is "
                            "incomplete or corrupt; delete it and provide the data again") from exc
    classes, splits = list(batches[meta][f"{prefix}label_names"]), []
    for names in (train, test):  # each row is one image: its R, G and B planes
        pixels = np.concatenate([np.asarray(batches[n]["data"], dtype=np.uint8) for n in names])
        labels = np.concatenate([np.asarray(batches[n][f"{prefix}labels"], dtype=np.int64) for n in names])
        splits.append(ImageData(torch.from_numpy(pixels.reshape(-1, 3, 32, 32)), torch.from_numpy(labels), classes))
    return splits[0], splits[1]


def _load_stl10(root: Path, download: bool) -> DatasetSplits:
    source, folder = _find_or_download(root, "stl10_binary", "STL-10", download, split="train"), root / "stl10_binary"
    try:
        classes = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines() if line.strip()]
        train_y, test_y = (torch.from_numpy(np.fromfile(folder / f"{s}_y.bin", np.uint8).astype(np.int64) - 1)
                           for s in ("train", "test"))  # stored as 1..10
        train_x, unlabeled_x, test_x = (np.memmap(folder / f"{s}_X.bin", np.uint8, "r").reshape(-1, 3, 96, 96)
                                        .transpose(0, 1, 3, 2) for s in ("train", "unlabeled", "test"))  # column-major
    except (OSError, ValueError) as exc:  # a file missing, empty or truncated
        raise UserError(f"{folder} is incomplete ({one_line(exc)}): delete it and provide the data again") from exc
    pretrain = ImageData(torch.from_numpy(np.concatenate([train_x, unlabeled_x])),  # one 2.9 GB copy, no more
                         torch.cat([train_y, torch.full((len(unlabeled_x),), -1)]), classes)
    train = ImageData(pretrain.images[: len(train_y)], train_y, classes)  # a view: shares memory
    test = ImageData(torch.from_numpy(np.ascontiguousarray(test_x)), test_y, classes)
    return DatasetSplits("stl10", pretrain, train, test, STL10_MEAN, STL10_STD, source)
