"""A Markdown report of one or several run folders: recipe, hardware, wall times, accuracies and figures side by side.

`python -m simclr_lib.report RUN [RUN ...] [--out PATH]` writes it from the command line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import UserError

MISSING = "—"  # what a cell shows when a run did not measure or record that value

# Figures the pipeline and the notebooks save, in reading order, with the caption each gets in the report.
# Any other PNG under figures/ is shown after these, captioned with its file name.
FIGURE_CAPTIONS = {
    "training_curves": "training curves: NT-Xent loss, learning rate and kNN monitor",
    "tsne": "t-SNE of the encoder's features (colour: true class)",
    "retrieval": "nearest training images of a few test images",
    "confusion_matrix": "linear probe: confusion matrix on the test set",
    "label_fractions": "fine-tuning vs supervised training with a fraction of the labels",
}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when the file is missing or unreadable (the report shows '—' instead)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _get(data: Any, *keys: str) -> Any:
    """data[k1][k2]... or None when any level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    """An accuracy in percent with 2 decimals, or '—'."""
    return f"{value:.2f} %" if _is_number(value) else MISSING


def _seconds(value: Any) -> str:
    """A wall time in seconds, with minutes or hours alongside once those read more easily."""
    if not _is_number(value):
        return MISSING
    if value >= 7200:
        return f"{value:.0f} s ({value / 3600:.2f} h)"
    if value >= 120:
        return f"{value:.0f} s ({value / 60:.1f} min)"
    return f"{value:.1f} s"


def _text(value: Any) -> str:
    """Any recorded value as a table cell; '—' when it was not recorded."""
    if value is None or value == "":
        return MISSING
    if _is_number(value) and not isinstance(value, int):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _cell(text: str) -> str:
    # A pipe inside a cell would end it; a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class _Run:
    """Everything a run folder recorded; any file may be missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config = _read_json(path / "config.json")
        self.summary = _read_json(path / "summary.json")
        self.eval = _read_json(path / "eval.json")

    def setting(self, key: str) -> Any:
        """A recipe value: summary.json first (what the run reports), then config.json."""
        value = self.summary.get(key)
        return self.config.get(key) if value is None else value

    def accuracy(self, kind: str, key: str) -> Any:
        """kNN/linear top-1 (trained or random init): eval.json's when it has one, else summary.json's."""
        value = _get(self.eval, kind, key)
        if value is None:
            summary_key = f"{kind}_top1" if key == "top1" else f"random_init_{kind}_top1"
            value = self.summary.get(summary_key)
        return value

    def figures(self) -> list[Path]:
        """The PNGs under figures/, the known ones first in reading order, then the rest by name."""
        folder = self.path / "figures"
        pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
        order = list(FIGURE_CAPTIONS)
        return sorted(pngs, key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.name))


def _optimiser(run: _Run) -> str:
    """e.g. 'lars, lr 1 × batch/256 = 2' or 'adam, lr 0.0003': the base lr, its scaling rule and the lr it gives."""
    name, lr = run.setting("optimizer"), run.config.get("lr")
    if not _is_number(lr):
        return _text(name)
    rule, batch = run.config.get("lr_scaling"), run.setting("batch_size")
    if rule == "linear" and _is_number(batch):
        lr_text = f"lr {lr:g} × batch/256 = {lr * batch / 256:g}"
    elif rule == "sqrt" and _is_number(batch):
        lr_text = f"lr {lr:g} × √batch = {lr * math.sqrt(batch):.4g}"
    else:
        lr_text = f"lr {lr:g}"
    return f"{_text(name)}, {lr_text}"


def _backbone(run: _Run) -> str:
    backbone, width = run.setting("backbone"), run.setting("width")
    if backbone is None:
        return MISSING
    return f"{backbone} (width {width})" if width is not None else str(backbone)


def _pretrain_images(run: _Run) -> str:
    n = run.summary.get("pretrain_images")
    if _is_number(n):
        return f"{n:,}"
    subset = run.config.get("train_subset")
    return f"{subset:,} (subset)" if _is_number(subset) else MISSING


def _fraction_sort_key(fraction: str) -> tuple[float, str]:
    try:
        return float(fraction), fraction
    except ValueError:
        return math.inf, fraction


def _recipe_table(runs: list[_Run], names: list[str]) -> str:
    rows = [
        ["preset", *[_text(r.setting("preset")) for r in runs]],
        ["dataset", *[_text(r.setting("dataset")) for r in runs]],
        ["backbone", *[_backbone(r) for r in runs]],
        ["pretraining epochs", *[_text(r.setting("epochs")) for r in runs]],
        ["batch size", *[_text(r.setting("batch_size")) for r in runs]],
        ["optimiser", *[_optimiser(r) for r in runs]],
        ["weight decay", *[_text(r.config.get("weight_decay")) for r in runs]],
        ["temperature τ", *[_text(r.setting("temperature")) for r in runs]],
        ["pretraining images", *[_pretrain_images(r) for r in runs]],
        ["seed", *[_text(r.config.get("seed")) for r in runs]],
        ["hardware (pretraining)", *[_text(r.summary.get("device")) for r in runs]],
    ]
    # Only worth a row when some run was re-evaluated on other hardware.
    if any(r.eval.get("device") for r in runs):
        rows.append(["hardware (eval.json)", *[_text(r.eval.get("device")) for r in runs]])
    rows += [
        ["wall time: pretraining", *[_seconds(r.summary.get("pretrain_seconds")) for r in runs]],
        ["wall time: total run", *[_seconds(r.summary.get("total_seconds")) for r in runs]],
        ["wall time: evaluation (eval.json)", *[_seconds(r.eval.get("seconds")) for r in runs]],
    ]
    return _table(["", *names], rows)


def _accuracy_table(runs: list[_Run], names: list[str]) -> str:
    rows = [
        ["kNN", *[_pct(r.accuracy("knn", "top1")) for r in runs]],
        ["linear probe", *[_pct(r.accuracy("linear", "top1")) for r in runs]],
        ["kNN, same network at random init", *[_pct(r.accuracy("knn", "random_init_top1")) for r in runs]],
        ["linear probe, same network at random init",
         *[_pct(r.accuracy("linear", "random_init_top1")) for r in runs]],
    ]
    # The union over all runs, so a fraction only one run measured still gets its row (with '—' for the others).
    fractions = sorted({f for r in runs for kind in ("finetune", "supervised")
                        for f in (_get(r.eval, kind) or {})}, key=_fraction_sort_key)
    for fraction in fractions:
        rows.append([f"fine-tuned, {fraction} % of labels",
                     *[_pct(_get(r.eval, "finetune", fraction, "top1")) for r in runs]])
        rows.append([f"supervised from scratch, {fraction} % of labels",
                     *[_pct(_get(r.eval, "supervised", fraction, "top1")) for r in runs]])
    return _table(["top-1 accuracy", *names], rows)


def _protocol_line(run: _Run, name: str) -> str:
    """Per run: the protocol its summary recorded, then one item per evaluation (fractions with equal text merged)."""
    def describe(entry: Any) -> str:
        if not isinstance(entry, dict):
            return ""
        parts = [str(entry["protocol"])] if entry.get("protocol") else []
        if entry.get("split"):
            parts.append(f"{entry['split']} split")
        if entry.get("epochs") is not None:
            parts.append(f"{entry['epochs']} epochs")
        return ", ".join(parts)

    pieces = []
    for kind, label in (("knn", "kNN"), ("linear", "linear probe")):
        if describe(run.eval.get(kind)):
            pieces.append(f"{label}: {describe(run.eval[kind])}")
    for kind, label in (("finetune", "fine-tuning"), ("supervised", "supervised")):
        by_text: dict[str, list[str]] = {}
        for fraction in sorted(_get(run.eval, kind) or {}, key=_fraction_sort_key):
            text = describe(run.eval[kind][fraction])
            if text:
                by_text.setdefault(text, []).append(f"{fraction} %")
        pieces += [f"{label} ({', '.join(fractions)}): {text}" for text, fractions in by_text.items()]
    head = f"- `{name}`: " + str(run.summary.get("protocol") or ("" if pieces else "protocol not recorded"))
    # eval.json's protocols can be long sentences each: one nested item per evaluation keeps them readable.
    return "\n".join([head.rstrip(), *[f"  - {piece}" for piece in pieces]])


def _link(target: Path, report_dir: Path) -> str:
    """A Markdown link target relative to the report, with '/' separators; <...> keeps spaces from breaking it."""
    rel = Path(os.path.relpath(os.path.abspath(target), os.path.abspath(report_dir))).as_posix()
    return f"<{rel}>" if any(c in rel for c in " ()<>") else rel


def _run_names(runs: list[_Run], report_dir: Path) -> list[str]:
    """Column headers: folder names, or paths relative to the report where two folders share a name."""
    names = [r.path.name or str(r.path) for r in runs]
    if len(set(names)) < len(names):
        names = [Path(os.path.relpath(os.path.abspath(r.path), os.path.abspath(report_dir))).as_posix() for r in runs]
    return names


def render_report(run_dirs: list[str | Path], report_dir: str | Path) -> str:
    """The report's Markdown text, with figure links relative to `report_dir`."""
    runs = [_Run(Path(d)) for d in run_dirs]
    report_dir = Path(report_dir)
    names = _run_names(runs, report_dir)
    title = (f"# SimCLR run report: {names[0]}" if len(runs) == 1
             else f"# SimCLR runs compared: {', '.join(names)}")
    folders = ", ".join(f"[`{n}`]({_link(r.path, report_dir)})" for n, r in zip(names, runs))
    parts = [
        title,
        f"Run folders: {folders}. {MISSING} means the run did not measure or record that value.",
        "## Recipe, hardware and wall time",
        _recipe_table(runs, names),
        "## Accuracy",
        _accuracy_table(runs, names),
        "Top-1 accuracy in percent. Where a run has an eval.json, its numbers are used; otherwise summary.json's. "
        "Protocol, as each run recorded it:\n\n" + "\n".join(_protocol_line(r, n) for r, n in zip(runs, names)),
        "## Figures",
    ]
    for run, name in zip(runs, names):
        parts.append(f"### {name}")
        figures = run.figures()
        if not figures:
            parts.append("No figures saved.")
        for png in figures:
            caption = FIGURE_CAPTIONS.get(png.stem, png.stem.replace("_", " "))
            parts.append(f"![{name}: {caption}]({_link(png, report_dir)})")
    return "\n\n".join(parts) + "\n"


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """A Markdown report of one or several runs (default: <first run>/report.md) comparing them side by side."""
    if not run_dirs:
        raise UserError("write_report needs at least one run folder")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise UserError(f"run folder {d} does not exist")
    out = Path(run_dirs[0]) / "report.md" if out is None else Path(out)
    if out.is_dir():
        out = out / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(run_dirs, out.parent), encoding="utf-8")
    return out
