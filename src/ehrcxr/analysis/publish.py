"""Writers of the published analysis outputs: every table as CSV (long form), Markdown and LaTeX (booktabs),
every figure as PNG and SVG. Only aggregates reach them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

TABLE_SUFFIXES = (".csv", ".md", ".tex")
FIGURE_SUFFIXES = (".png", ".svg")


def format_ci(estimate: float, low: float, high: float, digits: int = 3) -> str:
    """'0.812 [0.790, 0.833]'; 'n/a' for an undefined estimate."""
    if not np.isfinite(estimate):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"{estimate:.{digits}f}"
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_p(value: float) -> str:
    """A p- or q-value for a table: 3 significant digits, '<0.001' below 0.001, '' when undefined."""
    if not np.isfinite(value):
        return ""
    return "<0.001" if value < 0.001 else f"{value:.3g}"


def write_table(long: pd.DataFrame, stem: str | Path, *, title: str, display: pd.DataFrame | None = None,
                notes: Sequence[str] = ()) -> list[Path]:
    """Write ``long`` (the long-form table) to ``<stem>.csv`` and ``display`` (default ``long``; the readable
    form) to ``<stem>.md`` (title, notes, pipe table) and ``<stem>.tex`` (a booktabs tabular with the title as
    caption). Returns the three paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    display = long if display is None else display
    paths = [stem.with_name(stem.name + suffix) for suffix in TABLE_SUFFIXES]
    long.to_csv(paths[0], index=False)
    body = display.to_markdown(index=False) if len(display) else "_No rows._"
    paths[1].write_text("\n\n".join([f"# {title}", *notes, body]) + "\n")
    latex = display.to_latex(index=False, escape=True, caption=title, label=f"tab:{stem.name}",
                             na_rep="", longtable=len(display) > 40)
    paths[2].write_text(latex)
    return paths


def save_figure(figure, stem: str | Path) -> list[Path]:
    """Save a matplotlib figure as ``<stem>.png`` (150 dpi) and ``<stem>.svg`` and close it."""
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + suffix) for suffix in FIGURE_SUFFIXES]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight", metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(figure)
    return paths


def empty_figure(message: str):
    """A figure that says why there is nothing to plot (e.g. no X-ray data), so every declared output exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 1.5))
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figure
