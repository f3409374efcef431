"""``python -m kd.pipeline.demo.synth OUT_DIR --n SCENES --seed S``: write a synthetic dataset."""

from __future__ import annotations

import argparse
import time

from .writer import synthesize


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kd.pipeline.demo.synth", description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=1000, help="number of scenes (3 records each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                    metavar=("TRAIN", "VAL", "TEST"))
    args = ap.parse_args(argv)
    t = time.perf_counter()
    paths = synthesize(args.out_dir, args.n, args.seed, tuple(args.splits))
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"{args.n} scenes, {3 * args.n} records in {time.perf_counter() - t:.2f}s")


if __name__ == "__main__":
    main()
