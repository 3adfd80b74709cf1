"""The jobs behind the command line: the main run (pretrain -> evaluate -> figures -> summary) and `evaluate` /
`tsne` of a trained model. Every job writes into a run folder and never replaces a file that is already there."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import distributed, evaluate
from .checkpoints import CHECKPOINT, read_model_checkpoint
from .config import EVAL_SETTINGS, Config, make_config, upgrade
from .data import DatasetSplits, ImageData, balanced_indices, balanced_subset, load_splits
from .errors import UserError
from .models import SimCLR, build_model, load_model_state
from .report import fresh_path, write_report
from .runtime import device_description, on_device, resolve_device
from .train import check_pretraining_data, pretrain, read_metrics


def new_run_dir(out: str | Path | None, preset: str, runs_root: str | Path = "runs") -> Path:
    """A fresh run folder: `out` if given (the caller has checked it holds nothing), else runs/<preset>-<time>."""
    path = Path(out) if out is not None else fresh_path(Path(runs_root) / f"{preset}-{datetime.now():%Y%m%d-%H%M%S}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_data(config: Config) -> tuple[DatasetSplits, ImageData]:
    """The data set's splits and the (possibly class-balanced subset of the) pretraining images."""
    splits = load_splits(config.dataset, config.data_root, config.image_size, config.download, config.skip_bad_images)
    data = splits.pretrain
    if config.train_subset is not None:
        if config.train_subset > len(data):
            raise UserError(f"train_subset {config.train_subset} is larger than the {len(data)} pretraining "
                            "images: lower it, or pass --train-subset none to use them all")
        data = balanced_subset(data, config.train_subset, config.seed)
    check_pretraining_data(len(data), config, distributed.current().world_size)
    return splits, data


def random_init_model(config: Config, splits: DatasetSplits, device: torch.device) -> SimCLR:
    """The very network pretraining started from (build_model is seeded by config.seed), on `device`."""
    return on_device(build_model(config, splits.mean, splits.std), device)


def evaluate_model(model: SimCLR, splits: DatasetSplits, config: Config, device: torch.device,
                   progress: bool = True) -> dict[str, Any]:
    """kNN and linear-probe top-1 (percent) on the full test set with the full train set as bank / probe data:
    knn_top1, linear_top1, linear_train_top1, `linear` (the probe's whole result) and `train_features`."""
    train_f, test_f = (evaluate.extract_features(model, d.images, config.eval_batch_size, device)
                       for d in (splits.train, splits.test))
    knn = evaluate.knn_accuracy(train_f, splits.train.labels, test_f, splits.test.labels, splits.num_classes,
                                config.knn_k, config.knn_temperature)
    probe = evaluate.linear_probe(train_f, splits.train.labels, test_f, splits.test.labels, splits.num_classes,
                                  epochs=config.probe_epochs, lr=config.probe_lr, seed=config.seed, progress=progress)
    return {"knn_top1": knn, "linear_top1": probe["top1"], "linear_train_top1": probe["train_top1"],
            "linear": probe, "train_features": train_f}


def eval_record(trained: dict[str, Any], random_init: dict[str, Any], splits: DatasetSplits, config: Config,
                device: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The contents of an eval.json: kNN and linear probe, trained and at random init, each with its protocol."""
    words = evaluate.protocols(config, splits)
    probe = trained["linear"]
    return {"device": device, "classes": splits.test.classes,
            "knn": {"top1": trained["knn_top1"], "random_init_top1": random_init["knn_top1"], "split": words["split"],
                    "protocol": words["knn"]},
            "linear": {"top1": trained["linear_top1"], "random_init_top1": random_init["linear_top1"],
                       "train_top1": trained["linear_train_top1"], "split": words["split"],
                       "protocol": words["linear"], "epochs": config.probe_epochs,
                       "per_class": probe["per_class"], "confusion": probe["confusion"]}, **(extra or {})}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write `data` to `path`, or beside it (eval-2.json, ...) when `path` exists; return where it went."""
    path = fresh_path(path)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run(config: Config, out: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pretrain, evaluate the trained and the randomly initialised network, draw figures, write summary.json.
    Under torchrun every process pretrains its share; rank 0 alone writes, evaluates and returns the summary."""
    info = distributed.init_from_env(config.device)
    try:
        t_start = time.perf_counter()
        run_dir, splits, data = _prepare_run(config, out, resume, info)
        t0 = time.perf_counter()
        model, config = pretrain(config, splits, data, run_dir, resume=resume, progress=progress and info.is_main)
        if not info.is_main:
            return {}
        if info.enabled and resolve_device(config.device).type == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # torchrun gave each process one thread; rank 0 is alone now
        return _finish_run(model, config, splits, len(data), run_dir, progress,
                           {"pretrain_wall_seconds_this_session": time.perf_counter() - t0, "t_start": t_start})
    finally:
        distributed.shutdown()


def _prepare_run(config: Config, out: str | Path | None, resume: bool,
                 info: distributed.DistInfo) -> tuple[Path, DatasetSplits, ImageData]:
    """Check the run folder, load the data (before making the folder: a mistake leaves nothing behind), make it."""
    if resume and (out is None or not (Path(out) / CHECKPOINT).is_file()):
        raise UserError(f"--resume needs --out pointing at a run folder with {CHECKPOINT}; {out} has none")
    if not resume and out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} already exists: pass --resume to continue that run, or choose another --out")
    distributed.barrier()  # every rank has checked before rank 0 creates anything
    splits, data = load_data(config)
    run_dir = Path(out) if resume else None
    if not resume and info.is_main:
        run_dir = new_run_dir(out, config.preset)
        config.save(run_dir / "config.json")
    run_dir = Path(distributed.broadcast_object(str(run_dir) if run_dir is not None else None))
    if info.is_main:
        processes = f"  |  {info.world_size} processes (torchrun)" if info.enabled else ""
        print(f"run folder: {run_dir}  |  device: {device_description(resolve_device(config.device))}{processes}")
        print(f"data: {splits.name} from {splits.source}: {len(data)} pretraining images, "
              f"{len(splits.train)} train / {len(splits.test)} test for evaluation")
    return run_dir, splits, data


def _finish_run(model: SimCLR, config: Config, splits: DatasetSplits, n_pretrain: int, run_dir: Path,
                progress: bool, timing: dict[str, float]) -> dict[str, Any]:
    """Evaluate trained vs random init, draw the figures, write summary.json, eval.json and report.md."""
    from . import viz  # matplotlib is only imported when figures are drawn
    device = resolve_device(config.device)
    print("evaluating the trained encoder and the same network at random initialisation ...")
    trained = evaluate_model(model, splits, config, device, progress)
    baseline = random_init_model(config, splits, device)
    random_init = evaluate_model(baseline, splits, config, device, progress)
    figures = run_dir / "figures"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    viz.save_figure(viz.plot_training_curves(metrics), fresh_path(figures / "training_curves.png"))
    viz.save_figure(viz.plot_confusion_matrix(trained["linear"]["confusion"], splits.test.classes),
                    fresh_path(figures / "confusion_matrix.png"))
    print(f"drawing t-SNE ({config.tsne_points} test images) and nearest-neighbour retrieval ...")
    representation_figures(model, baseline, splits, config, device, figures, trained.pop("train_features"))
    protocol = "; ".join(f"{k}: {v}" for k, v in evaluate.protocols(config, splits).items() if k != "finetune")
    summary = {"preset": config.preset, "dataset": config.dataset, "backbone": config.backbone, "width": config.width,
               "epochs": config.epochs, "batch_size": config.batch_size, "optimizer": config.optimizer,
               "temperature": config.temperature, "pretrain_images": n_pretrain, "device": device_description(device),
               "knn_top1": trained["knn_top1"], "linear_top1": trained["linear_top1"],
               "random_init_knn_top1": random_init["knn_top1"], "random_init_linear_top1": random_init["linear_top1"],
               "linear_train_top1": trained["linear_train_top1"], "protocol": protocol,
               "pretrain_seconds": sum(r["seconds"] for r in metrics if r.get("kind") == "epoch"),
               "pretrain_wall_seconds_this_session": timing["pretrain_wall_seconds_this_session"],
               "total_seconds": time.perf_counter() - timing["t_start"], "run_dir": str(run_dir)}
    write_json(run_dir / "summary.json", summary)
    write_json(run_dir / "eval.json", eval_record(trained, random_init, splits, config, summary["device"]))
    report = write_report([run_dir])
    print(format_summary(summary))
    print(f"  report: {report}  (simclr evaluate {run_dir} adds label-fraction fine-tuning vs supervised)")
    return summary


def _columns(rows: list[tuple[str, ...]], width: int = 18) -> list[str]:
    """Rows of (label, value, value[, note]) as aligned text lines."""
    return [f"  {label:<{width}}{a:>10}{b:>14}" + (f"  {note[0]}" if note else "") for label, a, b, *note in rows]


def format_summary(summary: dict[str, Any]) -> str:
    """The short table `python run.py` prints at the end."""
    table = _columns([("", "trained", "random init"),
                      ("kNN top-1 (%)", f"{summary['knn_top1']:.2f}", f"{summary['random_init_knn_top1']:.2f}"),
                      ("linear top-1 (%)", f"{summary['linear_top1']:.2f}",
                       f"{summary['random_init_linear_top1']:.2f}")])
    return "\n".join([f"\n{summary['preset']}: {summary['backbone']} (width {summary['width']}), {summary['epochs']} "
                      f"epochs, batch {summary['batch_size']}, {summary['optimizer']}, T={summary['temperature']}, "
                      f"on {summary['device']}", *table,
                      f"  pretraining {summary['pretrain_seconds']:.0f} s, total {summary['total_seconds']:.0f} s",
                      f"  results in {summary['run_dir']}/ (summary.json, metrics.jsonl, checkpoint.pt, figures/)"])


def load_trained(source: str | Path, sha256: str | None = None,
                 overrides: dict[str, Any] | None = None) -> tuple[SimCLR, Config, Path, DatasetSplits]:
    """The trained model, its config (with `overrides` of EVAL_SETTINGS), the folder for results, and its data."""
    path, state = read_model_checkpoint(source, sha256)
    model = SimCLR(**state["arch"])
    load_model_state(model, state["model"], source=str(path))
    arch = upgrade({k: v for k, v in state["arch"].items() if k not in ("mean", "std")})  # the config's model keys
    # Weights without a recipe are evaluated on CIFAR-10 with their architecture.
    config = Config(**upgrade(state["config"])) if "config" in state else make_config("quick", **arch)
    changed = {k: v for k, v in (overrides or {}).items() if v is not None}
    if fixed := sorted(set(changed) - set(EVAL_SETTINGS)):
        raise UserError(f"{fixed[0]} cannot be changed when evaluating a trained model")
    config = config.replace(**changed)
    splits = load_splits(config.dataset, config.data_root, config.image_size, config.download, config.skip_bad_images)
    return on_device(model, resolve_device(config.device)), config, path.parent, splits


def label_fraction_results(model: SimCLR, splits: DatasetSplits, config: Config, device: torch.device,
                           fractions: list[float], supervised: bool = True,
                           progress: bool = True) -> dict[str, dict[str, Any]]:
    """Fine-tuning of the pretrained encoder, and the same backbone from scratch, on each label fraction."""
    words = evaluate.protocols(config, splits)
    kwargs = dict(mean=splits.mean, std=splits.std, epochs=config.finetune_epochs,
                  batch_size=config.finetune_batch_size, lr=config.finetune_lr, device=device, seed=config.seed,
                  progress=progress, min_steps=config.finetune_min_steps)
    jobs = [("finetune", evaluate.finetune, "whole network fine-tuned from the SimCLR encoder + a new linear head, "),
            ("supervised", evaluate.supervised_baseline, "the same backbone trained from random init with the same "
                                                         "budget, ")]
    jobs = jobs if supervised else jobs[:1]
    out: dict[str, dict[str, Any]] = {name: {} for name, _, _ in jobs}
    for percent in fractions:
        subset = splits.train.subset(evaluate.label_fraction_indices(splits.train.labels, percent, config.seed))
        common = (f"on a class-balanced {percent:g} % of the train labels ({len(subset)} images, seed "
                  f"{config.seed}); {words['finetune']}")
        for name, fn, what in jobs:
            result = fn(model, subset, splits.test, splits.num_classes, desc=f"{name} {percent:g}%", **kwargs)
            out[name][f"{percent:g}"] = {**result, "protocol": what + common, "split": words["split"]}
    return out


def evaluate_job(source: str | Path, fractions: list[float], supervised: bool = True, sha256: str | None = None,
                 overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """`simclr evaluate`: kNN, linear probe, label-fraction fine-tuning vs supervised; eval.json + figures."""
    from . import viz
    t0 = time.perf_counter()
    model, config, out_dir, splits = load_trained(source, sha256, overrides)
    device = resolve_device(config.device)
    print(f"evaluating {out_dir} on {device_description(device)}: kNN and linear probe, trained vs random init ...")
    trained = evaluate_model(model, splits, config, device, progress)
    random_init = evaluate_model(random_init_model(config, splits, device), splits, config, device, progress)
    extra = label_fraction_results(model, splits, config, device, fractions, supervised, progress)
    figures = out_dir / "figures"
    written = [viz.save_figure(viz.plot_confusion_matrix(trained["linear"]["confusion"], splits.test.classes),
                               fresh_path(figures / "confusion_matrix.png"))]
    if fractions:
        bars = {f"{p} % labels": {"SimCLR fine-tuned": extra["finetune"][p]["top1"],
                                  **({"supervised": extra["supervised"][p]["top1"]} if supervised else {})}
                for p in extra["finetune"]}
        figure = viz.plot_accuracy_bars(bars, "label fractions: fine-tuned SimCLR vs supervised from scratch")
        written.append(viz.save_figure(figure, fresh_path(figures / "label_fractions.png")))
    result = eval_record(trained, random_init, splits, config, device_description(device),
                         {**extra, "seconds": time.perf_counter() - t0})
    path = write_json(out_dir / "eval.json", result)
    report = write_report([out_dir])
    print(format_eval(result))
    print(f"  wrote {path}, {', '.join(str(p) for p in written)} and {report}")
    return result


def representation_figures(model: SimCLR, baseline: SimCLR, splits: DatasetSplits, config: Config,
                           device: torch.device, figures: Path, train_features: torch.Tensor | None = None,
                           queries: int = 8, neighbours: int = 8) -> list[Path]:
    """figures/tsne.png (random init beside trained, test images) and figures/retrieval.png (nearest train
    images); `train_features`, the trained model's features of the train set when already computed, saves a pass."""
    from . import viz
    n = min(config.tsne_points, len(splits.test))
    subset = splits.test.subset(balanced_indices(splits.test.labels, n, config.seed))
    bs = config.eval_batch_size
    embeddings = {name: viz.tsne_embedding(evaluate.extract_features(net, subset.images, bs, device).cpu(), config.seed)
                  for name, net in (("random init", baseline), ("trained encoder", model))}
    tsne = viz.save_figure(viz.plot_tsne(embeddings, subset.labels, splits.test.classes,
                                         title=f"t-SNE of {len(subset)} test images' representations h"),
                           fresh_path(figures / "tsne.png"))
    if train_features is None:
        train_features = evaluate.extract_features(model, splits.train.images, bs, device)
    q_idx = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(config.seed))[:queries]
    q = F.normalize(evaluate.extract_features(model, splits.test.images[q_idx], bs, device), dim=1)
    sims, idx = (q @ F.normalize(train_features, dim=1).T).topk(neighbours, dim=1)
    idx, sims = idx.cpu(), sims.cpu()
    retrieval = viz.save_figure(viz.plot_retrieval(splits.test.images[q_idx], splits.train.images[idx],
                                                   splits.test.labels[q_idx], splits.train.labels[idx],
                                                   splits.test.classes, sims), fresh_path(figures / "retrieval.png"))
    return [tsne, retrieval]


def tsne_job(source: str | Path, sha256: str | None = None, overrides: dict[str, Any] | None = None) -> list[Path]:
    """`simclr tsne`: the t-SNE and retrieval figures of a trained model."""
    model, config, out_dir, splits = load_trained(source, sha256, overrides)
    device = resolve_device(config.device)
    paths = representation_figures(model, random_init_model(config, splits, device), splits, config, device,
                                   out_dir / "figures")
    for path in paths:
        print(f"wrote {path}")
    return paths


def format_eval(result: dict[str, Any]) -> str:
    """A short table of an eval.json."""
    knn, linear = result["knn"], result["linear"]
    rows = [("", "SimCLR", "baseline"),
            ("kNN top-1 (%)", f"{knn['top1']:.2f}", f"{knn['random_init_top1']:.2f}", "(random init)"),
            ("linear top-1 (%)", f"{linear['top1']:.2f}", f"{linear['random_init_top1']:.2f}", "(random init)")]
    for key, ft in result.get("finetune", {}).items():
        sup = result.get("supervised", {}).get(key)
        rows.append((f"fine-tune, {key} % labels (%)", f"{ft['top1']:.2f}",
                     *((f"{sup['top1']:.2f}", "(supervised from scratch)") if sup else ("",))))
    return "\n".join(["", *_columns(rows, 28)])
