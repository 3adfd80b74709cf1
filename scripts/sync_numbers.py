"""Write every result the README and docs quote from the committed result files in docs/results/, so text and
files cannot drift apart. Each generated block sits between two markers:

    <!-- numbers:NAME -->
    ...generated text...
    <!-- /numbers -->

    python scripts/sync_numbers.py          # rewrite the blocks
    python scripts/sync_numbers.py --check  # exit 1 if a block differs from what the files say (a test runs this)
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simclr_lib.jobs import format_summary  # noqa: E402  (the very table `python run.py` prints)

RESULTS = ROOT / "docs" / "results"
DOCUMENTS = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "evaluation.md"]
BLOCK = re.compile(r"(<!-- numbers:([\w-]+) -->\n)(.*?)(<!-- /numbers -->)", re.S)


def read(run: str, name: str) -> dict:
    """docs/results/<run>/<name>.json."""
    return json.loads((RESULTS / run / f"{name}.json").read_text())


def _pct(value: float) -> str:
    return f"{value:.2f} %"


def quick_output() -> str:
    """What `python run.py` printed for the reference quick run."""
    summary = read("quick-cpu", "summary")
    summary = {**summary, "run_dir": "runs/quick-<timestamp>"}
    return "```\n" + format_summary(summary).strip("\n") + "\n```\n"


def results_table() -> str:
    """One row per committed run folder with a summary.json and an eval.json."""
    rows = ["| run | hardware | pretraining / total wall time | kNN top-1 | linear top-1 | same net at random init "
            "(kNN / linear) |", "|---|---|---|---|---|---|"]
    for folder in sorted(p for p in RESULTS.iterdir() if (p / "summary.json").is_file()):
        s, e = read(folder.name, "summary"), read(folder.name, "eval")
        rows.append(f"| `{folder.name}`: `{s['preset']}`, {s['epochs']} epochs, batch {s['batch_size']} | "
                    f"{s['device']} | {s['pretrain_seconds']:.0f} s / {s['total_seconds']:.0f} s | "
                    f"{_pct(e['knn']['top1'])} | {_pct(e['linear']['top1'])} | "
                    f"{_pct(e['knn']['random_init_top1'])} / {_pct(e['linear']['random_init_top1'])} |")
    return "\n".join(rows) + "\n"


def label_fractions() -> str:
    """Fine-tuning vs supervised from scratch, per label fraction, of the reference quick run."""
    e = read("quick-cpu", "eval")
    rows = ["| labels | SimCLR `quick` encoder, fine-tuned | same network from scratch, same budget |", "|---|---|---|"]
    for key, ft in e.get("finetune", {}).items():
        rows.append(f"| {key} % ({ft['labelled_images']} images, {ft['steps']} steps) | {_pct(ft['top1'])} | "
                    f"{_pct(e['supervised'][key]['top1'])} |")
    return "\n".join(rows) + f"\n\n`evaluate` took {e['seconds']:.0f} s on {e['device']}.\n"


def recipe_study() -> str:
    """The CPU recipe study of issue 11 (docs/results/recipe-study/*.json)."""
    rows = ["| recipe | changes from `quick` | kNN top-1 | linear top-1 | pretraining |", "|---|---|---|---|---|"]
    for path in sorted((RESULTS / "recipe-study").glob("*.json"), key=lambda p: -json.loads(p.read_text())["knn_top1"]):
        r = json.loads(path.read_text())
        changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "none"
        rows.append(f"| {r['recipe']} | {changes} | {_pct(r['knn_top1'])} | {_pct(r['linear_top1'])} | "
                    f"{r['pretrain_seconds']:.0f} s |")
    return "\n".join(rows) + "\n"


def notebook_times() -> str:
    """Seconds per notebook, SMOKE and full, from docs/executed/timings-*.json (scripts/run_notebooks.py --out)."""
    runs = {mode: json.loads((ROOT / "docs" / "executed" / f"timings-{mode}.json").read_text())
            for mode in ("smoke", "full")}
    rows = ["| notebook | SMOKE | full, CPU | full, GPU |", "|---|---|---|---|"]
    for name, seconds in runs["full"]["seconds"].items():
        smoke = runs["smoke"]["seconds"].get(name)
        rows.append(f"| `{name}` | {f'{smoke:.0f} s' if smoke is not None else '-'} | {seconds / 60:.1f} min | "
                    "not measured yet |")
    machines = "; ".join(f"{mode}: {run['machine']}" for mode, run in runs.items())
    return "\n".join(rows) + f"\n\nMeasured on: {machines}.\n"


GENERATORS: dict[str, Callable[[], str]] = {"quick-output": quick_output, "results-table": results_table,
                                            "label-fractions": label_fractions, "recipe-study": recipe_study,
                                            "notebook-times": notebook_times}


def synced(text: str) -> str:
    """`text` with every block regenerated."""
    def fill(match: re.Match) -> str:
        if match.group(2) not in GENERATORS:
            raise SystemExit(f"unknown numbers block {match.group(2)!r}: known are {', '.join(GENERATORS)}")
        return match.group(1) + GENERATORS[match.group(2)]() + match.group(4)
    return BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    check, stale = "--check" in argv, []
    for path in DOCUMENTS:
        text = path.read_text()
        new = synced(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(new)
    for path in stale:
        print(f"{'differs from docs/results' if check else 'updated'}: {path}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
