"""The pretraining loop: data on the device, two augmented views per image, NT-Xent, per-step schedule,
metrics log, kNN monitor, full-state checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .augment import SimCLRAugment
from .checkpoints import CHECKPOINT
from .data import DatasetSplits, ImageData
from .errors import UserError
from .evaluate import autocast, channels_last, extract_features, knn_accuracy
from .loss import nt_xent_loss
from .models import SimCLR, build_model, load_model_state
from .optim import WarmupCosineSchedule, build_optimizer, scaled_lr


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU; an explicit device that is not there is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available here: use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} asked for but MPS is not available here: use --device cpu or auto")
    return device


def device_description(device: torch.device) -> str:
    """A human-readable name of the hardware, for reports next to every number."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return device.type


def make_augment(config: dict[str, Any], splits: DatasetSplits) -> SimCLRAugment:
    """The view pipeline a config asks for, with the data set's normalisation."""
    blur = config["blur_prob"] if config["blur_prob"] is not None else (0.5 if splits.name == "stl10" else 0.0)
    return SimCLRAugment(
        image_size=config["image_size"] or splits.image_size,
        crop_scale=(config["crop_scale_min"], 1.0),
        color_strength=config["color_strength"],
        gray_prob=config["gray_prob"],
        blur_prob=blur,
        mean=splits.mean,
        std=splits.std,
    )


def step_seed(seed: int, epoch: int, step: int) -> int:
    """A seed that depends only on (seed, epoch, step), so any step's randomness can be replayed on resume."""
    return (((seed * 1_000_003) + epoch) * 1_000_003 + step) % (2**63 - 1)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only: no arbitrary code from pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None


class MetricsLog:
    """Append-only JSON-lines log, flushed after every record so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def knn_monitor(model: SimCLR, splits: DatasetSplits, config: dict[str, Any], device: torch.device) -> float:
    """A cheap kNN accuracy for the training curves: fixed subsets of the train (bank) and test (queries) sets.

    Only for watching progress; the reported accuracies come from `simclr_lib.evaluate` on the full sets.
    """
    bank, queries = _monitor_sets(splits, config["knn_monitor_size"])
    bank_f = extract_features(model, bank.images, config["eval_batch_size"], device)
    query_f = extract_features(model, queries.images, config["eval_batch_size"], device)
    return knn_accuracy(bank_f, bank.labels, query_f, queries.labels, splits.num_classes, config["knn_k"],
                        config["knn_temperature"])


def _monitor_sets(splits: DatasetSplits, size: int) -> tuple[ImageData, ImageData]:
    generator = torch.Generator().manual_seed(0)
    bank = splits.train.subset(torch.randperm(len(splits.train), generator=generator)[:size])
    queries = splits.test.subset(torch.randperm(len(splits.test), generator=generator)[: max(1, size // 5)])
    return bank, queries


def pretrain(config: dict[str, Any], splits: DatasetSplits, pretrain_data: ImageData, run_dir: Path,
             resume: bool = False, progress: bool = True) -> SimCLR:
    """Contrastive pretraining as a config describes, writing metrics.jsonl and checkpoint.pt into run_dir.

    With resume=True it continues from run_dir/checkpoint.pt: weights, optimiser, schedule, epoch and
    history are restored, and every random draw is a function of (seed, epoch, step), so the rest of the
    run is the same as if it had never stopped.
    """
    device = resolve_device(config["device"])
    n, batch_size = len(pretrain_data), config["batch_size"]
    if n < batch_size:
        raise UserError(f"only {n} pretraining images but batch_size is {batch_size}: "
                        "lower --batch-size or use more data")
    steps_per_epoch = n // batch_size  # drop the short last batch so every step sees the same batch size
    total_steps = config["epochs"] * steps_per_epoch

    model = build_model(config, splits.mean, splits.std).to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lr = scaled_lr(config["lr"], batch_size, config["lr_scaling"])
    optimizer = build_optimizer(config["optimizer"], model, lr, config["weight_decay"], config["momentum"])
    schedule = WarmupCosineSchedule(optimizer, total_steps, round(config["warmup_epochs"] * steps_per_epoch))
    augment = make_augment(config, splits)
    forward = torch.compile(model) if config["compile"] else model

    ckpt_path = run_dir / CHECKPOINT
    start_epoch, history, seconds_before = 0, [], 0.0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        load_model_state(model, state["model"], source=str(ckpt_path))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, history, seconds_before = state["epoch"], state["history"], state["pretrain_seconds"]
        torch.set_rng_state(state["rng"])
    log = MetricsLog(run_dir / "metrics.jsonl")

    images = pretrain_data.images.to(device)
    generator = torch.Generator(device=device)
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc="pretrain", unit="step",
                    dynamic_ncols=True)
    model.train()
    for epoch in range(start_epoch, config["epochs"]):
        t0 = time.perf_counter()
        generator.manual_seed(step_seed(config["seed"], epoch, -1))
        order = torch.randperm(n, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        window, window_steps = torch.zeros((), device=device), 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            generator.manual_seed(step_seed(config["seed"], epoch, i))
            batch = images[order[i * batch_size:(i + 1) * batch_size]]
            views = torch.cat([augment(batch, generator), augment(batch, generator)])
            if channels_last(device):
                views = views.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                z = forward(views)
            loss = nt_xent_loss(z[:batch_size], z[batch_size:], config["temperature"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr_used = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
            window += loss.detach()
            window_steps += 1
            if window_steps == config["log_every"] or i == steps_per_epoch - 1:
                value = (window / window_steps).item()  # the only host sync, every log_every steps
                if not math.isfinite(value):
                    raise UserError(f"the loss became {value} at step {step}: lower --lr, raise --temperature "
                                    "or train in fp32; the last good checkpoint is kept")
                log.write({"kind": "step", "epoch": epoch, "step": step + 1, "loss": value, "lr": lr_used})
                if pbar is not None:
                    pbar.set_postfix(epoch=f"{epoch + 1}/{config['epochs']}", loss=f"{value:.3f}",
                                     lr=f"{lr_used:.3g}")
                window, window_steps = torch.zeros((), device=device), 0
            if pbar is not None:
                pbar.update(1)
        seconds = time.perf_counter() - t0
        record = {"kind": "epoch", "epoch": epoch + 1, "loss": (loss_sum / steps_per_epoch).item(),
                  "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                  "views_per_s": 2 * steps_per_epoch * batch_size / seconds}
        last = epoch + 1 == config["epochs"]
        if config["knn_every"] and ((epoch + 1) % config["knn_every"] == 0 or last):
            record["knn_monitor_top1"] = knn_monitor(model, splits, config, device)
        history.append(record)
        log.write(record)
        seconds_before += seconds
        save_checkpoint(ckpt_path, {
            "arch": model.arch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
            "config": config, "history": history, "pretrain_seconds": seconds_before,
            # Every draw of the loop is seeded from (seed, epoch, step); the global RNG is kept for user code.
            "rng": torch.get_rng_state(),
        })
    if pbar is not None:
        pbar.close()
    model.eval()
    return model
