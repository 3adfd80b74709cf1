"""The training loop's fast path: batch sources, the time budget, and a step with no host synchronisation."""

import json

import numpy as np
import pytest
import torch

from simclr_lib.augment import SimCLRAugment
from simclr_lib.config import make_config
from simclr_lib.data import DatasetSplits, ImageData
from simclr_lib.loss import nt_xent_loss
from simclr_lib.models import build_model
from simclr_lib.optim import WarmupCosineSchedule, build_optimizer
from simclr_lib.train import BatchSource, TrainStep, pretrain, read_metrics


def tiny_splits(n: int = 48) -> DatasetSplits:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = (torch.randint(0, 60, (n, 3, 16, 16), generator=g) + 60 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    data = ImageData(images, labels, ["a", "b", "c"])
    return DatasetSplits("folder", data, data, data, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "generated")


def tiny_config(**overrides):
    values = dict(width=2, epochs=2, batch_size=16, warmup_epochs=1, knn_every=0, knn_k=5, knn_monitor_size=20,
                  device="cpu", log_every=1)
    return make_config("quick", **{**values, **overrides})


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_batches_equal_device_batches(workers):
    splits = tiny_splits()
    device = torch.device("cpu")
    on_device = BatchSource(splits.pretrain, "device", 16, seed=3, device=device)
    streamed = BatchSource(splits.pretrain, "stream", 16, seed=3, device=device, workers=workers)
    for epoch in (0, 1):
        a, b = list(on_device.epoch(epoch)), list(streamed.epoch(epoch, start_step=0))
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert x.dtype == torch.uint8 and torch.equal(x, y)
    assert torch.equal(list(on_device.epoch(1, start_step=2))[0], list(on_device.epoch(1))[2])


def test_streamed_training_is_identical_to_device_training(tmp_path):
    splits = tiny_splits()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    device_run = pretrain(tiny_config(data_placement="device"), splits, splits.pretrain, tmp_path / "a",
                          progress=False)
    stream_run = pretrain(tiny_config(data_placement="stream", workers=0), splits, splits.pretrain,
                          tmp_path / "b", progress=False)
    assert_same(weights(device_run), weights(stream_run))


def test_time_budget_fits_epochs_and_leaves_the_run_unchanged(tmp_path):
    splits = tiny_splits()
    for name in ("plain", "budget", "tiny"):
        (tmp_path / name).mkdir()
    plain = pretrain(tiny_config(), splits, splits.pretrain, tmp_path / "plain", progress=False)
    # A budget far beyond the recipe is capped at --epochs; the calibration steps must leave no trace.
    big = tiny_config(time_budget=1e6)
    (tmp_path / "budget" / "config.json").write_text(json.dumps(big))
    budgeted = pretrain(big, splits, splits.pretrain, tmp_path / "budget", progress=False)
    assert_same(weights(plain), weights(budgeted))
    fit = [r for r in read_metrics(tmp_path / "budget" / "metrics.jsonl") if r["kind"] == "time_budget"]
    assert len(fit) == 1 and fit[0]["epochs"] == 2 and fit[0]["step_seconds"] > 0
    # A budget smaller than one epoch still trains one, and config.json says so (with a fitting warmup).
    small = tiny_config(epochs=50, warmup_epochs=10, time_budget=1e-3)
    pretrain(small, splits, splits.pretrain, tmp_path / "tiny", progress=False)
    saved = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["warmup_epochs"] == pytest.approx(0.1) and saved["time_budget"] == 1e-3
    epochs = [r for r in read_metrics(tmp_path / "tiny" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1]


def test_train_step_has_no_host_sync():
    # On the meta device nothing has a value: any .item(), boolean mask or data-dependent shape in the step
    # (augmentation, forward, loss, LARS, schedule) would raise.
    config = tiny_config(optimizer="lars")
    model = build_model(config, (0.5,) * 3, (0.25,) * 3).to("meta")
    optimizer = build_optimizer("lars", model, 0.1, 1e-4)
    step = TrainStep(model, SimCLRAugment(image_size=16).to("meta"), optimizer,
                     WarmupCosineSchedule(optimizer, 10, 2), 0.5, torch.device("meta"))
    images = torch.empty(8, 3, 16, 16, dtype=torch.uint8, device="meta")
    loss = step(images, None)
    assert loss.device.type == "meta" and loss.shape == ()


def test_compiled_augmentation_and_loss_match_eager():
    augment = SimCLRAugment(image_size=16)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = augment.sample_params(8, 16, 16, torch.Generator().manual_seed(1))
    views = torch.compile(augment.apply)(images, params)
    assert torch.allclose(views, augment.apply(images, params), atol=1e-5)
    z1, z2 = views[:4].flatten(1), views[4:].flatten(1)
    assert torch.allclose(torch.compile(nt_xent_loss)(z1, z2, 0.5), nt_xent_loss(z1, z2, 0.5), atol=1e-5)


def test_image_files_stream_through_workers(tmp_path):
    from PIL import Image

    from simclr_lib.data import ImageFileDataset, resize_images

    g = torch.Generator().manual_seed(0)
    for i, (size, mode) in enumerate([((20, 16), "RGB"), ((16, 16), "L"), ((24, 30), "RGBA"), ((16, 18), "RGB")]):
        array = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(array).convert(mode).save(tmp_path / f"{i}.png")
    dataset = ImageFileDataset.from_folder(tmp_path, 12)
    assert len(dataset) == 4
    source = BatchSource(dataset, "stream", 2, seed=0, device=torch.device("cpu"), workers=1)
    batches = list(source.epoch(0))
    assert len(batches) == 2 and all(b.shape == (2, 3, 12, 12) and b.dtype == torch.uint8 for b in batches)
    first = torch.from_numpy(np.array(Image.open(tmp_path / "0.png"))).permute(2, 0, 1).contiguous()
    expected = resize_images(first, 12)
    assert torch.equal(dataset[0], expected)


def test_read_metrics_counts_a_repeated_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"kind": "step", "step": 1, "loss": 5.0}, {"kind": "step", "step": 2, "loss": 4.0},
               {"kind": "epoch", "epoch": 1, "loss": 4.5}, {"kind": "step", "step": 2, "loss": 4.1},
               {"kind": "time_budget", "epochs": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_metrics(path) == [records[0], records[2], records[3], records[4]]
    assert len(path.read_text().splitlines()) == 5  # the file keeps every line


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    from simclr_lib import checkpoints

    path = tmp_path / "checkpoint.pt"
    checkpoints.save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})

    def torn_save(state, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(checkpoints.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    state = checkpoints.load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
