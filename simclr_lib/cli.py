"""Command line: `python run.py [flags]` / `simclr train [flags]` runs the main job; `simclr eval RUN` re-evaluates."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import FIELDS, PRESETS, TYPES, load_config, make_config, validate
from .errors import UserError

COMMANDS = ("train", "eval")
RESUMABLE = {"device", "log_every", "knn_every", "eval_batch_size", "probe_epochs"}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
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
                           "Other commands: `simclr eval RUN_DIR` re-evaluates a finished run.")
    train.add_argument("--preset", default="quick", help="named recipe; every value can be overridden by a flag")
    train.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_flags(train)
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint: kNN + linear probe, trained vs random init")
    ev.add_argument("run_dir", help="a run folder holding checkpoint.pt and config.json")
    ev.add_argument("--data-root", default=None, help="where the data set is (default: the run's)")
    ev.add_argument("--device", default=None, help="auto, cpu, cuda, ... (default: the run's)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in FIELDS if name != "preset" and getattr(args, name, None) is not None}


def cmd_train(args: argparse.Namespace) -> None:
    """The main job."""
    from .pipeline import run

    overrides = _overrides(args)
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR naming the run to continue")
        config = load_config(Path(args.out) / "config.json") if (Path(args.out) / "config.json").is_file() \
            else None
        if config is None:
            raise UserError(f"--resume: {args.out} holds no config.json; is it a run folder?")
        changed = [k for k, v in overrides.items() if k not in RESUMABLE and config[k] != v]
        if changed:
            raise UserError(f"cannot change {changed[0]} when resuming; start a new run with another --out")
        config = validate({**config, **overrides})
    else:
        config = make_config(args.preset, **overrides)
    run(config, out=args.out, resume=args.resume, progress=not args.no_progress)


def cmd_eval(args: argparse.Namespace) -> None:
    """Re-evaluate a finished run and write eval.json."""
    from .data import load_splits
    from .models import SimCLR, build_model
    from .pipeline import evaluate_model
    from .train import resolve_device

    run_dir = Path(args.run_dir)
    config = load_config(run_dir / "config.json")
    if args.data_root:
        config["data_root"] = args.data_root
    if args.device:
        config["device"] = args.device
    device = resolve_device(config["device"])
    model = SimCLR.from_checkpoint(run_dir, map_location=device).to(device)
    splits = load_splits(config["dataset"], config["data_root"], config["image_size"], config["download"])
    result = {"trained": evaluate_model(model, splits, config, device, not args.no_progress),
              "random_init": evaluate_model(build_model(config, splits.mean, splits.std).to(device), splits,
                                            config, device, not args.no_progress)}
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `simclr` and `python run.py`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        argv = ["train", *argv]  # `python run.py --epochs 3` means `simclr train --epochs 3`; --help shows its flags
    args = build_parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval}[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint (end of the last full epoch) is kept: continue with --resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
