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
from simclr_lib.config import PRESETS  # noqa: E402
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


# What others published for the same recipe (not measured here), shown beside our row of that preset.
PUBLISHED = {"cifar10-r18": "about 91 % linear, 1000 epochs (official code)",
             "cifar10-r18-10min": "84.8 % kNN, 200 epochs (lightly's benchmark)",
             "seed-r50-bs256": "74.02 % linear, 400 epochs (seed repo); the paper: 83.9 %",
             "seed-r50-bs512": "78.32 % linear, 400 epochs (seed repo); the paper: 84.2 %",
             "paper-r50": "94.0 % linear, 1000 epochs (the paper, Appendix B.9)"}


def results_table() -> str:
    """One row per committed run folder with a summary.json and an eval.json; a run fitted to a --time-budget says
    how many of its preset's epochs it trained."""
    rows = ["| run | hardware | pretraining / total wall time | kNN top-1 | linear top-1 | same net at random init "
            "(kNN / linear) | published for the recipe |", "|---|---|---|---|---|---|---|"]
    for folder in sorted(p for p in RESULTS.iterdir() if (p / "summary.json").is_file()):
        s, e = read(folder.name, "summary"), read(folder.name, "eval")
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        budget, full = config.get("time_budget"), PRESETS.get(s["preset"], {}).get("epochs", s["epochs"])
        epochs = (f"{s['epochs']} of {full} epochs (all that fit {budget:.0f} s)" if budget and s["epochs"] < full
                  else f"{s['epochs']} epochs")
        compiled = ", torch.compile" if config.get("compile") else ""
        rows.append(f"| `{folder.name}`: `{s['preset']}`, {epochs}, batch {s['batch_size']}{compiled} | "
                    f"{s['device']} | {s['pretrain_seconds']:.0f} s / {s['total_seconds']:.0f} s | "
                    f"{_pct(e['knn']['top1'])} | {_pct(e['linear']['top1'])} | "
                    f"{_pct(e['knn']['random_init_top1'])} / {_pct(e['linear']['random_init_top1'])} | "
                    f"{PUBLISHED.get(s['preset'], '-')} |")
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


def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f} GiB"


def gpu_bench() -> str:
    """Training-step speed and peak memory per backbone and batch, from the `run.py bench` JSON files of GPU runs
    in docs/results/gpu-bench/ (scripts/gpu_check.sh writes bench.json)."""
    files = sorted((RESULTS / "gpu-bench").glob("*.json"))
    if not files:
        return "Not measured yet: no GPU bench file in `docs/results/gpu-bench/`.\n"
    rows = ["| device | backbone, recipe | batch | views/s | TFLOPS (% of tensor peak) | compiled: views/s, TFLOPS "
            "(% of peak), compile time | peak memory | per-image DataLoader path |", "|---" * 8 + "|"]
    for path in files:
        bench = json.loads(path.read_text())
        for r in bench["train_step"]:
            step = r.get("backbone", "resnet18") + (f", `{r['preset']}`" if "preset" in r else "")
            if r.get("out_of_memory"):
                rows.append(f"| {bench['device']} | {step} | {r['batch_size']} | out of memory |" + " - |" * 4)
                continue
            peak = f" ({r['fraction_of_peak']:.0%})" if r.get("fraction_of_peak") else ""
            compiled = f"failed ({r['compile_error'].split(':')[0]})" if "compile_error" in r else "not measured"
            if "compiled_views_per_s" in r:
                compiled_peak = f" ({r['compiled_fraction_of_peak']:.0%})" if r.get("compiled_fraction_of_peak") else ""
                cached = f" ({r['cached_compile_seconds']:.0f} s cached)" if "cached_compile_seconds" in r else ""
                compiled = (f"{r['compiled_views_per_s']:,.0f}, {r['compiled_tflops']:.0f}{compiled_peak}, "
                            f"{r['compile_seconds']:.0f} s{cached}")
            rows.append(f"| {bench['device']} | {step} | {r['batch_size']} | "
                        f"{r['fast_views_per_s']:,.0f} | {r.get('fast_tflops', 0):.0f}{peak} | {compiled} | "
                        f"{_gib(r['fast_peak_mb'])} | {r['dataloader_views_per_s']:,.0f} views/s |")
    return "\n".join(rows) + "\n"


GENERATORS: dict[str, Callable[[], str]] = {"quick-output": quick_output, "results-table": results_table,
                                            "label-fractions": label_fractions, "recipe-study": recipe_study,
                                            "notebook-times": notebook_times, "gpu-bench": gpu_bench}


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
