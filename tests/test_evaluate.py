"""Tests of the evaluation stage: metrics, vectorised bootstrap and the results table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrcxr.evaluate.aggregate import COLUMNS, aggregate_runs, run_aggregate
from ehrcxr.evaluate.bootstrap import (
    bootstrap_ci, bootstrap_metrics, resample_counts, weighted_auprc, weighted_auroc,
)
from ehrcxr.evaluate.metrics import auprc, auroc, macro
from ehrcxr.resources import phenotype_labels

SKLEARN = {"auroc": roc_auc_score, "auprc": average_precision_score}


def _tied_scores(rng, n):
    """Scores on a coarse grid so that many stays tie."""
    return np.round(rng.random(n), 1)


def test_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 80)
        p = _tied_scores(rng, 80)
        assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_hand_computed_values_and_macro_skips_single_class_labels():
    # positives at 0.35 and 0.8, negatives at 0.1 and 0.4: 3 of 4 pairs ordered -> AUROC 0.75;
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5 * 1/1 + 0.5 * 2/3 = 5/6
    y = np.array([[0, 0], [0, 0], [1, 0], [1, 0]])
    p = np.array([[0.1, 0.3], [0.4, 0.2], [0.35, 0.9], [0.8, 0.5]])
    assert auroc(y[:, 0], p[:, 0]) == pytest.approx(0.75)
    assert auprc(y[:, 0], p[:, 0]) == pytest.approx(5 / 6)
    assert np.isnan(auroc(y[:, 1], p[:, 1]))
    assert macro(y, p, "auroc") == pytest.approx(0.75)  # the all-negative label is left out
    assert macro(y, p, "auprc") == pytest.approx(5 / 6)
    assert np.isnan(macro(y[:, 1:], p[:, 1:], "auroc"))
    with pytest.raises(ValueError, match="row 1"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        auprc([0, 1, 1], [0.1, np.nan, 0.3])


def test_resample_counts_are_draws_with_replacement():
    counts = resample_counts(50, 200, np.random.default_rng(3))
    assert counts.shape == (200, 50)
    assert (counts.sum(axis=1) == 50).all() and (counts >= 0).all()
    # each stay is drawn Binomial(50, 1/50) times per resample: mean 1
    assert counts.mean() == pytest.approx(1.0)
    assert 0.8 < counts.var() < 1.2


def test_weighted_metrics_equal_sklearn_on_expanded_resamples():
    rng = np.random.default_rng(1)
    n = 70
    y = rng.integers(0, 2, n)
    p = _tied_scores(rng, n)
    w = resample_counts(n, 40, rng)
    w[0] = 1  # the full set
    w[1, ::2] = 0  # many zero weights
    w[2] = rng.integers(0, 4, n)  # arbitrary integer weights
    expected_auroc = [roc_auc_score(np.repeat(y, row), np.repeat(p, row)) for row in w]
    expected_auprc = [average_precision_score(np.repeat(y, row), np.repeat(p, row)) for row in w]
    np.testing.assert_allclose(weighted_auroc(y, p, w), expected_auroc, atol=1e-12)
    np.testing.assert_allclose(weighted_auprc(y, p, w), expected_auprc, atol=1e-12)
    # a weight vector keeping only negatives: both metrics undefined
    only_negatives = (y == 0).astype(int)
    assert np.isnan(weighted_auroc(y, p, only_negatives))
    assert np.isnan(weighted_auprc(y, p, only_negatives))


def _slow_bootstrap(y, p_by_seed, metric, n_boot, ci, seed):
    """Reference: sklearn on every expanded resample, macro over labels with both classes."""
    fn = SKLEARN[metric]

    def pooled_macro(idx):
        per_seed = []
        for p in p_by_seed:
            values = [fn(y[idx, j], p[idx, j]) for j in range(y.shape[1]) if len(set(y[idx, j])) == 2]
            per_seed.append(np.mean(values))
        return np.mean(per_seed)

    counts = resample_counts(len(y), n_boot, np.random.default_rng(seed))
    stats = [pooled_macro(np.repeat(np.arange(len(y)), row)) for row in counts]
    low, high = np.percentile(stats, [50 * (1 - ci), 50 * (1 + ci)])
    return pooled_macro(np.arange(len(y))), low, high


@pytest.mark.parametrize("metric", ["auroc", "auprc"])
def test_bootstrap_ci_equals_slow_sklearn_loop(metric):
    rng = np.random.default_rng(2)
    n = 40
    y = np.column_stack([rng.integers(0, 2, n), rng.integers(0, 2, n), np.zeros(n, int)])
    y[[3, 17], 2] = 1  # rare label: absent from a good share of the resamples
    p_by_seed = [_tied_scores(rng, (n, 3)) for _ in range(2)]
    got = bootstrap_ci(y, p_by_seed, metric, n_boot=60, ci=0.9, seed=7)
    np.testing.assert_allclose(got, _slow_bootstrap(y, p_by_seed, metric, 60, 0.9, 7), atol=1e-12)


def test_seed_pooling_averages_seed_estimates():
    y = np.array([[0], [0], [1], [1]])
    seed_a = np.array([[0.1], [0.4], [0.35], [0.8]])  # AUROC 0.75 (hand-computed above)
    seed_b = np.array([[0.1], [0.2], [0.3], [0.4]])  # perfect ranking: AUROC 1
    estimate, low, high = bootstrap_ci(y, [seed_a, seed_b], "auroc", n_boot=50)
    assert estimate == pytest.approx(0.875)
    assert low <= high
    [(macro_ci, label_ci)] = bootstrap_metrics(y, [seed_a, seed_b], ["auroc"], n_boot=50)
    assert label_ci[0, 0] == pytest.approx(0.875)


def test_bootstrap_accepts_a_metric_without_weighted_form():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (30, 2))
    p = [rng.random((30, 2))]
    vectorised = bootstrap_ci(y, p, "auroc", n_boot=20, seed=1)
    generic = bootstrap_ci(y, p, lambda yy, pp: roc_auc_score(yy, pp), n_boot=20, seed=1)
    np.testing.assert_allclose(vectorised, generic, atol=1e-12)
    p[0][5, 1] = np.inf
    with pytest.raises(ValueError, match="row 5, column 1"):
        bootstrap_ci(y, p, "auroc", n_boot=5)


# ---------------------------------------------------------------- aggregation


def _write_run(root, task, model, missing, seed, labels, stays, y, p):
    run = root / task / model / missing / f"seed{seed}"
    run.mkdir(parents=True)
    frame = pd.DataFrame({
        "stay_id": np.concatenate([stays["paired"], stays["partial"]]),
        "eval_set": ["paired_test"] * len(stays["paired"]) + ["partial_test"] * len(stays["partial"]),
        "has_cxr": np.r_[np.ones(len(stays["paired"]), bool), np.isin(stays["partial"], stays["paired"])],
    })
    for j, label in enumerate(labels):
        frame[f"y_{label}"] = y.loc[frame["stay_id"], label].to_numpy()
        frame[f"p_{label}"] = p[frame["stay_id"].to_numpy() - 1000, j]
    frame.to_parquet(run / "predictions.parquet")
    (run / "metrics.json").write_text(json.dumps(
        {"task": task, "model": model, "missing": missing, "seed": seed, "labels": labels}))
    return run


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(5)
    stay_ids = np.arange(1000, 1040)
    stays = {"partial": stay_ids, "paired": stay_ids[::2]}
    labels = {"mortality": ["mortality"], "phenotyping": phenotype_labels()}
    all_labels = ["mortality"] + phenotype_labels()
    y = pd.DataFrame(rng.integers(0, 2, (40, len(all_labels))), index=stay_ids, columns=all_labels)
    oracle = pd.DataFrame(rng.random((45, len(all_labels))), columns=all_labels)
    oracle.insert(0, "stay_id", np.arange(1000, 1045))
    oracle.to_parquet(tmp_path / "oracle.parquet")
    preds, dirs = {}, []
    for task, task_labels in labels.items():
        for seed in (1, 2):
            preds[task, seed] = rng.random((40, len(task_labels)))
            dirs.append(_write_run(tmp_path / "runs", task, "lstm", "natural", seed, task_labels, stays,
                                   y, preds[task, seed]))
    return dict(root=tmp_path, dirs=dirs, y=y, preds=preds, oracle=oracle, stays=stays, labels=labels)


def test_aggregate_runs_table(runs):
    out_csv, out_md = runs["root"] / "tables" / "main.csv", runs["root"] / "tables" / "main.md"
    table = aggregate_runs(runs["dirs"], out_csv, out_md, oracle_path=runs["root"] / "oracle.parquet",
                           n_boot=30, seed=0)
    written = pd.read_csv(out_csv)
    assert list(written.columns) == COLUMNS
    assert "stay_id" not in out_md.read_text()
    # mortality: 2 eval sets x 2 metrics; phenotyping: 2 eval sets x 2 metrics x (macro + 25 labels);
    # the same again for the oracle
    assert len(written) == 2 * (2 * 2 + 2 * 2 * 26)
    assert table.equals(table.sort_values(["task", "eval_set", "metric", "model", "missing"]))
    model_rows = written[written["model"] == "lstm"]
    assert (model_rows["n_seeds"] == 2).all()
    assert (written.loc[written["model"] == "oracle", "missing"] == "—").all()

    y, oracle = runs["y"], runs["oracle"].set_index("stay_id")
    paired = runs["stays"]["paired"]

    def row(task, model, eval_set, metric):
        hit = written[(written.task == task) & (written.model == model) & (written.eval_set == eval_set)
                      & (written.metric == metric)]
        assert len(hit) == 1
        return hit.iloc[0]

    oracle_mort = row("mortality", "oracle", "paired_test", "auroc")
    assert oracle_mort.estimate == pytest.approx(
        roc_auc_score(y.loc[paired, "mortality"], oracle.loc[paired, "mortality"]))
    assert oracle_mort.ci_low <= oracle_mort.estimate <= oracle_mort.ci_high
    ph = phenotype_labels()
    oracle_ph = row("phenotyping", "oracle", "partial_test", "auprc")
    assert oracle_ph.estimate == pytest.approx(np.mean(
        [average_precision_score(y[label], oracle.loc[y.index, label]) for label in ph]))
    seed_values = [roc_auc_score(y.loc[paired, "mortality"], runs["preds"]["mortality", s][::2, 0]) for s in (1, 2)]
    assert row("mortality", "lstm", "paired_test", "auroc").estimate == pytest.approx(np.mean(seed_values))
    label = ph[3]
    seed_values = [average_precision_score(y[label], runs["preds"]["phenotyping", s][:, 3]) for s in (1, 2)]
    assert row("phenotyping", "lstm", "partial_test", f"auprc:{label}").estimate == pytest.approx(np.mean(seed_values))

    markdown = out_md.read_text()
    assert "## mortality — paired_test" in markdown and "## phenotyping — partial_test" in markdown
    estimate = row("mortality", "oracle", "paired_test", "auroc")
    assert f"{estimate.estimate:.3f} [{estimate.ci_low:.3f}, {estimate.ci_high:.3f}]" in markdown


def test_run_aggregate_accepts_files_and_config_params(runs):
    files = [d / "metrics.json" for d in runs["dirs"]] + [d / "predictions.parquet" for d in runs["dirs"]]
    table = run_aggregate(files, runs["root"] / "t.csv", runs["root"] / "t.md", None,
                          {"n_bootstrap": 20, "ci": 0.9, "seed": 3})
    assert set(table["model"]) == {"lstm"} and len(table) == 2 * 2 + 2 * 2 * 26


def test_mismatched_stays_across_seeds_raise(runs):
    seed2 = runs["dirs"][1]  # mortality, seed 2
    frame = pd.read_parquet(seed2 / "predictions.parquet")
    frame.loc[frame["eval_set"] == "paired_test", "stay_id"] += 1
    frame.to_parquet(seed2 / "predictions.parquet")
    with pytest.raises(ValueError, match="paired_test stays differ across seeds of \\(mortality, lstm, natural\\)"):
        aggregate_runs(runs["dirs"], runs["root"] / "t.csv", runs["root"] / "t.md", n_boot=10)


def test_bad_probability_and_missing_runs(runs):
    seed1 = runs["dirs"][0]
    frame = pd.read_parquet(seed1 / "predictions.parquet")
    frame.loc[4, "p_mortality"] = np.nan
    frame.to_parquet(seed1 / "predictions.parquet")
    with pytest.raises(ValueError, match="column p_mortality, row 4"):
        aggregate_runs(runs["dirs"], runs["root"] / "t.csv", runs["root"] / "t.md", n_boot=10)
    absent = runs["root"] / "runs" / "mortality" / "lstm" / "natural" / "seed9"
    with pytest.raises(FileNotFoundError, match="seed9"):
        aggregate_runs(runs["dirs"][2:] + [absent], runs["root"] / "t.csv", runs["root"] / "t.md", n_boot=10)
    table = aggregate_runs(runs["dirs"][2:] + [absent], runs["root"] / "t.csv", runs["root"] / "t.md",
                           n_boot=10, allow_missing=True)
    assert set(table["task"]) == {"phenotyping"}
