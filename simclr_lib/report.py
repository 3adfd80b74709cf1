"""Markdown report of run folders: `simclr report RUN [RUN ...] --out FILE` (or `python run.py report ...`):
recipe from config.json, hardware and pretraining times from summary.json, accuracies and protocols from the latest
eval.json (results are never overwritten: a new one goes beside the old as eval-2.json, eval-3.json, ...)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import UserError

MISSING = "—"  # what a cell shows when a run did not measure or record that value

# Figures in reading order, with their captions; any other PNG under figures/ follows, captioned with its name.
FIGURE_CAPTIONS = {"training_curves": "training curves: NT-Xent loss, learning rate and kNN monitor",
                   "tsne": "t-SNE of the encoder's features (colour: true class)",
                   "retrieval": "nearest training images of a few test images",
                   "confusion_matrix": "linear probe: confusion matrix on the test set",
                   "label_fractions": "fine-tuning vs supervised training with a fraction of the labels"}

_N = r"-([2-9]|[1-9]\d+)"  # the version suffix -N of a file stem: N >= 2, written without leading zeros


def _versions(path: Path) -> list[tuple[int, Path]]:
    """(N, file) for the existing files among path (N = 1), <stem>-2<suffix>, <stem>-3<suffix>, ..., by N."""
    pattern = re.compile(re.escape(path.stem) + _N + re.escape(path.suffix))
    found = [(1, path)] if path.exists() else []
    files = path.parent.iterdir() if path.parent.is_dir() else []
    return sorted(found + [(int(m[1]), p) for p in files if (m := pattern.fullmatch(p.name))])


def latest_path(path: Path) -> Path | None:
    """The newest existing version of path: highest N of <stem>-N<suffix>, path itself being N = 1; None if none."""
    versions = _versions(Path(path))
    return versions[-1][1] if versions else None


def fresh_path(path: Path) -> Path:
    """Where a new version of path goes: path itself if no version exists, else <stem>-N<suffix> after the newest."""
    path, versions = Path(path), _versions(Path(path))
    return path.with_name(f"{path.stem}-{versions[-1][0] + 1}{path.suffix}") if versions else path


def _read_json(path: Path | None) -> dict[str, Any]:
    """A JSON object from a file; {} when there is none or it is unreadable (the report shows '—' instead)."""
    try:
        data = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def _get(data: Any, *keys: str) -> Any:  # data[k1][k2]..., None when a level is missing
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, unit: str = "") -> str:
    """A table cell: '—' when not recorded; unit '%' for an accuracy, 's' for a wall time (with min or h)."""
    if value is None or value == "" or (unit and not _is_number(value)):
        return MISSING
    if unit == "s":
        return (f"{value:.1f} s" if value < 120 else f"{value:.0f} s ({value / 60:.1f} min)" if value < 7200
                else f"{value:.0f} s ({value / 3600:.2f} h)")
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:g}" if isinstance(value, float) else f"{value:,}" if _is_number(value) else str(value)


def _fraction_order(fraction: str) -> tuple[float, str]:  # '0.5' < '1' < '10' < any other text
    return float(fraction) if re.fullmatch(r"\d*\.?\d+(e-?\d+)?", fraction) else math.inf, fraction


def _describe(entry: Any) -> str:
    """An evaluation's protocol, split and epochs as one phrase ('' when none was recorded)."""
    protocol, split, epochs = (_get(entry, key) for key in ("protocol", "split", "epochs"))
    parts = [protocol, split and f"{split} split", epochs is not None and f"{epochs} epochs"]
    return ", ".join(str(part) for part in parts if part)


class _Run:
    """What a run folder recorded (any file may be missing), as table cells, protocol lines and figures."""

    def __init__(self, path: Path) -> None:
        self.path, self.config, self.summary = path, _read_json(path / "config.json"), _read_json(path / "summary.json")
        self.eval_files = [p for _, p in _versions(path / "eval.json")]
        self.eval = _read_json(self.eval_files[-1] if self.eval_files else None)

    def recipe(self) -> dict[str, str]:
        """Recipe (config.json), hardware and wall times (summary.json; eval.json for the evaluation's)."""
        c, s, e = self.config, self.summary, self.eval
        name, lr, rule, batch = (c.get(k) for k in ("optimizer", "lr", "lr_scaling", "batch_size"))
        optimiser = _fmt(name) + (f", lr {lr:g}" if _is_number(lr) else "")  # then the lr its scaling rule gives
        if _is_number(lr) and _is_number(batch) and rule in ("linear", "sqrt"):
            optimiser += (f" × batch/256 = {lr * batch / 256:g}" if rule == "linear"
                          else f" × √batch = {lr * math.sqrt(batch):.4g}")
        backbone, width = c.get("backbone"), c.get("width")
        backbone = f"{backbone} (width {width})" if backbone is not None and width is not None else backbone
        cells = {"preset": c.get("preset"), "dataset": c.get("dataset"), "backbone": backbone,
                 "pretraining epochs": c.get("epochs"), "batch size": batch, "optimiser": optimiser,
                 "weight decay": c.get("weight_decay"), "temperature τ": c.get("temperature"),
                 "pretraining images": s.get("pretrain_images"), "seed": c.get("seed"),
                 "hardware (pretraining)": s.get("device"), "hardware (eval.json)": e.get("device")}
        times = {"pretraining": s.get("pretrain_seconds"), "total run": s.get("total_seconds"),
                 "evaluation (eval.json)": e.get("seconds")}
        return {k: _fmt(v) for k, v in cells.items()} | {f"wall time: {k}": _fmt(v, "s") for k, v in times.items()}

    def accuracies(self, fractions: list[str]) -> dict[str, str]:
        """Top-1 accuracies from the latest eval.json, with a row per label fraction in `fractions`."""
        keys = {"kNN": ("knn", "top1"), "linear probe": ("linear", "top1"),
                "kNN, same network at random init": ("knn", "random_init_top1"),
                "linear probe, same network at random init": ("linear", "random_init_top1")}
        for f in fractions:
            keys |= {f"fine-tuned, {f} % of labels": ("finetune", f, "top1"),
                     f"supervised from scratch, {f} % of labels": ("supervised", f, "top1")}
        return {label: _fmt(_get(self.eval, *path), "%") for label, path in keys.items()}

    def protocols(self, name: str, fractions: list[str]) -> str:
        """A list item naming the eval file read (and earlier ones), then one nested item per protocol."""
        files = [p.name for p in self.eval_files]
        head = f"- `{name}`: " + (files[-1] if files else "no eval.json")
        head += f" (earlier evaluations: {', '.join(files[:-1])})" if len(files) > 1 else ""
        groups: dict[tuple[str, str], list[str]] = {("kNN", _describe(self.eval.get("knn"))): [],
                                                    ("linear probe", _describe(self.eval.get("linear"))): []}
        for kind, label in (("finetune", "fine-tuning"), ("supervised", "supervised")):
            for fraction in fractions:  # equal protocols share one item
                groups.setdefault((label, _describe(_get(self.eval, kind, fraction))), []).append(f"{fraction} %")
        items = [label + (f" ({', '.join(fs)})" if fs else "") + f": {text}" for (label, text), fs in groups.items()
                 if text]
        head += "" if items or not files else ", protocol not recorded"
        return "\n".join([head, *[f"  - {item}" for item in items]])

    def figures(self) -> list[tuple[str, Path]]:
        """(caption, latest version) of each PNG under figures/: the known ones in reading order, then the rest."""
        stems = {re.sub(_N + "$", "", p.stem) for p in (self.path / "figures").glob("*.png")}
        order = [s for s in FIGURE_CAPTIONS if s in stems] + sorted(stems - FIGURE_CAPTIONS.keys())
        return [(FIGURE_CAPTIONS.get(s, s.replace("_", " ")), latest_path(self.path / "figures" / f"{s}.png"))
                for s in order]


def _table(corner: str, names: list[str], columns: list[dict[str, str]]) -> str:
    """A Markdown table: one row per key of the columns' dicts, one column per run."""
    rows = [[corner, *names], ["---"] * (1 + len(names))]
    rows += [[label, *[column[label] for column in columns]] for label in columns[0]]
    # A pipe inside a cell would end it; a newline would end the row.
    return "\n".join("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows)


def _relative(target: Path, report_dir: Path, link: bool = False) -> str:
    """target relative to the report, with '/'; as a link target, <...> keeps spaces from breaking it."""
    rel = Path(os.path.relpath(os.path.abspath(target), os.path.abspath(report_dir))).as_posix()
    return f"<{rel}>" if link and any(c in rel for c in " ()<>") else rel


def render_report(run_dirs: list[str | Path], report_dir: str | Path) -> str:
    """The report's Markdown text, with links relative to `report_dir`."""
    runs, report_dir = [_Run(Path(d)) for d in run_dirs], Path(report_dir)
    names = [r.path.name or str(r.path) for r in runs]
    if len(set(names)) < len(names):  # two folders share a name: use their paths
        names = [_relative(r.path, report_dir) for r in runs]
    # Label fractions: the union over runs, so a fraction one run measured gets a row ('—' for the others).
    fractions = sorted({f for r in runs for kind in ("finetune", "supervised") if isinstance(r.eval.get(kind), dict)
                        for f in r.eval[kind]}, key=_fraction_order)
    folders = ", ".join(f"[`{n}`]({_relative(r.path, report_dir, link=True)})" for n, r in zip(names, runs))
    parts = [f"# SimCLR run report: {names[0]}" if len(runs) == 1 else f"# SimCLR runs compared: {', '.join(names)}",
             f"Run folders: {folders}. {MISSING} means the run did not measure or record that value.",
             "## Recipe, hardware and wall time", _table("", names, [r.recipe() for r in runs]),
             "## Accuracy", _table("top-1 accuracy", names, [r.accuracies(fractions) for r in runs]),
             "Top-1 accuracy in percent, from each run's latest evaluation file. Protocols, as each run recorded them:"
             "\n\n" + "\n".join(r.protocols(n, fractions) for r, n in zip(runs, names)), "## Figures"]
    for run, name in zip(runs, names):
        parts += [f"### {name}", *([f"![{name}: {caption}]({_relative(png, report_dir, link=True)})"
                                    for caption, png in run.figures()] or ["No figures saved."])]
    return "\n\n".join(parts) + "\n"


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write the report of one or several runs (default: a fresh report.md in the first run folder); its path."""
    if not run_dirs:
        raise UserError("write_report needs at least one run folder")
    if missing := [str(d) for d in run_dirs if not Path(d).is_dir()]:
        raise UserError(f"run folder(s) {', '.join(missing)} do not exist")
    out = Path(run_dirs[0]) if out is None else Path(out)
    out = fresh_path(out / "report.md") if out.is_dir() else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(run_dirs, out.parent), encoding="utf-8")
    return out
