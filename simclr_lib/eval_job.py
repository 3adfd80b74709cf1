"""The evaluation jobs behind `simclr evaluate` and `simclr tsne`: load a trained model from a run folder, a .pt
file or a URL, and measure it against the same network at random initialisation on the full test set."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoints import resolve_checkpoint
from .config import make_config, validate
from .data import DatasetSplits, balanced_indices, load_splits
from .errors import UserError
from .evaluate import (
    channels_last,
    extract_features,
    finetune,
    knn_accuracy,
    label_fraction_indices,
    linear_probe,
    supervised_baseline,
)
from .models import SimCLR, build_model, load_model_state

RUNTIME_KEYS = ("data_root", "device", "download", "eval_batch_size", "probe_epochs", "finetune_epochs",
                "finetune_lr", "finetune_batch_size", "tsne_points", "skip_bad_images")


def random_init_model(config: dict[str, Any], splits: DatasetSplits, device: torch.device) -> SimCLR:
    """The very network pretraining started from (build_model is seeded by config["seed"]), on `device`."""
    model = build_model(config, splits.mean, splits.std).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(device) else model


def evaluate_model(model: SimCLR, splits: DatasetSplits, config: dict[str, Any], device: torch.device,
                   progress: bool = True) -> dict[str, Any]:
    """kNN and linear-probe top-1 (percent) on the full test set, with the full training set as bank/probe data.

    Returns knn_top1, linear_top1, linear_train_top1, `linear` (the probe's whole result: per class, confusion)
    and `train_features`, kept so the retrieval figure can reuse them.
    """
    train_f = extract_features(model, splits.train.images, config["eval_batch_size"], device)
    test_f = extract_features(model, splits.test.images, config["eval_batch_size"], device)
    knn = knn_accuracy(train_f, splits.train.labels, test_f, splits.test.labels, splits.num_classes,
                       config["knn_k"], config["knn_temperature"])
    probe = linear_probe(train_f, splits.train.labels, test_f, splits.test.labels, splits.num_classes,
                         epochs=config["probe_epochs"], lr=config["probe_lr"], seed=config["seed"],
                         progress=progress)
    return {"knn_top1": knn, "linear_top1": probe["top1"], "linear_train_top1": probe["train_top1"], "linear": probe,
            "train_features": train_f}




def load_trained(source: str | Path, sha256: str | None = None,
                 overrides: dict[str, Any] | None = None) -> tuple[SimCLR, dict[str, Any], Path]:
    """The trained model, its config (with runtime `overrides`) and the folder where results go."""
    from .checkpoints import load_checkpoint

    path = resolve_checkpoint(source, sha256=sha256)
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "arch" not in state or "model" not in state:
        raise UserError(f"{path} is not a SimCLR checkpoint of this project (no 'arch'/'model' entries)")
    model = SimCLR(**state["arch"])
    load_model_state(model, state["model"], source=str(path))
    if "config" in state:
        config = validate(state["config"])
    else:  # weights without a recipe: evaluate on CIFAR-10 with this architecture
        arch = state["arch"]
        config = make_config("quick", **{k: arch[k] for k in ("backbone", "cifar_stem", "width", "proj_hidden_dim",
                                                              "proj_dim", "proj_batch_norm")})
    changed = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(changed) - set(RUNTIME_KEYS))
    if unknown:
        raise UserError(f"{unknown[0]} cannot be changed when evaluating a trained model")
    return model, validate({**config, **changed}), path.parent


def _prepare(model: SimCLR, device: torch.device) -> SimCLR:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last(device) else model


def _fraction_key(percent: float) -> str:
    return f"{percent:g}"


def write_linear_eval(out_dir: Path, trained: dict[str, Any], random_init: dict[str, Any], splits: DatasetSplits,
                      config: dict[str, Any], device: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write eval.json (kNN + linear probe, and whatever `extra` adds) in the shape the report reads."""
    split = f"full {splits.name} test set ({len(splits.test)} images)"
    result = {
        "device": device,
        "classes": splits.test.classes,
        "knn": {"top1": trained["knn_top1"], "random_init_top1": random_init["knn_top1"], "split": split,
                "protocol": (f"weighted kNN (k={config['knn_k']}, T={config['knn_temperature']}, cosine) on frozen "
                             f"eval-mode features; bank: the full train set ({len(splits.train)} images)"),
                "epochs": None},
        "linear": {"top1": trained["linear_top1"], "random_init_top1": random_init["linear_top1"],
                   "train_top1": trained["linear_train_top1"], "split": split,
                   "protocol": (f"linear classifier on frozen, standardised eval-mode features of the full train "
                                f"set ({len(splits.train)} images); SGD + Nesterov 0.9, lr {config['probe_lr']}, "
                                "cosine per step, batch 512, no augmentation; last epoch reported"),
                   "epochs": config["probe_epochs"],
                   "per_class": trained["linear"].get("per_class"), "confusion": trained["linear"].get("confusion")},
        **(extra or {}),
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def label_fraction_results(model: SimCLR, splits: DatasetSplits, config: dict[str, Any], device: torch.device,
                           fractions: list[float], supervised: bool = True,
                           progress: bool = True) -> dict[str, dict[str, Any]]:
    """Fine-tuning of the pretrained encoder, and the same backbone from scratch, on each label fraction."""
    split = f"full {splits.name} test set ({len(splits.test)} images)"
    kwargs = dict(mean=splits.mean, std=splits.std, epochs=config["finetune_epochs"],
                  batch_size=config["finetune_batch_size"], lr=config["finetune_lr"], device=device,
                  seed=config["seed"], progress=progress)
    out: dict[str, dict[str, Any]] = {"finetune": {}, "supervised": {}}
    for percent in fractions:
        subset = splits.train.subset(label_fraction_indices(splits.train.labels, percent, config["seed"]))
        common = (f"on a class-balanced {percent:g} % of the train labels ({len(subset)} images, seed "
                  f"{config['seed']}); crop (0.2-1) + flip; SGD + Nesterov 0.9, lr {config['finetune_lr']}, "
                  f"wd 5e-4, cosine per step, {config['finetune_epochs']} epochs; last epoch reported")
        jobs = [("finetune", finetune, "whole network fine-tuned from the SimCLR encoder + a new linear head, ")]
        if supervised:
            jobs.append(("supervised", supervised_baseline,
                         "the same backbone trained from random init with the same budget, "))
        for name, fn, what in jobs:
            result = fn(model, subset, splits.test, splits.num_classes, desc=f"{name} {percent:g}%", **kwargs)
            out[name][_fraction_key(percent)] = {**result, "protocol": what + common, "split": split}
    return out


def evaluate_job(source: str | Path, fractions: list[float], supervised: bool = True, sha256: str | None = None,
                 overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """`simclr evaluate`: kNN, linear probe, label-fraction fine-tuning vs supervised; eval.json + figures."""
    from . import viz
    from .report import write_report
    from .train import device_description, resolve_device

    t0 = time.perf_counter()
    model, config, out_dir = load_trained(source, sha256, overrides)
    device = resolve_device(config["device"])
    model = _prepare(model, device)
    splits = load_splits(config["dataset"], config["data_root"], config["image_size"], config["download"],
                         config["skip_bad_images"])
    print(f"evaluating {out_dir} on {device_description(device)}: kNN and linear probe, trained vs random init ...")
    trained = evaluate_model(model, splits, config, device, progress)
    random_init = evaluate_model(random_init_model(config, splits, device), splits, config, device, progress)
    extra = label_fraction_results(model, splits, config, device, fractions, supervised, progress)
    figures = out_dir / "figures"
    viz.save_figure(viz.plot_confusion_matrix(trained["linear"]["confusion"], splits.test.classes),
                    figures / "confusion_matrix.png")
    if fractions:
        bars = {f"{p} % labels": {"SimCLR fine-tuned": extra["finetune"][p]["top1"],
                                  **({"supervised": extra["supervised"][p]["top1"]} if supervised else {})}
                for p in extra["finetune"]}
        viz.save_figure(viz.plot_accuracy_bars(bars, "label fractions: fine-tuned SimCLR vs supervised from scratch"),
                        figures / "label_fractions.png")
    result = write_linear_eval(out_dir, trained, random_init, splits, config, device_description(device),
                               {**extra, "seconds": time.perf_counter() - t0})
    report = write_report([out_dir])
    print(format_eval(result))
    print(f"  wrote {out_dir / 'eval.json'}, figures in {figures}/, report {report}")
    return result


def representation_figures(model: SimCLR, baseline: SimCLR, splits: DatasetSplits, config: dict[str, Any],
                           device: torch.device, figures: Path, queries: int = 8, neighbours: int = 8,
                           train_features: torch.Tensor | None = None) -> list[Path]:
    """figures/tsne.png (random init beside trained, test images) and figures/retrieval.png (nearest train images).

    `train_features`, the trained model's features of the full train set when already computed, saves a pass.
    """
    from . import viz

    subset = splits.test.subset(balanced_indices(splits.test.labels, min(config["tsne_points"], len(splits.test)),
                                                 config["seed"]))
    bs = config["eval_batch_size"]
    embeddings = {name: viz.tsne_embedding(extract_features(net, subset.images, bs, device).cpu(), config["seed"])
                  for name, net in (("random init", baseline), ("trained encoder", model))}
    tsne = viz.save_figure(viz.plot_tsne(embeddings, subset.labels, splits.test.classes,
                                         title=f"t-SNE of {len(subset)} test images' representations h"),
                           figures / "tsne.png")
    if train_features is None:
        train_features = extract_features(model, splits.train.images, bs, device)
    bank = F.normalize(train_features, dim=1)
    generator = torch.Generator().manual_seed(config["seed"])
    q_idx = torch.randperm(len(splits.test), generator=generator)[:queries]
    q = F.normalize(extract_features(model, splits.test.images[q_idx], bs, device), dim=1)
    sims, idx = (q @ bank.T).topk(neighbours, dim=1)
    idx, sims = idx.cpu(), sims.cpu()
    retrieval = viz.save_figure(viz.plot_retrieval(splits.test.images[q_idx], splits.train.images[idx],
                                                   splits.test.labels[q_idx], splits.train.labels[idx],
                                                   splits.test.classes, sims), figures / "retrieval.png")
    return [tsne, retrieval]


def tsne_job(source: str | Path, sha256: str | None = None, overrides: dict[str, Any] | None = None) -> list[Path]:
    """`simclr tsne`: the t-SNE and retrieval figures of a trained model."""
    from .train import resolve_device

    model, config, out_dir = load_trained(source, sha256, overrides)
    device = resolve_device(config["device"])
    splits = load_splits(config["dataset"], config["data_root"], config["image_size"], config["download"],
                         config["skip_bad_images"])
    paths = representation_figures(_prepare(model, device), random_init_model(config, splits, device), splits,
                                   config, device, out_dir / "figures")
    for path in paths:
        print(f"wrote {path}")
    return paths


def format_eval(result: dict[str, Any]) -> str:
    """A short table of an eval.json."""
    lines = ["", f"  {'':<28}{'SimCLR':>10}{'baseline':>12}",
             f"  {'kNN top-1 (%)':<28}{result['knn']['top1']:>10.2f}{result['knn']['random_init_top1']:>12.2f}"
             "  (random init)",
             f"  {'linear top-1 (%)':<28}{result['linear']['top1']:>10.2f}"
             f"{result['linear']['random_init_top1']:>12.2f}  (random init)"]
    for key, ft in result.get("finetune", {}).items():
        sup = result.get("supervised", {}).get(key)
        lines.append(f"  {f'fine-tune, {key} % labels (%)':<28}{ft['top1']:>10.2f}"
                     + (f"{sup['top1']:>12.2f}  (supervised from scratch)" if sup else ""))
    return "\n".join(lines)
