"""Data sets as in-memory uint8 tensors (N, 3, H, W) with int64 labels.

Everything is loaded once into memory: CIFAR-10 is 184 MB as uint8, and keeping the raw pixels on the
host (or the GPU) lets the augmentation module work on whole batches instead of one PIL image at a time.

Supported data sets (``load_splits(name, root)``):

* ``cifar10`` (default). Looked for under ``root`` in this order:
  1. torchvision's ``cifar-10-batches-py`` folder (the pickled python version);
  2. an ImageFolder tree ``<dir>/{train,test}/<class>/<image>`` at ``root`` or one level down, or a
     ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of one directly in ``root`` (read in memory, not extracted);
  3. a torchvision download into ``root`` (when ``download=True``).
* ``cifar100``: torchvision's ``cifar-100-python`` folder, else a download.
* ``stl10``: torchvision's ``stl10_binary`` folder, else a download. Pretraining uses train + unlabeled.
* ``folder``: any ImageFolder tree (``root/<split>/<class>/<image>``) or an archive of one.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .errors import DataNotFoundError, UserError

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # later torchvision releases drop their image decoders: PIL then does all the work
    decode_jpeg = None

DATASETS = ("cifar10", "cifar100", "stl10", "folder")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Per-channel statistics of the training images, the values used throughout the SimCLR literature.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
SPLIT_NAMES = ("train", "test", "val")

# "cifar10", "cifar-10", "CIFAR_10" but not "cifar100"; used to prefer the right candidate folder.
_CIFAR10_NAME = re.compile(r"cifar[-_]?10(?!\d)", re.IGNORECASE)
# Folders or archives that clearly hold another data set are never taken for CIFAR-10.
_OTHER_DATASET_NAME = re.compile(r"cifar[-_]?100|stl[-_]?10", re.IGNORECASE)

_JPEG_MAGIC = b"\xff\xd8\xff"
_DECODE_CHUNK = 4096  # images per decoding task: big enough to amortise overhead, small enough to retry


# --------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    """Images as a uint8 tensor (N, 3, H, W) with int64 labels (-1 marks an unlabelled image)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        # Catch shape/dtype mistakes here, where they are made, rather than deep inside training.
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        self.images = self.images.contiguous()
        self.classes = list(self.classes)

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return self.images.shape[-1]

    def subset(self, indices: torch.Tensor) -> ImageData:
        """A new ImageData holding the images at ``indices`` (integer indices or a boolean mask)."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        indices = indices.long()
        return ImageData(self.images[indices].contiguous(), self.labels[indices].clone(), self.classes)


@dataclass
class DatasetSplits:
    """The three splits a SimCLR run needs, with the normalisation statistics of the data set."""

    name: str
    pretrain: ImageData  # images for contrastive pretraining (labels unused; STL-10 adds unlabeled)
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


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def load_splits(
    name: str = "cifar10",
    root: str | Path = "data",
    image_size: int | None = None,
    download: bool = True,
    skip_bad_images: bool = False,
) -> DatasetSplits:
    """Load a data set's pretrain/train/test splits into memory (see the module docstring for sources)."""
    key = name.lower().replace("-", "").replace("_", "")  # accept "CIFAR-10", "stl_10", ...
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    root = Path(root)
    if key == "cifar10":
        splits = _load_cifar10(root, image_size, download, skip_bad_images)
    elif key == "cifar100":
        splits = _load_cifar100(root, download)
    elif key == "stl10":
        splits = _load_stl10(root, download)
    else:
        return _load_folder_splits(root, image_size, skip_bad_images)
    if image_size is not None and image_size != splits.image_size:
        splits = _resize_splits(splits, image_size)
    return splits


def load_image_folder(
    path: str | Path,
    split: str,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    classes: list[str] | None = None,
) -> ImageData:
    """Load one split (e.g. "train") of an ImageFolder tree or archive as RGB; "test" falls back to "val"."""
    # Images are resized so the shorter side is image_size, then centre-cropped to a square; without
    # image_size they must all share one square size. `classes` fixes the label order (default: the
    # split's sorted class folder names), so a test split can reuse the train split's numbering.
    tree = _open_tree(Path(path))
    data, bad = _load_tree_split(tree, split, image_size, image_size is None, skip_bad_images, classes)
    _warn_skipped(tree, bad)
    return data


def balanced_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of exactly ``n`` items, as equal per class as possible, drawn at random by ``seed``."""
    total = labels.shape[0]
    if not 1 <= n <= total:
        raise UserError(f"cannot take a subset of {n} images from a data set of {total}: use 1..{total}")
    generator = torch.Generator().manual_seed(seed)
    if (labels < 0).any():  # unlabelled images (STL-10's pretraining set): class balance is unknown
        return torch.randperm(total, generator=generator)[:n].sort().values

    classes, counts = labels.unique(return_counts=True)
    quotas = _class_quotas(counts.tolist(), n)
    chosen = []
    for cls, quota in zip(classes.tolist(), quotas):
        members = (labels == cls).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:quota]])
    return torch.cat(chosen).sort().values


def balanced_subset(data: ImageData, n: int, seed: int = 0) -> ImageData:
    """Exactly ``n`` images of ``data``, class-balanced and seeded (uniform if unlabelled): --train-subset."""
    return data.subset(balanced_indices(data.labels, n, seed))


def cifar10_candidates(root: str | Path) -> list[Path]:
    """Places under ``root`` that may hold CIFAR-10, in the order they are tried (cheap checks only)."""
    root = Path(root)
    if root.is_file() and _is_archive(root):  # --data-root pointing straight at an archive
        return [root]
    if not root.is_dir():
        return []
    candidates: list[Path] = []
    if (root / "cifar-10-batches-py").is_dir():
        candidates.append(root / "cifar-10-batches-py")
    if _looks_like_tree_dir(root):
        candidates.append(root)
    others = [
        entry
        for entry in sorted(root.iterdir())
        if not entry.name.startswith(".")
        and not _OTHER_DATASET_NAME.search(entry.name)
        and ((entry.is_dir() and _looks_like_tree_dir(entry)) or (entry.is_file() and _is_archive(entry)))
    ]
    # Deterministic preference: CIFAR-10 names first, then extracted folders before archives, then by name.
    others.sort(key=lambda p: (not _CIFAR10_NAME.search(p.name), p.is_file(), p.name))
    return candidates + others


# --------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's pickled python version)
# --------------------------------------------------------------------------------------------------


def _load_cifar10(root: Path, image_size: int | None, download: bool, skip_bad: bool) -> DatasetSplits:
    def splits(train: ImageData, test: ImageData, source: str) -> DatasetSplits:
        return DatasetSplits("cifar10", train, train, test, CIFAR10_MEAN, CIFAR10_STD, source)

    for candidate in cifar10_candidates(root):
        if candidate.name == "cifar-10-batches-py":
            train, test = _read_cifar_pickles(candidate, "cifar10")
            return splits(train, test, f"{candidate} (torchvision pickles)")
        tree = _scan_tree(candidate)
        if tree is None or "train" not in tree.splits or _test_split_name(tree) is None:
            continue  # e.g. torchvision's own cifar-10-python.tar.gz: not an ImageFolder archive
        train, test, skipped = _load_tree_train_test(tree, image_size, skip_bad)
        if len(train.classes) != 10:
            raise UserError(
                f"{candidate} was taken for CIFAR-10 but has {len(train.classes)} classes, not 10: "
                "move it out of the data root or load it with --dataset folder"
            )
        return splits(train, test, f"{candidate} (ImageFolder{_skipped_note(skipped)})")

    failure = _torchvision_download("CIFAR10", root, train=True) if download else None
    if download and failure is None:
        train, test = _read_cifar_pickles(root / "cifar-10-batches-py", "cifar10")
        return splits(train, test, f"torchvision download into {root}")
    raise DataNotFoundError(
        f"CIFAR-10 not found under {_show_dir(root)}: put torchvision's cifar-10-batches-py there, "
        "or an ImageFolder tree or .tar.gz of one "
        f"(e.g. cp ../shared/data/cifar10-jpeg.tar.gz {_show_dir(root)}), "
        f"or run with download enabled and internet access{_download_note(download, failure)}"
    )


def _load_cifar100(root: Path, download: bool) -> DatasetSplits:
    folder = root / "cifar-100-python"
    source = f"{folder} (torchvision pickles)"
    if not folder.is_dir():
        failure = _torchvision_download("CIFAR100", root, train=True) if download else None
        if not download or failure is not None:
            raise DataNotFoundError(
                f"CIFAR-100 not found under {_show_dir(root)}: put torchvision's cifar-100-python there, "
                "or load an ImageFolder copy with --dataset folder, "
                f"or run with download enabled and internet access{_download_note(download, failure)}"
            )
        source = f"torchvision download into {root}"
    train, test = _read_cifar_pickles(folder, "cifar100")
    return DatasetSplits("cifar100", train, train, test, CIFAR100_MEAN, CIFAR100_STD, source)


def _read_cifar_pickles(folder: Path, kind: str) -> tuple[ImageData, ImageData]:
    """Read torchvision's pickled CIFAR-10/100 files (the format of the original python release)."""
    if kind == "cifar10":
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta_file, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        train_files, test_files = ["train"], ["test"]
        meta_file, names_key, labels_key = "meta", "fine_label_names", "fine_labels"

    def unpickle(name: str) -> dict:
        path = folder / name
        try:
            with open(path, "rb") as f:
                # The files are Python 2 pickles; latin1 turns their byte-string keys into str.
                return pickle.load(f, encoding="latin1")
        except Exception as exc:  # missing, truncated or not a pickle: all mean a broken copy
            raise UserError(
                f"cannot read {path} ({_one_line(exc)}): the {folder.name} folder is incomplete or corrupt; "
                "delete it and provide the data again"
            ) from exc

    def read(names: list[str]) -> ImageData:
        batches = [unpickle(name) for name in names]
        pixels = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for b in batches])
        # Each row is 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
        images = torch.from_numpy(pixels.reshape(-1, 3, 32, 32).copy())
        return ImageData(images, torch.from_numpy(labels), classes)

    classes = list(unpickle(meta_file)[names_key])
    return read(train_files), read(test_files)


# --------------------------------------------------------------------------------------------------
# STL-10 (torchvision's stl10_binary)
# --------------------------------------------------------------------------------------------------


def _load_stl10(root: Path, download: bool) -> DatasetSplits:
    folder = root / "stl10_binary"
    source = f"{folder} (torchvision binary)"
    if not folder.is_dir():
        failure = _torchvision_download("STL10", root, split="train") if download else None
        if not download or failure is not None:
            raise DataNotFoundError(
                f"STL-10 not found under {_show_dir(root)}: put torchvision's stl10_binary there, "
                "or load an ImageFolder copy with --dataset folder, "
                f"or run with download enabled and internet access{_download_note(download, failure)}"
            )
        source = f"torchvision download into {root}"

    classes_file = folder / "class_names.txt"
    if not classes_file.is_file():
        raise UserError(f"{classes_file} is missing: the stl10_binary folder is incomplete")
    classes = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    train_labels = _read_stl_labels(folder / "train_y.bin")
    test_labels = _read_stl_labels(folder / "test_y.bin")
    n_train, n_test = len(train_labels), len(test_labels)
    image_bytes = 3 * 96 * 96
    if (folder / "train_X.bin").stat().st_size != n_train * image_bytes or (
        (folder / "test_X.bin").stat().st_size != n_test * image_bytes
    ):
        raise UserError(f"{folder}: image and label files disagree in length; the folder is corrupt")
    # Read train + unlabeled straight into one tensor: the pretraining set is ~2.9 GB, so no extra copy.
    pretrain_images = _read_stl_images([folder / "train_X.bin", folder / "unlabeled_X.bin"])
    unlabelled = torch.full((len(pretrain_images) - n_train,), -1, dtype=torch.int64)
    pretrain = ImageData(pretrain_images, torch.cat([train_labels, unlabelled]), classes)
    train = ImageData(pretrain_images[:n_train], train_labels, classes)  # a view: shares memory
    test = ImageData(_read_stl_images([folder / "test_X.bin"]), test_labels, classes)
    return DatasetSplits("stl10", pretrain, train, test, STL10_MEAN, STL10_STD, source)


def _read_stl_labels(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise UserError(f"{path} is missing: the stl10_binary folder is incomplete")
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1)  # stored as 1..10


def _read_stl_images(paths: list[Path]) -> torch.Tensor:
    image_bytes = 3 * 96 * 96
    for path in paths:
        if not path.is_file() or path.stat().st_size % image_bytes:
            raise UserError(f"{path} is missing or truncated: the stl10_binary folder is incomplete")
    counts = [path.stat().st_size // image_bytes for path in paths]
    out = torch.empty((sum(counts), 3, 96, 96), dtype=torch.uint8)
    start = 0
    for path, count in zip(paths, counts):
        with open(path, "rb") as f:
            for first in range(0, count, 5000):  # chunked so the temporary buffer stays small
                n = min(5000, count - first)
                chunk = np.fromfile(f, dtype=np.uint8, count=n * image_bytes).reshape(n, 3, 96, 96)
                # The binary stores each channel column-major (MATLAB order), hence the transpose.
                out[start + first : start + first + n] = torch.from_numpy(chunk).transpose(2, 3)
        start += count
    return out


# --------------------------------------------------------------------------------------------------
# ImageFolder trees and archives
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageFile:
    """One image file, either on disk (``path``) or already in memory from an archive (``data``)."""

    name: str  # shown in error messages
    path: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


@dataclass
class _Tree:
    """An ImageFolder tree: split name -> class name -> image files (sorted)."""

    location: str
    splits: dict[str, dict[str, list[_ImageFile]]]
    class_folders: dict[tuple[str, str], str]  # (split, class) -> folder name for messages


def _load_folder_splits(root: Path, image_size: int | None, skip_bad: bool) -> DatasetSplits:
    tree = _open_tree(root)
    train, test, skipped = _load_tree_train_test(tree, image_size, skip_bad)
    mean, std = channel_stats(train.images)
    source = f"{root} (ImageFolder{_skipped_note(skipped)})"
    return DatasetSplits("folder", train, train, test, mean, std, source)


def _load_tree_train_test(
    tree: _Tree, image_size: int | None, skip_bad: bool
) -> tuple[ImageData, ImageData, int]:
    """Load train and test (or val) of a tree with one class list and one image size; count skipped files."""
    test_split = _test_split_name(tree)
    if test_split is None:
        raise UserError(
            f"no test/ or val/ split in {tree.location}: expected {tree.location}/test/<class>/<image>"
        )
    strict = image_size is None
    train, bad_train = _load_tree_split(tree, "train", image_size, strict, skip_bad, None)
    # Test images come out the size of train's; without --image-size they must already have it.
    test, bad_test = _load_tree_split(tree, test_split, train.image_size, strict, skip_bad, train.classes)
    _warn_skipped(tree, bad_train + bad_test)
    return train, test, len(bad_train) + len(bad_test)


def _load_tree_split(
    tree: _Tree,
    split: str,
    image_size: int | None,
    strict_size: bool,
    skip_bad_images: bool,
    classes: list[str] | None,
) -> tuple[ImageData, list[str]]:
    """Decode one split of a tree; return it with the names of the unreadable files that were skipped."""
    if split == "test" and "test" not in tree.splits and "val" in tree.splits:
        split = "val"
    if split not in tree.splits:
        raise UserError(
            f"no {split}/ split in {tree.location}: expected {tree.location}/{split}/<class>/<image>"
        )
    by_class = tree.splits[split]
    for cls, files in by_class.items():
        if not files:
            raise UserError(f"class folder {tree.class_folders[(split, cls)]} contains no images")
    if classes is None:
        classes = sorted(by_class)
        if not classes:
            raise UserError(f"no images in {tree.location}/{split}: expected {split}/<class>/<image> files")
        if len(classes) == 1:
            raise UserError(
                f"only one class folder ({classes[0]}) in {tree.location}/{split}: need at least two classes"
            )
    unknown = sorted(set(by_class) - set(classes))
    if unknown:
        folder = tree.class_folders[(split, unknown[0])]
        raise UserError(f"class folder {folder} is not a class of the train split")

    label_of = {cls: i for i, cls in enumerate(classes)}
    files = [f for cls in sorted(by_class) for f in by_class[cls]]
    label_list = [label_of[cls] for cls in sorted(by_class) for _ in by_class[cls]]
    labels = torch.tensor(label_list, dtype=torch.int64)
    images, kept, bad = _decode_images(files, image_size, strict_size, skip_bad_images)
    if not kept:
        raise UserError(f"no readable images in {tree.location}/{split}")
    return ImageData(images, labels[torch.tensor(kept, dtype=torch.int64)], classes), bad


def _warn_skipped(tree: _Tree, bad: list[str]) -> None:
    if bad:
        message = f"skipped {len(bad)} unreadable image(s) in {tree.location}, e.g. {bad[0]}"
        warnings.warn(message, stacklevel=3)


def _open_tree(path: Path) -> _Tree:
    """Scan an ImageFolder directory or archive, or raise a UserError saying what is wrong with it."""
    if not path.exists():
        raise UserError(f"{path} does not exist: expected an ImageFolder tree <root>/train/<class>/<image>")
    if path.is_file() and not _is_archive(path):
        raise UserError(f"{path} is a file but not a .tar/.tar.gz/.tgz archive of an ImageFolder tree")
    tree = _scan_tree(path)
    if tree is None or "train" not in tree.splits:
        hint = ""
        if path.is_dir():
            inner = [d.name for d in sorted(path.iterdir()) if d.is_dir() and (d / "train").is_dir()]
            if inner:
                hint = f" (found {path / inner[0]}/train: use that folder as the root)"
        raise UserError(
            f"no train/ split in {path}: expected {path}/train/<class>/<image> (and test/ or val/){hint}"
        )
    return tree


def _scan_tree(path: Path) -> _Tree | None:
    """List an ImageFolder directory or archive; None if it is not laid out as one."""
    return _scan_archive(path) if path.is_file() else _scan_dir(path)


def _scan_dir(root: Path) -> _Tree | None:
    if not (root / "train").is_dir():
        return None
    tree = _Tree(str(root), {}, {})
    for split in SPLIT_NAMES:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        tree.splits[split] = {}
        for class_dir in sorted(split_dir.iterdir()):
            if not class_dir.is_dir() or _is_hidden(class_dir.name):
                continue
            files = []
            for folder, subdirs, names in os.walk(class_dir):
                subdirs[:] = sorted(d for d in subdirs if not _is_hidden(d))  # skips .ipynb_checkpoints
                files += [Path(folder) / n for n in names if _is_image_name(n)]
            tree.splits[split][class_dir.name] = [_ImageFile(str(p), path=p) for p in sorted(files)]
            tree.class_folders[(split, class_dir.name)] = str(class_dir)
    return tree


def _scan_archive(archive: Path) -> _Tree | None:
    """Read every image of a tar archive into memory; None if it holds no <split>/<class>/ layout."""
    files: dict[tuple[str, ...], bytes] = {}
    dirs: list[tuple[str, ...]] = []
    seen_split = False
    try:
        # Streaming mode ("r|*") reads the archive once, front to back, whatever its compression.
        with tarfile.open(archive, mode="r|*") as tar:
            for count, member in enumerate(tar):
                parts = tuple([p for p in member.name.split("/") if p and p != "."])  # "./train/x" too
                if not parts or any([_is_hidden(p) for p in parts]):
                    continue
                if not seen_split:
                    seen_split = any([p in SPLIT_NAMES for p in parts[:2]])
                    if count >= 1000 and not seen_split:
                        return None  # an unrelated archive (e.g. torchvision's own download): stop early
                if member.isdir():
                    dirs.append(parts)
                elif member.isfile() and _is_image_name(parts[-1]):
                    files[parts] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UserError(f"cannot read archive {archive}: {_one_line(exc)}") from exc

    # The tree starts at the top ("train/<class>/...") or in one top-level folder ("cifar10-jpeg/train/...").
    starts = {parts[:i] for parts in files for i in (0, 1) if len(parts) > i + 2 and parts[i] == "train"}
    if not starts:
        return None
    if len(starts) > 1 and () not in starts:
        names = ", ".join(f"{p[0]}/" for p in sorted(starts))
        raise UserError(f"archive {archive} holds several ImageFolder trees ({names}): keep only one")
    prefix = () if () in starts else starts.pop()
    depth = len(prefix)

    tree = _Tree(str(archive), {}, {})
    for parts in sorted(dirs):  # directory entries reveal empty class folders
        if len(parts) == depth + 2 and parts[:depth] == prefix and parts[depth] in SPLIT_NAMES:
            split, cls = parts[depth:]
            tree.splits.setdefault(split, {}).setdefault(cls, [])
            tree.class_folders[(split, cls)] = f"{archive}:{'/'.join(parts)}"
    for parts in sorted(files):
        if len(parts) >= depth + 3 and parts[:depth] == prefix and parts[depth] in SPLIT_NAMES:
            split, cls = parts[depth], parts[depth + 1]
            image = _ImageFile(f"{archive}:{'/'.join(parts)}", data=files[parts])
            tree.splits.setdefault(split, {}).setdefault(cls, []).append(image)
            tree.class_folders.setdefault((split, cls), f"{archive}:{'/'.join(parts[: depth + 2])}")
    return tree


def _test_split_name(tree: _Tree) -> str | None:
    return "test" if "test" in tree.splits else "val" if "val" in tree.splits else None


def _looks_like_tree_dir(path: Path) -> bool:
    return (path / "train").is_dir() and any((path / s).is_dir() for s in ("test", "val"))


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_hidden(name: str) -> bool:
    # Dot files and folders (.DS_Store, .ipynb_checkpoints, macOS "._x.jpg") and macOS zip/tar debris.
    return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------------------------------
# Decoding and resizing
# --------------------------------------------------------------------------------------------------


def _decode_images(
    files: list[_ImageFile], image_size: int | None, strict_size: bool, skip_bad: bool
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode files to one uint8 tensor (N, 3, S, S); return it, the kept positions and the skipped names."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work and are the
        # fastest option here. The filter is process-wide, so it also covers the decoding threads.
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)
        return _decode_all(files, image_size, strict_size, skip_bad)


def _decode_all(
    files: list[_ImageFile], image_size: int | None, strict_size: bool, skip_bad: bool
) -> tuple[torch.Tensor, list[int], list[str]]:
    """The work of _decode_images.

    ``image_size`` None takes the size of the first readable image. ``strict_size`` turns a size
    mismatch into an error (the user gave no --image-size) instead of a resize.
    """
    reference = "the train images"  # what every image must match in size (strict_size only)
    if image_size is None:
        first = None
        for f in files:
            first = _decode_one(f)
            if first is not None:
                reference = f.name
                break
            if not skip_bad:
                raise _bad_image_error(f)
        if first is None:
            return torch.empty(0, 3, 1, 1, dtype=torch.uint8), [], [f.name for f in files]
        height, width = first.shape[-2:]
        if height != width:
            raise UserError(
                f"{reference} is {width}x{height}, not square: pass --image-size N to resize "
                "(shorter side to N, then a centre crop)"
            )
        image_size = height

    chunks = [files[i : i + _DECODE_CHUNK] for i in range(0, len(files), _DECODE_CHUNK)]

    def work(chunk: list[_ImageFile]) -> tuple[torch.Tensor, list[bool], list[str]]:
        return _decode_chunk(chunk, image_size, strict_size, reference, skip_bad)

    # JPEG and PIL decoding release the GIL, so threads use every core without copying data to processes.
    workers = max(1, min(8, torch.get_num_threads(), len(chunks)))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(work, chunks))  # in order, so the first bad file is the one reported

    images = torch.cat([chunk_images for chunk_images, _, _ in results])
    readable = [ok for _, chunk_readable, _ in results for ok in chunk_readable]
    kept = [i for i, ok in enumerate(readable) if ok]
    bad = [name for _, _, chunk_bad in results for name in chunk_bad]
    return images, kept, bad


def _decode_chunk(
    files: list[_ImageFile], size: int, strict_size: bool, reference: str, skip_bad: bool
) -> tuple[torch.Tensor, list[bool], list[str]]:
    """Decode one chunk to (k, 3, size, size); also return a readable flag per file and the bad names."""
    # All JPEGs go through one libjpeg-turbo call; other formats, and JPEGs that fail there, through PIL.
    raw: list[bytes | None] = []
    for f in files:
        try:
            raw.append(f.read())
        except OSError:
            raw.append(None)
    decoded: list[torch.Tensor | None] = [None] * len(files)
    jpeg_positions = [i for i, data in enumerate(raw) if data is not None and data.startswith(_JPEG_MAGIC)]
    # If any JPEG in the chunk is bad the whole call fails, and each image is then decoded on its own.
    for i, img in zip(jpeg_positions, _decode_jpegs([raw[i] for i in jpeg_positions]) or []):
        decoded[i] = img
    images, kept, bad = [], [], []
    for i, f in enumerate(files):
        img = decoded[i] if decoded[i] is not None else _decode_bytes(raw[i])
        if img is None:
            if not skip_bad:
                raise _bad_image_error(f)
            kept.append(False)
            bad.append(f.name)
            continue
        height, width = img.shape[-2:]
        if (height, width) != (size, size):
            if strict_size:
                raise UserError(
                    f"{f.name} is {width}x{height} but {reference} is {size}x{size}: "
                    "pass --image-size N to resize all images to N x N"
                )
            img = resize_images(img, size)
        images.append(img)
        kept.append(True)
    # Stacking per chunk keeps only a few thousand small tensors alive at a time.
    stacked = torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return stacked, kept, bad


def _decode_one(f: _ImageFile) -> torch.Tensor | None:
    try:
        return _decode_bytes(f.read())
    except OSError:
        return None


def _decode_bytes(data: bytes | None) -> torch.Tensor | None:
    """Decode any image to a uint8 RGB tensor (3, H, W); None if it cannot be read."""
    if data is None:
        return None
    if data.startswith(_JPEG_MAGIC):
        decoded = _decode_jpegs([data])
        if decoded is not None:
            return decoded[0]
        # libjpeg-turbo refused it (broken, or an unusual JPEG variant): let PIL try.
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = _pil_to_rgb_array(img)
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _decode_jpegs(datas: list[bytes]) -> list[torch.Tensor] | None:
    """Decode JPEG files to RGB with torchvision's libjpeg-turbo (3x faster than PIL); None on any failure."""
    if decode_jpeg is None or not datas:
        return None
    buffers = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    try:
        return decode_jpeg(buffers, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def _pil_to_rgb_array(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode as an (H, W, 3) uint8 array."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale (PNG opens as "I" or "I;16"): PIL's own convert clips to 255, so scale instead.
        array = np.asarray(img).astype(np.int64)
        gray = (np.clip(array, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning about palette transparency
    # Alpha is dropped (as torchvision's ImageFolder does); greyscale, palette and CMYK become RGB.
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def _bad_image_error(f: _ImageFile) -> UserError:
    return UserError(f"cannot read image {f.name}: fix or delete it, or pass --skip-bad-images to skip it")


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 images (..., H, W) so the shorter side is ``size``, then centre-crop to size x size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.ndim == 4 and images.shape[0] > chunk:  # bounded temporary memory for big sets (STL-10)
        return torch.cat([resize_images(images[i : i + chunk], size) for i in range(0, len(images), chunk)])
    resized = TF.resize(images, [size], antialias=True)
    return TF.center_crop(resized, [size, size]).contiguous()


def _resize_splits(splits: DatasetSplits, size: int) -> DatasetSplits:
    def resize(data: ImageData) -> ImageData:
        return ImageData(resize_images(data.images, size), data.labels, data.classes)

    pretrain = resize(splits.pretrain)
    if splits.train is splits.pretrain:
        train = pretrain
    elif _is_prefix_view(splits.train, splits.pretrain):  # STL-10: train is the start of pretrain
        train = ImageData(pretrain.images[: len(splits.train)], splits.train.labels, splits.train.classes)
    else:
        train = resize(splits.train)
    return DatasetSplits(
        splits.name,
        pretrain,
        train,
        resize(splits.test),
        splits.mean,
        splits.std,
        f"{splits.source}, resized to {size}x{size}",
    )


def _is_prefix_view(part: ImageData, whole: ImageData) -> bool:
    return part.images.data_ptr() == whole.images.data_ptr() and len(part) <= len(whole)


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images, on the 0..1 scale."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(images), chunk):  # chunked: a float copy of a whole data set can be huge
        x = images[i : i + chunk].double() / 255
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _class_quotas(counts: list[int], n: int) -> list[int]:
    """Split n over classes as equally as their sizes allow; the remainder goes to the lowest labels.

    Water filling: find the largest per-class cap t with sum(min(count, t)) <= n, then hand the few
    images still missing, one each, to the classes that have more than t images.
    """
    low, high = 0, max(counts)
    while low < high:  # binary search for the largest cap that does not overshoot n
        mid = (low + high + 1) // 2
        if sum(min(c, mid) for c in counts) <= n:
            low = mid
        else:
            high = mid - 1
    quotas = [min(c, low) for c in counts]
    missing = n - sum(quotas)
    for i, c in enumerate(counts):
        if missing and c > quotas[i]:
            quotas[i] += 1
            missing -= 1
    return quotas


def _torchvision_download(dataset: str, root: Path, **kwargs: object) -> str | None:
    """Let torchvision download a data set into root; None on success, else why it failed (one line)."""
    try:
        getattr(torchvision.datasets, dataset)(str(root), download=True, **kwargs)
    except Exception as exc:  # no network, disk full, bad checksum...: all reported the same way
        return _one_line(exc)
    return None


def _download_note(download: bool, failure: str | None) -> str:
    if not download:
        return " (download is disabled)"
    return f" (download failed: {failure})" if failure else ""


def _skipped_note(skipped: int) -> str:
    return f"; {skipped} unreadable image(s) skipped" if skipped else ""


def _show_dir(path: Path) -> str:
    return str(path).rstrip("/") + "/"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files decoded and resized on access, for pretraining sets too large to hold in memory.

    Pass it to `simclr_lib.train.pretrain` as the pretraining data: DataLoader workers then decode and resize
    (shorter side to `image_size`, centre crop) into fixed-size uint8 batches, which are pinned, copied to the
    device without blocking and augmented there like in-memory data. Every image mode becomes RGB.
    """

    def __init__(self, paths: list[str | Path], image_size: int) -> None:
        if not paths:
            raise UserError("ImageFileDataset needs at least one image file")
        self.paths = [Path(p) for p in paths]
        self.image_size = int(image_size)

    @classmethod
    def from_folder(cls, root: str | Path, image_size: int) -> ImageFileDataset:
        """Every image file under `root` (recursively, sorted, hidden files skipped)."""
        root = Path(root)
        paths = sorted(p for p in root.rglob("*") if p.is_file() and _is_image_name(p.name))
        if not paths:
            raise UserError(f"no image files under {_show_dir(root)}")
        return cls(paths, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = _decode_bytes(path.read_bytes())
        except OSError:
            image = None
        if image is None:
            raise UserError(f"cannot read image {path}: fix or delete it")
        return resize_images(image, self.image_size)
