"""Calibration (ECE, Brier score) and X-ray-age analyses, checked against hand computations, sklearn and slow
per-resample loops over the np.repeat-expanded resamples."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from sklearn.metrics import brier_score_loss, roc_auc_score

from analysis_runs import noisy_scores, write_run
from ehrcxr.analysis.calibration import (
    MIN_STRATUM_STAYS, bin_index, calibration_table, reliability_curve, run_calibration, run_xray_age,
    weighted_calibration,
)
from ehrcxr.analysis.core import load_cells
from ehrcxr.evaluate.bootstrap import resample_weights

N_BOOT = 200
SEEDS = (0, 1)
FIRST_STAY = {"val": 1000, "paired_test": 2000, "partial_test": 3000}


def slow_ece(y: np.ndarray, p: np.ndarray, bins: int) -> float:
    """ECE of one label by its definition, bin by bin."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for b in range(bins):
        last = b == bins - 1
        members = (p >= edges[b]) & ((p <= edges[b + 1]) if last else (p < edges[b + 1]))
        if members.any():
            total += members.sum() / len(y) * abs(y[members].mean() - p[members].mean())
    return total


def mann_whitney_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U of the positives over n_pos n_neg (ties averaged)."""
    n_pos = int(y.sum())
    return (rankdata(p)[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (y.size - n_pos))


def write_grid(root, labels: list[str], models: dict[str, float], sizes: dict[str, int], seed_scores=None) -> dict:
    """Runs of every model (model -> signal) of task 'phenotyping'; ``seed_scores(model, seed, eval_set, y)`` overrides the
    scores. Returns {(model, eval_set): (y, per-seed scores)} and the run directories under 'dirs'."""
    out, dirs = {}, []
    for m, (model, signal) in enumerate(models.items()):
        for seed in SEEDS:
            sets = {}
            for eval_set, first in FIRST_STAY.items():
                n = sizes[eval_set]
                y = (np.random.default_rng(first).random((n, len(labels))) < 0.4).astype(np.int8)
                rng = np.random.default_rng([m, seed, first])
                p = seed_scores(model, seed, eval_set, y) if seed_scores else noisy_scores(rng, y, signal)
                sets[eval_set] = dict(stay_id=first + np.arange(n), y=y, p=p)
                out.setdefault((model, eval_set), (y, []))[1].append(p)
            dirs.append(write_run(root, "phenotyping", model, "natural", seed, labels, sets))
    out["dirs"] = dirs
    return out


def test_ece_by_hand_and_bin_edges():
    y = np.array([[0], [1], [1], [0], [1]])
    p = np.array([[0.1], [0.3], [0.5], [0.7], [1.0]])  # 0.5 opens the upper bin, 1.0 falls in the closed last bin
    np.testing.assert_array_equal(bin_index(p, 2).ravel(), [0, 0, 1, 1, 1])
    # bin [0, .5): mean y 1/2, mean p 0.2, 2 stays; bin [.5, 1]: mean y 2/3, mean p 2.2/3, 3 stays
    expected = 2 / 5 * abs(1 / 2 - 0.2) + 3 / 5 * abs(2 / 3 - 2.2 / 3)
    ece, brier = weighted_calibration(y, p, np.ones((1, 5)), bins=2)
    assert expected == pytest.approx(0.16)
    assert ece[0, 0] == pytest.approx(expected)
    assert brier[0, 0] == pytest.approx(brier_score_loss(y[:, 0], p[:, 0]))
    with pytest.raises(ValueError, match="must lie in"):
        bin_index(np.array([0.2, 1.2]), 10)


def test_weighted_calibration_equals_slow_resample_loop():
    rng = np.random.default_rng(3)
    y = (rng.random((60, 3)) < 0.3).astype(np.int8)
    p = noisy_scores(rng, y, 1.0)
    weights = resample_weights(60, 50, seed=7)
    ece, brier = weighted_calibration(y, p, weights, bins=10)
    for r, row in enumerate(weights.astype(int)):
        idx = np.repeat(np.arange(60), row)
        for j in range(3):
            assert ece[r, j] == pytest.approx(slow_ece(y[idx, j], p[idx, j], 10))
            assert brier[r, j] == pytest.approx(brier_score_loss(y[idx, j], p[idx, j]))


def test_reliability_curve_pools_labels_and_seeds():
    y = np.array([[0, 1], [1, 1]])
    seeds = [np.array([[0.1, 0.9], [0.2, 0.8]]), np.array([[0.3, 0.7], [0.4, 0.6]])]
    predicted, observed, count = reliability_curve(y, seeds, bins=2)
    np.testing.assert_allclose(count, [4, 4])
    np.testing.assert_allclose(predicted, [0.25, 0.75])
    np.testing.assert_allclose(observed, [0.5, 1.0])  # low bin: y 0, 1, 0, 1; high bin: all 1


def test_run_calibration_matches_slow_bootstrap(tmp_path):
    labels = ["a", "b"]
    sizes = {"val": 30, "paired_test": 60, "partial_test": 90}
    grid = write_grid(tmp_path, labels, {"sharp": 3.0, "vague": 0.5}, sizes)
    table = run_calibration(grid["dirs"], {"sharp": ["ehr", "cxr"], "vague": ["ehr"]}, tmp_path / "tables",
                            tmp_path / "figures", n_boot=N_BOOT, seed=5, bins=10)["calibration"]
    assert list(table.columns) == ["task", "missing", "eval_set", "model", "label", "metric", "estimate", "ci_low",
                                   "ci_high", "n_stays"]
    assert len(table) == 2 * 2 * 3 * 2  # eval sets x models x (macro, a, b) x metrics
    for model in ("sharp", "vague"):
        for eval_set in ("paired_test", "partial_test"):
            y, seeds = grid[model, eval_set]
            rows = table[(table["model"] == model) & (table["eval_set"] == eval_set)].set_index(["label", "metric"])
            assert (rows["n_stays"] == sizes[eval_set]).all()
            for j, label in enumerate(labels):
                ece = np.mean([slow_ece(y[:, j], p[:, j], 10) for p in seeds])
                brier = np.mean([brier_score_loss(y[:, j], p[:, j]) for p in seeds])
                assert rows.loc[(label, "ece"), "estimate"] == pytest.approx(ece)
                assert rows.loc[(label, "brier"), "estimate"] == pytest.approx(brier)
        # CIs: both models on the same resamples of the paired test stays, resample_weights(N, n_boot, seed)
        y, seeds = grid[model, "paired_test"]
        slow = np.zeros((N_BOOT + 1, 2, 2))  # resample, metric (ece, brier), label; seeds averaged
        for r, row in enumerate(resample_weights(sizes["paired_test"], N_BOOT, 5).astype(int)):
            idx = np.repeat(np.arange(sizes["paired_test"]), row)
            for p in seeds:
                for j in range(2):
                    slow[r, 0, j] += slow_ece(y[idx, j], p[idx, j], 10) / len(seeds)
                    slow[r, 1, j] += np.mean((p[idx, j] - y[idx, j]) ** 2) / len(seeds)
        rows = table[(table["model"] == model) & (table["eval_set"] == "paired_test")].set_index(["label", "metric"])
        for k, metric in enumerate(("ece", "brier")):
            for label, values in (("macro", slow[:, k].mean(axis=1)), ("a", slow[:, k, 0]), ("b", slow[:, k, 1])):
                estimate, low, high = rows.loc[(label, metric), ["estimate", "ci_low", "ci_high"]]
                assert estimate == pytest.approx(values[0])
                assert (low, high) == pytest.approx(tuple(np.percentile(values[1:], [2.5, 97.5])))
    cells = load_cells(grid["dirs"], {"sharp": ["ehr"], "vague": ["ehr"]}, scores=("p",))
    pd.testing.assert_frame_equal(calibration_table(cells, n_boot=20, threads=2), calibration_table(cells, n_boot=20))
    markdown = (tmp_path / "tables" / "calibration.md").read_text()
    assert "ECE" in markdown and "Brier" in markdown
    for suffix in (".png", ".svg"):
        assert (tmp_path / "figures" / f"reliability{suffix}").stat().st_size > 0


# X-ray age -------------------------------------------------------------------------------------------------------
AGE_COUNTS = {0: 50, 1: 50, 2: MIN_STRATUM_STAYS - 4, 3: 60}  # default bins [0,12) [12,24) [24,36) [36,48]
N_PAIRED = sum(AGE_COUNTS.values())


def paired_ages() -> np.ndarray:
    """Hours from X-ray to prediction of the paired test stays, by stratum; edges 12 and 48 included."""
    rng = np.random.default_rng(11)
    ages = np.concatenate([12 * s + rng.uniform(0.5, 11.5, n) for s, n in AGE_COUNTS.items()])
    ages[AGE_COUNTS[0]] = 12.0  # left-closed: stratum 1
    ages[-1] = 48.0  # the last bin is closed
    return ages


def write_stays(path, ages: np.ndarray, drop: str | None = None, without_stay: int | None = None) -> None:
    """stays.parquet whose times give ``ages``: half the stays reach 48 h (prediction at 48), half are shorter
    (prediction at discharge); the first stay's X-ray comes after its discharge (age clipped to 0)."""
    stay_id = FIRST_STAY["paired_test"] + np.arange(ages.size)
    los = np.where(np.arange(ages.size) % 2 == 0, 70.0, 47.5)
    cxr_hours = np.minimum(los, 48) - ages
    los[0], cxr_hours[0] = 20.0, 22.0
    frame = pd.DataFrame({"stay_id": stay_id, "los_hours": los, "cxr_hours": cxr_hours, "split": "test"})
    frame = frame[frame["stay_id"] != without_stay]
    frame.drop(columns=[drop] if drop else []).to_parquet(path, index=False)


def fading_scores(model, seed, eval_set, y):
    """'steady' separates the classes at every X-ray age; 'fading' loses its signal for X-rays over 36 h old."""
    rng = np.random.default_rng([seed, ("steady", "fading").index(model), FIRST_STAY[eval_set]])
    if eval_set != "paired_test" or model == "steady":
        return noisy_scores(rng, y, 3.0)
    return noisy_scores(rng, y, np.where(paired_ages() >= 36, 0.0, 3.0)[:, None])


@pytest.fixture(scope="module")
def age_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("xray_age")
    sizes = {"val": 30, "paired_test": N_PAIRED, "partial_test": 40}
    grid = write_grid(root, ["a", "b"], {"steady": 0.0, "fading": 0.0}, sizes, seed_scores=fading_scores)
    write_stays(root / "stays.parquet", paired_ages())
    return root, grid


def test_xray_age_strata_and_auroc_equal_sklearn(age_grid):
    root, grid = age_grid
    table = run_xray_age(grid["dirs"], root / "stays.parquet", {"steady": ["ehr", "cxr"], "fading": ["ehr", "cxr"]},
                         root / "tables", root / "figures", n_boot=N_BOOT, seed=2)["xray_age"]
    assert list(table.columns) == ["task", "missing", "model", "stratum", "age_low", "age_high", "metric",
                                   "estimate", "ci_low", "ci_high", "n_stays", "suppressed"]
    stratum = np.repeat(list(AGE_COUNTS), list(AGE_COUNTS.values()))  # by construction of paired_ages
    counts = table[(table["model"] == "steady") & (table["metric"] == "auroc")]
    assert counts["stratum"].tolist() == ["[0, 12) h", "[12, 24) h", "[24, 36) h", "[36, 48] h"]
    assert counts["n_stays"].tolist() == [int((stratum == s).sum()) for s in range(4)] == list(AGE_COUNTS.values())
    assert counts["suppressed"].tolist() == [False, False, True, False]

    weights = resample_weights(N_PAIRED, N_BOOT, 2)
    for model in ("steady", "fading"):
        y, seeds = grid[model, "paired_test"]
        rows = table[(table["model"] == model)].set_index(["stratum", "metric"])
        suppressed = rows.loc[("[24, 36) h", "auroc")]
        assert suppressed["suppressed"] and np.isnan(suppressed[["estimate", "ci_low", "ci_high"]].astype(float)).all()
        for s, name in ((0, "[0, 12) h"), (3, "[36, 48] h")):
            members = stratum == s
            expected = np.mean([np.mean([roc_auc_score(y[members, j], p[members, j]) for j in range(2)])
                                for p in seeds])
            assert rows.loc[(name, "auroc"), "estimate"] == pytest.approx(expected)
        if model == "steady":
            continue
        # the CI of the oldest stratum: the shared resamples' columns of its stays, expanded and scored (Mann-Whitney)
        members = np.flatnonzero(stratum == 3)
        slow = []
        for row in weights[1:, members].astype(int):
            idx = np.repeat(members, row)
            per_seed = [np.mean([mann_whitney_auroc(y[idx, j], p[idx, j]) for j in range(2)
                                 if 0 < y[idx, j].sum() < idx.size]) for p in seeds]
            slow.append(np.mean(per_seed))
        low, high = rows.loc[("[36, 48] h", "auroc"), ["ci_low", "ci_high"]]
        assert (low, high) == pytest.approx(tuple(np.percentile(slow, [2.5, 97.5])))

    auroc = table[table["metric"] == "auroc"].set_index(["model", "stratum"])["estimate"]
    assert auroc["fading", "[36, 48] h"] < auroc["fading", "[0, 12) h"] - 0.2
    assert auroc["fading", "[36, 48] h"] < auroc["steady", "[36, 48] h"] - 0.2
    assert "suppressed" in (root / "tables" / "xray_age.md").read_text()
    for suffix in (".png", ".svg"):
        assert (root / "figures" / f"xray_age{suffix}").stat().st_size > 0


def test_xray_age_gain_is_the_paired_difference_per_stratum(age_grid):
    root, grid = age_grid
    tables = run_xray_age(grid["dirs"], root / "stays.parquet", {"steady": ["ehr", "cxr"], "fading": ["ehr", "cxr"]},
                          root / "gain_tables", root / "gain_figures", n_boot=N_BOOT, seed=2,
                          contrasts=[("steady", "fading"), ("fading", "absent_model")])
    gain = tables["xray_age_gain"]
    assert set(zip(gain["model"], gain["reference"])) == {("steady", "fading")}  # a contrast needs both models
    auroc = gain[gain["metric"] == "auroc"].set_index("stratum")
    # the suppressed stratum has no gain row; the others hold the difference of the two models' estimates
    assert auroc.index.tolist() == ["[0, 12) h", "[12, 24) h", "[36, 48] h"]
    estimates = tables["xray_age"][tables["xray_age"]["metric"] == "auroc"].set_index(["model", "stratum"])["estimate"]
    for name in auroc.index:
        assert auroc.loc[name, "gain"] == pytest.approx(estimates["steady", name] - estimates["fading", name])
    # the oldest stratum's CI: percentiles of the per-resample differences, scored independently (Mann-Whitney)
    stratum = np.repeat(list(AGE_COUNTS), list(AGE_COUNTS.values()))
    members = np.flatnonzero(stratum == 3)
    differences = []
    for row in resample_weights(N_PAIRED, N_BOOT, 2)[1:, members].astype(int):
        idx = np.repeat(members, row)
        by_model = []
        for model in ("steady", "fading"):
            y, seeds = grid[model, "paired_test"]
            by_model.append(np.mean([np.mean([mann_whitney_auroc(y[idx, j], p[idx, j]) for j in range(2)
                                              if 0 < y[idx, j].sum() < idx.size]) for p in seeds]))
        differences.append(by_model[0] - by_model[1])
    oldest = auroc.loc["[36, 48] h"]
    assert (oldest["ci_low"], oldest["ci_high"]) == pytest.approx(tuple(np.percentile(differences, [2.5, 97.5])))
    assert oldest["ci_low"] > 0 and oldest["p_value"] < 0.05  # 'fading' loses its signal for old X-rays only
    assert auroc.loc["[0, 12) h", "ci_low"] < 0 < auroc.loc["[0, 12) h", "ci_high"]
    assert "steady" in (root / "gain_tables" / "xray_age_gain.md").read_text()
    for suffix in (".png", ".svg"):
        assert (root / "gain_figures" / f"xray_age_gain{suffix}").stat().st_size > 0


@pytest.mark.parametrize("case, match", [
    ("no_column", r"stays_bad\.parquet: missing column 'cxr_hours'"),
    ("absent_stay", r"no row for stay_id 2007"),
    ("too_old", r"stay_id 2003: its X-ray is 60 h old"),
])
def test_xray_age_bad_input(age_grid, case, match):
    root, grid = age_grid
    path = root / "stays_bad.parquet"
    ages = paired_ages()
    if case == "too_old":
        ages[3] = 60.0
    write_stays(path, ages, drop="cxr_hours" if case == "no_column" else None,
                without_stay=2007 if case == "absent_stay" else None)
    with pytest.raises(ValueError, match=match):
        run_xray_age(grid["dirs"], path, {"steady": ["ehr"], "fading": ["ehr"]}, root / "bad_tables",
                     root / "bad_figures", n_boot=10)
