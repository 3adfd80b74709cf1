"""Small helpers the notebooks share: where the project's data/ and runs/ are, the device, and a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import make_config
from .runtime import device_description, resolve_device


def project_root(start: str | Path | None = None) -> Path:
    """The folder holding pyproject.toml and simclr_lib/, upwards from `start` or the cwd (notebooks/ or the root)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
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


SMOKE_OVERRIDES: dict[str, Any] = dict(train_subset=512, epochs=1, batch_size=128, width=4, warmup_epochs=0.25,
                                       probe_epochs=2, knn_every=1, knn_monitor_size=500, tsne_points=300,
                                       finetune_epochs=1, log_every=1)


def ensure_trained_run(run_dir: str | Path | None, data_root: str | Path, device: str = "auto", smoke: bool = False,
                       preset: str = "quick", **overrides: Any) -> Path:
    """`run_dir` if it holds a trained checkpoint, else a run trained now (it says so); with smoke=True a tiny one
    (SMOKE_OVERRIDES: one short epoch on 512 images), for CI and quick looks."""
    from .jobs import new_run_dir, run  # here: the training stack loads only when a run must be trained
    if run_dir is not None and (Path(run_dir) / "checkpoint.pt").is_file():
        print(f"using the trained run in {run_dir}")
        return Path(run_dir)
    settings = {**(SMOKE_OVERRIDES if smoke else {}), **overrides, "data_root": str(data_root), "device": device}
    print(f"no trained run in {run_dir}: training a {'tiny smoke-test' if smoke else preset} run now "
          f"({settings.get('epochs', 'preset')} epochs) ...")
    if run_dir is None or Path(run_dir).exists():  # never write into a folder the user already has
        run_dir = new_run_dir(None, "smoke" if smoke else preset, runs_root=default_paths()[1])
    return Path(run(make_config(preset, **settings), out=run_dir)["run_dir"])
