"""The notebooks' shared helpers: project paths from any folder, and reuse of an existing trained run."""

import os
from pathlib import Path

import pytest
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


def fake_run(folder: Path, finished: bool = True) -> Path:
    folder.mkdir(parents=True)
    model = SimCLR("resnet18", width=4)
    torch.save({"arch": model.arch, "model": model.state_dict()}, folder / "checkpoint.pt")
    if finished:
        (folder / "summary.json").write_text("{}")
    return folder


def test_without_run_dir_the_most_recent_finished_run_is_used_and_named(tmp_path, capsys):
    import os

    runs = tmp_path / "runs"
    old, new = fake_run(runs / "quick-1"), fake_run(runs / "quick-2")
    fake_run(runs / "quick-3", finished=False)  # interrupted: no summary.json
    os.utime(old / "summary.json", (2e9, 2e9))  # finished last
    smoke = fake_run(runs / "smoke-1")
    os.utime(smoke / "summary.json", (2.5e9, 2.5e9))  # the newest, but a smoke run
    assert ensure_trained_run(None, tmp_path, runs_root=runs) == old
    assert "most recent finished run" in capsys.readouterr().out
    # SMOKE (CI) only reuses smoke runs, so it never evaluates a big run by accident
    assert ensure_trained_run(None, tmp_path, smoke=True, runs_root=runs) == smoke
    assert new.is_dir()
    # A run on your own images is not the notebooks' CIFAR-10 run, however recent
    photos = fake_run(runs / "quick-4")
    (photos / "summary.json").write_text('{"dataset": "folder"}')
    os.utime(photos / "summary.json", (3e9, 3e9))
    assert ensure_trained_run(None, tmp_path, runs_root=runs) == old


def test_the_shipped_encoder_comes_before_training(tmp_path, capsys):
    shipped = fake_run(tmp_path / "runs" / "pretrained-cifar10-r18")
    fake_run(tmp_path / "runs" / "smoke-1")  # a SMOKE run left by CI or a first look does not count
    assert ensure_trained_run(None, tmp_path, runs_root=tmp_path / "runs") == shipped
    assert "shipped pretrained encoder" in capsys.readouterr().out


def test_a_fresh_colab_clones_installs_and_imports_the_package(tmp_path):
    """A fresh Colab: an empty working folder, a stub google.colab, SIMCLR_REPO_URL at a local clone and the
    package not installed (site-packages without their .pth files, so the editable install is invisible)."""
    import json
    import site
    import subprocess
    import sys

    clone = tmp_path / "published"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    stubs = tmp_path / "stubs"
    (stubs / "google" / "colab").mkdir(parents=True)
    (stubs / "google" / "__init__.py").write_text("")
    (stubs / "google" / "colab" / "__init__.py").write_text("")
    (stubs / "pip").mkdir()  # records the install instead of changing this environment
    (stubs / "pip" / "__init__.py").write_text("")
    (stubs / "pip" / "__main__.py").write_text(
        f"import sys\nopen({str(tmp_path / 'pip-args')!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    first_code = next(c for c in json.loads((ROOT / "notebooks" / "03_loss.ipynb").read_text())["cells"]
                      if c["cell_type"] == "code")
    script = "import google.colab\n" + "".join(first_code["source"]) + \
        "\nimport simclr_lib, simclr_lib.loss\nprint('imported', simclr_lib.__file__)\n"
    content = tmp_path / "content"
    content.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SIMCLR_REPO_URL": str(clone),
           "PYTHONPATH": os.pathsep.join([str(stubs), *site.getsitepackages()])}
    proc = subprocess.run([sys.executable, "-S", "-c", script], cwd=content, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"imported {content / 'published' / 'simclr_lib' / '__init__.py'}" in proc.stdout
    assert (tmp_path / "pip-args").read_text() == f"install --quiet -e {content / 'published'}"
    # Without Colab and without the package, the cell says what to do instead of failing somewhere later.
    plain = subprocess.run([sys.executable, "-S", "-c", "".join(first_code["source"])], cwd=tmp_path / "stubs",
                           env={**env, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode != 0 and "make lab" in plain.stderr


def test_exercise_verdicts(capsys):
    from simclr_lib.notebook import exercise

    def check(fn):
        assert fn(2) == 4, "square 2 to get 4"

    def todo(x):
        raise NotImplementedError

    assert exercise("E1", lambda x: x * x, lambda x: x * x, check, smoke=True)
    assert not exercise("E1", todo, lambda x: x * x, check)
    assert not exercise("E1", lambda x: x + 1, lambda x: x * x, check)
    out = capsys.readouterr().out
    assert "E1: correct." in out and "not attempted yet" in out and "not yet. square 2 to get 4" in out
    with pytest.raises(AssertionError):  # CI: a wrong solution fails the notebook
        exercise("E1", todo, lambda x: x, check, smoke=True)


def test_a_wide_encoder_on_a_cpu_sees_class_balanced_subsets(capsys):
    from simclr_lib.data import DatasetSplits, ImageData
    from simclr_lib.notebook import cpu_subsets

    labels = torch.arange(400) % 4
    data = ImageData(torch.zeros(400, 3, 8, 8, dtype=torch.uint8), labels, ["a", "b", "c", "d"])
    splits = DatasetSplits("cifar10", data, data, data, (0.5,) * 3, (0.25,) * 3, "generated")
    wide, narrow = SimCLR(width=32), SimCLR(width=8)
    cut, was_cut = cpu_subsets(splits, wide, torch.device("cpu"), 0, train=100, test=40)
    assert was_cut and (len(cut.train), len(cut.test)) == (100, 40)
    assert "subsets of 100 train" in capsys.readouterr().out
    assert torch.bincount(cut.train.labels).tolist() == [25] * 4
    assert torch.bincount(cut.test.labels).tolist() == [10] * 4
    for model, device in ((narrow, torch.device("cpu")), (wide, torch.device("cuda"))):  # a narrow one; a GPU
        assert cpu_subsets(splits, model, device, 0, train=100, test=40) == (splits, False)
