"""Land what `scripts/gpu_check.sh` brought back from a GPU into the repository, the same way every time:

- the run's result files (config.json, metrics.jsonl, summary.json, eval*.json, report*.md) and the job's logs
  (environment.txt, bench.log, run.log) -> docs/results/<preset>-<card>/ (e.g. cifar10-r18-10min-h200/);
- bench.json -> docs/results/gpu-bench/<card>-<backbone>.json;
- the shipped encoder's folder -> runs/pretrained-cifar10-r18/, after its sha256 and weights are checked;
- then the README's and docs' numbers are regenerated from the files (scripts/sync_numbers.py).

Nothing that exists is overwritten: a second run or bench of the same kind gets a -2, -3 ... suffix, and an
existing shipped folder stops the script before anything is written (move it away, or pass --no-ship).

    python scripts/land_gpu_results.py OUT_DIR [--name RUN_NAME] [--no-ship] [--bench-only]

OUT_DIR is the folder the device tool brought back (results.tar.part-NN, bench.json, logs).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simclr_lib.errors import UserError  # noqa: E402
from simclr_lib.models import SimCLR  # noqa: E402
from simclr_lib.notebook import PRETRAINED  # noqa: E402

LOGS = ("environment.txt", "bench.log", "run.log")
SHIPPED_LIMIT = 25_000_000  # SPEC: the shipped folder holds at most 25 MB


def card(device: str) -> str:
    """A short file-name form of a device description: 'NVIDIA H200' -> 'h200'."""
    name = device.split(" (")[0].lower().removeprefix("nvidia ")  # 'CPU (2 cores, ...)' -> 'cpu'
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "device"


def free_path(path: Path) -> Path:
    """`path`, or the first of path-2, path-3 ... (before a .json suffix) that does not exist yet."""
    stem, suffix = (path.stem, path.suffix) if path.suffix == ".json" else (path.name, "")
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{stem}-{n}{suffix}")
    return candidate


def parts_of(out_dir: Path) -> list[Path]:
    """The results.tar.part-NN files in order, refused when there are none or one is missing."""
    parts = sorted(out_dir.glob("results.tar.part-*"))
    if not parts:
        raise UserError(f"{out_dir} holds no results.tar.part-* files: the run did not start (RUN=0, or see bench.log "
                        "and run.log) or this is not the folder the GPU job wrote; --bench-only lands bench.json alone")
    numbers = [p.name.rsplit("-", 1)[1] for p in parts]
    if numbers != [f"{i:02d}" for i in range(len(parts))]:
        raise UserError(f"results.tar parts {', '.join(numbers)} have a gap: one did not come back from the GPU")
    return parts


def unpack(out_dir: Path, into: Path) -> list[Path]:
    """Join out_dir/results.tar.part-* in order and extract them into `into`; return the top-level folders."""
    joined = into / "results.tar"
    with joined.open("wb") as sink:
        for part in parts_of(out_dir):
            with part.open("rb") as source:
                shutil.copyfileobj(source, sink)
    try:
        with tarfile.open(joined) as tar:
            members = tar.getmembers()
            # only plain files and folders inside `into` (what gpu_check.sh packs), on every Python version
            unsafe = [m.name for m in members if m.name.startswith("/") or ".." in Path(m.name).parts
                      or not (m.isfile() or m.isdir())]
            if unsafe:
                raise UserError(f"the results archive holds {unsafe[0]!r}, not a plain file or folder inside it")
            tar.extractall(into / "x", members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter")
                                                            else {}))
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"the results.tar parts do not make a whole archive ({exc}): the last one may be cut short") \
            from None
    joined.unlink()
    return sorted(p for p in (into / "x").iterdir() if p.is_dir())


def run_folder(folders: list[Path]) -> Path:
    """The one run folder among the extracted ones (the other, if any, is the shipped folder)."""
    runs = [p for p in folders if p.name != PRETRAINED]
    if len(runs) != 1:
        raise UserError(f"expected one run folder in the results, found {[p.name for p in runs] or 'none'}")
    missing = [n for n in ("config.json", "summary.json", "eval.json") if not (runs[0] / n).is_file()]
    if missing:
        held = ", ".join(sorted(p.name for p in runs[0].iterdir()))
        raise UserError(f"the run {runs[0].name} did not finish: it has no {', '.join(missing)} (it holds {held}); "
                        "read run.log, and pass --bench-only to land bench.json alone")
    return runs[0]


def check_shipped(folder: Path) -> None:
    """Refuse a shipped folder that is not a ResNet-18 whose weights load and match their sha256; warn when it is
    over the size limit (a longer metrics.jsonl can be trimmed)."""
    if not (folder / "checkpoint.pt.sha256").is_file():
        raise UserError("the shipped folder that came back has no checkpoint.pt.sha256: pass --no-ship")
    try:
        model = SimCLR.from_checkpoint(folder)  # checks checkpoint.pt against checkpoint.pt.sha256 first
    except UserError as exc:
        raise UserError(f"the shipped folder that came back does not load ({exc}): re-run the job, or pass --no-ship") \
            from None
    if model.arch["backbone"] != "resnet18":
        raise UserError(f"the shipped folder holds a {model.arch['backbone']} encoder, but {PRETRAINED} is a "
                        "ResNet-18: pass --no-ship")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > SHIPPED_LIMIT:
        print(f"warning: the shipped folder holds {size / 1e6:.1f} MB, over the {SHIPPED_LIMIT / 1e6:.0f} MB limit: "
              "trim it (e.g. metrics.jsonl) before committing", file=sys.stderr)


def read_bench(out_dir: Path) -> dict | None:
    """bench.json of `out_dir`, checked to be one, or None when the job wrote none."""
    if not (out_dir / "bench.json").is_file():
        return None
    try:
        bench = json.loads((out_dir / "bench.json").read_text())
        if not isinstance(bench, dict) or not {"device", "train_step"} <= bench.keys():  # what the docs' table reads
            raise ValueError
    except ValueError:
        raise UserError(f"{out_dir / 'bench.json'} is not a `run.py bench` result: --bench-only, or remove it") \
            from None
    return bench


def place(source: Path, dest: Path) -> Path:
    """Copy the folder `source` to `dest` (which must not exist) through a temporary sibling, so that a failure
    leaves no half-made folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        shutil.copytree(source, staging / dest.name)
        (staging / dest.name).rename(dest)
    finally:
        shutil.rmtree(staging)
    return dest


def land_run(out_dir: Path, tmp: Path, root: Path, name: str | None, ship: bool) -> list[Path]:
    """The run's result files and the job's logs into docs/results/, and the shipped folder into runs/."""
    shipped_dest = root / "runs" / PRETRAINED
    folders = unpack(out_dir, tmp)
    run = run_folder(folders)
    shipped = next((p for p in folders if p.name == PRETRAINED), None) if ship else None
    if shipped is not None:
        if shipped_dest.exists():
            raise UserError(f"{shipped_dest} already exists: move it away first, or pass --no-ship")
        check_shipped(shipped)
    elif ship:
        print("no shipped encoder's folder in the results (SHIP=0, or the run did not finish)")
    summary = json.loads((run / "summary.json").read_text())
    results = tmp / "results"
    results.mkdir()
    for path in sorted(run.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".md") or path.name == "metrics.jsonl"):
            shutil.copy2(path, results / path.name)
    for log in LOGS:
        if (out_dir / log).is_file():
            shutil.copy2(out_dir / log, results / log)
    dest = free_path(root / "docs" / "results" / (name or f"{summary['preset']}-{card(summary['device'])}"))
    return [place(results, dest)] + ([place(shipped, shipped_dest)] if shipped is not None else [])


def land(out_dir: str | Path, root: str | Path = ROOT, name: str | None = None, ship: bool = True,
         bench_only: bool = False) -> list[Path]:
    """Copy the GPU job's results in `out_dir` into the repository at `root`; return what was written. Everything
    is checked before anything is written (bench_only=True lands bench.json alone, e.g. after a failed run)."""
    out_dir, root = Path(out_dir), Path(root)
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"--name {name!r} must be one folder name (letters, digits, '.', '_', '-')")
    bench = read_bench(out_dir)
    if bench_only and bench is None:
        raise UserError(f"{out_dir} holds no bench.json (the bench failed: see bench.log)")
    with tempfile.TemporaryDirectory() as tmp:
        written = [] if bench_only else land_run(out_dir, Path(tmp), root, name, ship)
    if bench is not None:
        backbone = (bench["train_step"] or [{}])[0].get("backbone", "resnet18")
        target = free_path(root / "docs" / "results" / "gpu-bench" / f"{card(bench['device'])}-{backbone}.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out_dir / "bench.json", target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="the folder the GPU job wrote (results.tar.part-NN, bench.json, logs)")
    parser.add_argument("--name", help="the folder name under docs/results/ (default: <preset>-<card>)")
    parser.add_argument("--no-ship", action="store_true", help="leave the shipped encoder's folder out")
    parser.add_argument("--bench-only", action="store_true", help="land bench.json alone (e.g. when the run failed)")
    args = parser.parse_args(argv)
    try:
        written = land(args.out_dir, name=args.name, ship=not args.no_ship, bench_only=args.bench_only)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path.relative_to(ROOT)}")
    if subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_numbers.py")]).returncode != 0:
        print("error: scripts/sync_numbers.py failed on the landed files (above): fix them, then run it again",
              file=sys.stderr)
        return 1
    if (ROOT / "runs" / PRETRAINED) in written:
        print("next: python scripts/make_figures.py runs/pretrained-cifar10-r18  (the README's t-SNE and retrieval)\n"
              "      python run.py evaluate runs/pretrained-cifar10-r18  (an independent re-evaluation: within 1 "
              "point?)")
    print(f"git add {' '.join(str(p.relative_to(ROOT)) for p in written)} README.md docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
