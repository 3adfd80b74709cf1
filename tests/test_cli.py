"""The command line end to end on a tiny generated data set: files written, resume, and one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simclr_lib import checkpoints as checkpoints_module
from simclr_lib import train as train_module
from simclr_lib.cli import main

ROOT = Path(__file__).resolve().parents[1]


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
    assert summary["knn_monitor_seconds"] == pytest.approx(sum(r["knn_monitor_seconds"] for r in epochs))
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[-1]["step"] == 8 and steps[0]["lr"] > 0  # 64 images / batch 16 = 4 steps per epoch
    assert all(0 <= r["contrastive_acc"] <= 1 for r in steps)
    config = json.loads((out / "config.json").read_text())
    assert config["width"] == 4 and config["preset"] == "quick"  # config.json, a plain dict
    assert "kNN top-1" in capsys.readouterr().out
    # the run folder is never overwritten without --resume
    assert main(tiny_args(tiny_folder, out)) == 2
    assert "already exists" in capsys.readouterr().err


def weights_of(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def epoch_numbers(run_dir):
    return [r["epoch"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "epoch"]


def test_resume_after_a_crash_gives_the_same_weights(tiny_folder, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert main(tiny_args(tiny_folder, full, "--knn-every", "0", "--probe-epochs", "1")) == 0
    # a crash right after the first epoch's checkpoint (KeyboardInterrupt outside the stop handler)
    real_save = checkpoints_module.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_module, "save_checkpoint", save_then_crash)
    part = tmp_path / "part"
    assert main(tiny_args(tiny_folder, part, "--knn-every", "0", "--probe-epochs", "1",
                          "--checkpoint-every", "0")) == 130  # a checkpoint at every epoch end
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(checkpoints_module, "save_checkpoint", real_save)
    assert main(["--resume", "--out", str(part), "--no-progress"]) == 0
    assert_same_weights(weights_of(full), weights_of(part))
    assert epoch_numbers(part) == [1, 2]


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_epoch_checkpoints_and_resume_is_bit_identical(tiny_folder, tmp_path, monkeypatch, capsys,
                                                                  signum, code):
    full = tmp_path / "full"
    assert main(tiny_args(tiny_folder, full, "--knn-every", "0", "--probe-epochs", "1")) == 0
    # The signal arrives during the 6th step (epoch 2, step 2 of 4): the step finishes, then the run stops.
    real_call, calls = train_module.TrainStep.__call__, []

    def step_then_signal(self, images, generator):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signum)
        return real_call(self, images, generator)

    monkeypatch.setattr(train_module.TrainStep, "__call__", step_then_signal)
    part = tmp_path / "part"
    assert main(tiny_args(tiny_folder, part, "--knn-every", "0", "--probe-epochs", "1")) == code
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and signal.Signals(signum).name in message[0]
    assert f"--resume --out {part}" in message[0]
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (1, 2, 6)
    assert not (part / "summary.json").exists()
    monkeypatch.setattr(train_module.TrainStep, "__call__", real_call)
    assert main(["--resume", "--out", str(part), "--no-progress"]) == 0
    assert_same_weights(weights_of(full), weights_of(part))
    assert epoch_numbers(part) == [1, 2]
    # the epoch record of the interrupted epoch covers all of it: same mean loss as the uninterrupted run
    full_loss = [r for r in map(json.loads, (full / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "epoch"][-1]["loss"]
    part_loss = [r for r in map(json.loads, (part / "metrics.jsonl").read_text().splitlines())
                 if r["kind"] == "epoch"][-1]["loss"]
    assert part_loss == pytest.approx(full_loss, rel=1e-6)


def test_sigterm_from_outside_stops_a_real_process_with_143(tiny_folder, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_folder, out, "--epochs", "60", "--knn-every", "0", "--probe-epochs", "1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "Traceback" not in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < state["step"] < 240


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
    first = {name: (out / name).read_bytes() for name in ("eval.json", "report.md", "figures/tsne.png",
                                                          "figures/confusion_matrix.png")}
    code = main(["evaluate", str(out), "--label-fractions", "25,50", "--finetune-epochs", "2", "--finetune-min-steps",
                 "0", "--probe-epochs", "2", "--no-progress"])
    assert code == 0
    # Nothing the run wrote is replaced: the new evaluation, figures and report go beside the old ones.
    result = json.loads((out / "eval-2.json").read_text())
    assert (out / "report-2.md").is_file() and (out / "figures" / "confusion_matrix-2.png").is_file()
    assert json.loads(first["eval.json"])["linear"]["epochs"] == 3 and result["linear"]["epochs"] == 2
    for key in ("knn", "linear"):
        assert {"top1", "random_init_top1", "protocol", "split"} <= set(result[key])
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
    assert (out / "figures" / "tsne-2.png").is_file() and (out / "figures" / "retrieval-2.png").is_file()
    assert all((out / name).read_bytes() == data for name, data in first.items())
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


def test_nan_loss_stops_with_a_hint_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path, monkeypatch, capsys):
    real_loss, calls, good_steps = train_module.nt_xent_loss, [], [5]

    def loss_that_diverges(z1, z2, temperature):
        calls.append(1)
        loss = real_loss(z1, z2, temperature)
        return loss * float("nan") if len(calls) > good_steps[0] else loss  # 5: from the 2nd step of epoch 2 on

    monkeypatch.setattr(train_module, "nt_xent_loss", loss_that_diverges)
    out = tmp_path / "nan"
    assert main(tiny_args(tiny_folder, out, "--knn-every", "0", "--log-every", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss became nan at step 6" in err[0] and "lower --lr" in err[0]
    assert "last good checkpoint is kept" in err[0]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 1, still loadable
    calls.clear()
    good_steps[0] = 1  # diverging in the first epoch, before any checkpoint: it says so
    assert main(tiny_args(tiny_folder, tmp_path / "nan2", "--knn-every", "0", "--log-every", "1")) == 2
    assert "no checkpoint had been written yet" in capsys.readouterr().err


def test_keep_holds_older_checkpoints_beside_the_latest(tiny_folder, tmp_path):
    out = tmp_path / "keep"
    assert main(tiny_args(tiny_folder, out, "--epochs", "4", "--keep", "2", "--knn-every", "0",
                          "--checkpoint-every", "0")) == 0
    older = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert older == ["checkpoint-epoch0002.pt", "checkpoint-epoch0003.pt"]
    for name, epoch in [("checkpoint.pt", 4), *zip(older, (2, 3))]:
        assert torch.load(out / name, weights_only=True)["epoch"] == epoch
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize("edit, words", [
    ({"not_a_key": 1}, "unknown config key 'not_a_key'"),
    ({"epochs": "ten"}, "config key 'epochs' must be int"),
    ({"temperature": -1.0}, "temperature must be greater than 0"),
])
def test_config_files_are_validated(tmp_path, capsys, edit, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": 3, **edit}))
    assert main(["--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "run").exists()


def test_none_unsets_a_preset_value_and_a_partial_config_file_works(tiny_folder, tmp_path):
    out = tmp_path / "unset"
    config_file = tmp_path / "mine.json"
    config_file.write_text(json.dumps({"temperature": 0.2, "width": 4}))
    assert main(["--config", str(config_file), *tiny_args(tiny_folder, out, "--train-subset", "none",
                                                          "--knn-every", "0")]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train_subset"] is None and config["temperature"] == 0.2 and config["preset"] == "quick"
    assert json.loads((out / "summary.json").read_text())["pretrain_images"] == 96  # all of tiny train
