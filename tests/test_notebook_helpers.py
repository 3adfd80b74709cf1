"""The notebooks' shared helpers: project paths from any folder, and reuse of an existing trained run."""

from pathlib import Path

import torch

from simclr_lib.models import SimCLR
from simclr_lib.notebook import default_paths, ensure_trained_run, project_root

ROOT = Path(__file__).resolve().parents[1]


def test_project_root_from_the_notebooks_folder(monkeypatch):
    monkeypatch.chdir(ROOT / "tests")
    assert project_root() == ROOT
    assert default_paths() == (ROOT / "data", ROOT / "runs")


def test_an_existing_trained_run_is_used_as_it_is(tmp_path, capsys):
    model = SimCLR("resnet18", width=4)
    torch.save({"arch": model.arch, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    assert ensure_trained_run(tmp_path, data_root=tmp_path) == tmp_path
    assert "using the trained run" in capsys.readouterr().out
