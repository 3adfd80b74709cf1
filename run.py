"""python run.py: pretrain SimCLR, evaluate it against the same network at random init, and summarise.

Runs the `quick` preset by default (minutes on a laptop CPU); `python run.py --help` lists every flag.
"""

from simclr_lib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
