"""The training loop's fast path: batch sources, the time budget, and a step with no host synchronisation."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from simclr_lib.augment import SimCLRAugment
from simclr_lib.checkpoints import CheckpointWriter
from simclr_lib.config import make_config
from simclr_lib.data import DatasetSplits, ImageData
from simclr_lib.errors import Interrupted
from simclr_lib.loss import nt_xent_loss
from simclr_lib.models import build_model
from simclr_lib.optim import WarmupCosineSchedule, build_optimizer, scaled_lr, warmup_cosine
from simclr_lib.runtime import step_seed
from simclr_lib.train import BatchSource, TrainStep, epoch_order, make_augment, pretrain, read_metrics


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
    device_run, _ = pretrain(tiny_config(data_placement="device"), splits, splits.pretrain, tmp_path / "a",
                          progress=False)
    stream_run, _ = pretrain(tiny_config(data_placement="stream", workers=0), splits, splits.pretrain,
                          tmp_path / "b", progress=False)
    assert_same(weights(device_run), weights(stream_run))


def test_time_budget_fits_epochs_and_leaves_the_run_unchanged(tmp_path):
    splits = tiny_splits()
    for name in ("plain", "budget", "tiny"):
        (tmp_path / name).mkdir()
    plain, _ = pretrain(tiny_config(), splits, splits.pretrain, tmp_path / "plain", progress=False)
    # A budget far beyond the recipe is capped at --epochs; the calibration steps must leave no trace.
    big = tiny_config(time_budget=1e6)
    big.save(tmp_path / "budget" / "config.json")
    budgeted, fitted = pretrain(big, splits, splits.pretrain, tmp_path / "budget", progress=False)
    assert_same(weights(plain), weights(budgeted))
    assert fitted.epochs == 2
    fit = [r for r in read_metrics(tmp_path / "budget" / "metrics.jsonl") if r["kind"] == "time_budget"]
    assert len(fit) == 1 and fit[0]["epochs"] == 2 and fit[0]["step_seconds"] > 0
    assert fit[0]["first_steps"] >= 1 and fit[0]["first_steps_seconds"] > 0  # what a compiled run pays to compile
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


def test_epoch_order_is_drawn_on_the_cpu_whatever_the_device():
    # Bug: the order came from a generator on the data's device, so device-resident and streamed data (and a
    # resume that placed the data elsewhere) saw different batches on a GPU. The meta device stands in for one.
    data = tiny_splits().pretrain
    expected = torch.randperm(48, generator=torch.Generator().manual_seed(step_seed(3, 1, -1)))
    assert torch.equal(epoch_order(3, 1, 48), expected)
    elsewhere = BatchSource(data, "device", 16, seed=3, device=torch.device("meta"))
    assert [b.shape for b in elsewhere.epoch(1)] == [(16, 3, 16, 16)] * 3


def test_knn_every_0_monitors_after_the_last_epoch_only(tmp_path):
    splits = tiny_splits()
    pretrain(tiny_config(knn_every=0, epochs=3), splits, splits.pretrain, tmp_path, progress=False)
    epochs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    assert ["knn_monitor_top1" in r for r in epochs] == [False, False, True]
    assert epochs[-1]["knn_monitor_seconds"] > 0  # what the monitor cost, to set beside the epoch's seconds


@pytest.mark.parametrize("every, kept", [(0.0, ["checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt"]),
                                         (3600.0, ["checkpoint-epoch0001.pt"])])
def test_checkpoints_are_written_every_checkpoint_every_seconds_and_after_the_last_epoch(tmp_path, every, kept):
    # keep=5 keeps every checkpoint replaced: with an hour between writes only the first and last epochs write
    splits = tiny_splits()
    pretrain(tiny_config(epochs=3, keep=5, checkpoint_every=every), splits, splits.pretrain, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == kept
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_the_loop_uses_the_schedules_learning_rate_at_every_step(tmp_path):
    # 48 images / batch 16 = 3 steps per epoch; 4 epochs with 1.5 of warmup: 12 steps, 4.5 -> 4 warmup steps
    splits = tiny_splits()
    config = tiny_config(epochs=4, warmup_epochs=1.5, optimizer="sgd", lr=0.4)
    pretrain(config, splits, splits.pretrain, tmp_path, progress=False)
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    base = scaled_lr(0.4, 16, "linear")
    expected = [base * warmup_cosine(step, 12, round(1.5 * 3)) for step in range(12)]
    assert logged == pytest.approx(expected, rel=1e-12)


def test_make_augment_passes_every_configured_probability_on():
    splits = tiny_splits()
    augment = make_augment(tiny_config(gray_prob=0.7, color_strength=1.5, crop_scale_min=0.3, blur_prob=0.25),
                           splits)
    assert (augment.gray_prob, augment.color_strength, augment.crop_scale, augment.blur_prob) == (0.7, 1.5,
                                                                                                  (0.3, 1.0), 0.25)
    assert augment.image_size == 16 and tuple(augment.mean.flatten().tolist()) == splits.mean
    images = torch.randint(0, 256, (400, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = make_augment(tiny_config(gray_prob=1.0), splits)(images, torch.Generator().manual_seed(0))
    grey = views * augment.std + augment.mean  # back to [0, 1]: every view grey means the setting reached it
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)


def test_resume_restores_the_callers_random_state(tmp_path, monkeypatch):
    # The loop seeds its own draws; the global RNG is the caller's and a resumed run must hand it back as it was.
    splits = tiny_splits()
    (tmp_path / "full").mkdir()
    (tmp_path / "part").mkdir()
    torch.manual_seed(123)
    pretrain(tiny_config(), splits, splits.pretrain, tmp_path / "full", progress=False)
    after_full = torch.get_rng_state()
    real_call, calls = TrainStep.__call__, []

    def stop_after_four(self, images, generator):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, images, generator)

    monkeypatch.setattr(TrainStep, "__call__", stop_after_four)
    torch.manual_seed(123)
    with pytest.raises(Interrupted):
        pretrain(tiny_config(), splits, splits.pretrain, tmp_path / "part", progress=False)
    monkeypatch.setattr(TrainStep, "__call__", real_call)
    torch.manual_seed(999)  # another caller state in between
    pretrain(tiny_config(), splits, splits.pretrain, tmp_path / "part", resume=True, progress=False)
    assert torch.equal(torch.get_rng_state(), after_full)


def test_keep_deletes_the_oldest_checkpoints_not_the_first_names(tmp_path):
    writer = CheckpointWriter(tmp_path, keep=1)
    for epoch, step in [(6, 0), (7, 0), (7, 12), (8, 0)]:
        writer.write({"epoch": epoch, "step_in_epoch": step})
    # checkpoint.pt is epoch 8; the one kept before it is the mid-epoch (7, 12), newer than the end of epoch 7.
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-epoch0007-step0012.pt"]


def test_precision_auto_picks_bf16_fp16_or_fp32_by_device(monkeypatch):
    from simclr_lib.runtime import resolve_precision

    cuda = torch.device("cuda")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. Colab's T4
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("bf16", torch.device("cpu")) == "bf16"


def one_step(config, images, init_scale=2.0**16, **step_args):
    model = build_model(config, (0.5,) * 3, (0.25,) * 3)
    optimizer = build_optimizer("sgd", model, 0.1, 0.0)
    step = TrainStep(model, SimCLRAugment(image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3), optimizer,
                     WarmupCosineSchedule(optimizer, 10, 0), 0.5, torch.device("cpu"), **step_args)
    step.scaler._init_scale = init_scale  # the default 2^16 overflows at first, and the scaler skips that step
    loss = step(images, torch.Generator().manual_seed(0))
    return loss, model, step


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_follow_fp32(precision):
    images = tiny_splits(16).pretrain.images
    config = tiny_config(width=8)
    loss32, model32, _ = one_step(config, images, precision="fp32")
    loss, model, step = one_step(config, images, init_scale=128.0, precision=precision)
    assert step.scaler.is_enabled() == (precision == "fp16")  # fp16 gradients are scaled, or they underflow
    assert abs(loss.item() - loss32.item()) < 0.05
    moved32 = [(p - q).flatten() for p, q in zip(model32.parameters(), build_model(config).parameters())]
    moved = [(p - q).flatten() for p, q in zip(model.parameters(), build_model(config).parameters())]
    cosine = torch.nn.functional.cosine_similarity(torch.cat(moved32), torch.cat(moved), dim=0)
    assert cosine > 0.9  # the same update, up to rounding (an unrelated one would be near 0)


def test_bn_per_view_normalises_each_view_by_its_own_statistics():
    images = tiny_splits(16).pretrain.images
    config = tiny_config(width=4, proj_batch_norm="all")
    joint, _, step = one_step(config, images)
    per_view, _, per_step = one_step(config, images, bn_per_view=True)
    # The per-view loss is NT-Xent of the two views each passed through the model (train mode) on its own.
    model = build_model(config, (0.5,) * 3, (0.25,) * 3).train()
    views = per_step.views(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nt_xent_loss(model(views[:16]), model(views[16:]), 0.5)
        together = model(views)
    torch.testing.assert_close(per_view, expected)
    assert not torch.allclose(joint, per_view)
    torch.testing.assert_close(joint, nt_xent_loss(together[:16], together[16:], 0.5))


ARCHIVES = [Path(__file__).parents[1] / "data", Path(__file__).parents[1] / ".." / "shared" / "data"]
CIFAR_ROOT = next((d for d in ARCHIVES if (d / "cifar10-jpeg.tar.gz").is_file()), None)


@pytest.mark.skipif(CIFAR_ROOT is None, reason="no CIFAR-10 archive in data/ (CI stages one)")
def test_pretraining_beats_the_same_network_at_random_init(tmp_path):
    """The whole point: 6 epochs on 2,000 CIFAR-10 images lift the kNN accuracy of a narrow ResNet-18 (measured:
    22.9 % -> 34.2 % at seed 0, 21.8 % -> 27.1 % at seed 1, 2 CPU cores, about 40 s)."""
    from simclr_lib.data import balanced_subset, load_splits
    from simclr_lib.evaluate import extract_features, knn_accuracy
    from simclr_lib.jobs import random_init_model

    splits = load_splits("cifar10", CIFAR_ROOT, download=False)
    config = make_config("quick", train_subset=2000, epochs=6, batch_size=128, width=8, knn_every=6,
                         knn_monitor_size=1000, log_every=1000, device="cpu")
    bank, queries = balanced_subset(splits.train, 2000, seed=1), balanced_subset(splits.test, 1000, seed=1)

    def knn(model):
        features = [extract_features(model, d.images, 512, "cpu") for d in (bank, queries)]
        return knn_accuracy(features[0], bank.labels, features[1], queries.labels, 10, k=20)

    random_init = knn(random_init_model(config, splits, torch.device("cpu")))
    trained, _ = pretrain(config, splits, balanced_subset(splits.pretrain, 2000, seed=0), tmp_path, progress=False)
    assert knn(trained) > random_init + 3


def test_a_compiled_run_compiles_once(tmp_path, monkeypatch):
    # The compiled step (model, augmentation, loss) must not recompile: not after the time budget's calibration
    # steps are undone, nor when the kNN monitor switches the model to eval and back, nor from epoch to epoch.
    # Dynamo's eager backend traces and guards exactly as the real compiler does, in a fraction of the time.
    compile_for_real, compiled = torch.compile, []

    def traced(fn, **kwargs):
        compiled.append(kwargs)
        return compile_for_real(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", traced)
    torch._dynamo.reset()
    config = tiny_config(compile=True, time_budget=1e6, knn_every=1)
    (tmp_path / "run").mkdir()
    with torch._dynamo.config.patch(error_on_recompile=True):
        pretrain(config, tiny_splits(), tiny_splits().pretrain, tmp_path / "run", progress=False)
    torch._dynamo.reset()
    assert compiled == [{"dynamic": False}] * 3  # model, augmentation, loss
    epochs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("knn_monitor_top1" in r for r in epochs)
