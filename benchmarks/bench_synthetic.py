"""Time the synthetic data generator: rows written and seconds for a given number of ICU stays.

Usage: PYTHONPATH=src python benchmarks/bench_synthetic.py [--n-stays 10000] [--out DIR] [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ehrcxr.synthetic import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-stays", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ehrcxr-synthetic-"))
    try:
        started = time.perf_counter()
        counts = generate(out, n_stays=args.n_stays, seed=args.seed, image_size=args.image_size)
        seconds = time.perf_counter() - started
        for table, rows in counts.items():
            print(f"{table:>16}: {len(rows) if isinstance(rows, list) else rows:>10,}")
        print(f"generated {args.n_stays:,} stays in {seconds:.1f} s -> {out}")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
