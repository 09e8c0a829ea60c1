"""Does the report find what the synthetic generator planted? Prints one Markdown table for the analysis tables of
a finished synthetic run (default: the demo's): each planted effect, the statistic that should show it, and whether
it does (``ehrcxr.analysis.planted``).

    python benchmarks/planted_effects.py [results/synthetic]
"""
from __future__ import annotations

import sys
from pathlib import Path

from ehrcxr.analysis.planted import planted_effects


def main() -> None:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "results/synthetic")
    frame = planted_effects(results / "tables")
    frame["found"] = frame["found"].map({True: "yes", False: "**no**"})
    print(frame.drop(columns=["signal"]).to_markdown(index=False))


if __name__ == "__main__":
    main()
