"""The jobs behind the command line: the main run (pretrain -> evaluate -> figures -> summary) and `evaluate` /
`tsne` of a trained model. Every job writes into a run folder and never replaces a file that is already there."""

from __future__ import annotations

import dataclasses
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
from .config import DATASETS, EVAL_SETTINGS, Config, make_config, upgrade
from .data import DatasetSplits, balanced_indices, balanced_subset, load_splits
from .errors import UserError
from .images import ImageData, ImageFiles, read_images
from .models import SimCLR, build_model, export_encoder, load_model_state
from .report import fresh_path, write_report
from .runtime import device_description, on_device, resolve_device
from .train import check_pretraining_data, pretrain, read_metrics


def new_run_dir(out: str | Path | None, preset: str, runs_root: str | Path = "runs") -> Path:
    """A fresh run folder: `out` if given (the caller has checked it holds nothing), else runs/<preset>-<time>."""
    path = Path(out) if out is not None else fresh_path(Path(runs_root) / f"{preset}-{datetime.now():%Y%m%d-%H%M%S}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_data(config: Config) -> tuple[DatasetSplits, ImageData | ImageFiles]:
    """The data set's splits (evaluated on --eval-data when given) and the (possibly class-balanced subset of the)
    pretraining images."""
    splits = load_splits(config.dataset, config.data_root, config.image_size, config.download, config.skip_bad_images,
                         stream=config.data_placement == "stream")
    if config.eval_data is not None:
        other = evaluation_splits(config.replace(image_size=splits.image_size))
        splits = dataclasses.replace(splits, train=other.train, test=other.test,
                                     source=f"{splits.source}; evaluated on {other.source}")
    data = splits.pretrain
    if config.train_subset is not None and config.train_subset < len(data):  # a smaller set is used whole
        data = balanced_subset(data, config.train_subset, config.seed)
    check_pretraining_data(len(data), config, distributed.current().world_size)
    return splits, data


def named_data_root(config: Config) -> str:
    """Where a data set named by --eval-data or `embed` is looked for: --data-root, unless that is a folder of images
    (--dataset folder), which is never searched or downloaded into: then data/."""
    return "data" if config.dataset == "folder" else config.data_root


def evaluation_splits(config: Config) -> DatasetSplits:
    """The labelled data a model is evaluated on: config.eval_data when set, else the data set it was trained on."""
    name, root = config.dataset, config.data_root
    if config.eval_data is not None:
        key = config.eval_data.lower().replace("-", "").replace("_", "")
        name, root = (key, named_data_root(config)) if key in DATASETS[:-1] and not Path(config.eval_data).exists() \
            else ("folder", config.eval_data)
    no_labels = UserError(f"{root} has no labels to evaluate with: pass --eval-data with a folder of "
                          "train/<class>/<image> (test/ optional) or a data set name such as cifar10")
    if name == "folder" and Path(root).is_dir() and not (Path(root) / "train").is_dir():
        raise no_labels  # said before the images are decoded
    splits = load_splits(name, root, config.image_size, config.download, config.skip_bad_images)
    if not splits.labelled:
        raise no_labels
    return splits


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
        run_dir, splits, data, config = _prepare_run(config, out, resume, info)
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
                 info: distributed.DistInfo) -> tuple[Path, DatasetSplits, ImageData | ImageFiles, Config]:
    """Check the run folder, load the data (before making the folder: a mistake leaves nothing behind), make it."""
    if resume and (out is None or not (Path(out) / CHECKPOINT).is_file()):
        raise UserError(f"--resume needs --out pointing at a run folder with {CHECKPOINT}; {out} has none")
    if not resume and out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} already exists: pass --resume to continue that run, or choose another --out")
    distributed.barrier()  # every rank has checked before rank 0 creates anything
    splits, data = load_data(config)
    if config.dataset == "folder" and config.image_size is None:  # the size chosen for the images is the recipe's
        config = config.replace(image_size=splits.image_size)
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
    return run_dir, splits, data, config


def _finish_run(model: SimCLR, config: Config, splits: DatasetSplits, n_pretrain: int, run_dir: Path,
                progress: bool, timing: dict[str, float]) -> dict[str, Any]:
    """Evaluate trained vs random init, draw the figures, write summary.json, eval.json and report.md."""
    from . import viz  # matplotlib is only imported when figures are drawn
    device, figures = resolve_device(config.device), run_dir / "figures"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    viz.save_figure(viz.plot_training_curves(metrics), fresh_path(figures / "training_curves.png"))
    if not splits.labelled:
        print(f"no labelled images: evaluation skipped; evaluate later with `simclr evaluate {run_dir} --eval-data "
              "DIR` (DIR holding train/<class>/<image>) or `--eval-data cifar10`")
        keys = ("knn_top1", "linear_top1", "random_init_knn_top1", "random_init_linear_top1", "linear_train_top1")
        return _write_summary(config, n_pretrain, run_dir, device, metrics, timing,
                              {**dict.fromkeys(keys), "protocol": "not evaluated (no labelled images)"})
    print("evaluating the trained encoder and the same network at random initialisation ...")
    trained = evaluate_model(model, splits, config, device, progress)
    baseline = random_init_model(config, splits, device)
    random_init = evaluate_model(baseline, splits, config, device, progress)
    viz.save_figure(viz.plot_confusion_matrix(trained["linear"]["confusion"], splits.test.classes),
                    fresh_path(figures / "confusion_matrix.png"))
    print(f"drawing t-SNE ({config.tsne_points} test images) and nearest-neighbour retrieval ...")
    representation_figures(model, baseline, splits, config, device, figures, trained.pop("train_features"))
    protocol = "; ".join(f"{k}: {v}" for k, v in evaluate.protocols(config, splits).items() if k != "finetune")
    summary = _write_summary(config, n_pretrain, run_dir, device, metrics, timing, {
        "knn_top1": trained["knn_top1"], "linear_top1": trained["linear_top1"],
        "random_init_knn_top1": random_init["knn_top1"], "random_init_linear_top1": random_init["linear_top1"],
        "linear_train_top1": trained["linear_train_top1"], "protocol": protocol})
    write_json(run_dir / "eval.json", eval_record(trained, random_init, splits, config, summary["device"]))
    report = write_report([run_dir])
    print(f"  report: {report}  (simclr evaluate {run_dir} adds label-fraction fine-tuning vs supervised)")
    return summary


def _write_summary(config: Config, n_pretrain: int, run_dir: Path, device: torch.device, metrics: list[dict],
                   timing: dict[str, float], accuracies: dict[str, Any]) -> dict[str, Any]:
    """summary.json (the recipe, hardware, accuracies and times), printed as a short table."""
    epochs = [r for r in metrics if r.get("kind") == "epoch"]
    summary = {"preset": config.preset, "dataset": config.dataset, "backbone": config.backbone, "width": config.width,
               "epochs": config.epochs, "batch_size": config.batch_size, "optimizer": config.optimizer,
               "temperature": config.temperature, "pretrain_images": n_pretrain, "device": device_description(device),
               **accuracies, "pretrain_seconds": sum(r["seconds"] for r in epochs),
               "knn_monitor_seconds": sum(r.get("knn_monitor_seconds", 0.0) for r in epochs),
               "pretrain_wall_seconds_this_session": timing["pretrain_wall_seconds_this_session"],
               "total_seconds": time.perf_counter() - timing["t_start"], "run_dir": str(run_dir)}
    write_json(run_dir / "summary.json", summary)
    print(format_summary(summary))
    return summary


def _columns(rows: list[tuple[str, ...]], width: int = 18) -> list[str]:
    """Rows of (label, value, value[, note]) as aligned text lines."""
    return [f"  {label:<{width}}{a:>10}{b:>14}" + (f"  {note[0]}" if note else "") for label, a, b, *note in rows]


def format_summary(summary: dict[str, Any]) -> str:
    """The short table `python run.py` prints at the end."""
    table = ["  not evaluated: no labelled images"] if summary["knn_top1"] is None else _columns([
        ("", "trained", "random init"),
        ("kNN top-1 (%)", f"{summary['knn_top1']:.2f}", f"{summary['random_init_knn_top1']:.2f}"),
        ("linear top-1 (%)", f"{summary['linear_top1']:.2f}", f"{summary['random_init_linear_top1']:.2f}")])
    return "\n".join([f"\n{summary['preset']}: {summary['backbone']} (width {summary['width']}), {summary['epochs']} "
                      f"epochs, batch {summary['batch_size']}, {summary['optimizer']}, T={summary['temperature']}, "
                      f"on {summary['device']}", *table,
                      f"  pretraining {summary['pretrain_seconds']:.0f} s, total {summary['total_seconds']:.0f} s",
                      f"  results in {summary['run_dir']}/ (summary.json, metrics.jsonl, checkpoint.pt, figures/)"])


def load_model(source: str | Path, sha256: str | None = None,
               overrides: dict[str, Any] | None = None) -> tuple[SimCLR, Config, Path]:
    """The trained model (on its device), its config (with `overrides` of EVAL_SETTINGS) and the folder for results.
    Another --dataset or --data-root means other data: at its own image size (unless --image-size), not --eval-data."""
    path, state = read_model_checkpoint(source, sha256)
    model = SimCLR(**state["arch"])
    load_model_state(model, state["model"], str(path), state.get("encoder_only", False))
    arch = upgrade({k: v for k, v in state["arch"].items() if k not in ("mean", "std")})  # the config's model keys
    # Weights without a recipe are evaluated on CIFAR-10 with their architecture.
    config = (Config(**upgrade(state["config"])) if "config" in state
              else make_config("quick", **arch, image_size=state.get("image_size")))
    changed = {k: v for k, v in (overrides or {}).items() if v is not None}
    if fixed := sorted(set(changed) - set(EVAL_SETTINGS)):
        raise UserError(f"{fixed[0]} cannot be changed when evaluating a trained model")
    if "dataset" in changed or "data_root" in changed and changed["data_root"] != config.data_root:
        changed = {"eval_data": None, "image_size": None, **changed}
    config = config.replace(**changed)
    return on_device(model, resolve_device(config.device)), config, path.parent


def load_trained(source: str | Path, sha256: str | None = None,
                 overrides: dict[str, Any] | None = None) -> tuple[SimCLR, Config, Path, DatasetSplits]:
    """`load_model`, and the labelled data it is evaluated on (see `evaluation_splits`)."""
    model, config, out_dir = load_model(source, sha256, overrides)
    return model, config, out_dir, evaluation_splits(config)


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
    transfer = _transfer_name(config, overrides)
    print(f"evaluating {out_dir} on {device_description(device)}: kNN and linear probe, trained vs random init"
          f"{f', on {splits.source} (transfer)' if transfer else ''} ...")
    trained = evaluate_model(model, splits, config, device, progress)
    random_init = evaluate_model(random_init_model(config, splits, device), splits, config, device, progress)
    extra = label_fraction_results(model, splits, config, device, fractions, supervised, progress)
    figures = out_dir / "figures" / transfer
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
    path = write_json(out_dir / (f"{transfer}.json" if transfer else "eval.json"), result)
    report = [] if transfer else [write_report([out_dir])]
    print(format_eval(result))
    print(f"  wrote {', '.join(str(p) for p in [path, *written, *report])}")
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


def _transfer_name(config: Config, overrides: dict[str, Any] | None) -> str:
    """"transfer-<data set>" when --dataset asks for a transfer evaluation (written beside the run's own results,
    never over them), else ""."""
    if (overrides or {}).get("dataset") is None:
        return ""
    return f"transfer-{Path(config.data_root).resolve().name if config.dataset == 'folder' else config.dataset}"


def tsne_job(source: str | Path, sha256: str | None = None, overrides: dict[str, Any] | None = None) -> list[Path]:
    """`simclr tsne`: the t-SNE and retrieval figures of a trained model (of a transfer: figures/transfer-<name>/)."""
    model, config, out_dir, splits = load_trained(source, sha256, overrides)
    device = resolve_device(config.device)
    paths = representation_figures(model, random_init_model(config, splits, device), splits, config, device,
                                   out_dir / "figures" / _transfer_name(config, overrides))
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


def embed_job(source: str | Path, images: str, out: str | Path, split: str = "test", sha256: str | None = None,
              overrides: dict[str, Any] | None = None, progress: bool = True) -> Path:
    """`simclr embed`: the representations h (float32, N x D .npy) of every image in a folder or archive, with their
    names in <out>.files.txt, or of a named data set's split, with its labels in <out>.labels.npy."""
    import numpy as np
    from tqdm.auto import tqdm
    model, config, _ = load_model(source, sha256, overrides)
    out = Path(out).with_suffix(".npy")
    key = images.lower().replace("-", "").replace("_", "")
    named = key in DATASETS[:-1] and not Path(images).exists()
    beside = out.with_suffix(".labels.npy" if named else ".files.txt")
    if taken := [str(p) for p in (out, beside) if p.exists()]:
        raise UserError(f"{taken[0]} already exists: choose another --out")
    if named:
        data = getattr(load_splits(key, named_data_root(config), (overrides or {}).get("image_size"),
                                   config.download), split)
        pixels, names = data.images, None
    else:  # the size the model was trained at: its own folder's, else CIFAR's 32 or STL-10's 96
        size = config.image_size or (96 if config.dataset == "stl10" else 32)
        pixels, names = read_images(images, size, config.skip_bad_images)
    device, step = resolve_device(config.device), 16 * config.eval_batch_size
    features = torch.cat([evaluate.extract_features(model, pixels[i:i + step], config.eval_batch_size, device).cpu()
                          for i in tqdm(range(0, len(pixels), step), desc="embed", unit="chunk", disable=not progress)])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, features.numpy().astype(np.float32))
    if named:
        np.save(beside, data.labels.numpy())
    else:
        beside.write_text("".join(f"{name}\n" for name in names))
    print(f"wrote {out} ({len(features)} x {features.shape[1]} float32) and {beside}")
    return out


def export_job(source: str | Path, out: str | Path, sha256: str | None = None) -> Path:
    """`simclr export`: the encoder as a torchvision ResNet state_dict with its normalisation (see README)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose another --out")
    model, config, _ = load_model(source, sha256, {"device": "cpu"})
    blob = {**export_encoder(model), "image_size": config.image_size or (96 if config.dataset == "stl10" else 32)}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, out)
    stem = "CIFAR stem" if blob["cifar_stem"] else "ImageNet stem"
    print(f"wrote {out}: {blob['arch']} encoder ({stem}, width {blob['width']}, {model.feature_dim}-d features), "
          f"input (x / 255 - mean) / std with mean {blob['mean']}, std {blob['std']}")
    if blob["width"] != 64:
        print(f"  width {blob['width']}: torchvision's {blob['arch']}() has width 64; build this one with "
              f"simclr_lib.models.resnet_encoder('{blob['arch']}', {blob['cifar_stem']}, {blob['width']})")
    return out
