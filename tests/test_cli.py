"""The command line end to end on a tiny generated data set: files written, resume, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from simclr_lib import train as train_module
from simclr_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """4 classes of 16x16 images, 24 train / 6 test each, with a colour per class so there is signal."""
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 40, 220], [200, 200, 40]])
    for split, n in (("train", 24), ("test", 6)):
        for c, name in enumerate(["a", "b", "c", "d"]):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-40, 40, (16, 16, 3), generator=g)
                img = (colours[c] + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def tiny_args(data_root, out, *extra):
    return ["--dataset", "folder", "--data-root", str(data_root), "--out", str(out), "--epochs", "2",
            "--batch-size", "16", "--width", "4", "--train-subset", "64", "--probe-epochs", "3", "--knn-k", "5",
            "--knn-monitor-size", "20", "--log-every", "2", "--no-progress", "--device", "cpu", *extra]


def test_end_to_end_run_writes_every_file(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_folder, out, "--knn-every", "1")) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "figures/training_curves.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    for key in ("preset", "backbone", "epochs", "batch_size", "device", "knn_top1", "linear_top1",
                "random_init_knn_top1", "pretrain_seconds", "total_seconds"):
        assert key in summary, key
    assert 0 <= summary["knn_top1"] <= 100 and summary["epochs"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("knn_monitor_top1" in r for r in epochs)
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[-1]["step"] == 8 and steps[0]["lr"] > 0  # 64 images / batch 16 = 4 steps per epoch
    config = json.loads((out / "config.json").read_text())
    assert config["width"] == 4 and config["preset"] == "quick"
    assert "kNN top-1" in capsys.readouterr().out
    # the run folder is never overwritten without --resume
    assert main(tiny_args(tiny_folder, out)) == 2
    assert "already exists" in capsys.readouterr().err


def test_resume_after_an_interruption_gives_the_same_weights(tiny_folder, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert main(tiny_args(tiny_folder, full, "--knn-every", "0", "--probe-epochs", "1")) == 0
    # interrupt the second run right after its first checkpoint, as Ctrl-C would
    real_save = train_module.save_checkpoint

    def save_then_interrupt(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    part = tmp_path / "part"
    assert main(tiny_args(tiny_folder, part, "--knn-every", "0", "--probe-epochs", "1")) == 130
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert main(["--resume", "--out", str(part), "--no-progress"]) == 0
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(line)["epoch"] for line in (part / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [1, 2]


@pytest.mark.parametrize("args, words", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--batch-size", "1"], "batch_size must be at least 2"),
    (["--temperature", "0"], "temperature must be greater than 0"),
    (["--epochs", "many"], "invalid int value"),
    (["--not-a-flag"], "unrecognized arguments"),
    (["--dataset", "cifar10", "--data-root", "{empty}", "--no-download"], "CIFAR-10 not found"),
    (["--resume", "--out", "{empty}"], "config.json"),
])
def test_user_mistakes_exit_2_with_one_line(args, words, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("{empty}", str(empty)) for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "--out", str(tmp_path / "o")]
                          if "--out" not in args else [sys.executable, str(ROOT / "run.py"), *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0]


def test_batch_larger_than_data_is_a_clear_error(tiny_folder, tmp_path, capsys):
    code = main(tiny_args(tiny_folder, tmp_path / "r", "--batch-size", "128"))
    assert code == 2 and "lower --batch-size" in capsys.readouterr().err


def test_evaluate_tsne_and_report_commands(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL is downloaded into ./runs
    out = tmp_path / "run"
    assert main(tiny_args(tiny_folder, out, "--tsne-points", "12")) == 0
    for name in ("eval.json", "report.md", "figures/tsne.png", "figures/retrieval.png", "figures/confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert "report:" in capsys.readouterr().out
    code = main(["evaluate", str(out), "--label-fractions", "25,50", "--finetune-epochs", "2", "--probe-epochs", "2",
                 "--no-progress"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    for key in ("knn", "linear"):
        assert {"top1", "random_init_top1", "protocol", "split", "epochs"} <= set(result[key])
    for kind in ("finetune", "supervised"):
        assert set(result[kind]) == {"25", "50"}
        assert result[kind]["25"]["labelled_images"] == 24  # 25 % of 96, class-balanced
        assert result[kind]["25"]["epochs"] == 2 and "protocol" in result[kind]["25"]
    assert len(result["linear"]["confusion"]) == 4
    assert (out / "figures" / "label_fractions.png").is_file()
    # evaluating by checkpoint file or file URL gives the same kNN number (everything is seeded)
    assert main(["evaluate", (out / "checkpoint.pt").as_uri(), "--label-fractions", "", "--probe-epochs", "2",
                 "--no-progress"]) == 0
    downloaded = json.loads((tmp_path / "runs" / "downloaded-checkpoint" / "eval.json").read_text())
    assert downloaded["knn"]["top1"] == result["knn"]["top1"]
    assert main(["tsne", str(out), "--tsne-points", "12"]) == 0
    other = tmp_path / "other"
    assert main(tiny_args(tiny_folder, other, "--temperature", "0.2", "--tsne-points", "12")) == 0
    report = tmp_path / "compare.md"
    assert main(["report", str(out), str(other), "--out", str(report)]) == 0
    text = report.read_text()
    assert f"{result['knn']['top1']:.2f}" in text and "0.2" in text


def test_evaluate_rejects_a_bad_source(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--label-fractions", "0,200"]) == 2


def test_time_budget_sets_the_epochs(tiny_folder, tmp_path, capsys):
    out = tmp_path / "budget"
    assert main(tiny_args(tiny_folder, out, "--epochs", "40", "--time-budget", "0.001", "--knn-every", "0")) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    assert json.loads((out / "config.json").read_text())["epochs"] == 1
    assert "time budget" in capsys.readouterr().out
