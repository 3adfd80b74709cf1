"""The main job behind `python run.py`: pretrain -> evaluate -> figures -> summary, in one run folder."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoints import CHECKPOINT
from .config import load_config
from .data import DatasetSplits, balanced_subset, load_splits
from .errors import UserError
from .eval_job import evaluate_model, random_init_model, representation_figures, write_linear_eval
from .report import write_report
from .train import device_description, pretrain, read_metrics, resolve_device


def new_run_dir(out: str | Path | None, preset: str, runs_root: str | Path = "runs") -> Path:
    """A fresh run folder: `out` if given (`run` has checked it holds nothing), else runs/<preset>-<timestamp>."""
    if out is not None:
        path = Path(out)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(runs_root) / f"{preset}-{stamp}"
        suffix = 2
        while path.exists():
            path = Path(runs_root) / f"{preset}-{stamp}-{suffix}"
            suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_data(config: dict[str, Any]) -> tuple[DatasetSplits, Any]:
    """The data set's splits and the (possibly class-balanced subset of the) pretraining images."""
    splits = load_splits(config["dataset"], config["data_root"], config["image_size"], config["download"],
                         config["skip_bad_images"])
    pretrain_data = splits.pretrain
    if config["train_subset"] is not None:
        if config["train_subset"] > len(pretrain_data):
            raise UserError(f"train_subset {config['train_subset']} is larger than the {len(pretrain_data)} "
                            "pretraining images: lower it, or pass --train-subset none to use them all")
        pretrain_data = balanced_subset(pretrain_data, config["train_subset"], config["seed"])
    if len(pretrain_data) < config["batch_size"]:
        raise UserError(f"only {len(pretrain_data)} pretraining images but batch_size is {config['batch_size']}: "
                        "lower --batch-size or use more data")
    return splits, pretrain_data


def run(config: dict[str, Any], out: str | Path | None = None, resume: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Pretrain, evaluate the trained and the randomly initialised network, draw figures, write summary.json.

    Under torchrun every process pretrains its share (DistributedDataParallel); rank 0 alone creates the run
    folder, logs, evaluates and draws, and only rank 0 returns the summary (the others return {}).
    """
    info = distributed.init_from_env(config["device"])
    try:
        return _run(config, out, resume, progress, info)
    finally:
        distributed.shutdown()


def _run(config: dict[str, Any], out: str | Path | None, resume: bool, progress: bool,
         info: distributed.DistInfo) -> dict[str, Any]:
    from . import viz  # matplotlib is only imported when figures are drawn

    t_start = time.perf_counter()
    if resume and (out is None or not (Path(out) / CHECKPOINT).is_file()):
        raise UserError(f"--resume needs --out pointing at a run folder with {CHECKPOINT}; {out} has none")
    if not resume and out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} already exists: pass --resume to continue that run, or choose another --out")
    distributed.barrier()  # every rank has checked before rank 0 creates anything
    device = resolve_device(config["device"])
    # Data first: a missing data set must not leave an empty run folder behind.
    splits, pretrain_data = load_data(config)
    if resume:
        run_dir = Path(out)
    elif info.is_main:
        run_dir = new_run_dir(out, config["preset"])
        (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    run_dir = Path(distributed.broadcast_object(str(run_dir) if info.is_main or resume else None))
    if info.is_main:
        processes = f"  |  {info.world_size} processes (torchrun)" if info.enabled else ""
        print(f"run folder: {run_dir}  |  device: {device_description(device)}{processes}")
        print(f"data: {splits.name} from {splits.source}: {len(pretrain_data)} pretraining images, "
              f"{len(splits.train)} train / {len(splits.test)} test for evaluation")
    t0 = time.perf_counter()
    model = pretrain(config, splits, pretrain_data, run_dir, resume=resume, progress=progress and info.is_main)
    pretrain_wall = time.perf_counter() - t0
    if not info.is_main:
        return {}
    if info.enabled and device.type == "cpu":
        # torchrun gave each process one thread; rank 0 now evaluates alone and may use every core.
        torch.set_num_threads(os.cpu_count() or 1)
    fitted = load_config(run_dir / "config.json")  # --time-budget has set the epochs that fit
    config = {**config, "epochs": fitted["epochs"], "warmup_epochs": fitted["warmup_epochs"]}
    history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    pretrain_seconds = sum(r["seconds"] for r in history)

    print("evaluating the trained encoder and the same network at random initialisation ...")
    trained = evaluate_model(model, splits, config, device, progress)
    baseline = random_init_model(config, splits, device)
    random_init = evaluate_model(baseline, splits, config, device, progress)

    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    viz.save_figure(viz.plot_training_curves(read_metrics(run_dir / "metrics.jsonl")),
                    figures / "training_curves.png")
    viz.save_figure(viz.plot_confusion_matrix(trained["linear"]["confusion"], splits.test.classes),
                    figures / "confusion_matrix.png")
    print(f"drawing t-SNE ({config['tsne_points']} test images) and nearest-neighbour retrieval ...")
    representation_figures(model, baseline, splits, config, device, figures,
                           train_features=trained.pop("train_features"))

    summary = {
        "preset": config["preset"], "dataset": config["dataset"], "backbone": config["backbone"],
        "width": config["width"], "epochs": config["epochs"], "batch_size": config["batch_size"],
        "optimizer": config["optimizer"], "temperature": config["temperature"],
        "pretrain_images": len(pretrain_data), "device": device_description(device),
        "knn_top1": trained["knn_top1"], "linear_top1": trained["linear_top1"],
        "random_init_knn_top1": random_init["knn_top1"], "random_init_linear_top1": random_init["linear_top1"],
        "linear_train_top1": trained["linear_train_top1"],
        "protocol": (f"full {splits.name} test set ({len(splits.test)} images); kNN k={config['knn_k']} "
                     f"T={config['knn_temperature']} cosine on the full train set; linear probe on frozen "
                     f"features, SGD+Nesterov lr {config['probe_lr']} cosine, {config['probe_epochs']} epochs, "
                     "last epoch reported"),
        "pretrain_seconds": pretrain_seconds, "pretrain_wall_seconds_this_session": pretrain_wall,
        "total_seconds": time.perf_counter() - t_start,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_linear_eval(run_dir, trained, random_init, splits, config, device_description(device))
    report = write_report([run_dir])
    print(format_summary(summary))
    print(f"  report: {report}  (simclr evaluate {run_dir} adds label-fraction fine-tuning vs supervised)")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The short table `python run.py` prints at the end."""
    rows = [
        ("", "trained", "random init"),
        ("kNN top-1 (%)", f"{summary['knn_top1']:.2f}", f"{summary['random_init_knn_top1']:.2f}"),
        ("linear top-1 (%)", f"{summary['linear_top1']:.2f}", f"{summary['random_init_linear_top1']:.2f}"),
    ]
    table = "\n".join(f"  {a:<18}{b:>10}{c:>14}" for a, b, c in rows)
    return (f"\n{summary['preset']}: {summary['backbone']} (width {summary['width']}), {summary['epochs']} epochs, "
            f"batch {summary['batch_size']}, {summary['optimizer']}, T={summary['temperature']}, "
            f"on {summary['device']}\n{table}\n"
            f"  pretraining {summary['pretrain_seconds']:.0f} s, total {summary['total_seconds']:.0f} s\n"
            f"  results in {summary['run_dir']}/ (summary.json, metrics.jsonl, checkpoint.pt, figures/)")
