"""Fairness analysis on hand-built runs: every published number is checked against an independent computation
(sklearn, fairlearn, a slow loop over expanded resamples, a hand-computed ECE)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame, equalized_odds_difference, false_positive_rate, selection_rate, true_positive_rate,
)
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score, precision_score, roc_auc_score, roc_curve

from analysis_runs import noisy_scores, write_run
from ehrcxr.analysis.fairness import run_fairness, threshold_resamples, youden_threshold
from ehrcxr.evaluate.bootstrap import resample_weights

N_BOOT, SEED, CI = 200, 3, 0.95
N_TEST, N_VAL = 400, 300
RACES = {"WHITE": 160, "BLACK": 100, "HISPANIC": 60, "ASIAN": 40, "OTHER": 40}
MODALITIES = {"ehr": ["ehr"], "cxr": ["cxr"], "fusion": ["ehr", "cxr"]}
PHENOTYPES = ["chf", "copd"]
TEST_IDS = np.arange(1000, 1000 + N_TEST)


def _cohort(rng):
    """Test-stay demographics (row i = stay TEST_IDS[i]), mortality labels with exactly 30% positives per race,
    X-ray availability rising with age, and an insurance group of 9 and one of 10 stays."""
    race = rng.permutation(np.repeat(list(RACES), list(RACES.values())))
    y = np.zeros(N_TEST, dtype=np.int8)
    for name, size in RACES.items():
        members = np.flatnonzero(race == name)
        y[rng.choice(members, round(0.3 * size), replace=False)] = 1
    age = rng.integers(18, 96, N_TEST)
    insurance = rng.choice(["Medicare", "Medicaid", "Other"], N_TEST).astype(object)
    insurance[:9], insurance[9:19] = "Rare9", "Rare10"
    admission = rng.choice(["URGENT", "ELECTIVE", "EW EMER."], N_TEST).astype(object)
    admission[rng.choice(N_TEST, 15, replace=False)] = None
    stays = pd.DataFrame({"stay_id": TEST_IDS, "age": age, "gender": rng.choice(["M", "F"], N_TEST), "race": race,
                          "insurance": insurance, "admission_type": admission,
                          "cxr_dicom_id": None})
    has_cxr = (rng.random(N_TEST) < 0.2 + 0.6 * (age - 18) / 78).astype(np.int8)
    return stays, y, has_cxr


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Runs of two tasks, the stays table and run_fairness's outputs. mortality: ehr (2 seeds, strong), cxr (weak)
    and fusion (1 seed) whose BLACK positives get lower test scores; phenotyping: ehr alone, two labels."""
    root = tmp_path_factory.mktemp("fairness")
    rng = np.random.default_rng(7)
    stays, y, has_cxr = _cohort(rng)
    stays_path = root / "stays.parquet"
    stays.to_parquet(stays_path, index=False)
    paired = has_cxr.astype(bool)
    y_val = (rng.random(N_VAL) < 0.3).astype(np.int8)
    val_ids = np.arange(5000, 5000 + N_VAL)  # val stays need no row in stays.parquet
    y_pheno = (rng.random((N_TEST, 2)) < [0.35, 0.25]).astype(np.int8)
    y_pheno_val = (rng.random((N_VAL, 2)) < [0.35, 0.25]).astype(np.int8)
    scores = {}

    def sets(val_p, test_p, y_test, y_v):
        return {"val": dict(stay_id=val_ids, y=y_v, p=val_p),
                "partial_test": dict(stay_id=TEST_IDS, y=y_test, p=test_p, has_cxr=has_cxr),
                "paired_test": dict(stay_id=TEST_IDS[paired], y=y_test[paired], p=test_p[paired])}

    for model, seeds, signal in (("ehr", (0, 1), 2.5), ("cxr", (0,), 1.0), ("fusion", (0,), 2.5)):
        for seed in seeds:
            val_p, test_p = noisy_scores(rng, y_val, signal), noisy_scores(rng, y, signal)
            if model == "fusion":
                bias = (stays["race"].to_numpy() == "BLACK") & (y == 1)
                test_p = np.where(bias, test_p * 0.5, test_p)
            scores["mortality", model, seed] = dict(val=val_p, test=test_p)
            write_run(root, "mortality", model, "natural", seed, ["mortality"], sets(val_p, test_p, y, y_val))
    val_p, test_p = noisy_scores(rng, y_pheno_val, 2.0), noisy_scores(rng, y_pheno, 2.0)
    scores["phenotyping", "ehr", 0] = dict(val=val_p, test=test_p)
    write_run(root, "phenotyping", "ehr", "natural", 0, PHENOTYPES, sets(val_p, test_p, y_pheno, y_pheno_val))

    tables = run_fairness(sorted((root / "runs").glob("*/*/*/seed*")), stays_path, MODALITIES, root / "tables",
                          root / "figures", n_boot=N_BOOT, ci=CI, seed=SEED)
    return dict(root=root, stays=stays, y=y, y_val=y_val, y_pheno=y_pheno, y_pheno_val=y_pheno_val,
                has_cxr=has_cxr, scores=scores, tables=tables, stays_path=stays_path)


def _brute_force_youden(y, p) -> float:
    """Every ROC point's threshold; the lowest of those with the highest TPR − FPR."""
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    j = tpr - fpr
    return float(thresholds[np.isclose(j, j.max(), rtol=0, atol=1e-12)].min())


def _rows(table, **where) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for column, value in where.items():
        mask &= table[column].to_numpy() == value
    return table[mask]


def _value(table, column="estimate", **where) -> float:
    rows = _rows(table, **where)
    assert len(rows) == 1, where
    return float(rows[column].iloc[0])


def test_youden_threshold_matches_a_roc_curve_scan():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(5, 120))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = np.round(rng.random(n), 1 if trial % 2 else 3)  # coarse scores: many ties
        assert youden_threshold(y, p) == _brute_force_youden(y, p)
    assert np.isnan(youden_threshold(np.zeros(5), np.linspace(0, 1, 5)))
    # J ties between t = 0.8 (TPR 1/2, FPR 0) and t = 0.2 (TPR 1, FPR 1/2): the lowest wins
    assert youden_threshold(np.array([1, 0, 1, 0]), np.array([0.8, 0.5, 0.2, 0.1])) == 0.2


def test_ece_equals_hand_computation():
    # bins: 0.05 -> [0, .1) residual -0.05; 0.15, 0.15 -> [.1, .2) residual 0.85 - 0.15 = 0.7; 0.95 -> [.9, 1]
    # residual 0.05; ECE = (0.05 + 0.7 + 0.05) / 4 = 0.2; weights (2, 1, 1, 0) -> (0.1 + 0.7 + 0) / 4 = 0.2
    y = np.array([[0], [1], [0], [1]])
    p = np.array([[0.05], [0.15], [0.15], [0.95]])
    weights = np.array([[1.0, 1, 1, 1], [2, 1, 1, 0]])
    _, ece = threshold_resamples(y, [p], [np.array([0.5])], weights)["ece"]
    np.testing.assert_allclose(ece[:, 0], [0.2, 0.2])


def test_full_set_group_metrics_equal_sklearn_and_fairlearn(study):
    groups, gaps = study["tables"]["fairness_groups"], study["tables"]["fairness_gaps"]
    stays, y = study["stays"], study["y"]
    scores = study["scores"]["mortality", "fusion", 0]
    threshold = _brute_force_youden(study["y_val"], scores["val"])
    p, race = scores["test"], stays["race"].to_numpy()
    predicted = (p >= threshold).astype(int)
    frame = MetricFrame(metrics={"tpr": true_positive_rate, "fpr": false_positive_rate,
                                 "positive_rate": selection_rate}, y_true=y, y_pred=predicted,
                        sensitive_features=race).by_group
    where = dict(eval_set="partial_test", model="fusion", label="mortality", attribute="race")
    for group in RACES:
        rows = np.flatnonzero(race == group)
        expected = {"auroc": roc_auc_score(y[rows], p[rows]), "auprc": average_precision_score(y[rows], p[rows]),
                    "ppv": precision_score(y[rows], predicted[rows]), **frame.loc[group].to_dict()}
        for metric, value in expected.items():
            assert _value(groups, **where, group=group, metric=metric) == pytest.approx(value, abs=1e-12), metric
    for metric in ("tpr", "fpr"):
        assert _value(gaps, **where, metric=metric) == pytest.approx(frame[metric].max() - frame[metric].min())
    assert _value(gaps, **where, metric="equalized_odds") == pytest.approx(
        equalized_odds_difference(y, predicted, sensitive_features=race), abs=1e-12)
    assert _rows(gaps, **where, metric="tpr")["worst_group"].iloc[0] == frame["tpr"].idxmin()
    # the age bins are left-closed: [18, 40), [40, 60), [60, 80), [80, ∞)
    age = stays["age"].to_numpy()
    for name, low, high in (("18-40", 18, 40), ("40-60", 40, 60), ("60-80", 60, 80), ("80+", 80, 200)):
        rows = np.flatnonzero((age >= low) & (age < high))
        assert _value(groups, **{**where, "attribute": "age"}, group=name, metric="auroc") == pytest.approx(
            roc_auc_score(y[rows], p[rows]), abs=1e-12)


def test_seeds_pool_by_averaging_and_macro_averages_labels(study):
    groups, stays, y = study["tables"]["fairness_groups"], study["stays"], study["y"]
    rows = np.flatnonzero(stays["gender"].to_numpy() == "F")
    tprs = []
    for seed in (0, 1):
        scores = study["scores"]["mortality", "ehr", seed]
        threshold = _brute_force_youden(study["y_val"], scores["val"])
        tprs.append(true_positive_rate(y[rows], (scores["test"][rows] >= threshold).astype(int)))
    where = dict(eval_set="partial_test", model="ehr", attribute="gender", group="F")
    assert _value(groups, **where, label="mortality", metric="tpr") == pytest.approx(np.mean(tprs), abs=1e-12)

    pheno = study["scores"]["phenotyping", "ehr", 0]["test"]
    y_pheno = study["y_pheno"]
    per_label = [roc_auc_score(y_pheno[rows, j], pheno[rows, j]) for j in range(2)]
    where = dict(task="phenotyping", eval_set="partial_test", model="ehr", attribute="gender", group="F",
                 metric="auroc")
    assert _value(groups, **where, label="macro") == pytest.approx(np.mean(per_label), abs=1e-12)
    assert _value(groups, **where, label="copd") == pytest.approx(per_label[1], abs=1e-12)


def test_bootstrap_ci_equals_slow_loop_over_expanded_resamples(study):
    """Group CIs, and the CI of the difference to the reference group (WHITE, the largest race group), from a
    loop over resamples expanded into repeated stays."""
    groups, stays, y = study["tables"]["fairness_groups"], study["stays"], study["y"]
    race = stays["race"].to_numpy()
    weights = resample_weights(N_TEST, N_BOOT, SEED)
    runs = [study["scores"]["mortality", "ehr", seed] for seed in (0, 1)]
    thresholds = [_brute_force_youden(study["y_val"], run["val"]) for run in runs]

    def metrics(idx) -> dict[str, float]:
        y_b = y[idx]
        per_seed = {"auroc": [], "tpr": [], "ece": []}
        for run, threshold in zip(runs, thresholds):
            p_b = run["test"][idx]
            both = 0 < y_b.sum() < len(y_b)
            per_seed["auroc"].append(roc_auc_score(y_b, p_b) if both else np.nan)
            per_seed["tpr"].append(np.mean(p_b[y_b == 1] >= threshold) if y_b.sum() else np.nan)
            bins = np.minimum((p_b * 10).astype(int), 9)
            per_seed["ece"].append(sum(abs((y_b - p_b)[bins == b].sum()) for b in range(10)) / len(y_b))
        return {metric: np.mean(values) for metric, values in per_seed.items()}

    resampled = {name: {"auroc": [], "tpr": [], "ece": []} for name in ("HISPANIC", "WHITE")}
    for row in weights[1:].astype(int):
        for name, values in resampled.items():
            members = np.flatnonzero(race == name)
            for metric, value in metrics(np.repeat(members, row[members])).items():
                values[metric].append(value)
    where = dict(eval_set="partial_test", model="ehr", label="mortality", attribute="race", group="HISPANIC")
    for metric in ("auroc", "tpr", "ece"):
        hispanic, white = np.array(resampled["HISPANIC"][metric]), np.array(resampled["WHITE"][metric])
        low, high = np.percentile(hispanic[np.isfinite(hispanic)], [2.5, 97.5])
        assert _value(groups, "ci_low", **where, metric=metric) == pytest.approx(low, abs=1e-12), metric
        assert _value(groups, "ci_high", **where, metric=metric) == pytest.approx(high, abs=1e-12), metric
        difference = hispanic - white
        low, high = np.percentile(difference[np.isfinite(difference)], [2.5, 97.5])
        assert _value(groups, "difference_low", **where, metric=metric) == pytest.approx(low, abs=1e-12), metric
        assert _value(groups, "difference_high", **where, metric=metric) == pytest.approx(high, abs=1e-12)
        full = {name: metrics(np.flatnonzero(race == name))[metric] for name in ("HISPANIC", "WHITE")}
        assert _value(groups, "difference", **where, metric=metric) == pytest.approx(
            full["HISPANIC"] - full["WHITE"], abs=1e-12)
        below = 1 + np.sum(difference[np.isfinite(difference)] <= 0)
        above = 1 + np.sum(difference[np.isfinite(difference)] >= 0)
        p_value = min(1.0, 2 * min(below, above) / (np.isfinite(difference).sum() + 1))
        assert _value(groups, "difference_p", **where, metric=metric) == pytest.approx(p_value)
    reference = _rows(groups, **{**where, "group": "WHITE"})
    assert (reference["reference_group"] == "WHITE").all() and reference["difference"].isna().all()
    members = np.flatnonzero(race == "HISPANIC")
    # and the full-set ECE by hand
    p = runs[0]["test"][members]
    bins = np.minimum((p * 10).astype(int), 9)
    ece_seed0 = sum(abs((y[members] - p)[bins == b].sum()) for b in range(10)) / len(members)
    p = runs[1]["test"][members]
    bins = np.minimum((p * 10).astype(int), 9)
    ece_seed1 = sum(abs((y[members] - p)[bins == b].sum()) for b in range(10)) / len(members)
    assert _value(groups, **where, metric="ece") == pytest.approx((ece_seed0 + ece_seed1) / 2, abs=1e-12)


def test_small_groups_are_suppressed(study):
    groups, gaps, y = study["tables"]["fairness_groups"], study["tables"]["fairness_gaps"], study["y"]
    where = dict(eval_set="partial_test", model="fusion", label="mortality", attribute="insurance")
    nine = _rows(groups, **where, group="Rare9")
    assert nine["suppressed"].all() and nine["estimate"].isna().all() and nine["ci_low"].isna().all()
    assert nine["n_stays"].isna().all()  # a count under min_stays is not published either
    ten = _rows(groups, **where, group="Rare10").set_index("metric")
    assert ten.loc["fpr", "n_stays"] == 10
    assert not ten.loc["fpr", "suppressed"] and np.isfinite(ten.loc["fpr", "estimate"])
    assert y[9:19].sum() < 10 and ten.loc["tpr", "suppressed"]  # TPR also needs min_stays positives
    assert _value(gaps, "n_groups_left_out", **where, metric="fpr") == 1
    assert _value(gaps, "n_groups_left_out", **where, metric="tpr") == 2
    markdown = (study["root"] / "tables" / "fairness_groups.md").read_text()
    assert f"Suppressed: {int(groups['suppressed'].sum())} of {len(groups)} group rows" in markdown
    assert "Rare9" in markdown and "<10" in markdown


def test_planted_bias_shows_a_gap_and_a_positive_fusion_effect(study):
    gaps, effect = study["tables"]["fairness_gaps"], study["tables"]["fairness_fusion_effect"]
    where = dict(eval_set="partial_test", label="mortality", attribute="race", metric="tpr")
    biased = _rows(gaps, **where, model="fusion").iloc[0]
    assert biased["worst_group"] == "BLACK" and biased["ci_low"] > 0.2
    assert biased["estimate"] > _value(gaps, **where, model="ehr") + 0.2
    groups = _rows(study["tables"]["fairness_groups"], **where, model="fusion").set_index("group")
    assert groups.loc["BLACK", "ci_high"] < groups.loc["WHITE", "ci_low"]  # a signed difference, not just max − min
    assert groups.loc["BLACK", "reference_group"] == "WHITE" and groups.loc["BLACK", "difference_high"] < 0
    assert groups.loc["BLACK", "difference_p"] < 0.05
    fused = _rows(effect, **where, model="fusion").iloc[0]
    assert fused["reference"] == "ehr"  # the unimodal model with the best validation AUPRC
    assert fused["estimate"] == pytest.approx(biased["estimate"] - _value(gaps, **where, model="ehr"))
    assert fused["ci_low"] > 0 and fused["p"] < 0.05
    assert set(effect["model"]) == {"fusion"}


def test_missing_correlation_is_spearman_over_published_groups(study):
    groups, correlation = study["tables"]["fairness_groups"], study["tables"]["fairness_missing_correlation"]
    stays, has_cxr = study["stays"].copy(), study["has_cxr"]
    stays["age"] = pd.cut(stays["age"], [18, 40, 60, 80, np.inf], right=False,
                          labels=["18-40", "40-60", "60-80", "80+"]).astype(str)
    stays["admission_type"] = stays["admission_type"].fillna("unknown")
    stays["age_x_race"] = stays["age"] + " / " + stays["race"]
    stays["gender_x_race"] = stays["gender"] + " / " + stays["race"]
    checked = 0
    for row in correlation[correlation["eval_set"] == "partial_test"].itertuples():
        where = dict(eval_set="partial_test", model=row.model, label=row.label, metric=row.metric)
        part = _rows(groups, **where)
        overall = _value(part, attribute="overall")
        published = part[~part["attribute"].isin(["overall", "cxr_available"]) & part["estimate"].notna()]
        rates = [1 - has_cxr[stays[attribute].to_numpy() == group].mean()
                 for attribute, group in zip(published["attribute"], published["group"])]
        assert row.n_groups == len(published)
        deficits = published["estimate"] - overall
        if len(published) < 3 or np.ptp(deficits) == 0 or not np.isfinite(overall):
            assert np.isnan(row.rho) and np.isnan(row.p)
            continue
        expected = spearmanr(rates, deficits)
        assert row.rho == pytest.approx(expected.statistic, abs=1e-12)
        assert row.p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
        checked += 1
    assert checked > 20
    mortality = _rows(correlation, eval_set="partial_test", model="fusion", label="mortality", metric="auroc")
    assert mortality["n_groups"].iloc[0] > 20
    # X-ray availability is a group on partial_test only
    availability = _rows(groups, model="fusion", label="mortality", metric="auroc", attribute="cxr_available")
    assert set(availability["eval_set"]) == {"partial_test"} and set(availability["group"]) == {"no", "yes"}


def test_outputs_hold_aggregates_in_every_format(study):
    tables, figures = study["root"] / "tables", study["root"] / "figures"
    for name in ("fairness_groups", "fairness_gaps", "fairness_fusion_effect", "fairness_missing_correlation"):
        for suffix in (".csv", ".md", ".tex"):
            assert (tables / f"{name}{suffix}").stat().st_size > 0
        csv = pd.read_csv(tables / f"{name}.csv")
        assert "stay_id" not in csv.columns and len(csv) == len(study["tables"][name])
        markdown = (tables / f"{name}.md").read_text()
        assert "## mortality" in markdown
    assert list(study["tables"]["fairness_groups"].columns) == [
        "task", "missing", "eval_set", "model", "label", "attribute", "group", "metric", "estimate", "ci_low",
        "ci_high", "n_stays", "n_positive", "suppressed", "reference_group", "difference", "difference_low",
        "difference_high", "difference_p"]
    gaps_md = (tables / "fairness_gaps.md").read_text()
    assert "## phenotyping" in gaps_md and "Youden" in gaps_md and "| copd" not in gaps_md  # macro rows only
    for suffix in (".png", ".svg"):
        assert (figures / f"fairness_gaps{suffix}").stat().st_size > 0


def test_bad_stays_input_is_named(study, tmp_path):
    runs = sorted((study["root"] / "runs").glob("mortality/*/*/seed*"))
    lacking = tmp_path / "lacking.parquet"
    study["stays"].drop(columns="race").to_parquet(lacking, index=False)
    with pytest.raises(ValueError, match=r"lacking\.parquet: missing column 'race'"):
        run_fairness(runs, lacking, MODALITIES, tmp_path / "t", tmp_path / "f", n_boot=5)
    short = tmp_path / "short.parquet"
    study["stays"][study["stays"]["stay_id"] != 1234].to_parquet(short, index=False)
    with pytest.raises(ValueError, match=r"short\.parquet: no row for stay_id 1234"):
        run_fairness(runs, short, MODALITIES, tmp_path / "t", tmp_path / "f", n_boot=5)


def test_tasks_in_parallel_processes_give_the_serial_tables(study, tmp_path):
    runs = sorted((study["root"] / "runs").glob("*/*/*/seed*"))
    parallel = run_fairness(runs, study["stays_path"], MODALITIES, tmp_path / "t", tmp_path / "f", n_boot=N_BOOT,
                            ci=CI, seed=SEED, threads=2)  # one forked worker per task
    assert set(study["tables"]["fairness_groups"]["task"]) == {"mortality", "phenotyping"}
    for name, table in study["tables"].items():
        pd.testing.assert_frame_equal(table, parallel[name])
