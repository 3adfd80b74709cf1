"""Tests for simclr_lib.data on tiny generated data sets (plus one test on the staged CIFAR-10 archive)."""

from __future__ import annotations

import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from simclr_lib.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    DATASETS,
    ImageData,
    balanced_indices,
    balanced_subset,
    channel_stats,
    load_splits,
)
from simclr_lib.errors import DataNotFoundError, UserError

STAGED_ARCHIVE = Path(__file__).parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"


# ---------------------------------------------------------------------------------------------------
# Generators for tiny data sets
# ---------------------------------------------------------------------------------------------------


def save_image(path: Path, mode: str, size: tuple[int, int] = (8, 8), value: int = 100) -> None:
    """Write a uniform image of the given PIL mode; the format follows the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        img = Image.new("RGB", size, (value, 255 - value, 7))
    elif mode == "RGBA":
        img = Image.new("RGBA", size, (value, 20, 30, 40))
    elif mode == "L":
        img = Image.new("L", size, value)
    elif mode == "P":
        img = Image.new("RGB", size, (value, 0, 200)).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "P-transparent":
        img = Image.new("RGB", size, (value, 0, 200)).convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = 0
    elif mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], value * 256 + 128, dtype=np.uint16))  # I;16 mode
    else:
        raise ValueError(mode)
    if mode == "P-transparent":
        img.save(path, transparency=0)
    else:
        img.save(path)


# One image of every mode and format that must load, per class; all 8x8.
MIXED_IMAGES = [
    ("a_rgb.png", "RGB"),
    ("b_gray.png", "L"),
    ("c_rgba.png", "RGBA"),
    ("d_palette.png", "P"),
    ("e_palette_alpha.png", "P-transparent"),
    ("f_16bit.png", "I;16"),
    ("g_rgb.jpg", "RGB"),
    ("h_gray.jpeg", "L"),
    ("i_upper.JPG", "RGB"),
]


def make_tree(root: Path, classes=("cat", "dog", "emu"), splits=("train", "test"), images=None) -> Path:
    """An ImageFolder tree root/<split>/<class>/<file> with every class value-coded (cat=10, dog=20...)."""
    images = MIXED_IMAGES if images is None else images
    for split in splits:
        for k, cls in enumerate(classes):
            for name, mode in images:
                save_image(root / split / cls / name, mode, value=10 * (k + 1))
    return root


def make_archive(tree: Path, archive: Path, top_level: str | None) -> Path:
    """Pack a tree as a tar archive, inside one top-level folder or directly at the top."""
    mode = "w" if archive.suffix == ".tar" else "w:gz"
    with tarfile.open(archive, mode) as tar:
        for split_dir in sorted(tree.iterdir()):
            tar.add(split_dir, arcname=f"{top_level}/{split_dir.name}" if top_level else split_dir.name)
    return archive


def write_fake_cifar(root: Path, kind: str = "cifar10", per_batch: int = 3) -> Path:
    """Tiny pickles in the format of torchvision's cifar-10-batches-py / cifar-100-python."""

    def batch(n: int, offset: int, labels_key: str) -> dict:
        data = np.zeros((n, 3072), dtype=np.uint8)
        for i in range(n):
            data[i, :1024], data[i, 1024:2048], data[i, 2048:] = offset + i, 100, 200  # R, G, B planes
        return {"data": data, labels_key: [(offset + i) % 10 for i in range(n)]}

    def dump(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj, protocol=2))

    if kind == "cifar10":
        folder = root / "cifar-10-batches-py"
        for b in range(1, 6):
            dump(folder / f"data_batch_{b}", batch(per_batch, 10 * b, "labels"))
        dump(folder / "test_batch", batch(per_batch, 0, "labels"))
        dump(folder / "batches.meta", {"label_names": list(CIFAR10_CLASSES)})
    else:
        folder = root / "cifar-100-python"
        dump(folder / "train", batch(per_batch, 0, "fine_labels"))
        dump(folder / "test", batch(per_batch, 50, "fine_labels"))
        dump(folder / "meta", {"fine_label_names": [f"class{i:02d}" for i in range(100)]})
    return folder


def make_cifar10_tree(root: Path, size: int = 4) -> Path:
    """A ten-class ImageFolder tree standing in for CIFAR-10 (one image per class and split)."""
    for split in ("train", "test"):
        for k, cls in enumerate(CIFAR10_CLASSES):
            save_image(root / split / cls / "0000.png", "RGB", size=(size, size), value=k)
    return root


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------------
# ImageFolder trees and archives
# ---------------------------------------------------------------------------------------------------


def test_folder_loads_every_mode_with_exact_pixels(tmp_path):
    root = make_tree(tmp_path / "tree")
    splits = load_splits("folder", root)
    n = 3 * len(MIXED_IMAGES)
    assert splits.name == "folder" and splits.num_classes == 3 and splits.image_size == 8
    assert splits.train.classes == ["cat", "dog", "emu"]
    for data in (splits.pretrain, splits.train, splits.test):
        assert data.images.shape == (n, 3, 8, 8) and data.images.dtype == torch.uint8
        assert data.images.is_contiguous()
        assert data.labels.dtype == torch.int64
        assert data.labels.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    assert splits.pretrain is splits.train
    assert str(root) in splits.source

    # Files in a class are sorted by name, so position j is MIXED_IMAGES[j]; the dog class has value 20.
    dog = splits.train.images[9:18, :, 0, 0].tolist()
    assert dog[0] == [20, 235, 7]  # RGB PNG: exact
    assert dog[1] == [20, 20, 20]  # greyscale replicated to three channels
    assert dog[2] == [20, 20, 30]  # alpha dropped
    assert dog[3] == [20, 0, 200] and dog[4] == [20, 0, 200]  # palette, with and without transparency
    assert dog[5] == [20, 20, 20]  # 16-bit: 20 * 256 + 128 scaled down to 20, not clipped to 255
    for j in (6, 8):  # JPEG is lossy: close, not exact
        assert max(abs(a - b) for a, b in zip(dog[j], [20, 235, 7])) <= 8
    assert max(abs(a - 20) for a in dog[7]) <= 3

    # Folder statistics come from the train images, on the 0..1 scale.
    expected = splits.train.images.double().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(splits.mean, dtype=torch.float64), expected, atol=1e-3)
    assert all(0 < s < 1 for s in splits.std)


def test_images_of_other_sizes_are_resized(tmp_path):
    images = [("a.png", "RGB"), ("b.jpg", "L")]
    root = make_tree(tmp_path / "tree", classes=("x", "y"), images=images)
    splits = load_splits("folder", root, image_size=4)
    assert splits.train.images.shape == (4, 3, 4, 4) and splits.test.images.shape == (4, 3, 4, 4)
    assert splits.image_size == 4

    # A non-square image is resized on its shorter side and centre-cropped.
    save_image(root / "train" / "y" / "d_wide.png", "RGB", size=(10, 6))
    assert load_splits("folder", root, image_size=5).train.images.shape == (5, 3, 5, 5)

    # Without --image-size, images of several sizes (here 8x8 and 10x6) all go to 64x64, and the source says so.
    splits = load_splits("folder", root)
    assert splits.image_size == 64 and splits.test.images.shape == (4, 3, 64, 64)
    assert "resized and centre-cropped to 64x64" in splits.source and "--image-size" in splits.source


@pytest.mark.parametrize(
    "archive_name, top_level",
    [
        ("tree.tar.gz", "mydata"),
        ("tree.tgz", None),
        ("tree.tar", "mydata"),
        ("tree2.tar", None),
    ],
)
def test_archive_gives_identical_tensors(tmp_path, archive_name, top_level):
    tree = make_tree(tmp_path / "tree")
    archive = make_archive(tree, tmp_path / archive_name, top_level)
    from_dir = load_splits("folder", tree)
    from_archive = load_splits("folder", archive)
    for split in ("train", "test"):
        a, b = getattr(from_dir, split), getattr(from_archive, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes
    assert from_dir.mean == from_archive.mean and from_dir.std == from_archive.std
    assert str(archive) in from_archive.source


def test_val_split_stands_in_for_test_and_junk_is_ignored(tmp_path, monkeypatch):
    root = make_tree(
        tmp_path / "tree",
        classes=("a", "b", "c"),
        splits=("train", "val"),
        images=[("x.png", "RGB"), ("y.png", "L")],
    )
    # Files that are not images, hidden files and Jupyter's checkpoint folders are not data.
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".hidden.png").write_bytes(b"junk")
    save_image(root / "train" / ".ipynb_checkpoints" / "x.png", "RGB")
    save_image(root / "train" / "b" / ".ipynb_checkpoints" / "x.png", "RGB")
    splits = load_splits("folder", root)
    assert len(splits.train) == 6 and len(splits.test) == 6
    assert splits.train.classes == ["a", "b", "c"]
    monkeypatch.chdir(root)  # the tree as the working folder, "."
    assert torch.equal(load_splits("folder", ".").train.images, splits.train.images)

    # A test split without some classes keeps the train split's label numbering.
    (tmp_path / "partial").mkdir()
    make_tree(tmp_path / "partial", classes=("a", "b", "c"), splits=("train",), images=[("x.png", "RGB")])
    make_tree(tmp_path / "partial", classes=("c",), splits=("test",), images=[("x.png", "RGB")])
    partial = load_splits("folder", tmp_path / "partial")
    assert partial.test.labels.tolist() == [2] and partial.test.classes == ["a", "b", "c"]


def _corrupt(root: Path) -> Path:
    make_tree(root, classes=("a", "b"), images=[("x.png", "RGB"), ("y.jpg", "RGB")])
    (root / "train" / "a" / "broken.png").write_bytes(b"this is not an image")
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage after a JPEG marker")
    return root / "train" / "a" / "broken.png"


def _empty_class(root: Path) -> Path:
    make_tree(root, classes=("a", "b"), images=[("x.png", "RGB")])
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("no images here")
    return root / "train" / "empty"


def _no_images(root: Path) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    return root


def _one_class(root: Path) -> Path:
    make_tree(root, classes=("only",), images=[("x.png", "RGB")])
    return root / "train"


def _missing(root: Path) -> Path:
    return root


@pytest.mark.parametrize(
    "make_bad, words",
    [
        (_corrupt, ["cannot read image", "--skip-bad-images"]),
        (_empty_class, ["contains no images"]),
        (_no_images, ["no images"]),
        (_one_class, ["only one class", "only"]),
        (_missing, ["does not exist"]),
    ],
)
def test_bad_folders_raise_one_line_user_errors(tmp_path, make_bad, words):
    culprit = make_bad(tmp_path / "tree")
    with pytest.raises(UserError) as exc:
        load_splits("folder", tmp_path / "tree")
    assert_one_line(exc, str(culprit), *words)


def test_bad_archive_images_are_named_with_the_member(tmp_path):
    _corrupt(tmp_path / "tree")
    archive = make_archive(tmp_path / "tree", tmp_path / "bad.tar.gz", "top")
    with pytest.raises(UserError) as exc:
        load_splits("folder", archive)
    assert_one_line(exc, f"{archive}:top/train/a/broken.png")
    (tmp_path / "not-a-tar.tar.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(UserError) as exc:
        load_splits("folder", tmp_path / "not-a-tar.tar.gz")
    assert_one_line(exc, "cannot read archive", "not-a-tar.tar.gz")


def test_skip_bad_images_skips_and_counts(tmp_path):
    _corrupt(tmp_path / "tree")
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        splits = load_splits("folder", tmp_path / "tree", skip_bad_images=True)
    assert len(splits.train) == 4 and len(splits.test) == 4
    assert "2 unreadable image(s) skipped" in splits.source
    assert splits.train.labels.tolist() == [0, 0, 1, 1]
    # The bad JPEG fails torchvision's batched call; the good ones still decode exactly as without it.
    clean = make_tree(tmp_path / "clean", classes=("a", "b"), images=[("x.png", "RGB"), ("y.jpg", "RGB")])
    assert torch.equal(load_splits("folder", clean).train.images, splits.train.images)

    # An archive with skipped images is never cached: every load warns, and one without the flag still refuses.
    archive = make_archive(tmp_path / "tree", tmp_path / "bad.tar", None)
    for _ in range(2):
        with pytest.warns(UserWarning, match="skipped 2 unreadable"):
            assert len(load_splits("folder", archive, skip_bad_images=True).train) == 4
    assert not (tmp_path / "bad.tar.cache.pt").exists()
    with pytest.raises(UserError) as exc:
        load_splits("folder", archive)
    assert_one_line(exc, "cannot read image", "--skip-bad-images")


def test_pil_decodes_jpegs_when_torchvision_cannot(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree")
    fast = load_splits("folder", root).train.images
    monkeypatch.setattr("simclr_lib.images.decode_jpeg", None)
    slow = load_splits("folder", root).train.images
    png = [j for j, (name, _) in enumerate(MIXED_IMAGES) if name.endswith(".png")]
    assert torch.equal(fast.view(3, 9, 3, 8, 8)[:, png], slow.view(3, 9, 3, 8, 8)[:, png])
    assert (fast.int() - slow.int()).abs().max() <= 8  # JPEG decoders may round differently


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 resolution, CIFAR-100, STL-10
# ---------------------------------------------------------------------------------------------------


def test_cifar10_pickles_beat_a_folder_tree(tmp_path):
    write_fake_cifar(tmp_path)
    make_cifar10_tree(tmp_path / "cifar10-jpeg")
    splits = load_splits("cifar10", tmp_path, download=False)
    assert "cifar-10-batches-py" in splits.source
    assert len(splits.train) == 15 and len(splits.test) == 3 and splits.pretrain is splits.train
    assert splits.train.classes == list(CIFAR10_CLASSES) and splits.mean == CIFAR10_MEAN
    # Pickled rows are R, G, B planes: the first train image is R=10, G=100, B=200 everywhere.
    assert splits.train.images.shape == (15, 3, 32, 32)
    assert splits.train.images[0, :, 5, 7].tolist() == [10, 100, 200]
    assert splits.train.labels[:3].tolist() == [0, 1, 2]

    resized = load_splits("cifar10", tmp_path, image_size=16, download=False)
    assert resized.train.images.shape == (15, 3, 16, 16) and resized.pretrain is resized.train
    assert resized.train.images[0, :, 0, 0].tolist() == [10, 100, 200]


def test_cifar10_tree_one_level_down_first_folder_by_name(tmp_path):
    root = tmp_path / "data"
    make_cifar10_tree(root / "b-images", size=6)
    make_cifar10_tree(root / "a-images")
    (root / ".hidden-images").mkdir()
    make_archive(make_cifar10_tree(tmp_path / "src", size=8), root / "0-first.tar.gz", None)  # folders come first
    splits = load_splits("cifar10", root, download=False)
    assert "a-images" in splits.source and splits.image_size == 4
    assert splits.train.classes == list(CIFAR10_CLASSES) and splits.train.labels.tolist() == list(range(10))


def test_cifar10_tree_directly_at_root_and_archive_in_root(tmp_path):
    direct = make_cifar10_tree(tmp_path / "direct")
    assert len(load_splits("cifar10", direct, download=False).train) == 10

    data = tmp_path / "data"
    data.mkdir()
    (data / "unrelated.tar.gz").write_bytes(b"")  # sorts after the CIFAR-10 archive: never read
    archive = make_archive(make_cifar10_tree(tmp_path / "src"), data / "cifar10-jpeg.tar.gz", "cifar10-jpeg")
    splits = load_splits("cifar10", data, download=False, image_size=8)
    assert str(archive) in splits.source and splits.train.images.shape == (10, 3, 8, 8)


def test_archive_cache_is_written_reused_and_invalidated(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    archive = make_archive(make_cifar10_tree(tmp_path / "src"), data / "c.tar.gz", "c")
    first = load_splits("cifar10", data, download=False)
    cache = data / "c.tar.gz.cache.pt"
    assert cache.is_file() and not list(data.glob("*.tmp"))

    monkeypatch.setattr("simclr_lib.images._decode", lambda files: pytest.fail("decoded again"))
    again = load_splits("cifar10", data, download=False)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels, first.test.labels)
    assert again.train.classes == first.train.classes and again.source == first.source
    monkeypatch.undo()

    # Another image size, a changed archive, or a corrupt cache: decoded again and the cache rewritten.
    assert load_splits("folder", archive, image_size=8).image_size == 8
    make_archive(make_cifar10_tree(tmp_path / "src2", size=6), archive, "c")
    assert load_splits("cifar10", data, download=False).image_size == 6
    cache.write_bytes(b"not a cache")
    assert load_splits("cifar10", data, download=False).image_size == 6
    assert torch.load(cache, weights_only=True)["train"][0].shape == (10, 3, 6, 6)


def test_read_only_data_folder_works_without_a_cache(tmp_path):
    data = tmp_path / "read-only"
    data.mkdir()
    make_archive(make_cifar10_tree(tmp_path / "src"), data / "c.tar", None)
    data.chmod(0o555)
    try:
        assert len(load_splits("cifar10", data, download=False).train) == 10
        assert [p.name for p in data.iterdir()] == ["c.tar"]
    finally:
        data.chmod(0o755)


def test_cifar10_folder_with_wrong_class_count_is_refused(tmp_path):
    make_tree(tmp_path / "cifar10-small", classes=("a", "b"), images=[("x.png", "RGB")])
    with pytest.raises(UserError) as exc:
        load_splits("cifar10", tmp_path, download=False)
    assert_one_line(exc, "cifar10-small", "2 classes", "--dataset folder")


def test_missing_cifar10_names_all_three_ways(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        load_splits("cifar10", tmp_path / "data", download=False)
    assert_one_line(exc, "cifar-10-batches-py", "ImageFolder", ".tar.gz", str(tmp_path / "data"), "download")
    assert "shared" not in str(exc.value)  # says what to do on the user's machine, not on a build machine
    assert not (tmp_path / "data").exists()  # nothing was created


def test_cifar10_download_failure_and_success_without_network(tmp_path, monkeypatch):
    def offline(root, download, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\n<urlopen error no network>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError) as exc:
        load_splits("cifar10", tmp_path)
    assert_one_line(exc, "download failed", "urlopen error no network")

    def fake_download(root, download, **kwargs):
        write_fake_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    splits = load_splits("cifar10", tmp_path)
    assert "download" in splits.source and len(splits.train) == 15


def test_cifar10_pickle_folder_that_is_broken(tmp_path):
    folder = write_fake_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(UserError) as exc:
        load_splits("cifar10", tmp_path, download=False)
    assert_one_line(exc, "data_batch_3", "incomplete or corrupt")


def test_cifar100(tmp_path):
    write_fake_cifar(tmp_path, "cifar100")
    splits = load_splits("cifar100", tmp_path, download=False)
    assert splits.num_classes == 100 and len(splits.train) == 3 and len(splits.test) == 3
    assert splits.test.images[0, :, 0, 0].tolist() == [50, 100, 200]
    with pytest.raises(DataNotFoundError) as exc:
        load_splits("cifar100", tmp_path / "nothing", download=False)
    assert_one_line(exc, "cifar-100-python", "download")


def test_stl10_binary_layout_and_unlabeled(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    wanted = {
        name: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        for name, n in [("train", 2), ("test", 2), ("unlabeled", 3)]
    }
    for name, images in wanted.items():
        # The binary stores each channel column-major.
        (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_y.bin").write_bytes(bytes([3, 4]))
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")

    splits = load_splits("stl10", tmp_path, download=False)
    assert splits.num_classes == 10 and splits.image_size == 96
    assert torch.equal(splits.train.images, torch.from_numpy(wanted["train"]))
    assert torch.equal(splits.test.images, torch.from_numpy(wanted["test"]))
    assert torch.equal(splits.pretrain.images[2:], torch.from_numpy(wanted["unlabeled"]))
    assert splits.train.labels.tolist() == [0, 9] and splits.test.labels.tolist() == [2, 3]
    assert splits.pretrain.labels.tolist() == [0, 9, -1, -1, -1]

    small = load_splits("stl10", tmp_path, image_size=32, download=False)
    assert small.pretrain.images.shape == (5, 3, 32, 32) and small.train.images.shape == (2, 3, 32, 32)
    assert torch.equal(small.train.images, small.pretrain.images[:2])

    with pytest.raises(DataNotFoundError) as exc:
        load_splits("stl10", tmp_path / "nothing", download=False)
    assert_one_line(exc, "stl10_binary", "download")


def test_unknown_dataset_and_aliases(tmp_path):
    assert DATASETS == ("cifar10", "cifar100", "stl10", "folder")
    with pytest.raises(UserError) as exc:
        load_splits("imagenet", tmp_path)
    assert_one_line(exc, "imagenet", "cifar10")
    write_fake_cifar(tmp_path)
    assert load_splits("CIFAR-10", tmp_path, download=False).name == "cifar10"
    with pytest.raises(UserError):
        load_splits("cifar10", tmp_path, image_size=0)


# ---------------------------------------------------------------------------------------------------
# ImageData and balanced subsets
# ---------------------------------------------------------------------------------------------------


def make_data(labels: list[int]) -> ImageData:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    return ImageData(images, torch.tensor(labels), ["a", "b", "c"])


def test_image_data_checks_and_subset():
    data = make_data([0, 1, 2, 0])
    assert len(data) == 4 and data.image_size == 2
    part = data.subset(torch.tensor([3, 1]))
    assert part.labels.tolist() == [0, 1] and part.images[:, 0, 0, 0].tolist() == [3, 1]
    assert data.subset(torch.tensor([True, False, False, True])).labels.tolist() == [0, 0]
    with pytest.raises(ValueError):
        ImageData(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), [])  # float images
    with pytest.raises(ValueError):
        ImageData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), [])


def test_balanced_subset_is_balanced_exact_and_seeded():
    data = make_data([0] * 10 + [1] * 10 + [2] * 3)
    sub = balanced_subset(data, 7, seed=0)
    assert len(sub) == 7 and torch.bincount(sub.labels).tolist() == [3, 2, 2]
    # A small class gives what it has; the others share the rest equally.
    assert torch.bincount(balanced_subset(data, 20).labels).tolist() == [9, 8, 3]
    assert torch.bincount(balanced_subset(data, 23).labels).tolist() == [10, 10, 3]

    same = [balanced_indices(data.labels, 7, seed=1) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert any(not torch.equal(same[0], balanced_indices(data.labels, 7, seed=s)) for s in range(2, 6))
    assert len(set(same[0].tolist())) == 7  # no duplicates

    big = make_data([i % 3 for i in range(300)])
    counts = torch.bincount(balanced_subset(big, 100, seed=3).labels).tolist()
    assert sum(counts) == 100 and max(counts) - min(counts) <= 1

    for n in (0, 24):
        with pytest.raises(UserError):
            balanced_subset(data, n)


def test_balanced_subset_of_unlabelled_data_is_uniform():
    data = make_data([-1] * 50 + [0] * 5)
    sub = balanced_indices(data.labels, 20, seed=0)
    assert len(sub) == 20 and len(set(sub.tolist())) == 20
    assert torch.equal(sub, balanced_indices(data.labels, 20, seed=0))


# ---------------------------------------------------------------------------------------------------
# The staged CIFAR-10 archive
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not STAGED_ARCHIVE.is_file(), reason="staged CIFAR-10 archive not present")
def test_staged_cifar10_archive(tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    (data_root / "cifar10-jpeg.tar.gz").symlink_to(STAGED_ARCHIVE.resolve())
    start = time.perf_counter()
    splits = load_splits("cifar10", data_root, download=False)
    seconds = time.perf_counter() - start
    assert len(splits.train) == 50_000 and len(splits.test) == 10_000 and splits.pretrain is splits.train
    assert splits.train.images.shape == (50_000, 3, 32, 32)
    assert splits.test.images.shape == (10_000, 3, 32, 32)
    assert splits.train.classes == list(CIFAR10_CLASSES) and splits.num_classes == 10
    assert torch.bincount(splits.train.labels).tolist() == [5000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    # The decoded pixels have CIFAR-10's well-known channel means (JPEG moves them very little).
    mean, _ = channel_stats(splits.train.images)
    assert max(abs(a - b) for a, b in zip(mean, CIFAR10_MEAN)) < 2e-3
    assert seconds < 60, f"loading the staged archive took {seconds:.1f} s"
    cached = load_splits("cifar10", data_root, download=False)  # from <archive>.cache.pt: the very same pixels
    assert (data_root / "cifar10-jpeg.tar.gz.cache.pt").is_file()
    assert torch.equal(cached.train.images, splits.train.images) and torch.equal(cached.test.images, splits.test.images)
