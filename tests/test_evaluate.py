"""Tests of the evaluation stage: metrics, vectorised bootstrap and the results table."""
from __future__ import annotations

import json
import os
import shlex
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrcxr.evaluate.aggregate import COLUMNS, aggregate_runs, rerun_command, run_aggregate
from ehrcxr.evaluate.bootstrap import (
    bootstrap_ci, bootstrap_metrics, resample_counts, summarise_resamples, weighted_auprc, weighted_auroc,
)
from ehrcxr.evaluate.metrics import METRICS, auprc, auroc, macro, per_label
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


def test_per_label_named_metrics_equal_scikit_learn_with_ties_and_single_class_labels():
    rng = np.random.default_rng(11)
    y = (rng.random((300, 6)) < 0.2).astype(int)
    y[:, 5] = 0  # one class only: NaN
    p = np.round(rng.random((300, 6)), 1)  # ten distinct scores: many ties
    for name, reference in (("auroc", roc_auc_score), ("auprc", average_precision_score)):
        values = per_label(y, p, name)
        np.testing.assert_allclose(values[:5], [reference(y[:, j], p[:, j]) for j in range(5)], rtol=0, atol=1e-12)
        assert np.isnan(values[5])
        # a metric given as a function (here scikit-learn's own) is called as it is
        np.testing.assert_allclose(per_label(y, p, METRICS[name]), values, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="labels must be 0/1"):
        per_label(np.array([[0], [2]]), np.array([[0.1], [0.2]]), "auroc")


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


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 16, 17, 250])
def test_running_sums_equal_cumsum(n):
    from ehrcxr.evaluate.bootstrap import _running_sums

    w = np.random.default_rng(n).integers(0, 4, (n, 5)).astype(np.int32)
    got = _running_sums(w)
    assert got.shape == (n + 1, 5) and got.dtype == np.int32 and not got[0].any()
    np.testing.assert_array_equal(got[1:], np.cumsum(w, axis=0))


@pytest.mark.parametrize("n_rows", [3, 6, 1001])
def test_summarise_resamples_equals_nanpercentile(n_rows):
    rng = np.random.default_rng(n_rows)
    values = rng.normal(size=(n_rows, 4, 3))
    values[1:, 1, 0] = np.nan  # no finite resample: CI undefined
    values[1::3, 2, 1] = np.nan  # some resamples undefined: the percentile of the others
    values[2, 3, 2] = np.inf  # an infinite value counts as undefined
    got = summarise_resamples(values, ci=0.9)
    rest = np.where(np.isfinite(values[1:]), values[1:], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN column
        expected = np.nanpercentile(rest, [5, 95], axis=0)
    np.testing.assert_array_equal(got[..., 0], values[0])
    np.testing.assert_allclose(got[..., 1], expected[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[..., 2], expected[1], rtol=0, atol=1e-12)
    assert np.isnan(got[1, 0, 1:]).all() and np.isfinite(got[2, 1, 1:]).all()


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


def _write_run(root, task, model, missing, seed, labels, stays, y, p, selection_metric="val_auprc"):
    """A run directory whose eval sets hold ``stays`` ('paired', 'partial' stay ids), labels ``y`` (indexed by
    stay_id) and probabilities ``p`` (row stay_id - 1000)."""
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
        {"task": task, "model": model, "missing": missing, "seed": seed, "labels": labels,
         "selection_metric": selection_metric}))
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
    seed1, seed2 = runs["dirs"][:2]  # mortality, seeds 1 and 2; seed 2 is the newer run
    frame = pd.read_parquet(seed1 / "predictions.parquet")
    frame.loc[frame["eval_set"] == "paired_test", "stay_id"] += 1
    frame.to_parquet(seed1 / "predictions.parquet")
    os.utime(seed1 / "predictions.parquet", ns=(10**18, 10**18))
    os.utime(seed2 / "predictions.parquet", ns=(2 * 10**18, 2 * 10**18))
    # stays 1000, 1002, ..., 1038 became 1001, ..., 1039: all 20 differ
    with pytest.raises(ValueError, match=f"1 of 4 runs are outdated.*\n  {seed1}: 20 paired_test stays, the newest "
                                         "run 20 \\(20 only here, 20 only there\\)\n"):
        aggregate_runs(runs["dirs"], runs["root"] / "t.csv", runs["root"] / "t.md", n_boot=10)


def _age(run_dir, seconds: int) -> None:
    """Date the run's predictions ``seconds`` after a fixed moment (the newest run of a task is the reference)."""
    stamp = (1_700_000_000 + seconds) * 10**9
    os.utime(run_dir / "predictions.parquet", ns=(stamp, stamp))


def test_every_outdated_run_is_named_in_one_error_with_one_rerun_command(tmp_path):
    stay_ids = np.arange(1000, 1012)
    y = pd.DataFrame({"mortality": np.tile([0, 1, 0], 4)}, index=stay_ids)
    p = np.linspace(0.05, 0.95, 12)[:, None]
    current = {"partial": stay_ids, "paired": stay_ids[::2]}  # 6 paired stays
    root = tmp_path / "runs"
    # trained before an image became unusable: one paired stay more (1001)
    old_index = _write_run(root, "mortality", "ehr_lstm", "natural", 1, ["mortality"],
                           {"partial": stay_ids, "paired": np.r_[stay_ids[::2], 1001]}, y, p)
    # trained on an older cohort, in which stay 1004 (a death now) had not died
    assert y.loc[1004, "mortality"] == 1
    old_y = y.copy()
    old_y.loc[1004, "mortality"] = 0
    old_cohort = _write_run(root, "mortality", "ehr_transformer", "natural", 1, ["mortality"], current, old_y, p)
    fresh = _write_run(root, "mortality", "drfuse", "natural", 1, ["mortality"], current, y, p)
    for seconds, run_dir in enumerate([old_index, old_cohort, fresh]):
        _age(run_dir, seconds)
    with pytest.raises(ValueError) as error:
        aggregate_runs([old_index, old_cohort, fresh], tmp_path / "t.csv", tmp_path / "t.md", n_boot=10)
    lines = str(error.value).splitlines()
    assert lines[0].startswith("2 of 3 runs are outdated") and f"mortality: {fresh}" in lines[0]
    assert lines[1:3] == [
        f"  {old_index}: 7 paired_test stays, the newest run 6 (1 only here, 0 only there)",
        f"  {old_cohort}: paired_test y_mortality of stay_id 1004 differs from the newest run's; "
        "partial_test y_mortality of stay_id 1004 differs from the newest run's",
    ]
    assert shlex.split(lines[-1]) == ["snakemake", "--cores", "all", "--forcerun", str(old_index / "metrics.json"),
                                      str(old_cohort / "metrics.json")]
    assert lines[-1].strip() == rerun_command([old_index, old_cohort])
    # once both are rerun (newer than the reference and agreeing with it), the table is built
    _write_run(tmp_path / "rerun", "mortality", "ehr_lstm", "natural", 1, ["mortality"], current, y, p)
    table = aggregate_runs([tmp_path / "rerun/mortality/ehr_lstm/natural/seed1", fresh], tmp_path / "t.csv",
                           tmp_path / "t.md", n_boot=10)
    assert set(table["model"]) == {"ehr_lstm", "drfuse"}


def test_a_run_without_the_selection_record_is_outdated(runs):
    metrics_path = runs["dirs"][3] / "metrics.json"  # phenotyping, seed 2
    metrics = json.loads(metrics_path.read_text())
    del metrics["selection_metric"]
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(ValueError, match=r"1 of 4 runs are outdated.*\n  .*phenotyping/lstm/natural/seed2: its "
                                         "metrics.json does not record the model-selection criterion"):
        aggregate_runs(runs["dirs"], runs["root"] / "t.csv", runs["root"] / "t.md", n_boot=10)
    metrics_path.write_text(json.dumps({**metrics, "selection_metric": "val_f1"}))
    with pytest.raises(ValueError, match="selection_metric 'val_f1' is not one of"):
        aggregate_runs(runs["dirs"], runs["root"] / "t.csv", runs["root"] / "t.md", n_boot=10)


def test_rows_carry_counts_single_class_labels_and_selection(tmp_path):
    # stay  ph_a ph_b ph_c  mortality   paired
    # 1000   1    0    0      1          yes
    # 1001   0    0    1      0
    # 1002   0    0    1      0          yes
    # 1003   1    0    0      0          yes (mortality) / no (phenotyping)
    # 1004   1    0    0      0          yes
    # 1005   0    0    1      1
    labels = ["ph_a", "ph_b", "ph_c"]
    stay_ids = np.arange(1000, 1006)
    y = pd.DataFrame({"ph_a": [1, 0, 0, 1, 1, 0], "ph_b": 0, "ph_c": [0, 1, 1, 0, 0, 1],
                      "mortality": [1, 0, 0, 0, 0, 1]}, index=stay_ids)
    p = np.random.default_rng(0).random((6, 3))
    root = tmp_path / "runs"
    phenotyping = {"partial": stay_ids, "paired": np.array([1000, 1002, 1004])}
    mortality = {"partial": stay_ids, "paired": np.array([1000, 1002, 1003, 1004])}
    dirs = [_write_run(root, "phenotyping", "lstm", "natural", 1, labels, phenotyping, y, p, "val_auprc"),
            _write_run(root, "phenotyping", "lstm", "natural", 2, labels, phenotyping, y, p[::-1], "val_loss"),
            _write_run(root, "mortality", "lstm", "natural", 1, ["mortality"], mortality, y, p[:, :1], "val_loss"),
            _write_run(root, "mortality", "fusion", "natural", 1, ["mortality"], mortality, y, p[:, 1:2])]
    out_csv, out_md = tmp_path / "main.csv", tmp_path / "main.md"
    aggregate_runs(dirs, out_csv, out_md, n_boot=20)
    table = pd.read_csv(out_csv, keep_default_na=False)
    assert list(table.columns) == COLUMNS
    table = table.set_index(["task", "model", "eval_set", "metric"])

    def counts(*key):
        row = table.loc[key]
        return (row.n_stays, row.n_positive, row.n_labels_scored, row.single_class_labels, row.selection)

    # paired phenotyping stays 1000, 1002, 1004: ph_a 2 positive, ph_b none, ph_c 1 -> 3 positive labels in all;
    # n is each seed's eval set (3 stays), not the 6 predictions of the two seeds
    assert counts("phenotyping", "lstm", "paired_test", "auroc") == (3, 3, 2, "ph_b", "mixed")
    assert counts("phenotyping", "lstm", "partial_test", "auprc") == (6, 6, 2, "ph_b", "mixed")
    assert counts("phenotyping", "lstm", "partial_test", "auroc:ph_a") == (6, 3, 1, "", "mixed")
    assert counts("phenotyping", "lstm", "paired_test", "auprc:ph_b") == (3, 0, 0, "ph_b", "mixed")
    assert counts("mortality", "lstm", "paired_test", "auroc") == (4, 1, 1, "", "val_loss")
    assert counts("mortality", "fusion", "partial_test", "auroc") == (6, 2, 1, "", "val_auprc")
    assert table.loc[("phenotyping", "lstm", "paired_test", "auroc:ph_b"), "estimate"] == ""  # NaN: undefined

    markdown = out_md.read_text()
    assert ("**Selected without validation AUPRC**: mortality/lstm/natural (val_loss), "
            "phenotyping/lstm/natural (mixed).") in markdown
    assert "## mortality — paired_test\n\nn = 4 stays (every model and seed), 1 positive.\n" in markdown
    assert ("## phenotyping — paired_test\n\nn = 3 stays (every model and seed); 3 positive labels (positive stays "
            "summed over the 3 labels); 2 of 3 labels have both classes. A single class, so undefined, left out of "
            "the macro mean: ph_b.\n") in markdown
    assert "## phenotyping — partial_test\n\nn = 6 stays (every model and seed); 6 positive labels" in markdown


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
