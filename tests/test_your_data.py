"""Bring your own images, take the encoder out: unlabelled and train-only folders of any image size, streaming from
files, `embed`, `export` (checked against torchvision) and transfer evaluation, on generated folders."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from simclr_lib.cli import main
from simclr_lib.config import make_config
from simclr_lib.data import load_splits, resize_images
from simclr_lib.errors import UserError
from simclr_lib.images import ImageFiles
from simclr_lib.jobs import load_data
from simclr_lib.models import SimCLR, export_encoder
from simclr_lib.train import BatchSource, pretrain


def photos(root: Path, n: int = 24, seed: int = 0) -> Path:
    """A nested folder of unlabelled "photos": PNGs of 40x36 and JPEGs of 30x50, with a colour cast per image."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        size = (40, 36) if i % 2 else (30, 50)
        pixels = (torch.rand(3, generator=g) * 255 + torch.randint(-30, 30, (size[1], size[0], 3), generator=g))
        folder = root / ("holiday" if i < n // 2 else "garden/2025")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"img{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / name)
    return root


def train_only(root: Path, per_class: int = 10) -> Path:
    """A labelled folder with train/<class>/ only, three classes of 12x12 images."""
    for c, colour in enumerate([(220, 40, 40), (40, 200, 40), (40, 40, 220)]):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 12), tuple(v - i for v in colour)).save(root / "train" / f"class{c}" / f"{i}.png")
    return root


def cheap(*extra: str) -> list[str]:
    return ["--epochs", "1", "--batch-size", "8", "--width", "4", "--train-subset", "none", "--probe-epochs", "2",
            "--knn-k", "5", "--knn-monitor-size", "10", "--tsne-points", "10", "--no-progress", "--device", "cpu",
            *extra]


def test_unlabelled_folder_of_mixed_sizes_is_resized_to_64_and_cached(tmp_path, monkeypatch):
    root = photos(tmp_path / "photos")
    splits = load_splits("folder", root)
    assert len(splits.pretrain) == 24 and not splits.labelled and splits.num_classes == 0
    assert splits.pretrain.images.shape == (24, 3, 64, 64) and (splits.pretrain.labels == -1).all()
    assert "unlabelled" in splits.source and "64x64" in splits.source and "--image-size" in splits.source
    # Decoded once: the cache beside the folder is used, and a changed file or another size invalidates it.
    cache = tmp_path / "photos.cache.pt"
    assert cache.is_file() and not any(p.name.endswith(".cache.pt") for p in root.rglob("*"))
    monkeypatch.setattr("simclr_lib.images._decode", lambda files: pytest.fail("decoded again"))
    assert torch.equal(load_splits("folder", root).pretrain.images, splits.pretrain.images)
    monkeypatch.undo()
    assert load_splits("folder", root, image_size=16).pretrain.images.shape == (24, 3, 16, 16)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "holiday" / "img000.jpg")
    again = load_splits("folder", root)
    assert not torch.equal(again.pretrain.images[12], splits.pretrain.images[12])  # holiday/img000.jpg
    # Images that all share one square size keep it.
    square = tmp_path / "square"
    square.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(square / f"{i}.png")
    assert load_splits("folder", square).pretrain.image_size == 20


def test_train_only_folder_gets_a_seeded_balanced_test_split(tmp_path):
    splits = load_splits("folder", train_only(tmp_path / "labelled"))
    assert splits.labelled and splits.num_classes == 3 and splits.pretrain is splits.train
    assert len(splits.test) == 6 and splits.test.labels.bincount().tolist() == [2, 2, 2]
    assert len(splits.train) == 24 and splits.train.labels.bincount().tolist() == [8, 8, 8]
    assert "held out as test" in splits.source and "seed 0" in splits.source
    train_set = {tuple(x.flatten()[:3].tolist()) + (int(y),) for x, y in zip(splits.train.images, splits.train.labels)}
    assert not any(tuple(x.flatten()[:3].tolist()) + (int(y),) in train_set
                   for x, y in zip(splits.test.images, splits.test.labels))
    again = load_splits("folder", tmp_path / "labelled", image_size=12)  # another cache key, the same split
    assert torch.equal(again.test.images, splits.test.images)


def test_a_corrupt_file_is_one_line_or_skipped(tmp_path):
    root = photos(tmp_path / "photos", n=6)
    (root / "holiday" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(UserError) as exc:
        load_splits("folder", root)
    assert "broken.jpg" in str(exc.value) and "--skip-bad-images" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert len(load_splits("folder", root, skip_bad_images=True).pretrain) == 6


def test_streamed_and_in_memory_training_give_identical_weights(tmp_path):
    root = photos(tmp_path / "photos", n=16)
    weights = {}
    for placement, workers in (("device", 0), ("stream", 2)):
        config = make_config("quick", dataset="folder", data_root=str(root), image_size=16, width=4, batch_size=8,
                             epochs=1, device="cpu", data_placement=placement, workers=workers)
        splits, data = load_data(config)
        assert type(data).__name__ == ("ImageFiles" if placement == "stream" else "ImageData")
        run_dir = tmp_path / placement
        run_dir.mkdir()
        model, _ = pretrain(config, splits, data, run_dir, progress=False)
        weights[placement] = model.state_dict()
    assert all(torch.equal(weights["device"][k], weights["stream"][k]) for k in weights["device"])


def test_pretrain_on_unlabelled_photos_then_evaluate_embed_export(tmp_path, capsys):
    root, labelled = photos(tmp_path / "photos"), train_only(tmp_path / "labelled")
    run = tmp_path / "run"
    assert main(["--dataset", "folder", "--data-root", str(root), "--out", str(run), *cheap()]) == 0
    out = capsys.readouterr().out
    assert "evaluation skipped" in out and "--eval-data" in out and "not evaluated" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["knn_top1"] is None and summary["pretrain_images"] == 24
    assert json.loads((run / "config.json").read_text())["image_size"] == 64
    assert not (run / "eval.json").exists() and (run / "figures" / "training_curves.png").is_file()
    assert all("knn_monitor_top1" not in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())

    # Evaluation needs labels: one line without them, then on a labelled folder (at the run's 64 px).
    assert main(["evaluate", str(run), "--label-fractions", "", "--probe-epochs", "2", "--no-progress"]) == 2
    assert "--eval-data" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--eval-data", str(labelled), "--label-fractions", "", "--probe-epochs", "2",
                 "--no-progress"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert 0 <= result["knn"]["top1"] <= 100 and len(result["linear"]["confusion"]) == 3

    # embed: h of every photo in path order, the names beside; nothing is overwritten.
    features = tmp_path / "features.npy"
    assert main(["embed", str(run), str(root), "--out", str(features), "--no-progress"]) == 0
    h = np.load(features)
    names = (tmp_path / "features.files.txt").read_text().splitlines()
    assert h.shape == (24, 32) and h.dtype == np.float32 and len(names) == 24
    assert names[0].endswith("garden/2025/img012.jpg") and names[-1].endswith("holiday/img011.png")
    model = SimCLR.from_checkpoint(run)
    last = torch.from_numpy(np.array(Image.open(names[-1]).convert("RGB"))).permute(2, 0, 1)  # a PNG
    with torch.no_grad():
        expected = model.eval().encode(resize_images(last[None], 64))[0]
    assert torch.allclose(torch.from_numpy(h[-1]), expected, atol=1e-4)
    assert main(["embed", str(run), str(root), "--out", str(features)]) == 2
    assert "already exists" in capsys.readouterr().err

    # export, and the export loads back as a SimCLR encoder with the same features.
    exported = tmp_path / "encoder.pt"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    assert torch.load(exported, weights_only=True)["image_size"] == 64  # so the exported encoder is used at 64 px
    assert "resnet_encoder" in capsys.readouterr().out  # width 4 does not fit torchvision's constructor
    again = SimCLR.from_checkpoint(exported)
    assert "projection head is newly initialised" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(again.eval().encode(resize_images(last[None], 64))[0], expected)
    assert main(["export", str(run), "--out", str(exported)]) == 2


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_export_loads_strictly_into_torchvision_and_gives_the_same_features(tmp_path, cifar_stem):
    torch.manual_seed(0)
    model = SimCLR("resnet18", cifar_stem=cifar_stem, width=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "encoder.pt"
    torch.save(export_encoder(model), path)

    blob = torch.load(path, weights_only=True)  # what a user does, with torchvision alone
    net = torchvision.models.resnet18()
    if blob["cifar_stem"]:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(blob["state_dict"], strict=True)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(blob["mean"]).view(1, 3, 1, 1), torch.tensor(blob["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs, ours = net.eval()((x / 255 - mean) / std), model.encode(x)
    assert blob["arch"] == "resnet18" and len(blob["mean"]) == len(blob["std"]) == 3
    assert (theirs - ours).abs().max() < 1e-5

    # The reverse: a bare torchvision state_dict (its fc is named and ignored) loads into SimCLR.
    bare = tmp_path / "torchvision.pt"
    torch.save(torchvision.models.resnet18().state_dict() if not cifar_stem else net.state_dict(), bare)
    loaded = SimCLR.from_checkpoint(bare)
    assert loaded.arch["cifar_stem"] == cifar_stem and loaded.feature_dim == 512


def test_a_state_dict_with_missing_keys_is_one_line(tmp_path, capsys):
    state = torchvision.models.resnet18().state_dict()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(UserError) as exc:
        SimCLR.from_checkpoint(tmp_path / "partial.pt")
    assert "1 missing keys" in str(exc.value) and "layer4.1.bn2.weight" in str(exc.value)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert main(["export", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "torchvision ResNet state_dict" in capsys.readouterr().err


def test_transfer_evaluation_on_another_labelled_folder(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--dataset", "folder", "--data-root", str(tiny_folder), "--out", str(run), *cheap()]) == 0
    own = (run / "eval.json").read_bytes()
    labelled = train_only(tmp_path / "shapes")
    assert main(["evaluate", str(run), "--dataset", "folder", "--data-root", str(labelled), "--label-fractions", "",
                 "--probe-epochs", "2", "--no-progress"]) == 0
    assert "(transfer)" in capsys.readouterr().out
    result = json.loads((run / "transfer-shapes.json").read_text())
    assert len(result["linear"]["confusion"]) == 3 and (run / "eval.json").read_bytes() == own
    assert (run / "figures" / "transfer-shapes" / "confusion_matrix.png").is_file()
    # A run evaluated on --eval-data: a transfer to another folder uses that folder, not the run's --eval-data.
    other = tmp_path / "other"
    assert main(["--dataset", "folder", "--data-root", str(photos(tmp_path / "p")), "--eval-data", str(labelled),
                 "--out", str(other), *cheap()]) == 0
    assert main(["evaluate", str(other), "--dataset", "folder", "--data-root", str(tiny_folder), "--label-fractions",
                 "", "--probe-epochs", "2", "--no-progress"]) == 0
    assert len(json.loads((other / f"transfer-{tiny_folder.name}.json").read_text())["linear"]["confusion"]) == 4


def test_a_named_eval_data_set_is_never_looked_for_in_your_image_folder(tmp_path, monkeypatch, capsys):
    from test_data import write_fake_cifar
    monkeypatch.chdir(tmp_path)
    write_fake_cifar(tmp_path / "data", per_batch=8)  # ./data, the default data root
    root = photos(tmp_path / "photos")
    assert main(["--dataset", "folder", "--data-root", str(root), "--eval-data", "cifar10", "--no-download",
                 "--image-size", "32", "--out", str(tmp_path / "run"), *cheap()]) == 0
    assert "cifar-10-batches-py" in capsys.readouterr().out and not list(root.rglob("cifar*"))


def test_other_layouts_and_weight_files(tmp_path, capsys):
    # Images directly in train/ (no class folders), and an archive with images at its top: unlabelled.
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (10, 10), (i, 0, 0)).save(flat / "train" / f"{i}.png")
    assert not load_splits("folder", flat).labelled and len(load_splits("folder", flat).pretrain) == 4
    with tarfile.open(tmp_path / "top.tar", "w") as tar:
        for path in sorted((flat / "train").glob("*.png")):
            tar.add(path, arcname=path.name)
    assert len(load_splits("folder", tmp_path / "top.tar").pretrain) == 4
    # A training script's {"state_dict": ..., "epoch": ...} and torchvision's ImageNet-stem weights load.
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    model = SimCLR.from_checkpoint(tmp_path / "wrapped.pt")
    assert not model.arch["cifar_stem"] and model.arch["mean"] == (0.485, 0.456, 0.406)  # ImageNet's
    assert "ignored 2 unexpected keys: fc.bias, fc.weight" in capsys.readouterr().out
    # Every --help works (a % in a help text once broke argparse).
    for command in ([], ["evaluate"], ["embed"], ["export"], ["tsne"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--help"])
        assert exc.value.code == 0


def test_an_unreadable_file_met_by_a_stream_worker_is_one_line():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    files = [(f"img{i}.png", buffer.getvalue()) for i in range(7)] + [("bad.png", b"\x89PNG\r\n not a PNG")]
    source = BatchSource(ImageFiles(files, torch.full((8,), -1), 8), "stream", 4, 0, torch.device("cpu"), workers=1)
    with pytest.raises(UserError) as exc:
        list(source.epoch(0))
    assert str(exc.value).startswith("cannot read image bad.png: ") and "\n" not in str(exc.value)
