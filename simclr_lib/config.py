"""Run configuration: one flat dataclass, the named presets, and validation with one-line errors."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import UserError


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every setting of a run; each field is also a command-line flag (`--field-name`)."""

    preset: str = _f("quick", "name of the preset the run started from")
    # data
    dataset: str = _f("cifar10", "cifar10, cifar100, stl10 or folder")
    data_root: str = _f("data", "where data sets are looked for (and downloaded to)")
    download: bool = _f(True, "allow a torchvision download when the data is not on disk")
    image_size: int | None = _f(None, "side of the square views (default: the data set's image size)")
    train_subset: int | None = _f(None, "pretrain on a class-balanced subset of this many images")
    skip_bad_images: bool = _f(False, "skip (and count) unreadable images in a folder data set instead of stopping")
    # model
    backbone: str = _f("resnet18", "resnet18 or resnet50")
    width: int = _f(64, "channels of the first ResNet stage (64 = the standard network)")
    cifar_stem: bool = _f(True, "3x3 stride-1 conv1 and no max-pool (for small images)")
    proj_hidden_dim: int | None = _f(None, "hidden width of the projection head (default: feature dim)")
    proj_dim: int = _f(128, "output dimension of the projection head")
    proj_batch_norm: bool = _f(False, "BatchNorm in the projection head")
    # optimisation
    epochs: int = _f(1, "pretraining epochs")
    batch_size: int = _f(256, "images per step (each gives two views)")
    optimizer: str = _f("lars", "lars, sgd or adam")
    lr: float = _f(1.0, "base learning rate, scaled by lr_scaling")
    lr_scaling: str = _f("linear", "linear (lr*batch/256), sqrt (lr*sqrt(batch)) or none")
    weight_decay: float = _f(1e-6, "weight decay (not on BatchNorm parameters and biases)")
    momentum: float = _f(0.9, "momentum of LARS and SGD")
    warmup_epochs: float = _f(10.0, "linear warmup before the cosine decay")
    temperature: float = _f(0.5, "NT-Xent temperature")
    # augmentation
    crop_scale_min: float = _f(0.08, "smallest crop area as a fraction of the image")
    color_strength: float = _f(0.5, "colour distortion strength s")
    gray_prob: float = _f(0.2, "probability of converting a view to grayscale")
    blur_prob: float | None = _f(None, "probability of Gaussian blur (default: 0.5 for stl10, else 0)")
    # system
    seed: int = _f(0, "seed for the model init, data order and augmentations")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = _f(False, "torch.compile the model, the augmentation and the loss")
    time_budget: float | None = _f(None, "seconds of pretraining: as many epochs as fit (at most --epochs), "
                                         "measured on the first steps; the schedule spans exactly those epochs")
    data_placement: str = _f("auto", "device (whole uint8 set on the training device), stream (DataLoader "
                                     "with workers, pinned memory) or auto (device when it fits)")
    workers: int = _f(4, "DataLoader worker processes when streaming")
    sync_bn: bool = _f(True, "with torchrun: BatchNorm statistics over the global batch (the paper's global BN)")
    keep: int = _f(0, "older checkpoints kept beside checkpoint.pt (checkpoint-epochNNNN.pt), 0 for none")
    log_every: int = _f(20, "log the loss every this many steps")
    # evaluation
    knn_every: int = _f(1, "kNN monitor every this many epochs (0: only at the end)")
    knn_monitor_size: int = _f(10000, "bank size (train) and at most a fifth of it as queries (test) for the monitor")
    knn_k: int = _f(200, "neighbours of the weighted kNN classifier")
    knn_temperature: float = _f(0.1, "temperature of the kNN vote weights")
    probe_epochs: int = _f(100, "epochs of the linear probe on frozen features")
    probe_lr: float = _f(0.1, "learning rate of the linear probe (SGD + Nesterov, cosine)")
    eval_batch_size: int = _f(512, "batch size for feature extraction")
    finetune_epochs: int = _f(30, "epochs of label-fraction fine-tuning and of the supervised baseline")
    finetune_lr: float = _f(0.05, "learning rate of fine-tuning and the supervised baseline (SGD + Nesterov)")
    finetune_batch_size: int = _f(256, "batch size of fine-tuning and the supervised baseline")
    tsne_points: int = _f(2000, "test images shown in the t-SNE figure (class-balanced)")

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict."""
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
TYPES: dict[str, Any] = get_type_hints(Config)

PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a laptop CPU: a narrow ResNet-18 (width 8, 64-d features) for 16 epochs of a 10k-image subset,
    # about 4.5 min on 2 CPU cores; its kNN accuracy beats the same network at random init by ~15 points.
    "quick": dict(backbone="resnet18", width=8, train_subset=10000, epochs=16, batch_size=256, optimizer="lars",
                  lr=1.0, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=1, temperature=0.5,
                  knn_every=4, probe_epochs=30, knn_monitor_size=5000, finetune_epochs=15),
    # The official SimCLR single-GPU CIFAR-10 command (about 91 % linear eval after 1000 epochs).
    "cifar10-r18": dict(backbone="resnet18", epochs=1000, batch_size=512, optimizer="lars", lr=1.0,
                        lr_scaling="linear", weight_decay=1e-4, warmup_epochs=10, temperature=0.5, knn_every=10),
    # The seed repository's recipe (its table above) with its defects fixed: CIFAR stem, per-step cosine.
    "seed-r50-bs256": dict(backbone="resnet50", epochs=400, batch_size=256, optimizer="adam", lr=3e-4,
                           lr_scaling="none", weight_decay=1e-6, warmup_epochs=0, temperature=0.07,
                           blur_prob=0.5, knn_every=10),
    "seed-r50-bs512": dict(backbone="resnet50", epochs=400, batch_size=512, optimizer="adam", lr=3e-4,
                           lr_scaling="none", weight_decay=1e-6, warmup_epochs=0, temperature=0.07,
                           blur_prob=0.5, knn_every=10),
    # The paper's CIFAR-10 recipe, Appendix B.9 (94.0 % linear eval with ResNet-50 at batch 1024).
    "paper-r50": dict(backbone="resnet50", epochs=1000, batch_size=1024, optimizer="lars", lr=0.3,
                      lr_scaling="linear", weight_decay=1e-6, warmup_epochs=10, temperature=0.5, knn_every=10),
}


def _check_type(key: str, value: Any) -> Any:
    """`value` converted to the field's type, or a UserError naming the key."""
    expected = TYPES[key]
    optional = type(None) in getattr(expected, "__args__", ())
    base = next((a for a in getattr(expected, "__args__", (expected,)) if a is not type(None)), expected)
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool) or base is not bool and isinstance(value, bool) \
            or not isinstance(value, base):
        raise UserError(f"config key {key!r} must be {base.__name__}{' or null' if optional else ''}, "
                        f"got {value!r}")
    return value


def make_config(preset: str = "quick", **overrides: Any) -> dict[str, Any]:
    """The preset's values with `overrides` on top, validated; returns a plain dict."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    values["preset"] = preset
    epochs, warmup = values.get("epochs"), values.get("warmup_epochs", 0)
    if "warmup_epochs" not in overrides and isinstance(epochs, int) and isinstance(warmup, float | int) \
            and warmup > epochs:
        # A short run of a long recipe (e.g. --epochs 3 of a 10-warmup preset) warms up for a tenth of it.
        values["warmup_epochs"] = values["epochs"] / 10
    return validate({**Config().to_dict(), **values})


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check keys, types and ranges; return a complete config dict (missing keys take defaults)."""
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}; known keys are the flags listed by --help")
    full = {**Config().to_dict(), **config}
    full = {k: _check_type(k, v) for k, v in full.items()}
    choices = {"dataset": ("cifar10", "cifar100", "stl10", "folder"), "backbone": ("resnet18", "resnet50"),
               "optimizer": ("lars", "sgd", "adam"), "lr_scaling": ("none", "linear", "sqrt"),
               "data_placement": ("auto", "device", "stream")}
    for key, allowed in choices.items():
        if full[key] not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}; got {full[key]!r}")
    checks = [
        ("batch_size", full["batch_size"] >= 2, "at least 2 (NT-Xent needs negatives)"),
        ("temperature", full["temperature"] > 0, "greater than 0"),
        ("epochs", full["epochs"] >= 1, "at least 1"),
        ("lr", full["lr"] > 0, "greater than 0"),
        ("width", full["width"] >= 1, "at least 1"),
        ("proj_dim", full["proj_dim"] >= 1, "at least 1"),
        ("weight_decay", full["weight_decay"] >= 0, "at least 0"),
        ("momentum", 0 <= full["momentum"] < 1, "in [0, 1)"),
        ("warmup_epochs", 0 <= full["warmup_epochs"] <= full["epochs"], "between 0 and epochs"),
        ("crop_scale_min", 0 < full["crop_scale_min"] <= 1, "in (0, 1]"),
        ("color_strength", full["color_strength"] >= 0, "at least 0"),
        ("gray_prob", 0 <= full["gray_prob"] <= 1, "in [0, 1]"),
        ("blur_prob", full["blur_prob"] is None or 0 <= full["blur_prob"] <= 1, "in [0, 1]"),
        ("image_size", full["image_size"] is None or full["image_size"] >= 8, "at least 8"),
        ("train_subset", full["train_subset"] is None or full["train_subset"] >= 2, "at least 2"),
        ("log_every", full["log_every"] >= 1, "at least 1"),
        ("time_budget", full["time_budget"] is None or full["time_budget"] > 0, "greater than 0"),
        ("workers", full["workers"] >= 0, "at least 0"),
        ("keep", full["keep"] >= 0, "at least 0"),
        ("knn_every", full["knn_every"] >= 0, "at least 0"),
        ("knn_monitor_size", full["knn_monitor_size"] >= 10, "at least 10"),
        ("knn_k", full["knn_k"] >= 1, "at least 1"),
        ("knn_temperature", full["knn_temperature"] > 0, "greater than 0"),
        ("probe_epochs", full["probe_epochs"] >= 1, "at least 1"),
        ("probe_lr", full["probe_lr"] > 0, "greater than 0"),
        ("eval_batch_size", full["eval_batch_size"] >= 1, "at least 1"),
        ("finetune_epochs", full["finetune_epochs"] >= 1, "at least 1"),
        ("finetune_lr", full["finetune_lr"] > 0, "greater than 0"),
        ("finetune_batch_size", full["finetune_batch_size"] >= 2, "at least 2"),
        ("tsne_points", full["tsne_points"] >= 10, "at least 10"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise UserError(f"{key} must be {need}; got {full[key]!r}")
    return full


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a JSON config file, checked to be known config keys (values are checked by `validate`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object of config keys")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r} in {path}; known keys are the flags listed by --help")
    return data


def load_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a complete config.json (such as a run folder's)."""
    return validate(read_config_file(path))
