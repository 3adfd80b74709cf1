"""Images in memory and on disk: ImageData (uint8 tensors with labels), balanced subsets, resizing, and the reading
of image folders and archives of any layout and size (listing, batched decoding, caching, ImageFiles for streaming).

* An ImageFolder tree (``train/<class>/<image>``, ``test/`` or ``val/``) gives labelled splits; without test/ or val/,
  a seeded class-balanced fifth of train/ is held out. Any other folder of images is unlabelled (every image in it).
* Images of any size are resized (shorter side) and centre-cropped to ``image_size``; without one, to their common
  size if they all share one square size, else to PHOTO_SIZE.
* Decoded images are cached beside the archive or folder in ``<path>.cache.pt``, keyed by the size and time of the
  archive or of every file in the folder, and by the image size."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .errors import DataNotFoundError, UserError

try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # later torchvision releases drop their image decoders: PIL then does all the work
    decode_jpeg = None


PHOTO_SIZE = 64  # the side a folder's images get when they are not all one square size (--image-size to change)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_NAMES = ("train", "test", "val")


@dataclass
class ImageData:
    """Images as a uint8 tensor (N, 3, H, W) with int64 labels (-1: unlabelled), checked where they are made."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
        self.images, self.classes = images.contiguous(), list(self.classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return self.images.shape[-1]

    def subset(self, indices: torch.Tensor) -> ImageData:
        """A new ImageData holding the images at ``indices`` (integer indices or a boolean mask)."""
        indices = torch.as_tensor(indices)
        indices = (indices.nonzero().flatten() if indices.dtype == torch.bool else indices).long()
        return ImageData(self.images[indices], self.labels[indices].clone(), self.classes)


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded and resized to size x size only when a batch is read (--data-placement stream): the
    DataLoader workers decode, so the set need not fit in memory. Gives the same pixels as the in-memory decoding."""

    def __init__(self, files: list[tuple[str, Path | bytes]], labels: torch.Tensor, size: int) -> None:
        self.files, self.labels, self.image_size = files, labels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        try:
            return torch.stack([image for _, image in _decode_resized([self.files[i] for i in indices],
                                                                      self.image_size)])
        except UserError as exc:  # its header read (else it would have been skipped), its pixels do not
            raise UserError(f"{exc}; while streaming, only files whose header is unreadable are skipped: delete "
                            "it, or train without --data-placement stream") from None

    def subset(self, indices: torch.Tensor) -> ImageFiles:
        """The files at `indices`, as ImageData.subset."""
        return ImageFiles([self.files[i] for i in indices.tolist()], self.labels[indices], self.image_size)

    @property
    def images(self) -> torch.Tensor:
        """Every image, decoded (for small sets only)."""
        return self.__getitems__(list(range(len(self))))


def balanced_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of exactly ``n`` items, as equal per class as possible, drawn at random by ``seed``."""
    if not 1 <= n <= len(labels):
        raise UserError(f"cannot take a subset of {n} images from a data set of {len(labels)}: use 1..{len(labels)}")
    generator = torch.Generator().manual_seed(seed)
    if (labels < 0).any():  # unlabelled images (STL-10's pretraining set): class balance is unknown
        return torch.randperm(len(labels), generator=generator)[:n].sort().values
    classes, counts = labels.unique(return_counts=True)
    quotas, left = [0] * len(counts), n
    while left:  # deal one image per class per round, lowest label first, skipping classes that ran out
        for i, count in enumerate(counts.tolist()):
            if left and quotas[i] < count:
                quotas[i], left = quotas[i] + 1, left - 1
    members = [(labels == cls).nonzero().flatten() for cls in classes.tolist()]
    chosen = [m[torch.randperm(len(m), generator=generator)[:quota]] for m, quota in zip(members, quotas)]
    return torch.cat(chosen).sort().values


def balanced_subset(data: ImageData, n: int, seed: int = 0) -> ImageData:
    """Exactly ``n`` images of ``data``, class-balanced and seeded (uniform if unlabelled): --train-subset."""
    return data.subset(balanced_indices(data.labels, n, seed))


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 images (..., H, W) so the shorter side is ``size``, then centre-crop to size x size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.ndim == 4 and images.shape[0] > chunk:  # bounded temporary memory for big sets (STL-10)
        return torch.cat([resize_images(images[i : i + chunk], size) for i in range(0, len(images), chunk)])
    return TF.center_crop(TF.resize(images, [size], antialias=True), [size, size]).contiguous()


def load_tree(path: Path, image_size: int | None, skip_bad: bool, stream: bool = False,
               need_test: bool = False) -> tuple[ImageData | ImageFiles, ImageData, ImageData, str]:
    """Pretrain, train and test images of a folder or archive, and a note for the source. An ImageFolder tree
    (train/<class>/...) gives labelled splits, a seeded class-balanced fifth of train/ held out when there is no test/
    or val/; any other folder is unlabelled (every image in it, train and test empty). Cached beside `path`."""
    cache, key = Path(f"{os.path.abspath(path)}.cache.pt"), _cache_key(path, image_size)  # beside, never inside
    # No cache, or a corrupt or stale one: decode (and write it anew). A streamed set is never decoded whole.
    with contextlib.suppress(Exception):
        cached = {} if stream else torch.load(cache, weights_only=True)
        if cached["key"] == key and (cached["classes"] or not need_test):
            train, test = (ImageData(*cached[s], cached["classes"]) for s in ("train", "test"))
            return (train, train, test, cached["note"]) if train.classes else (train, test, test, cached["note"])
    files, labels, classes, note = _list_tree(path, need_test)
    common = None if image_size else _common_size([file for split in files.values() for _, file in split])
    size = image_size or common or PHOTO_SIZE
    if size != common and image_size is None:
        note += f"; images of several sizes: resized and centre-cropped to {size}x{size} (--image-size to change)"
    skipped = [] if skip_bad else None  # names of the unreadable files skipped; None: refuse them
    where = f"{path}{'/' if path.is_dir() else ':'}"
    decoded = {split: _decode_split(where + split if classes else str(path), files[split], labels[split], classes,
                                    size, skipped)
               for split in files if not (stream and split == "pretrain")}
    empty = ImageData(torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), classes)
    train, test = decoded.get("train", empty), decoded.get("test", empty)
    first = "pretrain" if "pretrain" in files else "train"  # unlabelled images, or the labelled train split
    if stream and skip_bad:  # workers cannot skip a file: the unreadable ones (by their header) leave the list now
        keep = torch.tensor([_header_size(file) is not None for _, file in files[first]], dtype=torch.bool)
        skipped += [name for (name, _), ok in zip(files[first], keep.tolist()) if not ok and name not in skipped]
        files[first], labels[first] = [f for f, ok in zip(files[first], keep.tolist()) if ok], labels[first][keep]
        if not files[first]:
            raise UserError(f"no readable images in {path}")
    pretrain = ImageFiles(files[first], labels[first], size) if stream else decoded[first]
    if skipped:  # never cached, so that no later load without --skip-bad-images misses them
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {path}, e.g. {skipped[0]}", stacklevel=3)
        note += f"; {len(skipped)} unreadable image(s) skipped"
    elif not stream and cache.parent.stat().st_mode & 0o222:  # never into a folder marked read-only
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:  # written whole, then renamed, so no reader sees half a cache
            torch.save({"key": key, "classes": classes, "note": note, "train": [pretrain.images, pretrain.labels]
                        if not classes else [train.images, train.labels], "test": [test.images, test.labels]}, tmp)
            os.replace(tmp, cache)
        except (OSError, RuntimeError):  # not writable after all, or the disk is full: stay uncached
            tmp.unlink(missing_ok=True)
    return pretrain, train, test, note


def _cache_key(path: Path, image_size: int | None) -> str:
    """What the decoded images depend on: the archive's size and time, or every file's in a folder, and the size."""
    stat = path.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    if path.is_dir():
        files = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))
        stamp = hashlib.sha256(repr(files).encode()).hexdigest()
    return f"v2 {stamp} size={image_size} turbo={decode_jpeg is not None}"


def _list_tree(path: Path, need_test: bool) -> tuple[dict[str, list], dict[str, torch.Tensor], list[str], str]:
    """The (name, file) lists and labels of the pretrain/train/test splits of a folder or archive (see load_tree)."""
    entries = _entries(path)
    splits = _scan(entries)
    where = f"{path}{'/' if path.is_dir() else ':'}"
    test_split = next((split for split in ("test", "val") if split in splits), None)
    if need_test and (not splits.get("train") or test_split is None):
        raise DataNotFoundError(f"no {'test/ or val/' if 'train' in splits else 'train/'} split in {path}: "
                                f"expected {where}train/<class>/<image> and test/ or val/")
    if not splits.get("train"):  # no ImageFolder tree (no train/<class>/ folders): every image, unlabelled
        files = _image_files(path, entries)
        return ({"pretrain": files}, {"pretrain": torch.full((len(files),), -1)}, [],
                f"unlabelled: {len(files)} images, no train/<class>/ folders")
    by_class = splits["train"]
    empty = [c for c, files in by_class.items() if not files]
    unknown = sorted(set(splits.get(test_split, {})) - set(by_class))
    if empty or unknown:
        problem = "contains no images" if empty else "is not a class of the train split"
        folder = f"train/{empty[0]}" if empty else f"{test_split}/{unknown[0]}"
        raise UserError(f"class folder {where}{folder} {problem}")
    if len(by_class) < 2:
        problem = f"only one class folder ({next(iter(by_class))})" if by_class else "no images"
        raise UserError(f"{problem} in {where}train: need <class>/<image> files of at least two classes")
    classes = sorted(by_class)

    def flat(split: dict[str, list]) -> tuple[list, torch.Tensor]:
        pairs = [(item, classes.index(cls)) for cls in sorted(split) for item in split[cls]]
        return [item for item, _ in pairs], torch.tensor([label for _, label in pairs], dtype=torch.int64)

    (train, train_y), note = flat(by_class), "ImageFolder"
    if test_split is not None:
        test, test_y = flat(splits[test_split])
    else:  # a seeded, class-balanced fifth of train/ becomes the test split
        held = torch.zeros(len(train), dtype=torch.bool)
        held[balanced_indices(train_y, max(len(classes), len(train) // 5), seed=0)] = True
        test, test_y = [f for f, h in zip(train, held.tolist()) if h], train_y[held]
        train, train_y = [f for f, h in zip(train, held.tolist()) if not h], train_y[~held]
        note += f"; no test/ split: a class-balanced {len(test)} of train/ (seed 0) held out as test"
    return {"train": train, "test": test}, {"train": train_y, "test": test_y}, classes, note


def read_images(path: str | Path, size: int, skip_bad: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Every image in a folder or archive (any layout, sorted by path) as uint8 (N, 3, size, size), resized and
    centre-cropped, with its name (`simclr embed`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a folder (or archive) of images, or cifar10/cifar100/stl10")
    files, skipped = _image_files(path, _entries(path)), [] if skip_bad else None
    kept = list(_decode_resized(files, size, skipped))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {path}, e.g. {skipped[0]}", stacklevel=2)
    return torch.stack([image for _, image in kept]), [files[i][0] for i, _ in kept]


def _image_files(path: Path, entries: list[tuple[tuple[str, ...], str, Path | bytes | None]]) -> list[tuple]:
    """(name, file) of every image among `entries` (of `path`, named in the error when there is none)."""
    files = [(name, file) for _, name, file in entries if file is not None and _is_image(name)]
    if not files:
        raise UserError(f"no images in {path}: expected image files (any layout), or train/<class>/<image>")
    return files


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _entries(path: Path) -> list[tuple[tuple[str, ...], str, Path | bytes | None]]:
    """(path parts, name for messages, file; None for a folder) of everything in a folder or archive (read into
    memory), without hidden files and folders (.DS_Store, .ipynb_checkpoints, macOS "._x.jpg", __MACOSX)."""
    if path.is_dir():
        entries = [(p.relative_to(path).parts, str(p), None if p.is_dir() else p) for p in path.rglob("*")]
    else:
        entries = []
        try:
            with tarfile.open(path, mode="r|*") as tar:  # streaming: one pass, whatever the compression
                for member in tar:
                    parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                    image = member.isfile() and _is_image(member.name)
                    if parts and (image or member.isdir()):  # other files are never read
                        data, name = tar.extractfile(member).read() if image else None, f"{path}:{'/'.join(parts)}"
                        # The tree sits at the top of the archive, or in a top-level folder.
                        top = len(parts) > 1 and parts[0] not in SPLIT_NAMES
                        entries.append((parts[1:] if top else parts, name, data))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot read archive {path}: {one_line(exc)}") from exc
    return sorted((e for e in entries if e[0] and not any(p.startswith(".") or p == "__MACOSX" for p in e[0])),
                  key=lambda entry: entry[0])


def _scan(entries: list[tuple[tuple[str, ...], str, Path | bytes | None]]) -> dict[str, dict[str, list]]:
    """Split -> class -> sorted (name, file) of the ImageFolder tree among `entries`."""
    splits: dict[str, dict[str, list[tuple[str, Path | bytes]]]] = {}
    for parts, name, file in entries:
        if parts[0] in SPLIT_NAMES:
            classes = splits.setdefault(parts[0], {})  # below: a class folder (maybe empty), or an image in one
            if len(parts) >= 2 and (file is None or len(parts) >= 3 and _is_image(name)):
                classes.setdefault(parts[1], []).extend([] if file is None else [(name, file)])
    return splits


def _common_size(files: list[Path | bytes]) -> int | None:
    """The images' side when they all share one square size (read from the file headers), else None."""
    sizes = {size for size in map(_header_size, files) if size is not None}  # unreadable: reported when decoded
    if len(sizes) != 1:
        return None
    width, height = sizes.pop()
    return width if width == height else None


def _header_size(file: Path | bytes) -> tuple[int, int] | None:
    """(width, height) from an image file's header, None when it cannot be read."""
    try:
        with Image.open(file if isinstance(file, Path) else io.BytesIO(file)) as img:
            return img.size
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return None


def _decode_split(where: str, files: list[tuple[str, Path | bytes]], labels: torch.Tensor, classes: list[str],
                  size: int, skipped: list[str] | None) -> ImageData:
    """Decode and resize to (N, 3, size, size); unreadable files are refused, or skipped and named in `skipped`."""
    kept = list(_decode_resized(files, size, skipped))
    if not kept:
        raise UserError(f"no readable images in {where}")
    return ImageData(torch.stack([image for _, image in kept]), labels[[i for i, _ in kept]], classes)


def _decode_resized(files: list[tuple[str, Path | bytes]], size: int,
                    skipped: list[str] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, image resized to size x size) of each readable file, decoded in chunks (full-size images are only
    held until resized); an unreadable one raises, or is skipped and named in `skipped`."""
    for start in range(0, len(files), 4096):
        chunk = files[start : start + 4096]
        for i, ((name, _), image) in enumerate(zip(chunk, _decode([file for _, file in chunk])), start):
            if image is None and skipped is None:
                raise UserError(f"cannot read image {name}: fix or delete it, or pass --skip-bad-images to skip it")
            if image is None:
                skipped.append(name)
            else:
                yield i, resize_images(image, size)


def _decode(files: list[Path | bytes]) -> list[torch.Tensor | None]:
    """Images as uint8 RGB (3, H, W), None where unreadable. JPEGs: libjpeg-turbo in one call, 3x faster than PIL."""
    # A file the OS will not let us read is an unreadable image too (PIL fails on b"").
    raws = [f if isinstance(f, bytes) else f.read_bytes() if os.access(f, os.R_OK) else b"" for f in files]
    images: list[torch.Tensor | None] = [None] * len(raws)
    jpegs = [i for i, raw in enumerate(raws) if raw[:3] == b"\xff\xd8\xff"] if decode_jpeg else []
    # One bad JPEG fails the whole call; PIL then decodes them all (with its libjpeg-turbo: the same pixels).
    with warnings.catch_warnings(), contextlib.suppress(RuntimeError):
        warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)  # 0.29+: works
        buffers = [torch.frombuffer(bytearray(raws[i]), dtype=torch.uint8) for i in jpegs]
        for i, image in zip(jpegs, decode_jpeg(buffers, mode=ImageReadMode.RGB) if jpegs else []):
            images[i] = image
    for i in [i for i, image in enumerate(images) if image is None]:  # PIL: other formats, and refused JPEGs
        try:
            with Image.open(io.BytesIO(raws[i])) as img:
                if img.mode.startswith("I"):  # 16-bit greyscale: scaled, as PIL's convert would clip it to 255
                    img = Image.fromarray((np.asarray(img).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
                # A palette's transparency goes through RGBA, which avoids PIL's warning; alpha is dropped.
                array = np.array((img.convert("RGBA") if "transparency" in img.info else img).convert("RGB"))
            images[i] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...): unreadable
            pass
    return images


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
