"""Evaluation: frozen representations (feature extraction, weighted kNN, linear probe) and the paper's
semi-supervised protocol (fine-tuning on a label fraction, against the same network trained from scratch)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .augment import SimCLRAugment, normalize
from .config import Config
from .data import DatasetSplits, ImageData, balanced_indices
from .errors import UserError
from .models import SimCLR
from .optim import WarmupCosineSchedule, param_groups
from .runtime import autocast, on_device, resolve_precision, step_seed, to_layout

# Settings of the linear probe and of fine-tuning that are not in the config (the protocols state them).
PROBE_BATCH_SIZE = 512
FINETUNE_WEIGHT_DECAY = 5e-4
FINETUNE_CROP = (0.2, 1.0)


@torch.no_grad()
def extract_features(model: SimCLR, images: torch.Tensor, batch_size: int = 512,
                     device: torch.device | str | None = None, precision: str = "fp32") -> torch.Tensor:
    """Representations h (N, feature_dim), float32 on `device`, of uint8 images, in fp32 unless `precision` says
    otherwise (the kNN monitor may use the training precision). The encoder runs in eval mode: in train mode BatchNorm
    would use (and update its running statistics with) the evaluation batches, leaking test data into the numbers."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = to_layout(images[start:start + batch_size].to(device, non_blocking=True), model)
            with autocast(device, precision):
                chunks.append(model.encode(batch).float())
        return torch.cat(chunks)
    finally:
        model.train(was_training)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk_size: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al. 2018): each of the k most cosine-similar bank items votes exp(sim / T) for its class."""
    bank = F.normalize(bank.float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    k = min(k, len(bank))
    predictions = []
    for start in range(0, len(queries), chunk_size):
        q = F.normalize(queries[start:start + chunk_size].to(bank.device).float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Top-1 accuracy in percent of `knn_predict`."""
    return top1(knn_predict(bank, bank_labels, queries, num_classes, k, temperature), query_labels)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                 batch_size: int = PROBE_BATCH_SIZE, weight_decay: float = 0.0, seed: int = 0,
                 progress: bool = False) -> dict[str, Any]:
    """A linear classifier on frozen, precomputed features (SGD + Nesterov 0.9, cosine per step, no augmentation):
    last-epoch train and test top-1 (%), per-class test accuracy and confusion matrix. Features are standardised
    with the train set's statistics first (affine, so still linear in h): one learning rate fits every encoder."""
    device = train_features.device
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features.to(device) - mean) / std
    y_train = train_labels.to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = torch.nn.Linear(x_train.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="linear probe", leave=False, disable=not progress):
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for start in range(0, len(x_train), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        train_pred, test_pred = classifier(x_train).argmax(1), classifier(x_test).argmax(1)
    return {**classification_metrics(test_pred, test_labels, num_classes), "train_top1": top1(train_pred, y_train)}


def top1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (predictions.cpu() == labels.cpu()).float().mean().item()


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top1, per_class (percent) and the confusion matrix (a list of rows) of test-set predictions."""
    return {"top1": top1(predictions, labels), "per_class": per_class_accuracy(predictions, labels, num_classes),
            "confusion": confusion_matrix(predictions, labels, num_classes).tolist()}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (num_classes, num_classes) int64 on the CPU: row = true class, column = predicted class."""
    predictions, labels = predictions.flatten().long().cpu(), labels.flatten().long().cpu()
    if predictions.shape != labels.shape:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    # An out-of-range class would silently land in another cell of the flattened matrix.
    for name, values in (("predictions", predictions), ("labels", labels)):
        if len(values) and not (0 <= values.min() and values.max() < num_classes):
            raise ValueError(f"{name} must lie in 0..{num_classes - 1}, got {values.min()}..{values.max()}")
    # One bincount over the pair index true * C + predicted fills every cell at once.
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Top-1 accuracy in percent of each class (NaN for a class with no examples in `labels`)."""
    confusion = confusion_matrix(predictions, labels, num_classes).double()
    return (100.0 * confusion.diagonal() / confusion.sum(dim=1)).tolist()  # 0 / 0 is NaN: no examples, no accuracy


def label_fraction_indices(labels: torch.Tensor, percent: float, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced `percent` % of a labelled set (at least one per class), fixed by seed."""
    if (labels < 0).any():
        raise UserError("a label fraction needs a labelled set, but some labels are -1 (unlabelled)")
    if not 0 < percent <= 100:
        raise UserError(f"the label fraction must be in (0, 100] percent, got {percent}")
    # The paper's 1 % / 10 % subsets; a tiny fraction of a small set still gets one image per class.
    n = min(len(labels), max(round(len(labels) * percent / 100), len(labels.unique())))
    return balanced_indices(labels, n, seed)


@torch.no_grad()
def _predict(network: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
             device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (CPU int64) of uint8 images, with `network` in eval mode and no augmentation."""
    network.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        x = to_layout(normalize(images[start:start + batch_size].to(device, non_blocking=True), mean, std), network)
        with autocast(device):
            predictions.append(network(x).argmax(dim=1).cpu())
    return torch.cat(predictions)


def train_classifier(encoder: nn.Module, feature_dim: int, train: ImageData, test: ImageData, num_classes: int,
                     mean: Sequence[float], std: Sequence[float], epochs: int = 30, batch_size: int = 256,
                     lr: float = 0.05, device: torch.device | str = "cpu", seed: int = 0, progress: bool = False,
                     desc: str = "fine-tune", precision: str = "auto", min_steps: int = 0) -> dict[str, Any]:
    """Train a copy of `encoder` + a new linear head end to end on `train` (crop + flip; SGD + Nesterov, cosine, no
    weight decay on BatchNorm and biases) for `epochs` or at least `min_steps`, then test once on all of `test`:
    the test metrics, train_top1 (un-augmented), epochs, steps, labelled_images and train_loss (last epoch's mean)."""
    if len(train) < 2:
        raise UserError(f"fine-tuning needs at least 2 labelled images (BatchNorm in train mode), got {len(train)}")
    device = torch.device(device)
    # Never train the caller's module: a pretrained model must stay usable for the next label fraction.
    encoder = copy.deepcopy(encoder).to(device)
    with torch.random.fork_rng(devices=[]):  # a seeded head that leaves the caller's global RNG alone
        torch.manual_seed(seed)
        head = nn.Linear(feature_dim, num_classes)
    network = on_device(nn.Sequential(encoder, head), device).requires_grad_(True)  # every weight trains

    n = len(train)
    batch_size = min(batch_size, n)
    # A last batch of 1 image would break BatchNorm (and is worth nothing): it is dropped, others are kept.
    steps_per_epoch = n // batch_size + (1 if n % batch_size >= 2 else 0)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(param_groups(network, FINETUNE_WEIGHT_DECAY), lr=lr, momentum=0.9, nesterov=True)
    schedule = WarmupCosineSchedule(optimizer, total_steps, warmup_steps=0)
    scaler = torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device) == "fp16")
    augment = SimCLRAugment(image_size=train.image_size, crop_scale=FINETUNE_CROP, color_prob=0.0, gray_prob=0.0,
                            blur_prob=0.0, mean=tuple(mean), std=tuple(std)).to(device)

    # The labelled set is small: keep it on the device as uint8 and augment there, batch by batch.
    images, labels = train.images.to(device), train.labels.to(device)
    generator = torch.Generator(device=device)
    epochs_iter = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    for epoch in epochs_iter:
        network.train()
        generator.manual_seed(step_seed(seed, epoch, -1))
        order = torch.randperm(n, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            # Seeding every step from (seed, epoch, step) makes each view reproducible on its own.
            generator.manual_seed(step_seed(seed, epoch, i))
            views = to_layout(augment(images[idx], generator), network)
            with autocast(device, precision):
                logits = network(views)
            loss = F.cross_entropy(logits.float(), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_sum += loss.detach()  # summed on the device: no host sync inside the epoch
        if progress:
            epochs_iter.set_postfix(loss=f"{(loss_sum / steps_per_epoch).item():.3f}")

    test_pred = _predict(network, test.images, mean, std, device)
    train_pred = _predict(network, train.images, mean, std, device)
    return {**classification_metrics(test_pred, test.labels, num_classes), "train_top1": top1(train_pred, train.labels),
            "epochs": epochs, "steps": total_steps, "labelled_images": n,
            "train_loss": (loss_sum / max(1, steps_per_epoch)).item() if epochs else float("nan")}


def finetune(model: SimCLR, train: ImageData, test: ImageData, num_classes: int, **kwargs: Any) -> dict[str, Any]:
    """The paper's semi-supervised protocol: fine-tune a copy of the encoder (without the projection head, as in
    SimCLR v1) on a labelled subset; `kwargs` go to `train_classifier`, mean/std default to the model's."""
    kwargs = {"mean": model.arch["mean"], "std": model.arch["std"], **kwargs}
    return train_classifier(model.encoder, model.feature_dim, train, test, num_classes, **kwargs)


def supervised_baseline(model: SimCLR, train: ImageData, test: ImageData, num_classes: int,
                        **kwargs: Any) -> dict[str, Any]:
    """The same architecture trained from scratch with the same `kwargs` as `finetune`: only the start differs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(kwargs.get("seed", 0))
        fresh = SimCLR(**model.arch)
    return finetune(fresh, train, test, num_classes, **{"desc": "supervised", **kwargs})


def protocols(config: Config, splits: DatasetSplits) -> dict[str, str]:
    """How each number was measured, in words, from the settings actually used."""
    n_train = len(splits.train)
    return {"split": f"full {splits.name} test set ({len(splits.test)} images)",
            "knn": f"weighted kNN (k={config.knn_k}, T={config.knn_temperature}, cosine) on frozen eval-mode "
                   f"features; bank: the full train set ({n_train} images)",
            "linear": f"linear classifier on frozen, standardised eval-mode features of the full train set "
                      f"({n_train} images); SGD + Nesterov 0.9, lr {config.probe_lr}, cosine per step, batch "
                      f"{PROBE_BATCH_SIZE}, {config.probe_epochs} epochs, no augmentation; last epoch reported",
            "finetune": f"crop ({FINETUNE_CROP[0]}-{FINETUNE_CROP[1]}) + flip; SGD + Nesterov 0.9, lr "
                        f"{config.finetune_lr}, wd {FINETUNE_WEIGHT_DECAY}, cosine per step, {config.finetune_epochs} "
                        f"epochs or at least {config.finetune_min_steps} steps; last epoch reported"}
