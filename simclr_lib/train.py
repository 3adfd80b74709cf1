"""The pretraining loop: data on the device, two augmented views per image, NT-Xent, per-step schedule,
metrics log, kNN monitor, full-state checkpoints and resume."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .augment import SimCLRAugment
from .checkpoints import CheckpointWriter, checkpoint_name, load_checkpoint, save_checkpoint
from .data import DatasetSplits, ImageData
from .distributed import DistInfo
from .errors import Interrupted, TrainingDiverged, UserError
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


class MetricsLog:
    """Append-only JSON-lines log, flushed after every record so a crash loses nothing written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; a step or epoch logged again (a run killed without a chance to
    checkpoint repeats the steps since its last checkpoint when resumed) counts once, with its latest record.
    The file itself is append-only and keeps every line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = {"step": "step", "epoch": "epoch"}
    latest = {(r["kind"], r[key[r["kind"]]]): i for i, r in enumerate(records) if r.get("kind") in key}
    return [r for i, r in enumerate(records)
            if r.get("kind") not in key or latest[(r["kind"], r[key[r["kind"]]])] == i]


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


class StopRequest:
    """While active, SIGINT (Ctrl-C) and SIGTERM only record a request to stop, which the loop honours after the
    current step by writing a checkpoint. The first signal restores the previous handlers, so a second one acts
    at once. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


class TrainStep:
    """One SimCLR step: two augmented views of each image, one forward pass over both, NT-Xent, optimiser and
    schedule step. Nothing in it reads a value back to the host, so on a GPU the step never waits for the device.

    With `compile=True` the model, the augmentation (given its parameters) and the loss go through torch.compile;
    the random parameters are still drawn eagerly from the step's generator, so compiled runs see the same views.
    With several processes (`dist`), the model is wrapped in DistributedDataParallel, `images` is this rank's
    share of the global batch, and the augmentation parameters are drawn for the whole global batch from the
    shared seed and sliced, so the ranks together compute exactly the one-process step on the global batch.
    """

    def __init__(self, model: nn.Module, augment: SimCLRAugment, optimizer: torch.optim.Optimizer,
                 schedule: WarmupCosineSchedule, temperature: float, device: torch.device,
                 compile: bool = False, dist: DistInfo | None = None) -> None:
        self.model, self.augment, self.optimizer, self.schedule = model, augment, optimizer, schedule
        self.temperature, self.device, self.dist = temperature, device, dist or DistInfo()
        network = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(network) if compile else network
        self.apply_augment = torch.compile(augment.apply) if compile else augment.apply
        self.loss_fn = torch.compile(nt_xent_loss) if compile else nt_xent_loss

    def views(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Both views of a uint8 batch (B, 3, H, W) as one (2B, 3, S, S) tensor: first views, then second views."""
        batch, _, height, width = images.shape
        first, world = self.dist.rank * batch, self.dist.world_size
        views = []
        for _ in range(2):
            params = self.augment.sample_params(batch * world, height, width, generator, images.device)
            views.append(self.apply_augment(images, params if world == 1 else params.rows(first, first + batch)))
        views = torch.cat(views)
        if channels_last(self.device):
            views = views.contiguous(memory_format=torch.channels_last)
        return views

    def on_views(self, views: torch.Tensor) -> torch.Tensor:
        """The optimisation step on ready views (2B, ...); returns the detached loss, still on the device."""
        with autocast(self.device):
            z = self.forward(views)
        half = views.shape[0] // 2
        loss = self.loss_fn(z[:half], z[half:], self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        return loss.detach()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment and train on one uint8 batch that is already on the device."""
        return self.on_views(self.views(images, generator))


class TensorImages(Dataset):
    """A uint8 image tensor as a map-style data set, for streaming it from host memory through a DataLoader."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A whole batch in one indexing call (the DataLoader uses this when it exists)."""
        return self.images[torch.as_tensor(indices)]


def _collate_images(batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


def epoch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The epoch's permutation of the n pretraining images, a function of (seed, epoch) only."""
    generator = torch.Generator(device=device).manual_seed(step_seed(seed, epoch, -1))
    return torch.randperm(n, device=device, generator=generator)


def data_placement(config: dict[str, Any], data: ImageData | Dataset, device: torch.device) -> str:
    """'device' (the whole uint8 set lives on the training device) or 'stream' (batches come through a
    DataLoader with workers and pinned memory). 'auto' keeps the data on the device when it takes at most a
    quarter of the free device memory, and always for in-memory data on the CPU."""
    choice = config["data_placement"]
    if not isinstance(data, ImageData):
        return "stream"  # e.g. an ImageFileDataset that decodes files in the workers
    if choice != "auto":
        return choice
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return "device" if data.images.nbytes <= free / 4 else "stream"
    return "device"


class BatchSource:
    """uint8 batches on the training device for (epoch, step): indexed from a device-resident tensor, or
    streamed through a DataLoader (decode or gather in workers, pinned memory, non-blocking copy).

    Both read the same seeded order, so for the same data they give the same batches. `batch_size` is the global
    batch; with several processes each rank gets its contiguous share of every global batch.
    """

    def __init__(self, data: ImageData | Dataset, placement: str, batch_size: int, seed: int,
                 device: torch.device, workers: int = 4, dist: DistInfo | None = None) -> None:
        self.placement, self.batch_size, self.seed, self.device, self.workers = (placement, batch_size, seed,
                                                                                 device, workers)
        self.dist = dist or DistInfo()
        self.local_batch = batch_size // self.dist.world_size
        if placement == "device":
            self.images = data.images.to(device)
            self.dataset = None
        else:
            self.images = None
            self.dataset = TensorImages(data.images) if isinstance(data, ImageData) else data
        self.n = len(data)
        self.steps_per_epoch = self.n // batch_size  # the short last batch is dropped: every step is full

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from `start_step` on."""
        bs, local = self.batch_size, self.local_batch
        offset = self.dist.rank * local
        if self.images is not None:
            order = epoch_order(self.seed, epoch, self.n, self.device)
            for i in range(start_step, self.steps_per_epoch):
                yield self.images[order[i * bs + offset:i * bs + offset + local]]
            return
        order = epoch_order(self.seed, epoch, self.n, torch.device("cpu")).tolist()
        batches = [order[i * bs + offset:i * bs + offset + local] for i in range(start_step, self.steps_per_epoch)]
        pin = self.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, pin_memory=pin,
                            collate_fn=_collate_images, persistent_workers=False,
                            prefetch_factor=4 if self.workers else None)
        for batch in loader:
            yield batch.to(self.device, non_blocking=True)


def pretrain(config: dict[str, Any], splits: DatasetSplits, pretrain_data: ImageData | Dataset, run_dir: Path,
             resume: bool = False, progress: bool = True) -> SimCLR:
    """Contrastive pretraining as a config describes, writing metrics.jsonl and checkpoint.pt into run_dir.

    Every random draw is a function of (seed, epoch, step), so resuming from a checkpoint (written at every epoch
    end, and mid-epoch when SIGINT/SIGTERM asks the run to stop) continues exactly as if the run had never
    stopped. With config["time_budget"] (and not resuming) the number of epochs is first fitted to the budget
    from the measured speed of the first steps, and config.json updated. Under torchrun every rank calls this;
    rank 0 alone logs and writes files.
    """
    t_start = time.perf_counter()
    info = distributed.current()
    device = resolve_device(config["device"])
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    n, batch_size = len(pretrain_data), config["batch_size"]
    if n < batch_size:
        raise UserError(f"only {n} pretraining images but batch_size is {batch_size}: "
                        "lower --batch-size or use more data")
    if batch_size % info.world_size or batch_size // info.world_size < 1:
        raise UserError(f"batch_size {batch_size} is the global batch and must split evenly over the "
                        f"{info.world_size} processes: use a multiple of {info.world_size}")
    placement = data_placement(config, pretrain_data, device)
    source = BatchSource(pretrain_data, placement, batch_size, config["seed"], device, config["workers"], info)
    steps_per_epoch = source.steps_per_epoch

    model = build_model(config, splits.mean, splits.std).to(device)
    if info.enabled and config["sync_bn"]:
        model = distributed.convert_batchnorm(model)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lr = scaled_lr(config["lr"], batch_size, config["lr_scaling"])
    optimizer = build_optimizer(config["optimizer"], model, lr, config["weight_decay"], config["momentum"])
    augment = make_augment(config, splits).to(device)
    generator = torch.Generator(device=device)
    log = MetricsLog(run_dir / "metrics.jsonl") if info.is_main else None
    checkpoints = CheckpointWriter(run_dir, config["keep"], enabled=info.is_main)

    def make_schedule() -> WarmupCosineSchedule:
        return WarmupCosineSchedule(optimizer, config["epochs"] * steps_per_epoch,
                                    round(config["warmup_epochs"] * steps_per_epoch))

    schedule = make_schedule()
    step_fn = TrainStep(model, augment, optimizer, schedule, config["temperature"], device, config["compile"], info)
    if config["time_budget"] is not None and not resume:
        fit = fit_epochs_to_budget(config, step_fn, source, generator, splits, device, checkpoints.path,
                                   deadline=t_start + config["time_budget"])
        config = {**config, "epochs": fit["epochs"], "warmup_epochs": fit["warmup_epochs"]}
        if info.is_main:
            (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            log.write({"kind": "time_budget", **fit})
            print(f"time budget {config['time_budget']:.0f} s: {fit['step_seconds'] * 1e3:.1f} ms/step over "
                  f"{fit['measured_steps']} steps -> {fit['epochs']} epochs of {steps_per_epoch} steps")
        schedule = step_fn.schedule = make_schedule()

    start_epoch, start_step, history, seconds_before = 0, 0, [], 0.0
    partial_loss, partial_seconds = 0.0, 0.0  # of an epoch interrupted part-way
    if resume and checkpoints.path.exists():
        state = load_checkpoint(checkpoints.path)
        load_model_state(model, state["model"], source=str(checkpoints.path))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, history = state["epoch"], state["history"]
        start_step = state.get("step_in_epoch", 0)
        partial_loss, partial_seconds = state.get("epoch_loss_sum", 0.0), state.get("epoch_seconds", 0.0)
        seconds_before = state["pretrain_seconds"] - partial_seconds  # the partial epoch is counted at its end
        checkpoints.last_name = checkpoint_name(start_epoch, start_step)
        torch.set_rng_state(state["rng"])

    def state_dict(epoch: int, step_in_epoch: int, loss_sum: float, seconds: float) -> dict[str, Any]:
        return {
            "arch": model.arch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "step": epoch * steps_per_epoch + step_in_epoch, "epoch_loss_sum": loss_sum, "epoch_seconds": seconds,
            "config": config, "history": history, "pretrain_seconds": seconds_before + seconds,
            # Every draw of the loop is seeded from (seed, epoch, step); the global RNG is kept for user code.
            "rng": torch.get_rng_state(),
        }

    total_steps = config["epochs"] * steps_per_epoch
    pbar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch + start_step, desc="pretrain",
                    unit="step", dynamic_ncols=True)
    model.train()
    try:
        with StopRequest() as stop:
            for epoch in range(start_epoch, config["epochs"]):
                t0 = time.perf_counter()
                first = start_step if epoch == start_epoch else 0
                earlier_loss = partial_loss if epoch == start_epoch else 0.0
                earlier_seconds = partial_seconds if epoch == start_epoch else 0.0
                loss_sum = torch.zeros((), device=device)
                window, window_steps = torch.zeros((), device=device), 0
                for i, batch in enumerate(source.epoch(epoch, first), start=first):
                    step = epoch * steps_per_epoch + i
                    generator.manual_seed(step_seed(config["seed"], epoch, i))
                    lr_used = optimizer.param_groups[0]["lr"]
                    loss = step_fn(batch, generator)
                    loss_sum += loss
                    window += loss
                    window_steps += 1
                    at_log = (step + 1) % config["log_every"] == 0 or i == steps_per_epoch - 1
                    if at_log:
                        # The only host syncs, every log_every steps (and collectives, so all ranks agree).
                        value = distributed.mean_over_ranks(window / window_steps).item()
                        if not math.isfinite(value):
                            raise TrainingDiverged(
                                f"the loss became {value} at step {step + 1} (epoch {epoch + 1}): lower --lr, "
                                "raise --temperature, or train in fp32 (bf16 autocast is on with CUDA); the last "
                                f"good checkpoint is kept in {checkpoints.path}")
                        if log is not None:
                            log.write({"kind": "step", "epoch": epoch, "step": step + 1, "loss": value,
                                       "lr": lr_used})
                        if pbar is not None:
                            pbar.set_postfix(epoch=f"{epoch + 1}/{config['epochs']}", loss=f"{value:.3f}",
                                             lr=f"{lr_used:.3g}")
                        window, window_steps = torch.zeros((), device=device), 0
                    if pbar is not None:
                        pbar.update(1)
                    # Honour SIGINT/SIGTERM after a whole step; with several processes only where all ranks meet.
                    if info.enabled:
                        stopping = at_log and distributed.any_rank(stop.signum is not None, device)
                    else:
                        stopping = stop.signum is not None
                    if stopping:
                        done_loss = earlier_loss + distributed.mean_over_ranks(loss_sum).item()
                        seconds = earlier_seconds + time.perf_counter() - t0
                        checkpoints.write(state_dict(epoch, i + 1, done_loss, seconds))
                        distributed.barrier()  # nobody exits before rank 0's checkpoint is on disk
                        raise Interrupted(stop.signum or signal.SIGTERM, epoch, i + 1, steps_per_epoch,
                                          step + 1, run_dir)
                seconds = earlier_seconds + time.perf_counter() - t0
                loss_mean = (earlier_loss + distributed.mean_over_ranks(loss_sum).item()) / steps_per_epoch
                record = {"kind": "epoch", "epoch": epoch + 1, "loss": loss_mean,
                          "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                          "views_per_s": 2 * (steps_per_epoch - first) * batch_size / max(seconds - earlier_seconds,
                                                                                          1e-9)}
                last = epoch + 1 == config["epochs"]
                if info.is_main and config["knn_every"] and ((epoch + 1) % config["knn_every"] == 0 or last):
                    record["knn_monitor_top1"] = knn_monitor(model, splits, config, device)
                history.append(record)
                if log is not None:
                    log.write(record)
                seconds_before += seconds
                checkpoints.write(state_dict(epoch + 1, 0, 0.0, 0.0))
                start_step, partial_loss, partial_seconds = 0, 0.0, 0.0
    finally:
        if pbar is not None:
            pbar.close()
    distributed.barrier()
    model.eval()
    return model


def fit_epochs_to_budget(config: dict[str, Any], step_fn: TrainStep, source: BatchSource,
                         generator: torch.Generator, splits: DatasetSplits, device: torch.device,
                         ckpt_path: Path, deadline: float, warmup_steps: int = 3,
                         measured_steps: int = 10) -> dict[str, Any]:
    """How many epochs fit before `deadline` (a time.perf_counter() value).

    Times real steps (after `warmup_steps` untimed ones, which absorb compilation and cuDNN autotuning), one kNN
    monitor and one checkpoint write, then puts the model, optimiser and schedule back exactly as they were.
    At least 1 epoch, at most config["epochs"].
    """
    model, optimizer, schedule = step_fn.model, step_fn.optimizer, step_fn.schedule
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), schedule.state_dict())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup_steps = min(warmup_steps, source.steps_per_epoch - 1)
    measured_steps = max(1, min(measured_steps, source.steps_per_epoch - warmup_steps))
    t0 = None
    for i, batch in enumerate(source.epoch(0)):
        if i == warmup_steps:
            sync()
            t0 = time.perf_counter()
        generator.manual_seed(step_seed(config["seed"], -1, i))  # calibration draws, not the run's
        step_fn(batch, generator)
        if i + 1 == warmup_steps + measured_steps:
            break
    sync()
    step_seconds = (time.perf_counter() - t0) / measured_steps
    monitor_seconds = checkpoint_seconds = 0.0
    if step_fn.dist.is_main:  # only rank 0 monitors and writes checkpoints
        if config["knn_every"]:
            t1 = time.perf_counter()
            knn_monitor(model, splits, config, device)
            monitor_seconds = (time.perf_counter() - t1) / config["knn_every"]
        t1 = time.perf_counter()
        probe = ckpt_path.with_name(ckpt_path.name + ".probe")
        save_checkpoint(probe, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        probe.unlink()
        checkpoint_seconds = time.perf_counter() - t1
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    schedule.load_state_dict(saved[2])
    epoch_seconds = source.steps_per_epoch * step_seconds + monitor_seconds + checkpoint_seconds
    budget = deadline - time.perf_counter()  # what is left after building, loading and this calibration
    # 3 % headroom for the per-epoch bookkeeping and for jitter in the measured speed.
    epochs = int(max(0.0, 0.97 * budget) // epoch_seconds)
    epochs = distributed.min_over_ranks(max(1, min(config["epochs"], epochs)), device)  # every rank agrees
    warmup = config["warmup_epochs"] if config["warmup_epochs"] <= epochs else epochs / 10
    return {"seconds_left": budget, "epochs": epochs, "warmup_epochs": warmup, "step_seconds": step_seconds,
            "measured_steps": measured_steps, "epoch_seconds": epoch_seconds, "monitor_seconds": monitor_seconds,
            "checkpoint_seconds": checkpoint_seconds}
