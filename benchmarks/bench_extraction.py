"""Time EHR event extraction on large chartevents files in the real MIMIC-IV v3.1 format.

For each size it writes `icu/chartevents.csv.gz` (N rows) and `hosp/labevents.csv.gz` (N/10 rows) for a cohort
of --stays ICU stays, then runs, each in its own process (so peak RSS is its own):
  ehrcxr  the workflow's extraction to the hourly tensor (ehrcxr.data.ehr.build_ehr_tensor, streaming);
  naive   pandas reads each whole file, keeps mapped itemids, joins stays and pivots (same cleaning and tensor);
  floor   merely decompressing both files (pyarrow's gzip stream, the fastest decompressor here).
and prints rows/s and peak RSS. The ehrcxr and naive tensors are checked to be identical.

Usage: PYTHONPATH=src python benchmarks/bench_extraction.py [--rows 10M 20M 40M] [--stays 20000] [--threads 2]
       [--out DIR] [--keep] [--methods ehrcxr naive floor]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAB_SHARE = 10  # labevents rows = chartevents rows / LAB_SHARE


def _rows(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, root: Path, threads: int) -> dict:
    """Run one method on ``root`` in this process; seconds, rows read and peak RSS (MB)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from ehrcxr.data import ehr

    pa.set_cpu_count(threads)
    files = [root / "icu" / "chartevents.csv.gz", root / "hosp" / "labevents.csv.gz"]
    stays = pd.read_parquet(root / "stays.parquet")
    started = time.perf_counter()
    if method == "floor":
        for path in files:
            with pa.input_stream(str(path), compression="gzip") as stream:
                while stream.read(1 << 22):
                    pass
    elif method == "ehrcxr":
        dataset = ehr.build_ehr_tensor(root, stays, threads=threads)
        np.save(root / "ehrcxr_values.npy", dataset["values"].values)
    elif method == "naive":
        from naive_extraction import naive_hourly_codes

        cohort = ehr.prepare_stays(stays)
        layout = ehr.channel_layout()
        dataset = ehr.tensor_from_codes(naive_hourly_codes(root, cohort, 48, layout), cohort, layout,
                                        dict.fromkeys(ehr.DROP_REASONS, 0))
        np.save(root / "naive_values.npy", dataset["values"].values)
    else:
        raise ValueError(f"unknown method {method!r}")
    seconds = time.perf_counter() - started
    meta = json.loads((root / "rows.json").read_text())
    return {"method": method, "seconds": seconds, "rows": meta["chartevents"] + meta["labevents"],
            "peak_rss_mb": _peak_rss_mb()}


def generate(root: Path, n_rows: int, n_stays: int) -> float:
    """Write the event files and the stays table; returns the seconds taken."""
    sys.path.insert(0, str(HERE))
    from chartevents_gen import benchmark_stays, write_chartevents, write_labevents

    started = time.perf_counter()
    stays = benchmark_stays(n_stays)
    write_chartevents(root / "icu" / "chartevents.csv.gz", stays, n_rows)
    write_labevents(root / "hosp" / "labevents.csv.gz", stays, n_rows // LAB_SHARE)
    stays.to_parquet(root / "stays.parquet")
    (root / "rows.json").write_text(json.dumps({"chartevents": n_rows, "labevents": n_rows // LAB_SHARE}))
    return time.perf_counter() - started


def _run_child(method: str, root: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", method, "--root", str(root),
               "--threads", str(threads)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=["10M", "20M", "40M"], help="chartevents rows, e.g. 5M")
    parser.add_argument("--stays", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--methods", nargs="+", default=["ehrcxr", "naive", "floor"])
    parser.add_argument("--out", type=Path, default=None, help="folder for the generated files (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.root, args.threads)))
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="ehrcxr-bench-"))
    results = []
    try:
        for size in args.rows:
            root = out / f"rows{size}"
            seconds = generate(root, _rows(size), args.stays)
            gz_mb = sum(p.stat().st_size for p in root.rglob("*.csv.gz")) / 2**20
            print(f"# {size} chartevents rows (+{_rows(size) // LAB_SHARE:,} labevents), {args.stays:,} stays: "
                  f"{gz_mb:,.0f} MB gzip, generated in {seconds:.0f} s", flush=True)
            for method in args.methods:
                result = _run_child(method, root, args.threads)
                results.append({"size": size, **result})
                print(f"  {method:>6}: {result['seconds']:7.1f} s  {result['rows'] / result['seconds'] / 1e6:5.2f} "
                      f"M rows/s  peak RSS {result['peak_rss_mb']:7.0f} MB", flush=True)
            if {"ehrcxr", "naive"} <= set(args.methods):
                import numpy as np

                same = np.array_equal(np.load(root / "ehrcxr_values.npy"), np.load(root / "naive_values.npy"),
                                      equal_nan=True)
                print(f"  ehrcxr tensor == naive tensor: {same}", flush=True)
                if not same:
                    raise SystemExit("ehrcxr and naive tensors differ")
            if not args.keep:
                shutil.rmtree(root)
        _print_table(results)
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)


def _print_table(results: list[dict]) -> None:
    print("\n| chartevents rows | method | seconds | M rows/s | peak RSS (MB) |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['size']} | {r['method']} | {r['seconds']:.1f} | {r['rows'] / r['seconds'] / 1e6:.2f} | "
              f"{r['peak_rss_mb']:.0f} |")
    by = {(r["size"], r["method"]): r for r in results}
    for size in dict.fromkeys(r["size"] for r in results):
        if (size, "ehrcxr") in by and (size, "naive") in by and (size, "floor") in by:
            ours, naive, floor = by[size, "ehrcxr"], by[size, "naive"], by[size, "floor"]
            print(f"{size}: ehrcxr {naive['seconds'] / ours['seconds']:.1f}x naive throughput, "
                  f"{ours['seconds'] / floor['seconds']:.2f}x the decompression floor's time, "
                  f"{100 * ours['peak_rss_mb'] / naive['peak_rss_mb']:.0f}% of naive peak RSS")


if __name__ == "__main__":
    main()
