"""Run configuration: one frozen, typed, validated dataclass from the command line to the training step, and presets."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import UserError

# The allowed values of the choice settings; the stage modules check their own arguments against these.
DATASETS, BACKBONES = ("cifar10", "cifar100", "stl10", "folder"), ("resnet18", "resnet50")
OPTIMIZERS, LR_SCALINGS, PLACEMENTS = ("lars", "sgd", "adam"), ("none", "linear", "sqrt"), ("auto", "device", "stream")
HEAD_NORMS, PRECISIONS = ("none", "hidden", "all"), ("auto", "bf16", "fp16", "fp32")


def _f(default: Any, help: str, ok: Callable[[Any], bool] | None = None, need: str = "",
       choices: tuple[str, ...] = ()) -> Any:
    """A field with its --help text and its check: `ok(value)` must hold (else "must be <need>") or be in `choices`."""
    return field(default=default, metadata={"help": help, "ok": ok, "need": need, "choices": choices})


def _at_least(low: float) -> dict[str, Any]:
    return {"ok": lambda v: v >= low, "need": f"at least {low:g}"}


_POSITIVE = {"ok": lambda v: v > 0, "need": "greater than 0"}
_PROBABILITY = {"ok": lambda v: 0 <= v <= 1, "need": "in [0, 1]"}


@dataclass(frozen=True)
class Config:
    """Every setting of a run; each field is also a command-line flag (`--field-name`). Invalid values raise."""

    preset: str = _f("quick", "name of the preset the run started from")
    # data
    dataset: str = _f("cifar10", "cifar10, cifar100, stl10 or folder", choices=DATASETS)
    data_root: str = _f("data", "where data sets are looked for (and downloaded to)")
    download: bool = _f(True, "allow a torchvision download when the data is not on disk")
    image_size: int | None = _f(None, "side of the square images and views (default: the data set's; a folder of "
                                      "mixed sizes: 64)", **_at_least(8))
    train_subset: int | None = _f(None, "pretrain on a class-balanced subset of at most this many images",
                                  **_at_least(2))
    skip_bad_images: bool = _f(False, "skip (and count) unreadable images in a folder data set instead of stopping")
    eval_data: str | None = _f(None, "labelled images to evaluate on instead of the pretraining set (needed when it "
                                     "has no labels): a folder of train/<class>/<image>, or cifar10/cifar100/stl10")
    # model
    backbone: str = _f("resnet18", "resnet18 or resnet50", choices=BACKBONES)
    width: int = _f(64, "channels of the first ResNet stage (64 = the standard network)", **_at_least(1))
    cifar_stem: bool = _f(True, "3x3 stride-1 conv1 and no max-pool (for small images)")
    proj_hidden_dim: int | None = _f(None, "hidden width of the projection head (default: feature dim)", **_at_least(1))
    proj_dim: int = _f(128, "output dimension of the projection head", **_at_least(1))
    proj_batch_norm: str = _f("none", "BatchNorm in the projection head: none, after the hidden layer, or after "
                                      "every layer (the official code's CIFAR head)", choices=HEAD_NORMS)
    # optimisation
    epochs: int = _f(1, "pretraining epochs", **_at_least(1))
    batch_size: int = _f(256, "images per step (each gives two views)", lambda v: v >= 2,
                         "at least 2 (NT-Xent needs negatives)")
    optimizer: str = _f("lars", "lars, sgd or adam", choices=OPTIMIZERS)
    lr: float = _f(1.0, "base learning rate, scaled by lr_scaling", **_POSITIVE)
    lr_scaling: str = _f("linear", "linear (lr*batch/256), sqrt (lr*sqrt(batch)) or none", choices=LR_SCALINGS)
    weight_decay: float = _f(1e-6, "weight decay (not on BatchNorm parameters and biases unless "
                                   "--weight-decay-all)", **_at_least(0))
    weight_decay_all: bool = _f(False, "weight decay on every parameter, BatchNorm and biases too (lightly's and "
                                       "most CIFAR recipes'); LARS still does not adapt their steps")
    lars_eta: float = _f(1e-3, "LARS trust coefficient: each layer's step is about lr * eta * ||w|| / ||g||",
                         **_POSITIVE)
    lars_clip: bool = _f(False, "clip LARS's per-layer rate at the global lr (LARC, as solo-learn)")
    momentum: float = _f(0.9, "momentum of LARS and SGD", lambda v: 0 <= v < 1, "in [0, 1)")
    warmup_epochs: float = _f(0.0, "linear warmup before the cosine decay", **_at_least(0))
    temperature: float = _f(0.5, "NT-Xent temperature", **_POSITIVE)
    bn_per_view: bool = _f(False, "BatchNorm statistics over each view's batch separately (one forward pass per "
                                  "view) instead of over both views together")
    # augmentation
    crop_scale_min: float = _f(0.08, "smallest crop area as a fraction of the image", lambda v: 0 < v <= 1, "in (0, 1]")
    color_strength: float = _f(0.5, "colour distortion strength s (hue shift 0.2 s stays within torchvision's 0.5)",
                               lambda v: 0 <= v <= 2.5, "in [0, 2.5]")
    gray_prob: float = _f(0.2, "probability of converting a view to grayscale", **_PROBABILITY)
    blur_prob: float | None = _f(None, "probability of Gaussian blur (default: 0.5 for stl10, else 0)", **_PROBABILITY)
    # system
    seed: int = _f(0, "seed for the model init, data order and augmentations")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    compile: bool = _f(False, "torch.compile the model, the augmentation and the loss")
    precision: str = _f("auto", "training arithmetic: auto (bf16 on GPUs that have it, fp16 with a gradient scaler "
                                "on older GPUs, fp32 on CPU), bf16, fp16 or fp32", choices=PRECISIONS)
    time_budget: float | None = _f(None, "seconds of pretraining: as many epochs as fit (at most --epochs), "
                                         "measured on the first steps; the schedule spans exactly those epochs",
                                   **_POSITIVE)
    data_placement: str = _f("auto", "device (whole uint8 set on the training device), stream (DataLoader "
                                     "with workers, pinned memory) or auto (device when it fits)", choices=PLACEMENTS)
    workers: int = _f(4, "DataLoader worker processes when streaming", **_at_least(0))
    sync_bn: bool = _f(True, "with torchrun: BatchNorm statistics over the global batch (the paper's global BN)")
    checkpoint_every: float = _f(300.0, "seconds between checkpoints, written at the first epoch end after (0: every "
                                        "epoch); the first and last epochs and SIGINT/SIGTERM always write one",
                                 **_at_least(0))
    keep: int = _f(0, "older checkpoints kept beside checkpoint.pt (checkpoint-epochNNNN.pt), 0 for none",
                   **_at_least(0))
    log_every: int = _f(20, "log the loss every this many steps", **_at_least(1))
    # evaluation
    knn_every: int = _f(1, "kNN monitor every this many epochs (0: only after the last epoch)", **_at_least(0))
    knn_monitor_size: int = _f(10000, "bank size (train) and at most a fifth of it as queries (test) for the "
                                      "monitor", **_at_least(10))
    knn_k: int = _f(200, "neighbours of the weighted kNN classifier", **_at_least(1))
    knn_temperature: float = _f(0.1, "temperature of the kNN vote weights", **_POSITIVE)
    probe_epochs: int = _f(100, "epochs of the linear probe on frozen features", **_at_least(1))
    probe_lr: float = _f(0.1, "learning rate of the linear probe (SGD + Nesterov, cosine)", **_POSITIVE)
    eval_batch_size: int = _f(512, "batch size for feature extraction", **_at_least(1))
    finetune_epochs: int = _f(30, "epochs of label-fraction fine-tuning and of the supervised baseline", **_at_least(1))
    finetune_lr: float = _f(0.05, "learning rate of fine-tuning and the supervised baseline (SGD + Nesterov)",
                            **_POSITIVE)
    finetune_min_steps: int = _f(500, "fine-tuning and the supervised baseline run at least this many steps (1 % of "
                                      "CIFAR-10 is 2 steps per epoch at batch 256)", **_at_least(0))
    finetune_batch_size: int = _f(256, "batch size of fine-tuning and the supervised baseline", **_at_least(2))
    tsne_points: int = _f(2000, "test images shown in the t-SNE figure (class-balanced)", **_at_least(10))

    def __post_init__(self) -> None:
        for name, f in FIELDS.items():
            value = _check_type(name, getattr(self, name))
            object.__setattr__(self, name, value)  # e.g. an int from JSON for a float field becomes a float
            meta = f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise UserError(f"{name} must be one of {', '.join(meta['choices'])}; got {value!r}")
            if meta["ok"] is not None and value is not None and not meta["ok"](value):
                raise UserError(f"{name} must be {meta['need']}; got {value!r}")
        if self.warmup_epochs > self.epochs:
            raise UserError(f"warmup_epochs must be between 0 and epochs; got {self.warmup_epochs!r}")

    def replace(self, **changes: Any) -> Config:
        """A validated copy with `changes` applied."""
        if unknown := sorted(set(changes) - set(FIELDS)):
            raise UserError(f"unknown config key {unknown[0]!r}; known keys are the flags listed by --help")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write as JSON (a run folder's config.json)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
TYPES: dict[str, Any] = get_type_hints(Config)
# What may differ when resuming: where and how fast it runs, not what it computes (time_budget only acts at the start).
RESUMABLE = ("device", "log_every", "knn_every", "eval_batch_size", "probe_epochs", "workers", "data_placement",
             "time_budget", "compile", "keep", "checkpoint_every")
# What evaluating a trained model may change: which data (another data set: a transfer evaluation) and where it is,
# how it runs, and the evaluation's own settings.
EVAL_SETTINGS = ("dataset", "image_size", "eval_data", "data_root", "device", "download", "eval_batch_size",
                 "probe_epochs", "finetune_epochs", "finetune_lr", "finetune_batch_size", "finetune_min_steps",
                 "tsne_points", "skip_bad_images")

# The seed repository's recipe (the README's table) with its defects fixed: CIFAR stem, per-step cosine.
_SEED_R50 = dict(backbone="resnet50", epochs=400, optimizer="adam", lr=3e-4, lr_scaling="none", weight_decay=1e-6,
                 warmup_epochs=0, temperature=0.07, blur_prob=0.5, knn_every=10)

PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a laptop CPU: a narrow ResNet-18 (width 8, 64-d features) for 16 epochs of a 10k-image subset,
    # about 5-7 min on 2 CPU cores; its kNN accuracy beats the same network at random init by ~15 points.
    "quick": dict(backbone="resnet18", width=8, train_subset=10000, epochs=16, batch_size=256, optimizer="lars",
                  lr=1.0, lr_scaling="linear", weight_decay=1e-6, warmup_epochs=1, temperature=0.5,
                  knn_every=4, probe_epochs=30, knn_monitor_size=5000, finetune_epochs=15),
    # The official SimCLR single-GPU CIFAR-10 command (about 91 % linear eval after 1000 epochs), with the official
    # v1 code's projection head: two layers, BatchNorm after both (v2's code defaults to three layers).
    "cifar10-r18": dict(backbone="resnet18", epochs=1000, batch_size=512, optimizer="lars", lr=1.0,
                        lr_scaling="linear", weight_decay=1e-4, warmup_epochs=10, temperature=0.5, knn_every=10,
                        proj_batch_norm="all"),
    # A short GPU budget: 8 minutes of pretraining, as many epochs as fit (at most 500), with the optimiser and head
    # of lightly's CIFAR-10 benchmark (84.8 % kNN after 200 epochs there): SGD 0.06 x batch/128, weight decay 5e-4
    # on every parameter, BatchNorm after the head's hidden layer; plus 10 warmup epochs. Chosen from public
    # results and the CPU recipe study (docs/benchmarks.md), not yet measured on a GPU.
    "cifar10-r18-10min": dict(backbone="resnet18", epochs=500, batch_size=512, optimizer="sgd", lr=0.12,
                              lr_scaling="linear", weight_decay=5e-4, weight_decay_all=True, proj_batch_norm="hidden",
                              warmup_epochs=10, temperature=0.5, knn_every=10, time_budget=480.0),
    "seed-r50-bs256": dict(_SEED_R50, batch_size=256),  # the seed repository's recipe (above) at its two batch sizes
    "seed-r50-bs512": dict(_SEED_R50, batch_size=512),
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
    if (base is bool) != isinstance(value, bool) or not isinstance(value, base):
        raise UserError(f"config key {key!r} must be {base.__name__}{' or null' if optional else ''}, got {value!r}")
    return value


def make_config(preset: str = "quick", **overrides: Any) -> Config:
    """The preset's values with `overrides` on top (None keeps the preset's value), validated."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    epochs, warmup = values.get("epochs", 1), values.get("warmup_epochs", 0)
    if "warmup_epochs" not in overrides and isinstance(epochs, int) and isinstance(warmup, float | int) \
            and warmup > epochs:
        # A short run of a long recipe (e.g. --epochs 3 of a 10-warmup preset) warms up for a tenth of it.
        values["warmup_epochs"] = epochs / 10
    return Config().replace(**values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The keys of a JSON config file, checked to be known config keys (values are checked by Config), upgraded."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object of config keys")
    if unknown := sorted(set(data) - set(FIELDS)):
        raise UserError(f"unknown config key {unknown[0]!r} in {path}; known keys are the flags listed by --help")
    return upgrade(data)


def load_config(path: str | Path) -> Config:
    """Read and validate a config.json (such as a run folder's); missing keys take their defaults."""
    return Config(**read_config_file(path))


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """Config keys written by older versions in today's form (proj_batch_norm was true/false)."""
    if isinstance(values.get("proj_batch_norm"), bool):
        values = {**values, "proj_batch_norm": "hidden" if values["proj_batch_norm"] else "none"}
    return values
