"""Command line: `python run.py [flags]` / `simclr train [flags]` runs the main job; `evaluate`, `tsne` and
`report` work on finished runs (`python run.py evaluate RUN_DIR` works too)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from .config import FIELDS, PRESETS, TYPES, load_config, make_config, read_config_file, validate
from .errors import Interrupted, UserError

COMMANDS = ("train", "evaluate", "eval", "tsne", "report", "bench")
# What may differ when resuming: where and how fast it runs, not what it computes (time_budget only acts at the start).
RESUMABLE = {"device", "log_every", "knn_every", "eval_batch_size", "probe_epochs", "workers", "data_placement",
             "time_budget", "compile", "keep"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Unset:
    """What `--flag none` parses to: set the key to None (an absent flag, also None, keeps the preset's value)."""

    def __repr__(self) -> str:
        return "none"


UNSET = _Unset()


def _optional(kind: type):
    def parse(text: str):
        return UNSET if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Config field; defaults are None so only the flags a user typed override the preset."""
    for name, f in FIELDS.items():
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        kind = TYPES[name]
        args = getattr(kind, "__args__", None)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
            continue
        if args:  # Optional[X]
            base = next(a for a in args if a is not type(None))
            parser.add_argument(flag, type=_optional(base), default=None, metavar=base.__name__.upper(),
                                help=f.metadata["help"] + " ('none' to unset)")
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=f.metadata["help"])


def build_parser() -> argparse.ArgumentParser:
    """The `simclr` parser with its subcommands."""
    parser = OneLineParser(prog="simclr", description="SimCLR on CIFAR-10: pretrain, evaluate, summarise.")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    presets = "; ".join(PRESETS)
    train = sub.add_parser("train", help="pretrain, evaluate (kNN + linear probe) and summarise (the default)",
                           description=f"Pretrain -> evaluate -> figures -> summary. Presets: {presets}. "
                           "Other commands: evaluate, tsne, report (see `simclr evaluate --help`).")
    train.add_argument("--preset", default="quick", help="named recipe; every value can be overridden by a flag")
    train.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--config", default=None, metavar="JSON",
                       help="start from a config.json (e.g. another run's); its values replace the preset's, "
                       "flags override both")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_flags(train)
    ev = sub.add_parser("evaluate", aliases=["eval"], help="evaluate a trained model: kNN, linear probe, "
                        "label-fraction fine-tuning vs supervised; writes eval.json, figures and report.md",
                        description="Evaluate a run folder, a checkpoint file or an http(s)/file URL of one "
                        "(downloaded once into runs/). Accuracies are on the full test set, last epoch.")
    _source_args(ev)
    ev.add_argument("--label-fractions", default="1,10", metavar="PCTS",
                    help="percent of train labels for fine-tuning, comma-separated ('' for none; default 1,10)")
    ev.add_argument("--no-supervised", action="store_true", help="skip the supervised-from-scratch baseline")
    for name in ("probe_epochs", "finetune_epochs", "finetune_lr", "finetune_batch_size", "eval_batch_size"):
        ev.add_argument("--" + name.replace("_", "-"), type=TYPES[name], default=None,
                        help=FIELDS[name].metadata["help"])
    ts = sub.add_parser("tsne", help="t-SNE of test representations (trained vs random init) and a retrieval figure")
    _source_args(ts)
    ts.add_argument("--tsne-points", type=int, default=None, help=FIELDS["tsne_points"].metadata["help"])
    rp = sub.add_parser("report", help="a Markdown report comparing one or more runs")
    rp.add_argument("run_dirs", nargs="+", help="run folders")
    rp.add_argument("--out", default=None, help="report file (default: report.md in the first run folder)")
    bn = sub.add_parser("bench", help="speed of the fast path vs the per-image path on this device (table + JSON)",
                        description="Augmentation images/s, loss forward+backward time and training-step views/s, "
                        "each beside the per-image / mask-and-gather formulation of the popular repos, in one "
                        "process on one device.")
    bn.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    bn.add_argument("--batch-sizes", default="256,512", metavar="B,B", help="training-step batch sizes")
    bn.add_argument("--width", type=int, default=None, help="ResNet-18 width (default: 64 on a GPU, 8 on a CPU)")
    bn.add_argument("--steps", type=int, default=None, help="timed training steps (default: 30 on a GPU, 4 on a CPU)")
    bn.add_argument("--workers", type=int, default=None, help="DataLoader workers of the per-image path "
                    "(default: CPU cores, at most 16)")
    bn.add_argument("--compile", action="store_true", help="torch.compile the fast path (model, augmentation, loss)")
    bn.add_argument("--data-root", default="data", help="CIFAR-10 location (random images when it is missing)")
    bn.add_argument("--out", default=None, help="JSON file (default: runs/bench-<timestamp>.json)")
    return parser


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a run folder, a checkpoint .pt file, or an http(s)/file URL of one")
    parser.add_argument("--sha256", default=None, help="expected SHA-256 of the checkpoint file")
    parser.add_argument("--data-root", default=None, help="where the data set is (default: the run's)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the run's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the user typed a flag for (`--flag none` gives UNSET)."""
    return {name: getattr(args, name) for name in FIELDS if name != "preset" and getattr(args, name, None) is not None}


def _apply(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`config` with the typed flags on top (UNSET becoming None), validated."""
    return validate({**config, **{k: None if v is UNSET else v for k, v in overrides.items()}})


def cmd_train(args: argparse.Namespace) -> None:
    """The main job."""
    from .pipeline import run

    overrides = _overrides(args)
    typed = {k: v for k, v in overrides.items() if v is not UNSET}
    unset = {k: v for k, v in overrides.items() if v is UNSET}
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR naming the run to continue")
        if not (Path(args.out) / "config.json").is_file():
            raise UserError(f"--resume: {args.out} holds no config.json; is it a run folder?")
        config = load_config(Path(args.out) / "config.json")
        changed = [k for k, v in overrides.items() if k not in RESUMABLE and config[k] != (None if v is UNSET else v)]
        if changed:
            raise UserError(f"cannot change {changed[0]} when resuming; start a new run with another --out")
        config = _apply(config, overrides)
    elif args.config is not None:
        # The file's values on top of its preset (or --preset), then the flags: a partial file is fine.
        values = read_config_file(args.config)
        config = _apply(make_config(values.pop("preset", args.preset), **{**values, **typed}), unset)
    else:
        config = _apply(make_config(args.preset, **typed), unset)
    run(config, out=args.out, resume=args.resume, progress=not args.no_progress)


def _runtime_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .eval_job import RUNTIME_KEYS

    return {k: getattr(args, k) for k in RUNTIME_KEYS if getattr(args, k, None) is not None}


def _fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--label-fractions takes percentages like 1,10; got {text!r}") from None
    if any(not 0 < v <= 100 for v in values):
        raise UserError(f"label fractions are percentages in (0, 100]; got {text!r}")
    return values


def cmd_evaluate(args: argparse.Namespace) -> None:
    """kNN, linear probe, fine-tuning vs supervised per label fraction; eval.json, figures, report."""
    from .eval_job import evaluate_job

    evaluate_job(args.source, _fractions(args.label_fractions), supervised=not args.no_supervised,
                 sha256=args.sha256, overrides=_runtime_overrides(args), progress=not args.no_progress)


def cmd_tsne(args: argparse.Namespace) -> None:
    """t-SNE and retrieval figures."""
    from .eval_job import tsne_job

    tsne_job(args.source, args.sha256, _runtime_overrides(args))


def cmd_report(args: argparse.Namespace) -> None:
    """Markdown report of one or several runs."""
    from .report import write_report

    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            raise UserError(f"{run_dir} is not a run folder")
    print(f"wrote {write_report(args.run_dirs, args.out)}")


def cmd_bench(args: argparse.Namespace) -> None:
    """Benchmarks: table on stdout, JSON file."""
    from datetime import datetime

    from .bench import format_bench, run_bench

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes takes integers like 256,512; got {args.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 2:
        raise UserError(f"--batch-sizes must list batch sizes of at least 2; got {args.batch_sizes!r}")
    for name in ("width", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be at least 0")
    out = Path(args.out) if args.out else Path("runs") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out.exists():
        raise UserError(f"{out} already exists: choose another --out")
    result = run_bench(args.device, batch_sizes, args.width, args.steps, args.workers, args.compile,
                       args.data_root, out)
    print(format_bench(result))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `simclr` and `python run.py`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Warnings (e.g. skipped images) as one plain line, without the source line Python adds by default.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    if not argv or argv[0] not in COMMANDS:
        argv = ["train", *argv]  # `python run.py --epochs 3` means `simclr train --epochs 3`; --help shows its flags
    args = build_parser().parse_args(argv)
    try:
        handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "eval": cmd_evaluate, "tsne": cmd_tsne,
                    "report": cmd_report, "bench": cmd_bench}
        handlers[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept: continue with --resume --out RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
