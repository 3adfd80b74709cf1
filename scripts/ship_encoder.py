"""Make the shipped encoder's folder (`runs/pretrained-cifar10-r18/`, see SPEC) from a finished run: the weights in
fp16 without the optimiser, the run's result files and figures, and the weights' sha256.

    python scripts/ship_encoder.py RUN_DIR                    # -> runs/pretrained-cifar10-r18/
    python scripts/ship_encoder.py RUN_DIR --out OTHER_DIR    # never overwrites: OTHER_DIR must not exist

`SimCLR.from_checkpoint(folder)` and `run.py evaluate|tsne|embed|export folder` load the result, and check the
weights against `checkpoint.pt.sha256` first.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from simclr_lib.checkpoints import CHECKPOINT, load_checkpoint, sha256_of  # noqa: E402
from simclr_lib.errors import UserError  # noqa: E402

RESULTS = ("config.json", "summary.json", "eval.json")  # the contract (SPEC); the rest is copied when there
# run.ipynb draws the curves and the confusion matrix from metrics.jsonl and eval.json, and shows these two images
EXTRAS = ("metrics.jsonl", "report.md", "figures/tsne.png", "figures/retrieval.png")
MAX_BYTES = 25_000_000  # the shipped folder's limit (SPEC: at most 25 MB in all)


def slim_checkpoint(state: dict) -> dict:
    """A run's checkpoint without optimiser, schedule and random state, its floating-point tensors in fp16."""
    weights = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    kept = ("arch", "config", "epoch", "step", "history", "pretrain_seconds")
    return {**{k: state[k] for k in kept if k in state}, "model": weights}


def folder_bytes(folder: Path) -> int:
    """The size of every file under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ship(run_dir: str | Path, out: str | Path, max_bytes: int = MAX_BYTES, eval_file: str | Path | None = None) -> Path:
    """Write the shipped folder `out` from the finished run `run_dir`; refuse to overwrite or to exceed max_bytes.
    `eval_file` (e.g. the eval-2.json of `run.py evaluate --label-fractions 1,10`) is shipped as eval.json."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: remove it first or choose another --out")
    missing = [name for name in (CHECKPOINT, *RESULTS) if not (run_dir / name).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run: it has no {', '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # a failure leaves no half-made folder
        staged = Path(tmp) / out.name
        staged.mkdir()
        torch.save(slim_checkpoint(load_checkpoint(run_dir / CHECKPOINT)), staged / CHECKPOINT)
        (staged / f"{CHECKPOINT}.sha256").write_text(f"{sha256_of(staged / CHECKPOINT)}  {CHECKPOINT}\n")
        for name in (*RESULTS, *EXTRAS):
            if (run_dir / name).is_file():
                (staged / name).parent.mkdir(exist_ok=True)
                shutil.copy2(run_dir / name, staged / name)
        if eval_file is not None:
            shutil.copy2(eval_file, staged / "eval.json")
        if (size := folder_bytes(staged)) > max_bytes:
            raise UserError(f"the folder would hold {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.0f} MB limit")
        staged.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished run folder (checkpoint.pt, config.json, summary.json, eval.json)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "pretrained-cifar10-r18"), help="the folder to make")
    parser.add_argument("--max-mb", type=float, default=MAX_BYTES / 1e6, help="refuse a larger folder (MB)")
    parser.add_argument("--eval", metavar="FILE", help="ship FILE as eval.json (e.g. the run's eval-2.json from "
                        "`run.py evaluate --label-fractions 1,10`, which adds fine-tuning results)")
    parser.add_argument("--weights-only", metavar="FILE", help="only write the fp16 weights of RUN_DIR's checkpoint "
                        "to FILE (e.g. of a run that did not finish)")
    args = parser.parse_args(argv)
    try:
        if args.weights_only:
            torch.save(slim_checkpoint(load_checkpoint(Path(args.run_dir) / CHECKPOINT)), args.weights_only)
            print(f"wrote {args.weights_only}")
            return 0
        out = ship(args.run_dir, args.out, int(args.max_mb * 1e6), args.eval)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({folder_bytes(out) / 1e6:.1f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
