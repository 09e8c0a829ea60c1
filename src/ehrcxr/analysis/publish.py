"""Writers of the published analysis outputs: every table as CSV (long form), Markdown and LaTeX (booktabs),
every figure as PNG and SVG. Only aggregates reach them."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pyarrow import csv as arrow_csv

TABLE_SUFFIXES = (".csv", ".md", ".tex")
FIGURE_SUFFIXES = (".png", ".svg")
LONG_TABLE_ROWS = 40  # longer LaTeX tables become a longtable (breaks across pages)
_LATEX_ESCAPES = str.maketrans({"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                                "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                "\\": r"\textbackslash{}"})


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
    write_csv(long, paths[0])
    body = display.to_markdown(index=False) if len(display) else "_No rows._"
    paths[1].write_text("\n\n".join([f"# {title}", *notes, body]) + "\n")
    paths[2].write_text(latex_table(display, caption=title, label=f"tab:{stem.name}"))
    return paths


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """``table`` as CSV by Arrow's writer (several times faster than pandas' on the long tables): a header row,
    strings quoted, missing values empty, booleans ``true``/``false`` (RFC 4180; ``pd.read_csv`` reads it back)."""
    arrow_csv.write_csv(pa.Table.from_pandas(table, preserve_index=False), path)


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return text.translate(_LATEX_ESCAPES)


def _latex_cell(value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.6g}"
    return latex_escape(str(value))


def latex_table(display: pd.DataFrame, *, caption: str, label: str) -> str:
    """A booktabs table of ``display`` (no index; numbers right-aligned, the rest left; missing values empty)
    with ``caption`` and ``label``: a ``table`` float, or a ``longtable`` past :data:`LONG_TABLE_ROWS` rows."""
    align = "".join("r" if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype) else "l"
                    for dtype in display.dtypes)
    header = " & ".join(latex_escape(str(column)) for column in display.columns) + r" \\"
    rows = [" & ".join(_latex_cell(value) for value in row) + r" \\" for row in display.itertuples(index=False)]
    title = rf"\caption{{{latex_escape(caption)}}}\label{{{label}}}"
    if len(display) > LONG_TABLE_ROWS:
        lines = [rf"\begin{{longtable}}{{{align}}}", title + r" \\", r"\toprule", header, r"\midrule",
                 r"\endfirsthead", r"\toprule", header, r"\midrule", r"\endhead", r"\bottomrule", r"\endlastfoot",
                 *rows, r"\end{longtable}"]
    else:
        lines = [r"\begin{table}", title, rf"\begin{{tabular}}{{{align}}}", r"\toprule", header, r"\midrule",
                 *rows, r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def save_figure(figure, stem: str | Path) -> list[Path]:
    """Save a matplotlib figure as ``<stem>.png`` (150 dpi) and ``<stem>.svg`` (text kept as text: editable,
    smaller and several times faster to write than glyph paths) and close it."""
    import matplotlib
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + suffix) for suffix in FIGURE_SUFFIXES]
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for path in paths:
            figure.savefig(path, dpi=150, bbox_inches="tight",
                           metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(figure)
    return paths


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def empty_figure(message: str):
    """A figure that says why there is nothing to plot (e.g. no X-ray data), so every declared output exists."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 1.5))
    axis.axis("off")
    axis.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return figure
