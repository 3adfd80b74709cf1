"""The shipped encoder's folder (runs/pretrained-cifar10-r18/, SPEC): scripts/ship_encoder.py makes it from a
finished run, every command loads it and checks its sha256; the committed one, once there, loads and matches."""

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from simclr_lib.checkpoints import sha256_of
from simclr_lib.cli import main
from simclr_lib.errors import UserError
from simclr_lib.models import SimCLR
from simclr_lib.notebook import PRETRAINED

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "runs" / PRETRAINED
_spec = importlib.util.spec_from_file_location("ship_encoder", ROOT / "scripts" / "ship_encoder.py")
ship_encoder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ship_encoder)
_spec = importlib.util.spec_from_file_location("land_gpu_results", ROOT / "scripts" / "land_gpu_results.py")
land_gpu_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(land_gpu_results)


@pytest.fixture(scope="module")
def finished_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ship") / "run"
    args = ["--dataset", "folder", "--data-root", str(tiny_folder), "--out", str(out), "--epochs", "2",
            "--batch-size", "16", "--width", "4", "--train-subset", "64", "--probe-epochs", "2", "--knn-k", "5",
            "--knn-every", "0", "--tsne-points", "12", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    return out


def test_shipping_a_run_gives_an_fp16_folder_that_every_command_loads(finished_run, tmp_path, capsys):
    folder = ship_encoder.ship(finished_run, tmp_path / PRETRAINED)
    names = {p.name for p in folder.iterdir()}
    assert {"checkpoint.pt", "checkpoint.pt.sha256", "config.json", "summary.json", "eval.json",
            "metrics.jsonl", "figures"} <= names
    digest, name = (folder / "checkpoint.pt.sha256").read_text().split()
    assert name == "checkpoint.pt" and digest == sha256_of(folder / "checkpoint.pt")
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert "optimizer" not in state and state["model"]["encoder.conv1.weight"].dtype == torch.float16
    # the same representations as the run's own weights, up to fp16 rounding
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours, theirs = SimCLR.from_checkpoint(folder).eval(), SimCLR.from_checkpoint(finished_run).eval()
    with torch.no_grad():
        assert torch.allclose(ours.encode(images), theirs.encode(images), atol=2e-2, rtol=2e-2)
    data = str(json.loads((folder / "config.json").read_text())["data_root"])
    assert main(["export", str(folder), "--out", str(tmp_path / "encoder.pt")]) == 0
    assert main(["embed", str(folder), data, "--out", str(tmp_path / "h.npy"), "--no-progress"]) == 0
    assert main(["tsne", str(folder), "--tsne-points", "12"]) == 0
    assert main(["evaluate", str(folder), "--label-fractions", "", "--probe-epochs", "2", "--no-progress"]) == 0
    # nothing the folder shipped with was overwritten: new results go beside it
    assert (folder / "eval-2.json").is_file() and (folder / "figures" / "tsne-2.png").is_file()
    assert sha256_of(folder / "eval.json") == sha256_of(finished_run / "eval.json")


def test_a_shipped_checkpoint_that_does_not_match_its_sha256_is_refused(finished_run, tmp_path):
    folder = ship_encoder.ship(finished_run, tmp_path / PRETRAINED)
    blob = bytearray((folder / "checkpoint.pt").read_bytes())
    blob[-100] ^= 0xFF
    (folder / "checkpoint.pt").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        SimCLR.from_checkpoint(folder)


def test_a_shipped_folder_cannot_be_resumed_and_an_empty_sha256_file_is_one_clear_error(finished_run, tmp_path,
                                                                                         capsys):
    folder = ship_encoder.ship(finished_run, tmp_path / PRETRAINED)
    assert main(["--resume", "--out", str(folder), "--no-progress"]) == 2
    assert "holds weights only" in capsys.readouterr().err
    (folder / "checkpoint.pt.sha256").write_text("\n")
    assert main(["export", str(folder), "--out", str(tmp_path / "e.pt")]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs the git checkout")
def test_git_tracks_what_ship_writes_and_ignores_what_evaluating_the_shipped_folder_adds():
    shipped = ["checkpoint.pt", "checkpoint.pt.sha256", "config.json", "summary.json", "eval.json", "metrics.jsonl",
               "report.md", "figures/tsne.png", "figures/retrieval.png"]
    later = ["eval-2.json", "report-2.md", "transfer-stl10.json", "checkpoint.pt.tmp", "h.npy",
             "figures/tsne-2.png", "figures/label_fractions.png", "figures/transfer-stl10/confusion_matrix.png"]
    paths = [f"runs/{PRETRAINED}/{name}" for name in shipped + later]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(f"runs/{PRETRAINED}/{name}" for name in later)


def test_another_eval_file_is_shipped_as_eval_json(finished_run, tmp_path):
    # e.g. the eval-2.json of `run.py evaluate --label-fractions 1,10`, with fine-tuning results for notebook 05
    other = tmp_path / "eval-2.json"
    other.write_text('{"finetune": {"1": {"top1": 50.0}}}')
    folder = ship_encoder.ship(finished_run, tmp_path / PRETRAINED, eval_file=other)
    assert (folder / "eval.json").read_text() == other.read_text()


def test_weights_only_keeps_the_fp16_weights_of_a_run(finished_run, tmp_path):
    # what scripts/gpu_check.sh keeps of a run that did not finish, to bring back under the size limit
    assert ship_encoder.main([str(finished_run), "--weights-only", str(tmp_path / "w.pt")]) == 0
    assert SimCLR.from_checkpoint(tmp_path / "w.pt").encoder.conv1.weight.shape[0] == 4


def test_shipping_never_overwrites_and_needs_a_finished_run(finished_run, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        ship_encoder.ship(finished_run, tmp_path / "taken")
    with pytest.raises(UserError, match="not a finished run"):
        ship_encoder.ship(tmp_path / "taken", tmp_path / "new")
    with pytest.raises(UserError, match="over the 0 MB limit"):
        ship_encoder.ship(finished_run, tmp_path / "big", max_bytes=1000)
    assert not (tmp_path / "big").exists()


def gpu_job_output(run: Path, work: Path, out: Path, ship: bool = True, part_size: str = "200k") -> Path:
    """What scripts/gpu_check.sh brings back: the run folder without checkpoints and the shipped folder, packed with
    the same tar | split (small parts here, so that joining them is tested), beside bench.json and the logs."""
    staged = work / run.name
    shutil.copytree(run, staged, ignore=shutil.ignore_patterns("checkpoint*.pt"))
    names = [run.name]
    if ship:
        ship_encoder.ship(run, work / PRETRAINED)
        names.append(PRETRAINED)
    out.mkdir()
    subprocess.run(f"tar -C {work} -cf - {' '.join(names)} | split -b {part_size} -d - {out}/results.tar.part-",
                   shell=True, check=True)
    step = {"preset": "cifar10-r18-10min", "backbone": "resnet18", "width": 64, "fast_views_per_s": 1.0,
            "fast_tflops": 1.0, "fraction_of_peak": 0.1, "fast_peak_mb": 1024.0, "dataloader_views_per_s": 1.0}
    bench = {"device": "NVIDIA H200", "train_step": [
        {**step, "batch_size": 512, "compiled_views_per_s": 81_234.0, "compiled_tflops": 268.0,
         "compiled_fraction_of_peak": 0.27, "compile_seconds": 45.2},
        {**step, "batch_size": 1024, "compile_error": "BackendCompilerFailed: no"},
        {"backbone": "resnet18", "batch_size": 4096, "width": 64, "out_of_memory": True}]}
    (out / "bench.json").write_text(json.dumps(bench))
    (out / "run.log").write_text("pretraining budget: 300 s\n")
    return out


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("split") is None, reason="needs tar and split")
def test_landing_the_gpu_jobs_output_puts_each_file_where_the_docs_read_it(finished_run, tmp_path, monkeypatch):
    out = gpu_job_output(finished_run, tmp_path / "work", tmp_path / "out")
    assert len(list(out.glob("results.tar.part-*"))) > 1
    root = tmp_path / "repo"
    written = land_gpu_results.land(out, root)
    preset = json.loads((finished_run / "summary.json").read_text())["preset"]
    results = root / "docs" / "results" / f"{preset}-cpu"  # the run's device names the folder
    assert written == [results, root / "runs" / PRETRAINED, root / "docs" / "results" / "gpu-bench" /
                       "h200-resnet18.json"]
    for name in ("config.json", "metrics.jsonl", "summary.json", "eval.json"):
        assert (results / name).read_bytes() == (finished_run / name).read_bytes()
    assert (results / "run.log").is_file() and not list(results.glob("*.pt"))
    shipped = root / "runs" / PRETRAINED
    assert (shipped / "checkpoint.pt").read_bytes() == (tmp_path / "work" / PRETRAINED / "checkpoint.pt").read_bytes()
    SimCLR.from_checkpoint(shipped)
    # the README's results table and the docs' GPU table are generated from exactly these files
    spec = importlib.util.spec_from_file_location("sync_numbers", ROOT / "scripts" / "sync_numbers.py")
    sync_numbers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync_numbers)
    monkeypatch.setattr(sync_numbers, "RESULTS", root / "docs" / "results")
    assert f"`{preset}-cpu`" in sync_numbers.results_table() and "torch.compile" not in sync_numbers.results_table()
    config = json.loads((results / "config.json").read_text())
    (results / "config.json").write_text(json.dumps({**config, "compile": True}))
    assert re.search(r"batch \d+, torch.compile \|", sync_numbers.results_table())  # a compiled run says so
    table = sync_numbers.gpu_bench()
    step = "| NVIDIA H200 | resnet18, `cifar10-r18-10min` |"
    assert f"{step} 512 | 1 | 1 (10%) | 81,234, 268 (27%), 45 s |" in table
    assert f"{step} 1024 | 1 | 1 (10%) | failed (BackendCompilerFailed) |" in table
    assert "| NVIDIA H200 | resnet18 | 4096 | out of memory |" in table


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("split") is None, reason="needs tar and split")
def test_landing_never_overwrites_and_refuses_an_unfinished_run_or_a_bad_shipped_folder(finished_run, tmp_path):
    out = gpu_job_output(finished_run, tmp_path / "work", tmp_path / "out")
    root = tmp_path / "repo"
    first = land_gpu_results.land(out, root, name="r")
    files = sorted(p for p in root.rglob("*"))
    with pytest.raises(UserError, match="already exists"):  # the shipped folder is there: nothing is written
        land_gpu_results.land(out, root, name="r")
    assert sorted(p for p in root.rglob("*")) == files
    second = land_gpu_results.land(out, root, name="r", ship=False)  # a second landing goes beside the first
    assert [p.name for p in second] == ["r-2", "h200-resnet18-2.json"] and [p.name for p in first][0] == "r"
    # a run that stopped before its summary: one clear error, then the bench alone
    unfinished = tmp_path / "src" / "unfinished"
    shutil.copytree(finished_run, unfinished)
    (unfinished / "summary.json").unlink()
    out2 = gpu_job_output(unfinished, tmp_path / "work2", tmp_path / "out2", ship=False)
    with pytest.raises(UserError, match="did not finish.*--bench-only"):
        land_gpu_results.land(out2, tmp_path / "repo2")
    assert not (tmp_path / "repo2").exists()
    assert land_gpu_results.land(out2, tmp_path / "repo2", bench_only=True)[0].name == "h200-resnet18.json"
    # a shipped checkpoint that does not match its sha256 is refused before anything is written
    out3 = gpu_job_output(finished_run, tmp_path / "work3", tmp_path / "out3")
    blob = bytearray((tmp_path / "work3" / PRETRAINED / "checkpoint.pt").read_bytes())
    blob[-100] ^= 0xFF
    (tmp_path / "work3" / PRETRAINED / "checkpoint.pt").write_bytes(bytes(blob))
    for part in out3.glob("results.tar.part-*"):
        part.unlink()
    subprocess.run(f"tar -C {tmp_path / 'work3'} -cf - {finished_run.name} {PRETRAINED} | split -b 200k -d - "
                   f"{out3}/results.tar.part-", shell=True, check=True)
    with pytest.raises(UserError, match="sha256"):
        land_gpu_results.land(out3, tmp_path / "repo3")
    assert not (tmp_path / "repo3").exists()


@pytest.mark.skipif(shutil.which("tar") is None or shutil.which("split") is None, reason="needs tar and split")
def test_landing_refuses_missing_or_cut_parts_and_odd_names_in_one_line(finished_run, tmp_path, capsys):
    out = gpu_job_output(finished_run, tmp_path / "work", tmp_path / "out", ship=False, part_size="20k")
    parts = sorted(out.glob("results.tar.part-*"))
    assert len(parts) > 2
    root = tmp_path / "repo"
    for bad_name in ("../x", "/abs", "a/b", ""):
        with pytest.raises(UserError, match="one folder name"):
            land_gpu_results.land(out, root, name=bad_name)
    saved = {part: part.read_bytes() for part in parts}
    for part in parts[1:]:  # the last parts did not come back: no gap, but the archive stops short
        part.unlink()
    with pytest.raises(UserError, match="do not make a whole archive"):
        land_gpu_results.land(out, root)
    for part, blob in saved.items():
        part.write_bytes(blob)
    parts[1].unlink()  # a part in the middle did not come back
    with pytest.raises(UserError, match="have a gap"):
        land_gpu_results.land(out, root)
    for part in parts:
        part.unlink(missing_ok=True)
    assert land_gpu_results.main([str(out)]) == 2  # RUN=0: no parts, one line that says what to do
    assert "--bench-only" in capsys.readouterr().err
    assert not root.exists()
    (out / "bench.json").write_text("[]")
    with pytest.raises(UserError, match="not a `run.py bench` result"):
        land_gpu_results.land(out, root, bench_only=True)


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="no encoder has been shipped yet (it is trained on a GPU)")
def test_the_committed_shipped_encoder_matches_its_sha256_and_loads():
    digest = (SHIPPED / "checkpoint.pt.sha256").read_text().split()[0]
    assert sha256_of(SHIPPED / "checkpoint.pt") == digest
    assert ship_encoder.folder_bytes(SHIPPED) <= ship_encoder.MAX_BYTES
    summary = json.loads((SHIPPED / "summary.json").read_text())
    assert {"knn_top1", "linear_top1", "device"} <= summary.keys() and (SHIPPED / "eval.json").is_file()
    model = SimCLR.from_checkpoint(SHIPPED)
    assert model.arch["backbone"] == "resnet18" and model.arch["width"] == 64
