"""Command line: `python run.py [flags]` / `simclr train [flags]` runs the main job; `evaluate`, `tsne`, `embed`,
`export` and `report` work on finished runs (`python run.py evaluate RUN_DIR` works too)."""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import FIELDS, PRESETS, RESUMABLE, TYPES, load_config, make_config, read_config_file
from .errors import Interrupted, UserError

SOURCE_HELP = ("a run folder; a .pt file: a checkpoint, an exported encoder or a torchvision ResNet state_dict; or an "
               "http(s)/file URL of one")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line and exit code 2, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _at_least(low: int):
    def parse(text: str) -> int:
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return int(text)
    parse.__name__ = "int"  # what argparse names in "invalid int value"
    return parse


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per Config field (or per field in `names`). Only flags a user typed appear in the parsed
    namespace (default SUPPRESS), so an absent flag keeps the preset's value and `--flag none` sets None."""
    for name in names or [n for n in FIELDS if n != "preset"]:
        flag, kind = "--" + name.replace("_", "-"), TYPES[name]
        help = FIELDS[name].metadata["help"].replace("%", "%%")  # argparse formats help texts with %
        args = getattr(kind, "__args__", None)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            base = next(a for a in args if a is not type(None)) if args else kind
            parser.add_argument(flag, type=_optional(base) if args else kind, default=argparse.SUPPRESS,
                                metavar=base.__name__.upper(), help=help + (" ('none' to unset)" if args else ""))


def build_parser() -> argparse.ArgumentParser:
    """The `simclr` parser with its subcommands."""
    parser = OneLineParser(prog="simclr", description="SimCLR on CIFAR-10: pretrain, evaluate, summarise.")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser)
    train = sub.add_parser("train", help="pretrain, evaluate (kNN + linear probe) and summarise (the default)",
                           description=f"Pretrain -> evaluate -> figures -> summary. Presets: {'; '.join(PRESETS)}. "
                           "Other commands: evaluate, tsne, embed, export, report, bench (see `simclr embed --help`).")
    train.add_argument("--preset", default="quick", help="named recipe; every value can be overridden by a flag")
    train.add_argument("--out", default=None, help="run folder (default: runs/<preset>-<timestamp>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--config", metavar="JSON", help="start from a config.json (e.g. another run's); its values "
                       "replace the preset's, flags override both")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_flags(train)
    ev = sub.add_parser("evaluate", aliases=["eval"], help="evaluate a trained model: kNN, linear probe, "
                        "label-fraction fine-tuning vs supervised; writes eval.json, figures and report.md",
                        description="Evaluate a run folder, a checkpoint file or an http(s)/file URL of one "
                        "(downloaded once into runs/). Accuracies are on the full test set, last epoch.")
    _source_args(ev)
    add_config_flags(ev, ("dataset", "eval_data", "image_size"))
    ev.add_argument("--label-fractions", default="1,10", metavar="PCTS",
                    help="percent of train labels for fine-tuning, comma-separated ('' for none; default 1,10)")
    ev.add_argument("--no-supervised", action="store_true", help="skip the supervised-from-scratch baseline")
    add_config_flags(ev, ("probe_epochs", "finetune_epochs", "finetune_min_steps", "finetune_lr", "finetune_batch_size",
                          "eval_batch_size"))
    ts = sub.add_parser("tsne", help="t-SNE of test representations (trained vs random init) and a retrieval figure")
    _source_args(ts)
    add_config_flags(ts, ("tsne_points", "dataset", "eval_data", "image_size"))
    em = sub.add_parser("embed", help="representations h of a folder of images or a data set split, as a .npy file",
                        description="Write the representation h (float32, N x D) of every image to OUT, with the "
                        "file names (OUT.files.txt) or the data set's labels (OUT.labels.npy) beside it.")
    _source_args(em)
    em.add_argument("images", help="a folder or archive of images (any layout and size), or cifar10/cifar100/stl10")
    em.add_argument("--out", required=True, help="the .npy file to write (never overwritten)")
    em.add_argument("--split", choices=("train", "test"), default="test", help="the split of a named data set")
    add_config_flags(em, ("image_size", "eval_batch_size", "skip_bad_images"))
    ex = sub.add_parser("export", help="the encoder as a torchvision ResNet state_dict (with its normalisation)")
    ex.add_argument("source", help=SOURCE_HELP)
    ex.add_argument("--out", required=True, help="the .pt file to write (never overwritten)")
    ex.add_argument("--sha256", default=None, help="expected SHA-256 of the checkpoint file")
    rp = sub.add_parser("report", help="a Markdown report comparing one or more runs")
    rp.add_argument("run_dirs", nargs="+", help="run folders")
    rp.add_argument("--out", default=None, help="report file (default: report.md in the first run folder)")
    bn = sub.add_parser("bench", help="speed of the fast path vs the per-image path on this device (table + JSON)",
                        description="Augmentation images/s, loss forward+backward time and training-step views/s, "
                        "each beside the per-image / mask-and-gather formulation of the popular repos, in one "
                        "process on one device.")
    bn.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    bn.add_argument("--batch-sizes", default="256,512", metavar="B,B", help="training-step batch sizes")
    bn.add_argument("--preset", default="quick", choices=list(PRESETS),
                    help="time the training step of a run of this preset (head, augmentation, optimiser, temperature)")
    bn.add_argument("--backbone", default=None, choices=("resnet18", "resnet50"),
                    help="the encoder timed (default: the preset's)")
    bn.add_argument("--width", type=_at_least(1), help="ResNet width (default: 64 on a GPU, 8 on a CPU)")
    bn.add_argument("--steps", type=_at_least(1), help="timed training steps (default: 30 on a GPU, 4 on a CPU)")
    bn.add_argument("--workers", type=_at_least(0),
                    help="DataLoader workers of the per-image path (default: CPU cores, at most 16)")
    bn.add_argument("--compile", action="store_true",
                    help="also time the fast path compiled by torch.compile (model, augmentation, loss) and its "
                    "compile time")
    bn.add_argument("--data-root", default="data", help="CIFAR-10 location (random images when it is missing)")
    bn.add_argument("--out", default=None, help="JSON file (default: runs/bench-<timestamp>.json)")
    return parser


def _source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help=SOURCE_HELP)
    parser.add_argument("--sha256", default=None, help="expected SHA-256 of the checkpoint file")
    add_config_flags(parser, ("data_root", "device", "download"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the user typed a flag for (None where the flag said 'none')."""
    return {name: value for name, value in vars(args).items() if name in FIELDS and name != "preset"}


def cmd_train(args: argparse.Namespace) -> None:
    """The main job."""
    from .jobs import run
    overrides = _overrides(args)
    if args.resume:
        if args.out is None:
            raise UserError("--resume needs --out RUN_DIR naming the run to continue")
        if not (Path(args.out) / "config.json").is_file():
            raise UserError(f"--resume: {args.out} holds no config.json; is it a run folder?")
        config = load_config(Path(args.out) / "config.json")
        if changed := [k for k, v in overrides.items() if k not in RESUMABLE and getattr(config, k) != v]:
            raise UserError(f"cannot change {changed[0]} when resuming; start a new run with another --out")
        config = config.replace(**overrides)
    else:
        # A --config file's values on top of its preset (or --preset), then the flags: a partial file is fine.
        values = read_config_file(args.config) if args.config is not None else {}
        preset = values.pop("preset", args.preset)
        merged = {**values, **overrides}
        config = make_config(preset, **merged).replace(**{k: None for k, v in merged.items() if v is None})
    run(config, out=args.out, resume=args.resume, progress=not args.no_progress)


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
    from .jobs import evaluate_job
    evaluate_job(args.source, _fractions(args.label_fractions), supervised=not args.no_supervised,
                 sha256=args.sha256, overrides=_overrides(args), progress=not args.no_progress)


def cmd_tsne(args: argparse.Namespace) -> None:
    """t-SNE and retrieval figures."""
    from .jobs import tsne_job
    tsne_job(args.source, args.sha256, _overrides(args))


def cmd_embed(args: argparse.Namespace) -> None:
    """Representations of a folder or data set, to a .npy file."""
    from .jobs import embed_job
    embed_job(args.source, args.images, args.out, args.split, args.sha256, _overrides(args), not args.no_progress)


def cmd_export(args: argparse.Namespace) -> None:
    """The encoder as a torchvision state_dict file."""
    from .jobs import export_job
    export_job(args.source, args.out, args.sha256)


def cmd_report(args: argparse.Namespace) -> None:
    """Markdown report of one or several runs."""
    from .report import write_report
    print(f"wrote {write_report(args.run_dirs, args.out)}")


def cmd_bench(args: argparse.Namespace) -> None:
    """Benchmarks: table on stdout, JSON file."""
    from .bench import format_bench, run_bench
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes takes integers like 256,512; got {args.batch_sizes!r}") from None
    if not batch_sizes or min(batch_sizes) < 2:
        raise UserError(f"--batch-sizes must list batch sizes of at least 2; got {args.batch_sizes!r}")
    out = Path(args.out) if args.out else Path("runs") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out.exists():
        raise UserError(f"{out} already exists: choose another --out")
    result = run_bench(args.device, batch_sizes, args.width, args.steps, args.workers, args.compile,
                       args.data_root, out, backbone=args.backbone, preset=args.preset)
    print(format_bench(result))
    print(f"wrote {out}")


HANDLERS = {"train": cmd_train, "evaluate": cmd_evaluate, "eval": cmd_evaluate, "tsne": cmd_tsne, "embed": cmd_embed,
            "export": cmd_export, "report": cmd_report, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `simclr` and `python run.py`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Warnings (e.g. skipped images) as one plain line, without the source line Python adds by default.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    if not argv or argv[0] not in HANDLERS:
        argv = ["train", *argv]  # `python run.py --epochs 3` means `simclr train --epochs 3`; --help shows its flags
    args = build_parser().parse_args(argv)
    try:
        HANDLERS[args.command](args)
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
