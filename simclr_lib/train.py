"""The pretraining loop: data on the device, two augmented views per image, NT-Xent, per-step schedule,
metrics log, kNN monitor, full-state checkpoints and exact resume."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .augment import SimCLRAugment
from .checkpoints import CheckpointWriter, checkpoint_name, load_checkpoint, save_checkpoint
from .config import Config
from .data import DatasetSplits, ImageData, ImageFiles
from .distributed import DistInfo
from .errors import Interrupted, TrainingDiverged, UserError
from .evaluate import extract_features, knn_accuracy
from .loss import contrastive_accuracy, nt_xent_loss
from .models import SimCLR, build_model, load_model_state
from .optim import WarmupCosineSchedule, optimizer_for
from .runtime import autocast, on_device, resolve_device, resolve_precision, step_seed, to_layout


def make_augment(config: Config, splits: DatasetSplits) -> SimCLRAugment:
    """The view pipeline a config asks for, with the data set's normalisation."""
    blur = config.blur_prob if config.blur_prob is not None else (0.5 if splits.name == "stl10" else 0.0)
    return SimCLRAugment(image_size=config.image_size or splits.image_size, crop_scale=(config.crop_scale_min, 1.0),
                         color_strength=config.color_strength, gray_prob=config.gray_prob, blur_prob=blur,
                         mean=splits.mean, std=splits.std)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in order; a step or epoch logged again (a run killed without a chance to
    checkpoint repeats the steps since its last checkpoint when resumed) counts once, with its latest record."""
    path = Path(path)
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {(r["kind"], r[r["kind"]]): i for i, r in enumerate(records) if r.get("kind") in ("step", "epoch")}
    return [r for i, r in enumerate(records) if r.get("kind") not in ("step", "epoch")
            or latest[(r["kind"], r[r["kind"]])] == i]


def knn_monitor(model: SimCLR, splits: DatasetSplits, config: Config, device: torch.device) -> float:
    """A cheap kNN accuracy for the training curves on fixed subsets of train (bank) and test (queries); the
    reported accuracies come from `simclr_lib.evaluate` on the full sets."""
    generator = torch.Generator().manual_seed(0)
    size = config.knn_monitor_size
    bank = splits.train.subset(torch.randperm(len(splits.train), generator=generator)[:size])
    queries = splits.test.subset(torch.randperm(len(splits.test), generator=generator)[: max(1, size // 5)])
    bank_f, query_f = (extract_features(model, d.images, config.eval_batch_size, device, config.precision)
                       for d in (bank, queries))
    return knn_accuracy(bank_f, bank.labels, query_f, queries.labels, splits.num_classes, config.knn_k,
                        config.knn_temperature)


class StopRequest:
    """While active, SIGINT and SIGTERM only record a request to stop, which the loop honours after the current
    step by writing a checkpoint. The first signal restores the previous handlers, so a second one acts at once.
    Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self) -> None:
        self.signum, self._previous = None, {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.__exit__()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class TrainStep:
    """One SimCLR step: two views of each image, one forward pass over both, NT-Xent, optimiser and schedule step,
    with no read-back to the host. `compile=True` compiles model, augmentation and loss (the random parameters
    are still drawn eagerly). With several processes (`dist`) the model is wrapped in DDP and every rank draws the
    parameters of the whole global batch and applies its slice: together they compute the one-process step."""

    def __init__(self, model: nn.Module, augment: SimCLRAugment, optimizer: torch.optim.Optimizer,
                 schedule: WarmupCosineSchedule, temperature: float, device: torch.device, compile: bool = False,
                 dist: DistInfo | None = None, precision: str = "auto", bn_per_view: bool = False) -> None:
        self.model, self.augment, self.optimizer, self.schedule = model, augment, optimizer, schedule
        self.temperature, self.device, self.dist = temperature, device, dist or DistInfo()
        self.precision, self.bn_per_view = resolve_precision(precision, device), bn_per_view
        # fp16 needs its gradients scaled (it would underflow); a disabled scaler passes everything through.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        network = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel
            network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # Static shapes (every batch is full): a second batch size in one process (the bench) gets its own graph
        # instead of a slower dynamic-shape one.
        compiled = functools.partial(torch.compile, dynamic=False) if compile else (lambda fn: fn)
        self.forward, self.apply_augment = compiled(network), compiled(augment.apply)
        self.loss_fn = compiled(nt_xent_loss)

    def views(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Both views of a uint8 batch (B, 3, H, W) as one (2B, 3, S, S) tensor: first views, then second views."""
        batch, _, height, width = images.shape
        first, world = self.dist.rank * batch, self.dist.world_size
        views = []
        for _ in range(2):
            params = self.augment.sample_params(batch * world, height, width, generator, images.device)
            views.append(self.apply_augment(images, params if world == 1 else params.rows(first, first + batch)))
        return to_layout(torch.cat(views), self.model)

    def on_views(self, views: torch.Tensor) -> torch.Tensor:
        """The optimisation step on ready views (2B, ...); returns the detached loss, still on the device."""
        half = views.shape[0] // 2
        with autocast(self.device, self.precision):
            # Per view, BatchNorm normalises each view's batch by its own statistics.
            z = torch.cat([self.forward(views[:half]), self.forward(views[half:])]) if self.bn_per_view \
                else self.forward(views)
        loss = self.loss_fn(z[:half], z[half:], self.temperature)
        self.accuracy = contrastive_accuracy(z[:half].detach(), z[half:].detach())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return loss.detach()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment and train on one uint8 batch that is already on the device."""
        return self.on_views(self.views(images, generator))


class _Rows(torch.utils.data.TensorDataset):
    """One uint8 image tensor as a data set whose DataLoader batches are gathered in one indexing call."""

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.tensors[0][torch.as_tensor(indices)]


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    return batch  # `_Rows.__getitems__` already gives the whole batch as one tensor


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's permutation of the n pretraining images: a function of (seed, epoch) only, drawn on the CPU
    whatever the device or data placement, so a resume that places the data elsewhere sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, -1)))


class BatchSource:
    """uint8 batches on the training device for (epoch, step): indexed from a device-resident tensor
    ("device"), or gathered in DataLoader workers and copied from pinned memory ("stream"); both read the same
    seeded order. `batch_size` is the global batch; with several processes each rank gets its contiguous share."""

    def __init__(self, data: ImageData | ImageFiles, placement: str, batch_size: int, seed: int, device: torch.device,
                 workers: int = 4, dist: DistInfo | None = None) -> None:
        self.placement, self.batch_size, self.seed, self.device = placement, batch_size, seed, device
        self.workers, self.dist = workers, dist or DistInfo()
        self.local_batch = batch_size // self.dist.world_size
        self.images = data.images.to(device) if placement == "device" else None
        # Streamed: rows of an in-memory set, or image files that the workers decode (ImageFiles).
        self.streamed = data if isinstance(data, ImageFiles) else _Rows(data.images)
        self.n = len(data)
        self.steps_per_epoch = self.n // batch_size  # the short last batch is dropped: every step is full

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from `start_step` on."""
        order = epoch_order(self.seed, epoch, self.n).to(self.device if self.placement == "device" else "cpu")
        first = self.dist.rank * self.local_batch
        rows = (order[i * self.batch_size + first:i * self.batch_size + first + self.local_batch]
                for i in range(start_step, self.steps_per_epoch))
        if self.placement == "device":
            yield from (self.images[idx] for idx in rows)
            return
        loader = DataLoader(self.streamed, batch_sampler=[idx.tolist() for idx in rows],
                            num_workers=self.workers, pin_memory=self.device.type == "cuda", collate_fn=_as_batch,
                            prefetch_factor=4 if self.workers else None)
        try:
            yield from (batch.to(self.device, non_blocking=True) for batch in loader)
        except UserError as exc:  # raised in a worker, DataLoader adds the worker's traceback: keep the last line
            lines = str(exc).strip().splitlines()
            if len(lines) > 1:
                raise UserError(lines[-1].split("UserError: ", 1)[-1]) from None
            raise


def data_placement(config: Config, data: ImageData, device: torch.device) -> str:
    """'auto': "device" if the uint8 set takes at most 1/4 of the free CUDA memory (always off CUDA), else "stream"."""
    if config.data_placement != "auto":
        return config.data_placement
    fits = device.type != "cuda" or data.images.nbytes <= torch.cuda.mem_get_info(device)[0] / 4
    return "device" if fits else "stream"


def check_pretraining_data(n: int, config: Config, world_size: int = 1) -> None:
    """A one-line UserError when n images cannot make one full batch, or the batch does not split over ranks."""
    if n < config.batch_size:
        raise UserError(f"only {n} pretraining images but batch_size is {config.batch_size}: "
                        "lower --batch-size or use more data")
    if config.batch_size % world_size:
        raise UserError(f"batch_size {config.batch_size} is the global batch and must split evenly over the "
                        f"{world_size} processes: use a multiple of {world_size}")


class Pretraining:
    """Everything one pretraining run holds: model, optimiser, schedule, batches, log, checkpoints and progress.
    Every random draw is a function of (seed, epoch, step), so resuming from a checkpoint (written after the first
    epoch, then at an epoch end every checkpoint_every seconds and after the last epoch, and mid-epoch when
    SIGINT/SIGTERM asks the run to stop) continues exactly as if the run had never stopped."""

    def __init__(self, config: Config, splits: DatasetSplits, data: ImageData, run_dir: Path) -> None:
        self.info = info = distributed.current()
        device = resolve_device(config.device)
        self.device = torch.device("cuda", info.local_rank) if info.enabled and device.type == "cuda" else device
        check_pretraining_data(len(data), config, info.world_size)
        self.config, self.splits, self.run_dir = config, splits, run_dir
        self.source = BatchSource(data, data_placement(config, data, self.device), config.batch_size, config.seed,
                                  self.device, config.workers, info)
        self.steps_per_epoch = self.source.steps_per_epoch
        model = build_model(config, splits.mean, splits.std)
        self.model = on_device(distributed.convert_batchnorm(model) if info.enabled and config.sync_bn else model,
                               self.device)
        self.optimizer = optimizer_for(config, self.model)
        self.step_fn = TrainStep(self.model, make_augment(config, splits).to(self.device), self.optimizer,
                                 self._schedule(), config.temperature, self.device, config.compile, info,
                                 config.precision, config.bn_per_view)
        self.generator = torch.Generator(device=self.device)
        self.checkpoints = CheckpointWriter(run_dir, config.keep, enabled=info.is_main)
        # Where the run stands: the next (epoch, step), the partial epoch's loss sum and seconds, the history.
        self.epoch, self.step, self.loss_sum, self.seconds = 0, 0, 0.0, 0.0
        self.history: list[dict[str, Any]] = []
        # Pretraining seconds of the finished epochs; views/s of the last epoch's steps in this session.
        self.seconds_before, self.views_per_s = 0.0, 0.0
        # the first epoch always writes one (--resume then has something to continue); later ones every
        # config.checkpoint_every seconds
        self.last_write = -math.inf

    def _schedule(self) -> WarmupCosineSchedule:
        spe, config = self.steps_per_epoch, self.config
        return WarmupCosineSchedule(self.optimizer, config.epochs * spe, round(config.warmup_epochs * spe))

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl (rank 0 only), opened per record so a crash loses nothing written."""
        if self.info.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def restore(self) -> None:
        """Continue from the run folder's checkpoint: weights, optimiser, schedule, position and the global RNG."""
        state = load_checkpoint(self.checkpoints.path)
        if "optimizer" not in state:
            raise UserError(f"{self.checkpoints.path} holds weights only (a shipped or exported encoder), not a run "
                            "to continue: start a new run, or evaluate it with `run.py evaluate`")
        load_model_state(self.model, state["model"], source=str(self.checkpoints.path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):  # fp16 runs only
            self.step_fn.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.history = state["epoch"], state["step_in_epoch"], state["history"]
        self.loss_sum, self.seconds = state["epoch_loss_sum"], state["epoch_seconds"]
        self.seconds_before = state["pretrain_seconds"] - self.seconds  # the partial epoch counts at its end
        self.checkpoints.last_name = checkpoint_name(self.epoch, self.step)
        torch.set_rng_state(state["rng"])

    def fit_to_budget(self, deadline: float, warmup_steps: int = 3, measured_steps: int = 10) -> None:
        """Train as many epochs as fit before `deadline` (a perf_counter() value), at least 1, at most config.epochs.
        Times real steps (after untimed ones that absorb compilation and autotuning), one kNN monitor and one
        checkpoint write, then puts model, optimiser, schedule and scaler back as they were; config.json follows."""
        step_fn, config = self.step_fn, self.config
        parts = (self.model, self.optimizer, step_fn.schedule, step_fn.scaler)
        saved = copy.deepcopy([part.state_dict() for part in parts])
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        warmup_steps = min(warmup_steps, self.steps_per_epoch - 1)
        measured_steps = max(1, min(measured_steps, self.steps_per_epoch - warmup_steps))
        started = time.perf_counter()
        for i, batch in enumerate(itertools.islice(self.source.epoch(0), warmup_steps + measured_steps)):
            if i == warmup_steps:
                sync()
                t0 = time.perf_counter()
            self.generator.manual_seed(step_seed(config.seed, -1, i))  # calibration draws, not the run's
            step_fn(batch, self.generator)
        sync()
        t1 = time.perf_counter()
        monitor = checkpoint = 0.0
        if self.info.is_main:  # only rank 0 monitors and writes checkpoints
            knn_monitor(self.model, self.splits, config, self.device)
            t2 = time.perf_counter()
            probe = self.checkpoints.path.with_name("checkpoint.pt.probe")
            save_checkpoint(probe, {"model": saved[0], "optimizer": saved[1]})
            probe.unlink()
            monitor, checkpoint = t2 - t1, time.perf_counter() - t2
        for part, state in zip(parts, saved):
            part.load_state_dict(state)
        # The monitor runs every knn_every epochs; with knn_every 0 once, after the last epoch: off the time left.
        # first_steps_seconds: the untimed steps, compilation and autotuning included (the compiler's cost in a run)
        fit = {"step_seconds": (t1 - t0) / measured_steps, "measured_steps": measured_steps,
               "first_steps": warmup_steps, "first_steps_seconds": t0 - started,
               "monitor_seconds": monitor / config.knn_every if config.knn_every else 0.0,
               "checkpoint_seconds": checkpoint}
        epoch_seconds = self.steps_per_epoch * fit["step_seconds"] + fit["monitor_seconds"]
        # one checkpoint per checkpoint_every seconds (at most one per epoch), and the last one
        every = max(config.checkpoint_every, epoch_seconds, 1e-9)
        fit["epoch_seconds"] = epoch_seconds + checkpoint * epoch_seconds / every
        fit["seconds_left"] = deadline - time.perf_counter() - (0.0 if config.knn_every else monitor) - checkpoint
        # 3 % headroom for the per-epoch bookkeeping and for jitter in the measured speed; every rank agrees.
        epochs = int(max(0.0, 0.97 * fit["seconds_left"]) // fit["epoch_seconds"])
        fit["epochs"] = distributed.min_over_ranks(max(1, min(config.epochs, epochs)), self.device)
        fit["warmup_epochs"] = config.warmup_epochs if config.warmup_epochs <= fit["epochs"] else fit["epochs"] / 10
        self.config = config.replace(epochs=fit["epochs"], warmup_epochs=fit["warmup_epochs"])
        step_fn.schedule = self._schedule()
        if self.info.is_main:
            self.config.save(self.run_dir / "config.json")
            self.log({"kind": "time_budget", **fit})
            print(f"time budget {config.time_budget:.0f} s: {fit['step_seconds'] * 1e3:.1f} ms/step over "
                  f"{measured_steps} steps -> {fit['epochs']} epochs of {self.steps_per_epoch} steps")

    def state_dict(self) -> dict[str, Any]:
        """The full state of the run at (self.epoch, self.step), for checkpoint.pt."""
        return {"arch": self.model.arch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.step_fn.schedule.state_dict(), "scaler": self.step_fn.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step, "step": self.epoch * self.steps_per_epoch + self.step,
                "epoch_loss_sum": self.loss_sum, "epoch_seconds": self.seconds, "config": self.config.to_dict(),
                "history": self.history, "pretrain_seconds": self.seconds_before + self.seconds,
                # Every draw of the loop is seeded from (seed, epoch, step); the global RNG is kept for user code.
                "rng": torch.get_rng_state()}

    def run(self, progress: bool) -> SimCLR:
        """Train the remaining epochs; return the model in eval mode."""
        pbar = tqdm(total=self.config.epochs * self.steps_per_epoch, desc="pretrain", unit="step", dynamic_ncols=True,
                    initial=self.epoch * self.steps_per_epoch + self.step, disable=not (progress and self.info.is_main))
        self.model.train()
        with pbar, StopRequest() as stop:  # the bar closes however the loop ends
            while self.epoch < self.config.epochs:
                self._train_epoch(stop, pbar)
                self._end_epoch()
        distributed.barrier()
        return self.model.eval()

    def _train_epoch(self, stop: StopRequest, pbar: Any) -> None:
        """The steps of the current epoch from self.step on; the loss is summed on the device (no host sync)."""
        t0, seconds_before, first = time.perf_counter(), self.seconds, self.step
        loss_sum, window, window_steps = torch.zeros((), device=self.device), torch.zeros(2, device=self.device), 0
        for i, batch in enumerate(self.source.epoch(self.epoch, first), start=first):
            global_step = self.epoch * self.steps_per_epoch + i + 1
            self.generator.manual_seed(step_seed(self.config.seed, self.epoch, i))
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self.step_fn(batch, self.generator)
            loss_sum += loss
            window += torch.stack([loss, self.step_fn.accuracy])
            window_steps += 1
            at_log = global_step % self.config.log_every == 0 or i == self.steps_per_epoch - 1
            if at_log:
                self._log_steps(window / window_steps, global_step, lr, pbar)
                window, window_steps = torch.zeros(2, device=self.device), 0
            pbar.update(1)
            # Honour SIGINT/SIGTERM after a whole step; with several processes only where all ranks meet.
            stopping = stop.signum is not None
            if self.info.enabled:
                stopping = at_log and distributed.any_rank(stopping, self.device)
            self.step, self.seconds = i + 1, seconds_before + time.perf_counter() - t0
            if stopping or self.step == self.steps_per_epoch:
                self.loss_sum += distributed.mean_over_ranks(loss_sum).item()
            if stopping:
                self.checkpoints.write(self.state_dict())
                distributed.barrier()  # nobody exits before rank 0's checkpoint is on disk
                raise Interrupted(stop.signum or signal.SIGTERM, self.epoch, self.step, self.steps_per_epoch,
                                  global_step, self.run_dir)
        self.views_per_s = 2 * (self.steps_per_epoch - first) * self.config.batch_size / max(
            self.seconds - seconds_before, 1e-9)

    def _log_steps(self, means: torch.Tensor, global_step: int, lr: float, pbar: Any) -> None:
        """The only host sync of the loop, every log_every steps (a collective, so all ranks agree): the mean loss
        and contrastive accuracy of the steps since the last log."""
        value, accuracy = distributed.mean_over_ranks(means).tolist()
        if not math.isfinite(value):
            fp32 = "" if self.step_fn.precision == "fp32" else ", or pass --precision fp32"
            kept = (f"the last good checkpoint is kept in {self.checkpoints.path}" if self.checkpoints.path.exists()
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"the loss became {value} at step {global_step} (epoch {self.epoch + 1}): lower "
                                   f"--lr or raise --temperature{fp32}; {kept}")
        self.log({"kind": "step", "epoch": self.epoch, "step": global_step, "loss": value, "lr": lr,
                  "contrastive_acc": accuracy})
        pbar.set_postfix(epoch=f"{self.epoch + 1}/{self.config.epochs}", loss=f"{value:.3f}", lr=f"{lr:.3g}")

    def _end_epoch(self) -> None:
        """The epoch's record (with the kNN monitor when due), then a checkpoint at the start of the next epoch."""
        done, every = self.epoch + 1, self.config.knn_every
        record = {"kind": "epoch", "epoch": done, "loss": self.loss_sum / self.steps_per_epoch,
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": self.seconds, "views_per_s": self.views_per_s}
        # knn_every 0 monitors only after the last epoch.
        if self.info.is_main and self.splits.labelled and (done == self.config.epochs or (every and done % every == 0)):
            t0 = time.perf_counter()
            record["knn_monitor_top1"] = knn_monitor(self.model, self.splits, self.config, self.device)
            record["knn_monitor_seconds"] = time.perf_counter() - t0  # its cost beside the epoch's `seconds`
        self.history.append(record)
        self.log(record)
        self.seconds_before += self.seconds
        self.epoch, self.step, self.loss_sum, self.seconds = done, 0, 0.0, 0.0
        # A checkpoint costs a full write (and on a fast GPU, a sizeable part of an epoch): every few minutes is
        # enough, since SIGINT/SIGTERM write one at once; the last epoch always writes, for evaluation and resume.
        now = time.perf_counter()
        if done == self.config.epochs or now - self.last_write >= self.config.checkpoint_every:
            self.checkpoints.write(self.state_dict())
            self.last_write = now


def pretrain(config: Config, splits: DatasetSplits, data: ImageData, run_dir: Path, resume: bool = False,
             progress: bool = True) -> tuple[SimCLR, Config]:
    """Contrastive pretraining as `config` says, with metrics.jsonl and checkpoints in run_dir; returns the model and
    the config it ran with (a time_budget first fits the epochs). Under torchrun all ranks call it; rank 0 writes."""
    start = time.perf_counter()
    run = Pretraining(config, splits, data, Path(run_dir))
    if resume and run.checkpoints.path.exists():
        run.restore()
    elif config.time_budget is not None and not resume:
        run.fit_to_budget(deadline=start + config.time_budget)
    return run.run(progress), run.config
