"""Small helpers the notebooks share: where the project's data/ and runs/ are, the device, and a trained run."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import make_config
from .data import DatasetSplits, balanced_indices
from .runtime import device_description, resolve_device


def project_root() -> Path:
    """The project folder (pyproject.toml + simclr_lib/): the one this package was loaded from, as in a clone or
    Colab whatever the working folder, else the nearest one upwards from the cwd."""
    here = Path.cwd().resolve()
    for folder in (Path(__file__).resolve().parents[1], here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "simclr_lib").is_dir():
            return folder
    return here


def default_paths() -> tuple[Path, Path]:
    """(DATA_ROOT, RUNS_ROOT): the project's data/ and runs/ folders."""
    root = project_root()
    return root / "data", root / "runs"


def use_device(name: str = "auto") -> torch.device:
    """Resolve "auto"/"cpu"/"cuda"/"mps" and print what will be used."""
    device = resolve_device(name)
    print(f"device: {device} ({device_description(device)})")
    return device


PRETRAINED = "pretrained-cifar10-r18"  # the encoder that ships with the project, in runs/ (see SPEC)

SMOKE_OVERRIDES: dict[str, Any] = dict(train_subset=512, epochs=1, batch_size=128, width=4, warmup_epochs=0.25,
                                       probe_epochs=2, knn_every=1, knn_monitor_size=500, tsne_points=300,
                                       finetune_epochs=1, finetune_min_steps=0, log_every=1)


def finished_runs(runs_root: str | Path, smoke: bool = False) -> list[Path]:
    """Your CIFAR-10 run folders under `runs_root` that finished (checkpoint.pt and summary.json), most recent
    first: the smoke runs (smoke-*) with smoke=True, else the others, never the shipped encoder (the notebooks study
    CIFAR-10, and a full run must not pick up a tiny smoke run)."""
    runs = [d for d in Path(runs_root).glob("*") if (d / "checkpoint.pt").is_file()
            and (d / "summary.json").is_file() and d.name != PRETRAINED and d.name.startswith("smoke-") == smoke
            and json.loads((d / "summary.json").read_text()).get("dataset", "cifar10") == "cifar10"]
    return sorted(runs, key=lambda d: (d / "summary.json").stat().st_mtime, reverse=True)


def ensure_trained_run(run_dir: str | Path | None, data_root: str | Path, device: str = "auto", smoke: bool = False,
                       preset: str = "quick", runs_root: str | Path | None = None, **overrides: Any) -> Path:
    """A trained run to look at, and which one it is, said aloud: `run_dir` if it holds a checkpoint, else the most
    recent finished run in runs/ (with smoke=True: the most recent smoke run), else the shipped pretrained encoder,
    else one trained now (smoke=True: a tiny one, SMOKE_OVERRIDES, for CI and quick looks)."""
    from .jobs import new_run_dir, run  # here: the training stack loads only when a run must be trained
    runs_root = Path(runs_root or default_paths()[1])
    if run_dir is not None and (Path(run_dir) / "checkpoint.pt").is_file():
        print(f"using the trained run in {run_dir} (RUN_DIR)")
        return Path(run_dir)
    if run_dir is None:
        found = finished_runs(runs_root, smoke)
        shipped = runs_root / PRETRAINED
        if found:
            print(f"using the most recent finished run in runs/: {found[0]} (set RUN_DIR to choose another)")
            return found[0]
        if not smoke and (shipped / "checkpoint.pt").is_file():
            print(f"using the shipped pretrained encoder in {shipped} (set RUN_DIR to use your own run)")
            return shipped
    settings = {**(SMOKE_OVERRIDES if smoke else {}), **overrides, "data_root": str(data_root), "device": device}
    print(f"no trained run {'in ' + str(run_dir) if run_dir else 'found in ' + str(runs_root)}: training a "
          f"{'tiny smoke-test' if smoke else preset} run now ({settings.get('epochs', 'preset')} epochs) ...")
    if run_dir is None or Path(run_dir).exists():  # never write into a folder the user already has
        run_dir = new_run_dir(None, "smoke" if smoke else preset, runs_root=runs_root)
    return Path(run(make_config(preset, **settings), out=run_dir)["run_dir"])


# From this width on, an encoder on a CPU is evaluated on subsets in the notebooks: a full-width ResNet-18 encodes
# about 56 CIFAR images/s on 2 cores (fp32; 18 minutes for the 60k images), width 16 about 580 (measured).
CPU_SUBSET_WIDTH = 32


def cpu_subsets(splits: DatasetSplits, model: torch.nn.Module, device: torch.device, seed: int, train: int,
                test: int) -> tuple[DatasetSplits, bool]:
    """On a CPU, a wide encoder (width >= CPU_SUBSET_WIDTH, e.g. the shipped one) sees class-balanced subsets of
    `train` and `test` labelled images, said aloud; elsewhere, and for narrow encoders, the splits as they are.
    Returns the splits and whether they were cut."""
    if device.type != "cpu" or model.arch["width"] < CPU_SUBSET_WIDTH:
        return splits, False
    train_rows = balanced_indices(splits.train.labels, min(train, len(splits.train)), seed)
    test_rows = balanced_indices(splits.test.labels, min(test, len(splits.test)), seed)
    cut = dataclasses.replace(splits, train=splits.train.subset(train_rows), test=splits.test.subset(test_rows))
    print(f"a width-{model.arch['width']} encoder on a CPU: using class-balanced subsets of {len(train_rows):,} "
          f"train and {len(test_rows):,} test images (the full sets take tens of minutes to encode here; on a GPU "
          "this notebook uses them all)")
    return cut, True


def exercise(name: str, attempt: Callable[..., Any], solution: Callable[..., Any],
             check: Callable[[Callable[..., Any]], None], smoke: bool = False) -> bool:
    """Check a learner's `attempt` with `check` (which asserts) and print a verdict. An attempt that raises
    NotImplementedError is "not attempted yet". With smoke=True (CI) the solution must pass first."""
    if smoke:
        check(solution)
    try:
        check(attempt)
    except NotImplementedError:
        print(f"{name}: not attempted yet. Fill in the cell above; the solution is in the folded cell below it.")
        return False
    except AssertionError as exc:
        print(f"{name}: not yet. {exc}")
        return False
    print(f"{name}: correct.")
    return True


def reference_results(name: str = "quick-cpu") -> dict[str, Any]:
    """A reference run's committed result files, docs/results/<name>/: summary, eval, config and metrics records
    (the numbers the notebooks quote are read from here, never typed into the text)."""
    from .train import read_metrics

    folder = project_root() / "docs" / "results" / name
    files = {key: json.loads((folder / f"{key}.json").read_text()) for key in ("summary", "eval", "config")}
    return {**files, "metrics": read_metrics(folder / "metrics.jsonl")}
