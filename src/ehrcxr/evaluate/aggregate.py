"""Aggregate per-run test predictions into the main results table (long-form CSV + Markdown).

Runs are grouped by (task, model, missing); the seeds of a group are pooled (see
:func:`ehrcxr.evaluate.bootstrap.bootstrap_ci`) on each evaluation set. Every row carries the counts it rests
on (stays, positives, labels with both classes) and the criterion that selected the models. An EHR-only
model's runs at one miss<r> serve every miss<r> of the grid (its cells are identical across rates); such rows
name the setting their runs were trained at (``run_missing``). Only aggregates are written. With
``allow_missing`` the runs without outputs (failed cells) are left out and listed at the top of the Markdown.
Runs trained on other inputs are all named in one error, with the command that reruns them.
"""
from __future__ import annotations

import json
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ehrcxr.data.tasks import TASKS, is_multiclass
from ehrcxr.evaluate.bootstrap import bootstrap_metrics, resample_weights, summarise_resamples
from ehrcxr.evaluate.metrics import METRICS, has_both_classes
from ehrcxr.evaluate.multiclass import MULTICLASS_METRICS, multiclass_resample_stats

log = logging.getLogger("ehrcxr.evaluate")

EVAL_SETS = ("paired_test", "partial_test")
PREDICTED_SETS = ("val", *EVAL_SETS)  # predictions.parquet rows: val (analyses' thresholds, model choice) + test
COLUMNS = ["task", "model", "missing", "run_missing", "eval_set", "metric", "estimate", "ci_low", "ci_high", "n_seeds",
           "selection", "n_stays", "n_positive", "n_labels_scored", "single_class_labels"]
ORACLE_MODEL, ORACLE_MISSING, ORACLE_SELECTION = "oracle", "—", "—"
ORACLE_TASKS = ("phenotyping", "mortality")  # tasks whose true label probabilities the synthetic oracle holds
SELECTION_METRICS = ("val_auprc", "val_auroc", "val_loss")  # what ehrcxr.train.loop.fit selects epochs by
_RUN_KEYS = ("task", "model", "missing", "seed", "labels")
RUN_OUTPUTS = ("metrics.json", "predictions.parquet")


@dataclass
class Run:
    """One training run: its identity and model-selection criterion (None when its metrics.json predates
    that record) from metrics.json, and its test predictions."""

    path: Path
    task: str
    model: str
    missing: str
    seed: int
    labels: list[str]
    selection_metric: str | None
    predictions: pd.DataFrame

    def eval_set(self, eval_set: str) -> pd.DataFrame:
        """Rows of ``eval_set``, sorted by stay_id."""
        rows = self.predictions[self.predictions["eval_set"] == eval_set]
        return rows.sort_values("stay_id").reset_index(drop=True)


def _check_predictions(frame: pd.DataFrame, labels: list[str], path: Path, prefixes: tuple[str, ...] = ("p",)
                       ) -> None:
    needed = ["stay_id", "eval_set"] + [f"{k}_{label}" for label in labels for k in ("y", *prefixes)]
    absent = [c for c in needed if c not in frame.columns]
    if absent:
        raise ValueError(f"{path}: missing columns {absent}")
    bad_set = ~frame["eval_set"].isin(PREDICTED_SETS)
    if bad_set.any():
        row = int(np.flatnonzero(bad_set)[0])
        raise ValueError(
            f"{path}: column eval_set, row {row}: {frame['eval_set'].iloc[row]!r} is not one of {PREDICTED_SETS}"
        )
    duplicated = frame.duplicated(["stay_id", "eval_set"])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        raise ValueError(f"{path}: stay_id {frame['stay_id'].iloc[row]} appears twice in eval_set "
                         f"{frame['eval_set'].iloc[row]!r} (row {row})")
    for label in labels:
        y = frame[f"y_{label}"].to_numpy()
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: column y_{label}, row {row} (stay_id {frame['stay_id'].iloc[row]}): "
                             f"label {y[row]!r} is not 0/1")
        for prefix in prefixes:
            column = f"{prefix}_{label}"
            p = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(p)
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{path}: column {column}, row {row} (stay_id {frame['stay_id'].iloc[row]}): "
                                 f"probability {frame[column].iloc[row]!r} is not a finite number")


def load_run(run_dir: str | Path, prefixes: tuple[str, ...] = ("p",)) -> Run:
    """Read ``metrics.json`` and ``predictions.parquet`` of one run directory and validate them. ``prefixes``: the
    score columns read per label (``p``: as trained; ``p_nocxr``/``p_noehr``: one modality withheld)."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "metrics.json"
    meta = json.loads(meta_path.read_text())
    absent = [k for k in _RUN_KEYS if k not in meta]
    if absent:
        raise ValueError(f"{meta_path}: missing keys {absent}")
    labels = list(meta["labels"])
    if not labels:
        raise ValueError(f"{meta_path}: 'labels' is empty")
    selection_metric = meta.get("selection_metric")
    if selection_metric not in (None, *SELECTION_METRICS):
        raise ValueError(f"{meta_path}: selection_metric {selection_metric!r} is not one of {SELECTION_METRICS}")
    pred_path = run_dir / "predictions.parquet"
    columns = ["stay_id", "eval_set"] + [f"{k}_{label}" for label in labels for k in ("y", *prefixes)]
    available = set(pq.read_schema(pred_path).names)
    if "has_cxr" in available:
        columns.insert(2, "has_cxr")
    absent = [c for c in columns if c not in available]
    if absent:
        raise ValueError(f"{pred_path}: missing columns {absent[:4]}{' …' if len(absent) > 4 else ''} (written by an "
                         f"older ehrcxr? rerun with: {rerun_command([run_dir])})")
    predictions = pd.read_parquet(pred_path, columns=columns)
    _check_predictions(predictions, labels, pred_path, prefixes)
    return Run(run_dir, str(meta["task"]), str(meta["model"]), str(meta["missing"]), int(meta["seed"]),
               labels, selection_metric, predictions)


def _as_run_dirs(paths) -> list[Path]:
    """Run directories from directories or files inside them (metrics.json / predictions.parquet)."""
    dirs: dict[Path, None] = {}
    for path in map(Path, paths):
        dirs[path.parent if path.suffix in (".json", ".parquet") else path] = None
    return list(dirs)


def _absent_outputs(run_dir: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if not (run_dir / name).is_file()]


def _run_identity(run_dir: str | Path) -> dict:
    """task, model, missing and seed of a run directory laid out as ``…/{task}/{model}/{missing}/seed{seed}``
    (read from the path, since a failed run has no metrics.json); '?' where the path does not follow it."""
    parts = Path(run_dir).parts
    if len(parts) >= 4 and re.fullmatch(r"seed\d+", parts[-1]):
        return dict(task=parts[-4], model=parts[-3], missing=parts[-2], seed=int(parts[-1][len("seed"):]))
    return dict(task="?", model="?", missing="?", seed="?")


def _load_runs(run_dirs, allow_missing: bool) -> tuple[list[Run], list[Path]]:
    """The complete runs, and the run directories left out because they lack outputs (``allow_missing``)."""
    runs, missing = [], []
    for run_dir in _as_run_dirs(run_dirs):
        absent = _absent_outputs(run_dir)
        if absent:
            if not allow_missing:
                raise FileNotFoundError(f"run {run_dir} lacks {absent}")
            log.warning("skipping run %s: it lacks %s", run_dir, absent)
            missing.append(run_dir)
            continue
        runs.append(load_run(run_dir))
    if not runs:
        detail = f": all {len(missing)} run directories lack {list(RUN_OUTPUTS)}" if missing else ""
        raise ValueError(f"no complete runs to aggregate{detail}")
    return runs, missing


def _group_runs(runs: list[Run]) -> dict[tuple[str, str, str], list[Run]]:
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.task, run.model, run.missing), []).append(run)
    for key, members in groups.items():
        members.sort(key=lambda r: r.seed)
        seeds = [r.seed for r in members]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"runs of {key} repeat a seed: {[str(r.path) for r in members]}")
    return groups


def _pooled_arrays(members: list[Run], eval_set: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels (N, L) and per-seed probabilities of ``eval_set`` (the seeds share its stays and labels:
    :func:`check_runs_current`)."""
    labels = members[0].labels
    y = members[0].eval_set(eval_set)[[f"y_{label}" for label in labels]].to_numpy(dtype=np.int8)
    p_by_seed = [run.eval_set(eval_set)[[f"p_{label}" for label in labels]].to_numpy(dtype=np.float64)
                 for run in members]
    return y, p_by_seed


def rerun_command(run_dirs) -> str:
    """The one snakemake command that retrains the runs in ``run_dirs`` (it forces their train jobs by
    output; the tables downstream follow)."""
    outputs = " ".join(shlex.quote(str(Path(run_dir) / "metrics.json")) for run_dir in run_dirs)
    return f"snakemake --cores all --forcerun {outputs}"


def _eval_set_difference(run: Run, reference: Run, eval_set: str) -> str | None:
    """How the stays or labels of ``run``'s ``eval_set`` differ from ``reference``'s; None when they agree."""
    rows, reference_rows = run.eval_set(eval_set), reference.eval_set(eval_set)
    ids, reference_ids = rows["stay_id"].to_numpy(), reference_rows["stay_id"].to_numpy()
    if ids.shape != reference_ids.shape or (ids != reference_ids).any():
        return (f"{ids.size} {eval_set} stays, the newest run {reference_ids.size} "
                f"({np.setdiff1d(ids, reference_ids).size} only here, "
                f"{np.setdiff1d(reference_ids, ids).size} only there)")
    columns = [f"y_{label}" for label in run.labels]
    y, reference_y = rows[columns].to_numpy(dtype=np.int8), reference_rows[columns].to_numpy(dtype=np.int8)
    if (y != reference_y).any():
        stay, column = np.argwhere(y != reference_y)[0]
        return f"{eval_set} {columns[column]} of stay_id {ids[stay]} differs from the newest run's"
    return None


def _outdated_runs(runs: list[Run]) -> tuple[dict[Path, str], dict[str, Path]]:
    """Every run that cannot be pooled, with why, and the newest run of each task. Every run of a task must
    be scored on the same test stays and labels (they depend only on the cohort and the usable images); as
    snakemake reruns exactly the cells whose inputs changed, the newest run (predictions.parquet time) of a
    task shows the current ones. A metrics.json without ``selection_metric`` predates that record."""
    outdated, newest = {}, {}
    for task in sorted({run.task for run in runs}):
        members = [run for run in runs if run.task == task]
        reference = max(members, key=lambda r: ((r.path / "predictions.parquet").stat().st_mtime_ns, str(r.path)))
        newest[task] = reference.path
        for run in members:
            reasons = []
            if run.selection_metric is None:
                reasons.append("its metrics.json does not record the model-selection criterion (older ehrcxr)")
            if run.labels != reference.labels:
                reasons.append(f"its labels differ from the newest run's ({len(run.labels)} vs "
                               f"{len(reference.labels)})")
            else:
                reasons += [why for why in (_eval_set_difference(run, reference, s) for s in EVAL_SETS) if why]
            if reasons:
                outdated[run.path] = "; ".join(reasons)
    return outdated, newest


def check_runs_current(runs: list[Run]) -> None:
    """Raise one error naming every outdated run (see :func:`_outdated_runs`) and the one command that
    reruns them all; a run trained on an older cohort or CXR index would otherwise be pooled or compared
    with runs scored on other stays."""
    outdated, newest = _outdated_runs(runs)
    if not outdated:
        return
    lines = [f"{len(outdated)} of {len(runs)} runs are outdated (trained on another cohort or CXR index, or by "
             "an older ehrcxr), compared with the newest run of their task ("
             + ", ".join(f"{task}: {path}" for task, path in newest.items()) + "):"]
    lines += [f"  {path}: {why}" for path, why in outdated.items()]
    lines += ["Rerun them all with (plus the --configfile/--profile options you ran with):",
              f"  {rerun_command(outdated)}"]
    raise ValueError("\n".join(lines))


def _selection(members: list[Run]) -> str:
    """The criterion that selected the models of a group: shared by every seed, else 'mixed'."""
    criteria = {run.selection_metric for run in members}
    return criteria.pop() if len(criteria) == 1 else "mixed"


def _counts(y: np.ndarray, labels: list[str]) -> tuple[dict, list[dict]]:
    """What a metric on ``y`` (N, L) rests on: for the macro row (positives summed over labels) and per label."""
    positives = y.sum(axis=0)
    both = [has_both_classes(y[:, j]) for j in range(y.shape[1])]
    macro_counts = dict(n_stays=len(y), n_positive=int(positives.sum()), n_labels_scored=sum(both),
                        single_class_labels=";".join(label for label, ok in zip(labels, both) if not ok))
    label_counts = [dict(n_stays=len(y), n_positive=int(positives[j]), n_labels_scored=int(both[j]),
                         single_class_labels="" if both[j] else label) for j, label in enumerate(labels)]
    return macro_counts, label_counts


def _multiclass_rows(key, eval_set, y, p_by_seed, selection, counts, *, n_boot, ci, seed) -> list[dict]:
    """Accuracy, macro-F1 and linear-weighted kappa of a multiclass task, on the main table's resamples."""
    task, model, missing = key
    values = multiclass_resample_stats(y, p_by_seed, resample_weights(y.shape[0], n_boot, seed))
    rows = []
    for metric in MULTICLASS_METRICS:
        estimate, low, high = summarise_resamples(values[metric], ci)
        rows.append(dict(task=task, model=model, missing=missing, run_missing=missing, eval_set=eval_set,
                         metric=metric, estimate=estimate, ci_low=low, ci_high=high, n_seeds=len(p_by_seed),
                         selection=selection, **counts))
    return rows


def _metric_rows(key, eval_set, labels, y, p_by_seed, selection, *, n_boot, ci, seed, threads=1) -> list[dict]:
    task, model, missing = key
    rows = []
    results = bootstrap_metrics(y, p_by_seed, list(METRICS), n_boot=n_boot, ci=ci, seed=seed, threads=threads)
    macro_counts, label_counts = _counts(y, labels)
    if is_multiclass_task(task) and model != ORACLE_MODEL:
        rows += _multiclass_rows(key, eval_set, y, p_by_seed, selection, macro_counts, n_boot=n_boot, ci=ci,
                                 seed=seed)
    for name, (macro_ci, label_ci) in zip(METRICS, results):
        named = [(name, macro_ci, macro_counts)]
        if len(labels) > 1:  # multi-label tasks (phenotyping) also report every label
            named += [(f"{name}:{label}", tuple(label_ci[j]), label_counts[j]) for j, label in enumerate(labels)]
        for metric, (estimate, low, high), counts in named:
            if not np.isfinite(estimate):
                log.warning("%s %s %s %s: %s undefined (single class: %s)",
                            task, model, missing, eval_set, metric, counts["single_class_labels"])
            rows.append(dict(task=task, model=model, missing=missing, run_missing=missing, eval_set=eval_set,
                             metric=metric, estimate=estimate, ci_low=low, ci_high=high, n_seeds=len(p_by_seed),
                             selection=selection, **counts))
    return rows


def _oracle_rows(groups, oracle_path: Path, *, n_boot, ci, seed, threads=1) -> list[dict]:
    oracle = pd.read_parquet(oracle_path)
    if "stay_id" not in oracle.columns:
        raise ValueError(f"{oracle_path}: missing column stay_id")
    if oracle["stay_id"].duplicated().any():
        raise ValueError(f"{oracle_path}: stay_id {oracle['stay_id'][oracle['stay_id'].duplicated()].iloc[0]} "
                         "appears twice")
    oracle = oracle.set_index("stay_id")
    rows = []
    for task in sorted({key[0] for key in groups}):
        # the task's eval sets are defined by the `natural` setting (all task stays), else by any run
        candidates = sorted((key for key in groups if key[0] == task), key=lambda k: (k[2] != "natural", k))
        reference = groups[candidates[0]][0]
        labels = reference.labels
        absent = [label for label in labels if label not in oracle.columns]
        if absent and task in ORACLE_TASKS:
            raise ValueError(f"{oracle_path}: missing columns {absent} for task {task}")
        if absent:  # the generator gives no true class probabilities of length of stay
            log.info("no oracle rows for %s: %s holds no probabilities of its labels", task, oracle_path)
            continue
        for eval_set in EVAL_SETS:
            stays = reference.eval_set(eval_set)
            if stays.empty:
                continue
            unknown = ~stays["stay_id"].isin(oracle.index)
            if unknown.any():
                raise ValueError(f"{oracle_path}: no oracle row for stay_id {stays['stay_id'][unknown].iloc[0]} "
                                 f"({unknown.sum()} {task} {eval_set} stays of {reference.path} lack one)")
            y = stays[[f"y_{label}" for label in labels]].to_numpy(dtype=np.int8)
            p = oracle.loc[stays["stay_id"], labels].to_numpy(dtype=np.float64)
            rows += _metric_rows((task, ORACLE_MODEL, ORACLE_MISSING), eval_set, labels, y, [p], ORACLE_SELECTION,
                                 n_boot=n_boot, ci=ci, seed=seed, threads=threads)
    return rows


def served_missing(groups, ehr_only_models, grid_missing) -> dict[tuple[str, str, str], tuple[str, str, str]]:
    """(task, model, miss<r>) -> the group whose runs report it: a miss<r> cell withholds the X-ray only from models
    that read one, on the same paired stays at every rate, so an EHR-only model's runs at its first trained
    miss<r> (in ``grid_missing`` order) serve every miss<r> of the grid it was not trained at."""
    rates, ehr_only = [missing for missing in grid_missing if missing != "natural"], set(ehr_only_models)
    served = {}
    for task, model in sorted({key[:2] for key in groups if key[1] in ehr_only}):
        trained = [rate for rate in rates if (task, model, rate) in groups]
        for rate in rates:
            if trained and (task, model, rate) not in groups:
                served[task, model, rate] = (task, model, trained[0])
    return served


def _missing_order(missing: str) -> tuple:
    if missing == "natural":
        return (0, 0.0, missing)
    match = re.fullmatch(r"miss(\d*\.?\d+)", missing)
    if match:
        return (1, float(match.group(1)), missing)
    return (3, 0.0, missing) if missing == ORACLE_MISSING else (2, 0.0, missing)


def _format_ci(row) -> str:
    if not np.isfinite(row.estimate):
        return "n/a"
    return f"{row.estimate:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


def _missing_section(missing: list[Path], n_runs: int) -> list[str]:
    if not missing:
        return ["", f"No missing cells: all {n_runs} runs of the grid are present."]
    rows = pd.DataFrame([{**_run_identity(run_dir), "run directory": str(run_dir)} for run_dir in missing])
    return ["", f"## Missing cells: {len(missing)} of {n_runs} runs", "",
            f"These runs lack {' or '.join(RUN_OUTPUTS)} (failed or not run) and are left out of every table "
            "below; a (task, model, missing) group that lost only some seeds is pooled over the rest (n_seeds "
            "in the CSV).", "", rows.to_markdown(index=False)]


def _selection_note(table: pd.DataFrame) -> list[str]:
    """A line naming the cells whose models were (in some or all seeds) selected on validation loss."""
    fallback = table[table["selection"].isin(["val_loss", "mixed"])]
    cells = fallback.drop_duplicates(["task", "model", "missing"]).sort_values(["task", "model", "missing"])
    if cells.empty:
        return []
    named = ", ".join(f"{r.task}/{r.model}/{r.missing} ({r.selection})" for r in cells.itertuples())
    return ["", f"**Selected without validation AUPRC**: {named}. No validation label had both classes, so the "
            "epoch with the lowest validation loss was kept (val_loss: in every seed; mixed: in some, see each "
            "run's metrics.json)."]


def _shared_note(table: pd.DataFrame) -> list[str]:
    """A line naming the rows (marked †) that repeat an EHR-only model's runs at another miss<r>."""
    shared = table[table["run_missing"] != table["missing"]].drop_duplicates(["task", "model", "missing"])
    if shared.empty:
        return []
    named = "; ".join(
        f"{task}/{model}: {part['n_seeds'].iloc[0]} run(s) at {run_missing} also give "
        + ", ".join(sorted(part["missing"], key=_missing_order))
        for (task, model, run_missing), part in shared.groupby(["task", "model", "run_missing"], sort=True))
    return ["", f"**† EHR-only: one run serves every miss<r>.** A miss<r> cell withholds the X-ray only from "
            f"models that read one, on the same paired stays at every rate, so an EHR-only model is trained at one "
            f"rate and reported at all: {named}."]


def _counts_line(row) -> str:
    """What a task × eval_set section rests on, from one of its macro rows."""
    single = [label for label in row.single_class_labels.split(";") if label]
    n_labels = row.n_labels_scored + len(single)
    if n_labels == 1:
        line = f"n = {row.n_stays} stays (every model and seed), {row.n_positive} positive."
    else:
        line = (f"n = {row.n_stays} stays (every model and seed); {row.n_positive} positive labels (positive stays "
                f"summed over the {n_labels} labels); {row.n_labels_scored} of {n_labels} labels have both classes.")
    if single:
        left_out = ", left out of the macro mean" if n_labels > 1 else ""
        line += f" A single class, so undefined{left_out}: {', '.join(single)}."
    return line


MULTICLASS_TITLES = {"accuracy": "Accuracy", "macro_f1": "Macro-F1",
                     "kappa_linear": "Cohen's kappa, linearly weighted (ordered classes)"}


def is_multiclass_task(task: str) -> bool:
    """True for a known multiclass task (its table adds accuracy, macro-F1 and kappa)."""
    return task in TASKS and is_multiclass(task)


ITEMID_MAP_NOTES = {
    "corrected": "EHR item map `corrected`: blood glucose and blood pH only.",
    "benchmark": "EHR item map `benchmark`: mimic3-benchmarks' map as MedFuse and CareBench use it (urine glucose and "
                 "urine / other-fluid pH feed glucose and pH), for comparability with published numbers.",
}


def render_markdown(table: pd.DataFrame, *, ci: float = 0.95, n_boot: int = 1000,
                    missing_runs: list[Path] | None = None, n_runs: int = 0, itemid_map: str | None = None) -> str:
    """Markdown of the macro metrics: one section per task × eval_set, models × missing settings.

    Each section states its stays, positives and single-class labels (shared by every model and seed of the
    section); cells selected on validation loss, and (marked †) rows repeating an EHR-only model's runs at
    another miss<r>, are named at the top. With ``missing_runs`` (a list, possibly empty, of the ``n_runs`` run
    directories) the page is titled 'Available results' and first lists the runs that lack outputs, one row per
    task/model/missing/seed. ``itemid_map`` (the config's ehr.itemid_map) is named under the title.
    """
    lines = [
        "# Main results" if missing_runs is None else "# Available results",
        "",
        f"Estimate [{ci:.0%} CI]: mean over training seeds of the macro metric on the test stays; "
        f"percentile bootstrap over stays ({n_boot} resamples, shared by all seeds).",
    ]
    if itemid_map is not None:
        lines += ["", ITEMID_MAP_NOTES.get(itemid_map, f"EHR item map `{itemid_map}`.")]
    lines += _selection_note(table) + _shared_note(table)
    if missing_runs is not None:
        lines += _missing_section(missing_runs, n_runs)
    shown = list(METRICS) + list(MULTICLASS_METRICS)
    macro = table[table["metric"].isin(shown)]
    for (task, eval_set), section in macro.groupby(["task", "eval_set"], sort=True):
        lines += ["", f"## {task} — {eval_set}", "", _counts_line(section[section["metric"].isin(METRICS)].iloc[0])]
        for metric in shown:
            cells = section[section["metric"] == metric]
            if cells.empty:
                continue
            cells = cells.assign(cell=[_format_ci(r) + ("†" if r.run_missing != r.missing else "")
                                       for r in cells.itertuples()])
            grid = cells.pivot(index="model", columns="missing", values="cell").fillna("")
            grid = grid[sorted(grid.columns, key=_missing_order)]
            grid = grid.loc[sorted(grid.index, key=lambda m: (m == ORACLE_MODEL, m))]
            grid.columns.name = None
            title = f"Macro {metric.upper()}" if metric in METRICS else MULTICLASS_TITLES[metric]
            if metric in METRICS and is_multiclass_task(task):
                title += " (one class vs the rest)"
            lines += ["", f"### {title}", "", grid.to_markdown()]
    return "\n".join(lines) + "\n"


def aggregate_runs(
    run_dirs,
    out_csv: str | Path,
    out_md: str | Path,
    *,
    oracle_path: str | Path | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    allow_missing: bool = False,
    ehr_only_models=(),
    grid_missing=(),
    threads: int = 1,
    itemid_map: str | None = None,
) -> pd.DataFrame:
    """Build the main results table from run directories and write it as CSV and Markdown.

    ``run_dirs``: run directories (or files inside them). Runs are grouped by (task, model, missing)
    and their seeds pooled; every run of a task must be scored on the same stays and labels, else one error
    names every outdated run (:func:`check_runs_current`). For each eval set the table holds macro
    ``auroc``/``auprc`` with bootstrap CIs and, for multi-label tasks, ``<metric>:<label>`` rows; each row
    also holds ``selection`` (val_auprc, val_auroc, val_loss or mixed over the seeds), ``n_stays``,
    ``n_positive`` (positive stays; summed over the labels in a macro row), ``n_labels_scored`` (labels with both
    classes) and ``single_class_labels`` (';'-joined). ``oracle_path`` (synthetic data) adds rows model='oracle',
    missing='—' scored on the stays of each task's eval sets (taken from a ``natural`` run when there is
    one). ``allow_missing`` skips run directories without metrics.json or predictions.parquet instead of
    failing, logs them and lists them (task/model/missing/seed) at the top of the Markdown, which is then
    titled 'Available results'. ``ehr_only_models`` with ``grid_missing`` (the grid's missingness settings):
    each of these models' runs at one miss<r> also give its rows at every other miss<r> of the grid
    (:func:`served_missing`); ``run_missing`` names the setting a row's runs were trained at (``missing``
    otherwise) and ``n_seeds`` the runs it rests on. ``threads``: labels bootstrapped at once. ``itemid_map``: the
    EHR item map the tensors were built with, named in the Markdown.
    Returns the long-form table (columns :data:`COLUMNS`).
    """
    runs, missing = _load_runs(run_dirs, allow_missing)
    check_runs_current(runs)
    groups = _group_runs(runs)
    group_rows = {}
    for key in sorted(groups):
        members = groups[key]
        selection = _selection(members)
        group_rows[key] = []
        for eval_set in EVAL_SETS:
            if members[0].eval_set(eval_set).empty:
                continue
            y, p_by_seed = _pooled_arrays(members, eval_set)
            group_rows[key] += _metric_rows(key, eval_set, members[0].labels, y, p_by_seed, selection,
                                            n_boot=n_boot, ci=ci, seed=seed, threads=threads)
        log.info("aggregated %s over seeds %s (selected by %s)", key, [r.seed for r in members], selection)
    for key, source in served_missing(groups, ehr_only_models, grid_missing).items():
        group_rows[key] = [{**row, "missing": key[2]} for row in group_rows[source]]
        log.info("reported %s from the EHR-only runs at %s", key, source[2])
    rows = [row for key in sorted(group_rows) for row in group_rows[key]]
    if oracle_path is not None:
        rows += _oracle_rows(groups, Path(oracle_path), n_boot=n_boot, ci=ci, seed=seed, threads=threads)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table = table.sort_values(["task", "eval_set", "metric", "model", "missing"], kind="stable").reset_index(drop=True)
    out_csv, out_md = Path(out_csv), Path(out_md)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_csv, index=False)
    out_md.write_text(render_markdown(table, ci=ci, n_boot=n_boot, missing_runs=missing if allow_missing else None,
                                      n_runs=len(runs) + len(missing), itemid_map=itemid_map))
    log.info("wrote %d rows to %s and %s", len(table), out_csv, out_md)
    if missing:
        log.warning("%d of %d runs are missing and left out of the tables: %s", len(missing),
                    len(runs) + len(missing), ", ".join(map(str, missing)))
    return table


def run_aggregate(run_dirs, out_csv, out_md, oracle_path, params: dict, allow_missing: bool = False,
                  ehr_only_models=(), grid_missing=(), threads: int = 1, itemid_map: str | None = None) -> pd.DataFrame:
    """Workflow entry point: ``params`` is the config ``evaluate:`` section (n_bootstrap, ci, seed);
    ``allow_missing`` tabulates the runs that have outputs and lists the others; ``ehr_only_models`` and
    ``grid_missing`` report EHR-only runs at every miss<r> (see :func:`aggregate_runs`); ``threads``: labels
    bootstrapped at once."""
    absent = [k for k in ("n_bootstrap", "ci", "seed") if k not in params]
    if absent:
        raise ValueError(f"config evaluate: section lacks {absent}")
    return aggregate_runs(run_dirs, out_csv, out_md, oracle_path=oracle_path or None,
                          n_boot=int(params["n_bootstrap"]), ci=float(params["ci"]), seed=int(params["seed"]),
                          allow_missing=allow_missing, ehr_only_models=ehr_only_models,
                          grid_missing=grid_missing, threads=threads, itemid_map=itemid_map)
