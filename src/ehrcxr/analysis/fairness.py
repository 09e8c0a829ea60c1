"""Subgroup performance and disparity: does fusing the X-ray narrow or widen the gaps between patient groups?

For every task, on ``partial_test`` (all test stays; X-ray availability varies) and ``paired_test``, each model is
scored within groups of stays: age bins, gender, race, insurance, admission type, X-ray availability
(``partial_test`` only) and the intersections age × race and gender × race. Per group, model and label (and the
macro mean over labels of a multi-label task): AUROC, AUPRC, TPR, FPR and PPV at a threshold chosen on validation,
ECE and the positive rate, each with a percentile bootstrap CI and its difference to the attribute's largest group
(CI, bootstrap p). Per attribute: the gap between groups, the ratio,
the worst group and the equalized-odds difference; per fusion model, its gap minus the best unimodal model's; per
model, the Spearman correlation between a group's X-ray missing rate and its deficit.

Every estimate uses the resamples of the main table (one weight matrix per task and evaluation set, shared by
every model, group and label): a group's resamples are its stays' columns of that matrix, so a group metric, a gap
and a difference of gaps between models are all evaluated on the same resamples. Groups below ``min_stays`` stays
(or, for TPR and the equalized-odds difference, positives) are suppressed (PhysioNet's small-cell rule). The work
is one slice per task, evaluation set and model (:class:`ModelSlice`), spread over cores by ``core.map_slices``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from ehrcxr.analysis import core, publish
from ehrcxr.evaluate.bootstrap import pooled_resample_stats, resample_weights, summarise_resamples

log = logging.getLogger("ehrcxr.analysis.fairness")

EVAL_SETS = ("partial_test", "paired_test")
METRICS = ("auroc", "auprc", "tpr", "fpr", "ppv", "ece", "positive_rate")
EQUALIZED_ODDS = "equalized_odds"
HIGHER_IS_WORSE = ("fpr", "ece")  # the worst group has the highest value; for the other metrics, the lowest
ECE_BINS = 10
AGE_EDGES = (18, 40, 60, 80, np.inf)
AGE_BINS = ("18-40", "40-60", "60-80", "80+")
UNKNOWN = "unknown"
OVERALL = "overall"
CXR_AVAILABLE = "cxr_available"
SINGLE_ATTRIBUTES = ("age", "gender", "race", "insurance", "admission_type")
INTERSECTIONS = (("age", "race"), ("gender", "race"))
STAYS_COLUMNS = ("stay_id", *SINGLE_ATTRIBUTES)
MACRO = "macro"
COLUMNS = ["task", "missing", "eval_set", "model", "label", "attribute", "group", "metric", "estimate", "ci_low",
           "ci_high", "n_stays", "n_positive", "suppressed", "reference_group", "difference", "difference_low",
           "difference_high", "difference_p"]


@dataclass
class Group:
    """A group of an evaluation set's stays: ``members`` index its (sorted) stays."""

    attribute: str
    name: str
    members: np.ndarray


@dataclass
class GroupResamples:
    """One model's values in one group: per metric, (W, K) over the weight rows and label columns (see
    :func:`label_columns`), and the counts they rest on."""

    group: Group
    values: dict[str, np.ndarray]
    n_stays: int
    n_positive: np.ndarray  # (K,): positives per label; the macro column sums them


def label_columns(labels: list[str]) -> list[str]:
    """The label columns of a task's results: its label alone, or 'macro' then every label."""
    return list(labels) if len(labels) == 1 else [MACRO, *labels]


def _with_macro(macro: np.ndarray, per_label: np.ndarray) -> np.ndarray:
    """(W, K): the per-label values, preceded by the macro mean for a multi-label task."""
    return per_label if per_label.shape[1] == 1 else np.column_stack([macro, per_label])


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The score threshold t maximising Youden's J = TPR − FPR of 'positive iff p >= t' on ``y``/``p`` (1-D);
    among ties the lowest t. NaN when ``y`` holds one class. The candidates are the distinct scores."""
    y = np.asarray(y).astype(np.int64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(-np.asarray(p, dtype=np.float64), kind="stable")
    scores, positive = np.asarray(p, dtype=np.float64)[order], y[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # thresholding at a score keeps all its ties
    tp, fp = np.cumsum(positive)[last_of_tie], np.cumsum(1 - positive)[last_of_tie]
    j_numerator = tp * n_neg - fp * n_pos  # J · n_pos · n_neg, exact in integers
    best = np.flatnonzero(j_numerator == j_numerator.max())[-1]  # candidates descend: the last is the lowest
    return float(scores[last_of_tie][best])


def cell_thresholds(cell: core.Cell) -> list[np.ndarray]:
    """Per seed, the (L,) Youden thresholds of each label on that run's own val predictions."""
    y = cell.labels_of("val")
    if y.shape[0] == 0:
        raise ValueError(f"{cell.runs[0].path}/predictions.parquet has no val rows (written by an older ehrcxr); "
                         "rerun the cell")
    return [np.array([youden_threshold(y[:, j], p[:, j]) for j in range(y.shape[1])]) for p in cell.scores("val")]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.full(np.broadcast(numerator, denominator).shape, np.nan),
                     where=denominator > 0)


def _mean_of_finite(values: np.ndarray, axis: int) -> np.ndarray:
    finite = np.isfinite(values)
    return _ratio(np.where(finite, values, 0.0).sum(axis=axis), finite.sum(axis=axis).astype(np.float64))


def threshold_resamples(y: np.ndarray, p_by_seed: list[np.ndarray], thresholds: list[np.ndarray],
                        weights: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TPR, FPR, PPV, positive rate and ECE of ``y`` (n, L) under every weight row of ``weights`` (W, n), per seed
    at its ``thresholds`` (positive iff p >= t), as weighted sums: matrix products of the weight rows with
    indicator vectors. Returns, per metric, the seed-pooled ``(macro (W,), per-label (W, L))`` (the mean over
    seeds of the finite per-seed values; the macro value of a seed is its mean over labels defined in that row)."""
    y = y.astype(np.float64)
    n_labels = y.shape[1]
    total = weights.sum(axis=1)[:, None]
    positives, negatives = weights @ y, weights @ (1.0 - y)
    per_seed = {metric: [] for metric in ("tpr", "fpr", "ppv", "positive_rate", "ece")}
    for p, threshold in zip(p_by_seed, thresholds):
        predicted = (p >= threshold).astype(np.float64)  # a NaN threshold predicts nothing; its metrics are NaN
        true_pos = weights @ (predicted * y)
        flagged = weights @ predicted
        undefined = ~np.isfinite(threshold)
        per_seed["tpr"].append(np.where(undefined, np.nan, _ratio(true_pos, positives)))
        per_seed["fpr"].append(np.where(undefined, np.nan, _ratio(flagged - true_pos, negatives)))
        per_seed["ppv"].append(np.where(undefined, np.nan, _ratio(true_pos, flagged)))
        per_seed["positive_rate"].append(np.where(undefined, np.nan, _ratio(flagged, total)))
        bins = np.minimum((p * ECE_BINS).astype(np.int64), ECE_BINS - 1)  # [0, .1), …, [.9, 1]
        # residual y − p of each stay in column (label, bin): one non-zero per stay and label
        columns = (np.arange(n_labels) * ECE_BINS + bins).ravel()
        residual_by_bin = sparse.csr_matrix(((y - p).ravel(), (np.repeat(np.arange(len(y)), n_labels), columns)),
                                            shape=(len(y), n_labels * ECE_BINS))
        per_bin = np.asarray((residual_by_bin.T @ weights.T).T)  # (W, L · bins) weighted residual sums
        summed = np.abs(per_bin).reshape(-1, n_labels, ECE_BINS).sum(axis=2)
        per_seed["ece"].append(_ratio(summed, total))
    out = {}
    for metric, values in per_seed.items():
        stacked = np.stack(values)  # (S, W, L)
        out[metric] = (_mean_of_finite(_mean_of_finite(stacked, axis=2), axis=0), _mean_of_finite(stacked, axis=0))
    return out


def group_resamples(group: Group, y: np.ndarray, p_by_seed: list[np.ndarray], thresholds: list[np.ndarray],
                    weights: np.ndarray, threads: int = 1, min_stays: int = 0) -> GroupResamples:
    """Every metric of :data:`METRICS` of one model in ``group`` under every weight row (the group's columns of
    the shared weight matrix ``weights`` (W, N)); NaN, without computing, for a group under ``min_stays`` stays
    (suppressed anyway)."""
    members = group.members
    y_group, p_group, w_group = y[members], [p[members] for p in p_by_seed], weights[:, members]
    label_positives = y_group.sum(axis=0).astype(np.int64)
    n_positive = label_positives if y.shape[1] == 1 else np.r_[label_positives.sum(), label_positives]
    if len(members) < min_stays:
        hidden = np.full((weights.shape[0], n_positive.size), np.nan)
        return GroupResamples(group, {metric: hidden for metric in METRICS}, len(members), n_positive)
    values = {}
    ranked = pooled_resample_stats(y_group, p_group, ["auroc", "auprc"], w_group, threads)
    for metric, (macro, per_label) in zip(("auroc", "auprc"), ranked):
        values[metric] = _with_macro(macro, per_label)
    for metric, (macro, per_label) in threshold_resamples(y_group, p_group, thresholds, w_group).items():
        values[metric] = _with_macro(macro, per_label)
    return GroupResamples(group, {metric: values[metric] for metric in METRICS}, len(members), n_positive)


# ---------------------------------------------------------------------------------------------------------- groups

def read_stays(stays_path) -> pd.DataFrame:
    """The cohort columns the groups need, indexed by stay_id; a missing column is named with the file."""
    return core.read_stays(Path(stays_path), STAYS_COLUMNS, "the fairness groups")


def _age_bin(age: pd.Series) -> pd.Series:
    binned = pd.cut(pd.to_numeric(age, errors="coerce"), list(AGE_EDGES), right=False, labels=list(AGE_BINS))
    return binned.astype(object).where(binned.notna(), UNKNOWN)


def _as_group_names(values: pd.Series) -> pd.Series:
    return values.astype(object).where(values.notna(), UNKNOWN).astype(str)


def _group_order(attribute: str, name: str) -> tuple:
    """Age bins in age order, then every other group by name; 'unknown' last."""
    parts = name.split(" / ")
    keys = []
    for part, part_attribute in zip(parts, attribute.split("_x_") if "_x_" in attribute else [attribute]):
        rank = AGE_BINS.index(part) if part_attribute == "age" and part in AGE_BINS else len(AGE_BINS)
        keys.append((part == UNKNOWN, rank, part))
    return tuple(keys)


def stay_attributes(stays: pd.DataFrame, stays_path, stay_ids: np.ndarray, has_cxr: np.ndarray | None,
                    what: str) -> pd.DataFrame:
    """One row per stay of ``stay_ids`` (in order) with its group in every attribute; ``has_cxr`` (None on
    paired_test, where every stay has its X-ray) gives the X-ray availability attribute."""
    unknown = ~np.isin(stay_ids, stays.index.to_numpy())
    if unknown.any():
        raise ValueError(f"{stays_path}: no row for stay_id {stay_ids[unknown][0]} ({int(unknown.sum())} {what} "
                         "stays lack one)")
    rows = stays.loc[stay_ids]
    table = pd.DataFrame({"age": _age_bin(rows["age"]).to_numpy()})
    for attribute in SINGLE_ATTRIBUTES[1:]:
        table[attribute] = _as_group_names(rows[attribute]).to_numpy()
    if has_cxr is not None:
        table[CXR_AVAILABLE] = np.where(has_cxr, "yes", "no")
    for first, second in INTERSECTIONS:
        table[f"{first}_x_{second}"] = table[first].astype(str) + " / " + table[second].astype(str)
    return table


def make_groups(attributes: pd.DataFrame) -> list[Group]:
    """The overall group, then every group of every attribute (columns of ``attributes``) in display order."""
    groups = [Group(OVERALL, "all", np.arange(len(attributes)))]
    for attribute in attributes.columns:
        codes = attributes[attribute].to_numpy()
        for name in sorted(set(codes), key=lambda value: _group_order(attribute, value)):
            groups.append(Group(attribute, name, np.flatnonzero(codes == name)))
    return groups


# ------------------------------------------------------------------------------------------------- summaries

def _suppressed(result: GroupResamples, metric: str, min_stays: int) -> np.ndarray:
    """(K,) the group is too small to publish ``metric``: under ``min_stays`` stays, or (TPR, and so the
    equalized-odds difference) under ``min_stays`` positives."""
    small = np.full(result.n_positive.shape, result.n_stays < min_stays)
    if metric == "tpr":
        small |= result.n_positive < min_stays
    return small


def _published_counts(counts: np.ndarray, min_stays: int) -> pd.api.extensions.ExtensionArray:
    """Counts as published: those under ``min_stays`` are withheld (NA)."""
    counts = np.asarray(counts, dtype=np.int64)
    return pd.arrays.IntegerArray(counts, counts < min_stays)


def reference_group(results: list[GroupResamples]) -> int:
    """Index of an attribute's reference group: the one with the most stays ('unknown' only if nothing else)."""
    sizes = [(result.group.name != UNKNOWN, result.n_stays) for result in results]
    return max(range(len(results)), key=lambda index: sizes[index])


def _attribute_group_rows(results: list[GroupResamples], key: dict, columns: list[str], *, ci: float,
                          min_stays: int) -> pd.DataFrame:
    """The rows of one attribute's groups (group, then metric, then label column), every group and metric summarised
    in array operations."""
    n_groups, n_columns = len(results), len(columns)
    reference = reference_group(results)
    shape = (n_groups, len(METRICS), n_columns)
    parts = {name: np.full(shape, np.nan) for name in ("estimate", "ci_low", "ci_high", "difference",
                                                      "difference_low", "difference_high", "difference_p")}
    suppressed = np.zeros(shape, dtype=bool)
    for m, metric in enumerate(METRICS):  # every group at once: values and differences (W, G, K)
        values = np.stack([result.values[metric] for result in results], axis=1)
        difference = values - values[:, [reference]]
        small = np.stack([_suppressed(result, metric, min_stays) for result in results])  # (G, K)
        compared = ~(small | small[reference])
        compared[reference] = False
        summary, difference_summary = summarise_resamples(values, ci), summarise_resamples(difference, ci)
        for i, name in enumerate(("estimate", "ci_low", "ci_high")):
            parts[name][:, m] = np.where(small, np.nan, summary[..., i])
        for i, name in enumerate(("difference", "difference_low", "difference_high")):
            parts[name][:, m] = np.where(compared, difference_summary[..., i], np.nan)
        parts["difference_p"][:, m] = np.where(compared, core.bootstrap_p_value(difference), np.nan)
        suppressed[:, m] = small
    n_stays = np.repeat([result.n_stays for result in results], len(METRICS) * n_columns)
    n_positive = np.broadcast_to(np.stack([result.n_positive for result in results])[:, None, :], shape)
    return pd.DataFrame({
        **key, "label": np.tile(columns, n_groups * len(METRICS)), "attribute": results[0].group.attribute,
        "group": np.repeat([result.group.name for result in results], len(METRICS) * n_columns),
        "metric": np.tile(np.repeat(METRICS, n_columns), n_groups),
        "estimate": parts["estimate"].ravel(), "ci_low": parts["ci_low"].ravel(), "ci_high": parts["ci_high"].ravel(),
        "n_stays": _published_counts(n_stays, min_stays),
        "n_positive": _published_counts(n_positive.ravel(), min_stays), "suppressed": suppressed.ravel(),
        "reference_group": results[reference].group.name,
        **{name: parts[name].ravel() for name in ("difference", "difference_low", "difference_high",
                                                  "difference_p")}}, columns=COLUMNS)


def group_rows(results: list[GroupResamples], key: dict, columns: list[str], *, ci: float, min_stays: int
               ) -> pd.DataFrame:
    """Long-form rows (estimate, CI, counts, suppressed) of one model's groups, each with its difference to its
    attribute's reference group (:func:`reference_group`) on the same resamples: estimate, CI and bootstrap p."""
    by_attribute: dict[str, list[GroupResamples]] = {}
    for result in results:
        by_attribute.setdefault(result.group.attribute, []).append(result)
    return pd.concat([_attribute_group_rows(members, key, columns, ci=ci, min_stays=min_stays)
                      for members in by_attribute.values()], ignore_index=True)


def _spread(values: np.ndarray, included: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per weight row and label column, the max and min over the ``included`` groups (G, K) of ``values``
    (G, W, K); NaN where fewer than two groups are included or an included group is undefined in that row."""
    mask = included[:, None, :]
    highest = np.where(mask, values, -np.inf).max(axis=0)
    lowest = np.where(mask, values, np.inf).min(axis=0)
    undefined = (mask & ~np.isfinite(values)).any(axis=0) | (included.sum(axis=0) < 2)[None, :]
    return np.where(undefined, np.nan, highest), np.where(undefined, np.nan, lowest)


def attribute_gaps(results: list[GroupResamples], min_stays: int) -> dict[str, dict[str, tuple]]:
    """Per metric (and the equalized-odds difference) of one attribute's groups: (gap (W, K), ratio (W, K),
    worst group index per K or None, included (G, K)). Groups that are suppressed or undefined on the full set
    are left out."""
    out = {}
    included_of = {}
    for metric in METRICS:
        values = np.stack([result.values[metric] for result in results])  # (G, W, K)
        included = np.stack([~_suppressed(result, metric, min_stays) for result in results]) & np.isfinite(values[:, 0])
        highest, lowest = _spread(values, included)
        full_set = np.where(included, values[:, 0], np.inf if metric not in HIGHER_IS_WORSE else -np.inf)
        worst = full_set.argmax(axis=0) if metric in HIGHER_IS_WORSE else full_set.argmin(axis=0)
        out[metric] = (highest - lowest, _ratio(lowest, highest), np.where(included.any(axis=0), worst, -1), included)
        included_of[metric] = (values, included)
    # equalized odds (fairlearn's between_groups, worst_case): max of the TPR and FPR gaps over the groups with
    # enough stays and positives
    eligible = included_of["tpr"][1] & included_of["fpr"][1]  # TPR's suppression is the equalized-odds rule
    gaps = [np.subtract(*_spread(included_of[metric][0], eligible)) for metric in ("tpr", "fpr")]
    out[EQUALIZED_ODDS] = (np.maximum(*gaps), np.full(gaps[0].shape, np.nan), None, eligible)
    return out


def gap_rows(gaps: dict[str, tuple], results: list[GroupResamples], key: dict, columns: list[str], *, ci: float
             ) -> list[dict]:
    """Long-form rows of one attribute's gaps, ratios and worst groups."""
    rows = []
    for metric, (gap, ratio, worst, included) in gaps.items():
        gap_summary, ratio_summary = summarise_resamples(gap, ci), summarise_resamples(ratio, ci)
        for k, label in enumerate(columns):
            worst_group = results[worst[k]].group.name if worst is not None and worst[k] >= 0 else ""
            rows.append(dict(**key, label=label, attribute=results[0].group.attribute, metric=metric,
                             estimate=gap_summary[k, 0], ci_low=gap_summary[k, 1], ci_high=gap_summary[k, 2],
                             ratio=ratio_summary[k, 0], ratio_low=ratio_summary[k, 1],
                             ratio_high=ratio_summary[k, 2], worst_group=worst_group,
                             n_groups=int(included[:, k].sum()), n_groups_left_out=int((~included[:, k]).sum())))
    return rows


def fusion_effect_rows(fusion_gaps: dict, reference_gaps: dict, reference: str, key: dict, columns: list[str], *,
                       ci: float) -> list[dict]:
    """Per attribute, metric and label of one fusion model (``key`` names it): its gap minus the reference (best
    unimodal) model's, on the same resamples, with CI and bootstrap p. ``*_gaps``: (attribute, metric) -> (W, K)."""
    rows = []
    for (attribute, metric), gap in fusion_gaps.items():
        difference = gap - reference_gaps[attribute, metric]
        summary, p_value = summarise_resamples(difference, ci), core.bootstrap_p_value(difference)
        for k, label in enumerate(columns):
            rows.append(dict(**key, reference=reference, label=label, attribute=attribute, metric=metric,
                             estimate=summary[k, 0], ci_low=summary[k, 1], ci_high=summary[k, 2], p=p_value[k]))
    return rows


def _masked_spread(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of ``values`` (C, G), max − min over the entries where ``mask``; 0 where fewer than one."""
    highest = np.where(mask, values, -np.inf).max(axis=1)
    lowest = np.where(mask, values, np.inf).min(axis=1)
    return np.where(mask.any(axis=1), highest - lowest, 0.0)


def missing_correlation_rows(groups: pd.DataFrame, missing_rates: dict[tuple[str, str], float]) -> list[dict]:
    """Per model, label and metric of ``groups`` (one task and eval set, full-set estimates): Spearman's rho
    between a group's X-ray missing rate and its deficit (group − overall), over the published groups of every
    attribute except X-ray availability itself; p as ``scipy.stats.spearmanr`` (t distribution, n − 2 degrees of
    freedom). All (model, label, metric) rows at once: ranks within each row's published groups, then Pearson's r
    of the ranks."""
    from scipy.stats import rankdata, t as t_distribution

    keys = ["model", "label", "metric"]
    overall = groups.loc[groups["attribute"] == OVERALL].set_index(keys)["estimate"]
    scored = groups.loc[~groups["attribute"].isin([OVERALL, CXR_AVAILABLE])]
    estimates = scored.set_index([*keys, "attribute", "group"])["estimate"].unstack(["attribute", "group"])
    estimates = estimates.reindex(overall.index)  # (C, G) in the order the rows came
    rates = np.array([missing_rates[column] for column in estimates.columns], dtype=np.float64)
    values = estimates.to_numpy(np.float64)
    published = np.isfinite(values)
    n_groups = published.sum(axis=1)
    deficits = values - overall.to_numpy(np.float64)[:, None]
    usable = np.isfinite(deficits)
    defined = ((n_groups >= 3) & np.isfinite(overall.to_numpy(np.float64))
               & (_masked_spread(np.broadcast_to(rates, values.shape), usable) > 0)
               & (_masked_spread(deficits, usable) > 0))
    rank_rates = rankdata(np.where(usable, rates, np.nan), axis=1, nan_policy="omit")
    rank_deficits = rankdata(np.where(usable, deficits, np.nan), axis=1, nan_policy="omit")
    centred = [np.where(usable, ranks - _mean_of_finite(ranks, axis=1)[:, None], 0.0)
               for ranks in (rank_rates, rank_deficits)]
    denominator = np.sqrt((centred[0] ** 2).sum(axis=1) * (centred[1] ** 2).sum(axis=1))
    rho = np.clip(_ratio((centred[0] * centred[1]).sum(axis=1), denominator), -1.0, 1.0)
    freedom = np.maximum(n_groups - 2, 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_statistic = rho * np.sqrt(freedom / ((1.0 + rho) * (1.0 - rho)))
    p_value = 2.0 * t_distribution.sf(np.abs(t_statistic), freedom)
    rho, p_value = np.where(defined, rho, np.nan), np.where(defined, p_value, np.nan)
    return [dict(model=model, label=label, metric=metric, rho=float(rho[c]), p=float(p_value[c]),
                 n_groups=int(n_groups[c])) for c, (model, label, metric) in enumerate(overall.index)]


# --------------------------------------------------------------------------------------------------- the run

@dataclass
class FairnessTables:
    """The rows of every table, gathered over tasks and evaluation sets (groups: one frame per task and set)."""

    groups: list[pd.DataFrame]
    gaps: list
    fusion_effect: list
    missing_correlation: list


@dataclass
class EvalSet:
    """The stays of one task's evaluation set with their groups and the shared resample weights."""

    attributes: pd.DataFrame
    groups: list[Group]
    has_cxr: np.ndarray
    y: np.ndarray
    weights: np.ndarray


def eval_set_groups(anchor: core.Cell, eval_set: str, stays: pd.DataFrame, stays_path, n_boot: int, seed: int
                    ) -> EvalSet:
    """Groups and weights of ``eval_set`` of ``anchor``'s task (every cell of a task shares its stays and labels:
    core.load_cells checks)."""
    stay_ids = anchor.stays(eval_set)
    has_cxr = anchor.has_cxr(eval_set)
    attributes = stay_attributes(stays, stays_path, stay_ids, has_cxr if eval_set == "partial_test" else None,
                                 f"{anchor.task} {eval_set}")
    return EvalSet(attributes, make_groups(attributes), has_cxr, anchor.labels_of(eval_set),
                   resample_weights(len(stay_ids), n_boot, seed))


class ModelSlice(NamedTuple):
    """One model on one evaluation set of one task: the unit of work spread over cores. ``reference``: the best
    unimodal model; its own slice keeps its gap resamples, which a fusion model's slice gets as
    ``reference_gaps`` to add the fusion effect."""

    task: str
    missing: str
    eval_set: str
    model: str
    reference: str | None = None
    reference_gaps: dict | None = None


def _model_rows(cells: dict, key: ModelSlice, threads: int, *, stays, stays_path, n_boot, ci, seed, min_stays
                ) -> dict:
    """Group rows, gap rows, fusion-effect rows (given the reference's gaps) and the gap resamples of one model on
    one evaluation set."""
    cell = cells[key.task, key.model, key.missing]
    columns = label_columns(cell.labels)
    evaluation = eval_set_groups(cell, key.eval_set, stays, stays_path, n_boot, seed)
    thresholds = cell_thresholds(cell)
    p_by_seed = cell.scores(key.eval_set)
    results = [group_resamples(group, evaluation.y, p_by_seed, thresholds, evaluation.weights, threads, min_stays)
               for group in evaluation.groups]
    row_key = dict(task=key.task, missing=key.missing, eval_set=key.eval_set, model=key.model)
    out = {"groups": group_rows(results, row_key, columns, ci=ci, min_stays=min_stays), "gaps": [],
           "fusion_effect": []}
    gap_resamples = {}
    for attribute in evaluation.attributes.columns:
        members = [result for result in results if result.group.attribute == attribute]
        gaps = attribute_gaps(members, min_stays)
        out["gaps"] += gap_rows(gaps, members, row_key, columns, ci=ci)
        gap_resamples.update({(attribute, metric): gap for metric, (gap, *_) in gaps.items()})
    if key.reference_gaps is not None:
        out["fusion_effect"] = fusion_effect_rows(gap_resamples, key.reference_gaps, key.reference, row_key,
                                                  columns, ci=ci)
    if key.model == key.reference:
        out["gap_resamples"] = gap_resamples
    return out


def _headline(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the macro column (multi-label tasks) or the single label."""
    multi = table.groupby("task")["label"].transform(lambda labels: (labels == MACRO).any())
    return table[~multi | (table["label"] == MACRO)]


def _estimate_text(row) -> str:
    if row.get("suppressed", False):
        return "suppressed"
    return publish.format_ci(row["estimate"], row["ci_low"], row["ci_high"])


def _wide(table: pd.DataFrame, index: list[str], metrics, text) -> pd.DataFrame:
    """One column per metric holding ``text(row)``, rows keyed by ``index`` in the order of ``table``."""
    frame = table.assign(text=table.apply(text, axis=1), _order=table.groupby(index, sort=False).ngroup())
    wide = frame.pivot(index=["_order", *index], columns="metric", values="text")
    wide = wide[[metric for metric in metrics if metric in wide.columns]]
    return wide.reset_index().drop(columns="_order").rename_axis(columns=None)


def _groups_display(groups: pd.DataFrame, min_stays: int) -> pd.DataFrame:
    shown = _headline(groups)
    shown = shown.assign(n=shown["n_stays"].astype(object).where(shown["n_stays"].notna(), f"<{min_stays}"))
    return _wide(shown, ["task", "eval_set", "attribute", "group", "model", "n"], METRICS, _estimate_text)


def _gaps_display(gaps: pd.DataFrame) -> pd.DataFrame:
    shown = _headline(gaps)
    keys = ["task", "eval_set", "attribute", "model"]
    wide = _wide(shown, keys, (*METRICS, EQUALIZED_ODDS), _estimate_text)
    for metric in ("auroc", "tpr"):
        worst = shown.loc[shown["metric"] == metric, [*keys, "worst_group"]]
        wide = wide.merge(worst.rename(columns={"worst_group": f"worst {metric}"}), on=keys, how="left")
    return wide


def _fusion_display(effect: pd.DataFrame) -> pd.DataFrame:
    shown = _headline(effect)
    shown = shown.assign(model=shown["model"] + " vs " + shown["reference"])
    text = lambda row: f"{_estimate_text(row)} (p {publish.format_p(row['p']) or 'n/a'})"  # noqa: E731
    return _wide(shown, ["task", "eval_set", "attribute", "model"], (*METRICS, EQUALIZED_ODDS), text)


def _correlation_display(correlation: pd.DataFrame) -> pd.DataFrame:
    text = lambda row: ("n/a" if not np.isfinite(row["rho"])  # noqa: E731
                        else f"{row['rho']:.2f} (p {publish.format_p(row['p'])}, {row['n_groups']} groups)")
    return _wide(_headline(correlation), ["task", "model"], METRICS, text)


def _write_sectioned(long: pd.DataFrame, make_display, stem: Path, *, title: str, notes: list[str]) -> None:
    """``publish.write_table`` with the display ``make_display(long)``, the Markdown split into one section per
    task."""
    display = make_display(long) if len(long) else long
    publish.write_table(long, stem, title=title, display=display, notes=notes)
    sections = [f"# {title}", *notes]
    for task, part in display.groupby("task", sort=True):
        sections += [f"## {task}", part.drop(columns="task").to_markdown(index=False)]
    if display.empty:
        sections.append("_No rows._")
    stem.with_name(stem.name + ".md").write_text("\n\n".join(sections) + "\n")


def _notes(*, n_boot: int, ci: float, seed: int, min_stays: int, missing: str) -> list[str]:
    return [
        f"Setting `{missing}`. Groups: age [18, 40), [40, 60), [60, 80), [80, ∞) years; gender; race; insurance; "
        "admission type; X-ray availability (`cxr_available`, partial_test only); age × race and gender × race; "
        "missing values form the group 'unknown'. partial_test holds every test stay, paired_test those with "
        "their X-ray.",
        "Threshold (TPR, FPR, PPV, positive rate): per seed and label, the score t maximising Youden's J = TPR − "
        "FPR of 'positive iff p ≥ t' on that run's own val predictions (candidates: the distinct val scores; ties: "
        "the lowest t), applied to the same seed's test scores. Seeds are pooled by averaging the per-seed metric, "
        "as in the main table. PPV is undefined where nothing is predicted positive. ECE: 10 equal-width bins.",
        f"{100 * ci:g}% percentile bootstrap CIs from {n_boot} stay resamples (seed {seed}, those of the main "
        "table), one set per task and evaluation set "
        "shared by every model, group and label. Multi-label tasks show the macro mean over labels here; the CSV "
        "holds every label.",
        f"Small cells (PhysioNet): a group with fewer than {min_stays} stays, or for TPR and the equalized-odds "
        f"difference fewer than {min_stays} positives (summed over labels for the macro mean), is suppressed: no "
        f"estimate, and left out of the gaps. Counts below {min_stays} are not published.",
    ]


def run_fairness(run_dirs, stays_path, modalities: dict[str, list[str]], tables_dir, figures_dir, *,
                 ehr_only_models=(), grid_missing=(), n_boot=1000, ci=0.95, seed=0, min_stays=10,
                 missing="natural", threads=1) -> dict[str, pd.DataFrame]:
    """Subgroup metrics, gaps, the fusion effect on gaps and the missing-rate correlation of the cells at
    ``missing``; writes the tables ``fairness_groups``, ``fairness_gaps``, ``fairness_fusion_effect`` and
    ``fairness_missing_correlation`` (CSV/MD/TeX) into ``tables_dir`` and the figure ``fairness_gaps`` (PNG/SVG)
    into ``figures_dir``. Returns the long tables by name."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    cells = core.load_cells(run_dirs, modalities, ehr_only_models, grid_missing)
    tasks = sorted({task for task, _, cell_missing in cells if cell_missing == missing})
    if not tasks:
        raise ValueError(f"no cells at missing={missing!r}; the runs have "
                         f"{sorted({key[2] for key in cells})}")
    tables = fairness_tables(cells, read_stays(stays_path), stays_path, n_boot=n_boot, ci=ci, seed=seed,
                             min_stays=min_stays, missing=missing, threads=threads)
    return _publish(tables, Path(tables_dir), Path(figures_dir), n_boot=n_boot, ci=ci, seed=seed,
                    min_stays=min_stays, missing=missing)


def fairness_tables(cells: dict, stays: pd.DataFrame, stays_path, *, n_boot=1000, ci=0.95, seed=0, min_stays=10,
                    missing="natural", threads=1) -> FairnessTables:
    """Every table's rows of the cells at ``missing``. The work is one :class:`ModelSlice` per task, evaluation set
    and model, spread over ``threads`` cores: first each task's reference (the best unimodal model on validation),
    then every other model, the fusion models with the reference's gap resamples."""
    tasks = sorted({task for task, _, cell_missing in cells if cell_missing == missing})
    compute = partial(_model_rows, stays=stays, stays_path=stays_path, n_boot=n_boot, ci=ci, seed=seed,
                      min_stays=min_stays)
    sets = [(task, eval_set) for task in tasks for eval_set in EVAL_SETS
            if core.cells_of(cells, task, missing)[0].stays(eval_set).size]
    for task in tasks:
        for eval_set in sorted(set(EVAL_SETS) - {s for t, s in sets if t == task}):
            log.warning("%s: no %s stays; skipped", task, eval_set)
    references = {}
    for task in tasks:
        unimodal = [cell for cell in core.cells_of(cells, task, missing) if len(set(cell.modalities)) == 1]
        chosen = core.best_by_validation(unimodal)
        references[task] = chosen.model if chosen is not None else None
    first = [ModelSlice(task, missing, eval_set, references[task], references[task]) for task, eval_set in sets
             if references[task]]
    done = {(key.task, key.eval_set, key.model): part
            for key, part in zip(first, core.map_slices(compute, cells, first, threads))}
    rest = []
    for task, eval_set in sets:
        reference = references[task]
        for cell in core.cells_of(cells, task, missing):
            if cell.model != reference:
                gaps = done[task, eval_set, reference]["gap_resamples"] if cell.is_fusion and reference else None
                rest.append(ModelSlice(task, missing, eval_set, cell.model, reference if gaps else None, gaps))
    done.update({(key.task, key.eval_set, key.model): part
                 for key, part in zip(rest, core.map_slices(compute, cells, rest, threads))})
    tables = FairnessTables([], [], [], [])
    for task, eval_set in sets:
        task_cells = core.cells_of(cells, task, missing)
        log.info("fairness: %s %s (%d models)", task, eval_set, len(task_cells))
        parts = [done[task, eval_set, cell.model] for cell in task_cells]
        set_groups = pd.concat([part["groups"] for part in parts], ignore_index=True)
        tables.groups.append(set_groups)
        tables.gaps += [row for part in parts for row in part["gaps"]]
        tables.fusion_effect += [row for part in parts for row in part["fusion_effect"]]
        if eval_set == "partial_test":
            has_cxr = task_cells[0].has_cxr(eval_set)
            attributes = stay_attributes(stays, stays_path, task_cells[0].stays(eval_set), has_cxr, task)
            rates = {(group.attribute, group.name): float(1 - has_cxr[group.members].mean())
                     for group in make_groups(attributes)}
            tables.missing_correlation += [
                dict(task=task, missing=missing, eval_set=eval_set, **row)
                for row in missing_correlation_rows(set_groups, rates)]
    return tables


GAP_COLUMNS = ["task", "missing", "eval_set", "model", "label", "attribute", "metric", "estimate", "ci_low", "ci_high",
               "ratio", "ratio_low", "ratio_high", "worst_group", "n_groups", "n_groups_left_out"]
FUSION_COLUMNS = ["task", "missing", "eval_set", "model", "reference", "label", "attribute", "metric", "estimate",
                  "ci_low", "ci_high", "p", "q"]
CORRELATION_COLUMNS = ["task", "missing", "eval_set", "model", "label", "metric", "rho", "p", "n_groups"]


def _publish(tables: FairnessTables, tables_dir: Path, figures_dir: Path, *, n_boot, ci, seed, min_stays, missing
             ) -> dict[str, pd.DataFrame]:
    groups = (pd.concat(tables.groups, ignore_index=True) if tables.groups
              else pd.DataFrame(columns=COLUMNS).astype({"n_stays": "Int64", "n_positive": "Int64"}))
    gaps = pd.DataFrame(tables.gaps, columns=GAP_COLUMNS)
    effect = pd.DataFrame(tables.fusion_effect, columns=FUSION_COLUMNS)
    effect["q"] = np.nan
    for _, index in effect.groupby(["task", "eval_set"]).groups.items():
        effect.loc[index, "q"] = core.benjamini_hochberg(effect.loc[index, "p"].to_numpy())
    correlation = pd.DataFrame(tables.missing_correlation, columns=CORRELATION_COLUMNS)

    notes = _notes(n_boot=n_boot, ci=ci, seed=seed, min_stays=min_stays, missing=missing)
    difference_note = ("CSV: each group's difference to its attribute's reference group (the group with the most "
                       "stays; `reference_group`), group − reference on the same resamples, with CI and two-sided "
                       "bootstrap p (`difference_p`); empty where either group is suppressed.")
    n_suppressed = int(groups["suppressed"].sum())
    suppression = (f"Suppressed: {n_suppressed} of {len(groups)} group rows (every label, metric and model in the "
                   f"CSV); {int(_headline(groups)['suppressed'].sum())} of the rows shown.")
    _write_sectioned(groups, lambda table: _groups_display(table, min_stays), tables_dir / "fairness_groups",
                     title="Performance by patient group", notes=[*notes, difference_note, suppression])
    gap_note = ("Gap: max − min over the published groups of an attribute, its CI from the same resamples. A gap is "
                "≥ 0 by construction and its resamples are biased upward (the max of noisy values), so the CI of a "
                "small gap may lie above the estimate: compare gaps between models (fusion effect) rather than with "
                "0. Ratio: min / max (CSV); worst group: the lowest value (the highest for FPR and ECE; for the "
                "positive rate, the group least often flagged). Equalized odds: max of the TPR and FPR gaps over the "
                "groups with enough stays and positives (fairlearn's equalized_odds_difference).")
    _write_sectioned(gaps, _gaps_display, tables_dir / "fairness_gaps",
                     title="Disparity between patient groups", notes=[*notes, gap_note])
    effect_note = ("Each fusion model's gap minus the gap of the best unimodal model (highest validation macro "
                   "AUPRC among the single-modality models), on the same resamples; > 0: fusion widens the gap. "
                   "p: two-sided bootstrap p; q (CSV): Benjamini–Hochberg over the rows of a task and evaluation "
                   "set.")
    _write_sectioned(effect, _fusion_display, tables_dir / "fairness_fusion_effect",
                     title="Does fusion change disparity?", notes=[*notes, effect_note])
    correlation_note = ("partial_test. Spearman's rho between a group's X-ray missing rate (share of its stays "
                        "without an X-ray) and its deficit (group − overall value), over the published groups of "
                        "every attribute but X-ray availability. Groups overlap (an intersection lies inside its "
                        "attributes' groups), so p is descriptive. For FPR and ECE a positive deficit is worse.")
    _write_sectioned(correlation, _correlation_display, tables_dir / "fairness_missing_correlation",
                     title="Gap versus X-ray missing rate", notes=[notes[0], correlation_note])
    publish.save_figure(gap_figure(gaps), figures_dir / "fairness_gaps")
    return {"fairness_groups": groups, "fairness_gaps": gaps, "fairness_fusion_effect": effect,
            "fairness_missing_correlation": correlation}


def gap_figure(gaps: pd.DataFrame):
    """Per task, the AUROC and TPR gaps of every attribute with their CIs per model (partial_test; macro or the
    single label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = gaps[(gaps["eval_set"] == "partial_test") & gaps["metric"].isin(["auroc", "tpr"])]
    shown = _headline(shown) if len(shown) else shown
    if shown.empty or not np.isfinite(shown["estimate"].to_numpy(np.float64)).any():
        return publish.empty_figure("No partial_test gaps to plot.")
    tasks, models = sorted(shown["task"].unique()), sorted(shown["model"].unique())
    attributes = list(dict.fromkeys(shown["attribute"]))
    slot = len(models) + 1
    colours = plt.colormaps["tab10"]
    figure, axes = plt.subplots(len(tasks), 2, figsize=(11, 0.9 + 0.16 * slot * len(attributes) * len(tasks)),
                                squeeze=False)
    for row, task in enumerate(tasks):
        for col, metric in enumerate(("auroc", "tpr")):
            axis = axes[row, col]
            part = shown[(shown["task"] == task) & (shown["metric"] == metric)]
            for m, model in enumerate(models):
                rows = part[part["model"] == model].set_index("attribute").reindex(attributes)
                positions = np.arange(len(attributes)) * slot + m
                axis.hlines(positions, rows["ci_low"], rows["ci_high"], color=colours(m % 10), linewidth=1.2)
                axis.plot(rows["estimate"], positions, "o", color=colours(m % 10), markersize=3.5, label=model)
            axis.set_yticks(np.arange(len(attributes)) * slot + (len(models) - 1) / 2, attributes)
            axis.invert_yaxis()
            axis.set_xlim(left=0)
            axis.set_title(f"{task}: {metric.upper()} gap (max − min), partial_test", fontsize=9)
            axis.grid(axis="x", alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure
