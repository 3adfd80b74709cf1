"""Execute every notebook with papermill (SMOKE = True by default) and check it: no error, at least one figure,
committed without outputs, a `parameters` cell. Used by CI and `make notebooks`.

Usage: python scripts/run_notebooks.py [--full] [--out DIR] [NOTEBOOK ...]

With --out, the executed copies (outputs and figures included) and timings-<smoke|full>.json (seconds per notebook,
with the machine) are kept there: `make executed-notebooks` writes the full-path versions into docs/executed/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import papermill

ROOT = Path(__file__).resolve().parents[1]


def notebooks() -> list[Path]:
    """The numbered notebooks in order, then run.ipynb."""
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + [ROOT / "run.ipynb"]


def static_problems(path: Path) -> list[str]:
    """What is wrong with the committed file itself: outputs left in, no parameters cell."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    if any(cell.get("outputs") or cell.get("execution_count") for cell in nb.cells if cell.cell_type == "code"):
        problems.append("committed with outputs (clear them)")
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells):
        problems.append("no code cell tagged 'parameters'")
    return problems


def figure_count(nb: nbformat.NotebookNode) -> int:
    """Number of image outputs in an executed notebook."""
    return sum(1 for cell in nb.cells for out in cell.get("outputs", [])
               if any(key.startswith("image/") for key in out.get("data", {})))


def main(argv: list[str] | None = None) -> int:
    """Run the notebooks; exit 1 if any fails a check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks (default: all)")
    parser.add_argument("--full", action="store_true", help="run with SMOKE = False")
    parser.add_argument("--out", type=Path, default=None, help="where executed copies go (default: a temp dir)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="executed-notebooks-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    failures, timings = [], {}
    os.environ["SIMCLR_HEADLESS"] = "1"  # the kernels inherit it: no widget explorer without a browser (see 01)
    for path in args.paths or notebooks():
        path = path.resolve()
        problems = static_problems(path)
        t0 = time.perf_counter()
        target = out_dir / path.name
        try:
            papermill.execute_notebook(str(path), str(target), parameters={"SMOKE": not args.full},
                                       cwd=str(path.parent), progress_bar=False, kernel_name="python3")
            figures = figure_count(nbformat.read(target, as_version=4))
            if figures == 0:
                problems.append("drew no figure")
        except Exception as exc:  # papermill raises PapermillExecutionError with the cell's traceback
            problems.append(f"failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}")
            figures = 0
        seconds = time.perf_counter() - t0
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        print(f"{path.relative_to(ROOT)}: {seconds:.0f} s, {figures} figures, {status}", flush=True)
        timings[path.name] = round(seconds, 1)
        if problems:
            failures.append(path.name)
    sys.path.insert(0, str(ROOT))
    from simclr_lib.runtime import device_description, resolve_device

    machine = f"{device_description(resolve_device('auto'))}, {platform.machine()}"
    (out_dir / f"timings-{'full' if args.full else 'smoke'}.json").write_text(
        json.dumps({"machine": machine, "seconds": timings}, indent=2) + "\n")
    print(f"executed copies in {out_dir}")
    if failures:
        print(f"{len(failures)} notebook(s) failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
