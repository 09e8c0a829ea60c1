"""Ranking analysis: average ranks, Friedman test and Nemenyi CD, checked against hand computations, scipy and an
independent sklearn recomputation of every block on fake runs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import friedmanchisquare, rankdata
from sklearn.metrics import roc_auc_score

from analysis_runs import noisy_scores, write_run
from ehrcxr.analysis.ranking import (
    ALL_TASKS, average_ranks, cd_cliques, friedman_test, nemenyi_cd, run_ranking,
)

TASKS = {"mortality": ["mortality"], "phenotyping": ["a", "b", "c"]}
SEEDS = (0, 1)
N_STAYS = 120
FIRST_STAY = {"val": 1000, "paired_test": 2000, "partial_test": 3000}


def task_labels(task: str, eval_set: str) -> np.ndarray:
    """Labels of a task's eval set, shared by every run (prevalence 0.4)."""
    rng = np.random.default_rng([len(task), FIRST_STAY[eval_set]])
    return (rng.random((N_STAYS, len(TASKS[task]))) < 0.4).astype(np.int8)


def write_grid(root, signals: dict[str, float], tasks=TASKS, missing: str = "natural") -> dict:
    """Runs of every model (``signals``: model -> class separation of its scores) and task under
    ``root/runs``; returns
    {(task, model, eval_set): per-seed scores} for independent recomputation."""
    scores = {}
    for task, labels in tasks.items():
        for m, (model, signal) in enumerate(signals.items()):
            for seed in SEEDS:
                sets = {}
                for eval_set, first in FIRST_STAY.items():
                    y = task_labels(task, eval_set)
                    p = noisy_scores(np.random.default_rng([m, seed, first, len(task)]), y, signal)
                    sets[eval_set] = dict(stay_id=first + np.arange(N_STAYS), y=y, p=p)
                    scores.setdefault((task, model, eval_set), []).append(p)
                write_run(root, task, model, missing, seed, labels, sets)
    return scores


def run_dirs(root) -> list:
    return sorted(path.parent for path in (root / "runs").rglob("metrics.json"))


def expected_blocks(scores: dict, models: list[str], tasks=TASKS) -> pd.DataFrame:
    """Blocks (task, test set, label) x models: mean over seeds of sklearn's AUROC."""
    rows = {}
    for task, labels in tasks.items():
        for eval_set in ("paired_test", "partial_test"):
            y = task_labels(task, eval_set)
            for j, label in enumerate(labels):
                rows[task, eval_set, label] = [
                    np.mean([roc_auc_score(y[:, j], p[:, j]) for p in scores[task, model, eval_set]])
                    for model in models]
    return pd.DataFrame(list(rows.values()), index=pd.MultiIndex.from_tuples(rows), columns=models)


def test_average_ranks_by_hand():
    values = np.array([[0.9, 0.8, 0.7],
                       [0.9, 0.7, 0.8],
                       [0.9, 0.6, 0.6]])  # first model best everywhere; the last block ties the others
    np.testing.assert_allclose(average_ranks(values), [1.0, (2 + 3 + 2.5) / 3, (3 + 2 + 2.5) / 3])


def test_friedman_equals_scipy_and_formula():
    values = np.array([[0.81, 0.79, 0.70, 0.75],
                       [0.66, 0.71, 0.60, 0.61],
                       [0.90, 0.88, 0.91, 0.86],
                       [0.72, 0.70, 0.69, 0.73],
                       [0.85, 0.80, 0.78, 0.79]])
    chi2, p = friedman_test(values)
    expected = friedmanchisquare(*values.T)
    assert chi2 == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    n, k = values.shape  # no ties: chi2 = 12 N / (k (k+1)) (sum_j R_j^2 - k (k+1)^2 / 4)
    ranks = rankdata(-values, axis=1).mean(axis=0)
    assert chi2 == pytest.approx(12 * n / (k * (k + 1)) * ((ranks ** 2).sum() - k * (k + 1) ** 2 / 4))
    assert np.isnan(friedman_test(values[:, :2])).all()  # needs 3 models


@pytest.mark.parametrize("n_blocks", [4, 12, 30])
def test_nemenyi_cd_matches_demsar_table(n_blocks):
    # Demšar (2006), Table 5(a): q_0.05 = 2.343 for k = 3, 2.569 for k = 4
    assert nemenyi_cd(3, n_blocks) == pytest.approx(2.343 * np.sqrt(3 * 4 / (6 * n_blocks)), rel=1e-3)
    assert nemenyi_cd(4, n_blocks) == pytest.approx(2.569 * np.sqrt(4 * 5 / (6 * n_blocks)), rel=1e-3)
    assert np.isnan(nemenyi_cd(1, n_blocks))


def test_cd_cliques():
    assert cd_cliques(np.array([1.0, 1.5, 2.8, 3.0]), 1.0) == [(0, 1), (2, 3)]
    assert cd_cliques(np.array([1.0, 1.5, 1.9, 3.0]), 1.0) == [(0, 2)]
    assert cd_cliques(np.array([1.0, 1.6, 2.2]), 0.7) == [(0, 1), (1, 2)]
    assert cd_cliques(np.array([1.0, 2.0, 3.0]), 0.5) == []


def test_run_ranking_matches_independent_computation(tmp_path):
    signals = {"strong": 5.0, "medium": 1.3, "weak": 0.3, "fair": 1.2}
    scores = write_grid(tmp_path, signals)
    write_grid(tmp_path, {"strong": 5.0, "medium": 1.5}, tasks={"mortality": ["mortality"]}, missing="miss0.5")
    modalities = {model: ["ehr", "cxr"] for model in signals}
    result = run_ranking(run_dirs(tmp_path), modalities, tmp_path / "tables", tmp_path / "figures")
    table = result["ranking"]
    assert list(table.columns) == ["missing", "scope", "model", "average_rank", "n_blocks", "k_models",
                                   "friedman_chi2", "friedman_p", "cd"]

    expected = expected_blocks(scores, list(signals))
    ranks = pd.Series(rankdata(-expected.to_numpy(), axis=1).mean(axis=0), index=list(signals))
    chi2 = friedmanchisquare(*expected.to_numpy().T).statistic
    overall = table[(table["missing"] == "natural") & (table["scope"] == ALL_TASKS)].set_index("model")
    assert list(overall.index) == list(ranks.sort_values().index)  # best first
    np.testing.assert_allclose(overall["average_rank"], ranks[overall.index])
    assert overall.loc["strong", "average_rank"] == 1.0  # best in all 8 blocks
    assert (overall["n_blocks"] == 8).all() and (overall["k_models"] == 4).all()
    np.testing.assert_allclose(overall["friedman_chi2"], chi2)
    np.testing.assert_allclose(overall["cd"], 2.569 * np.sqrt(4 * 5 / (6 * 8)), rtol=1e-3)

    phenotyping = table[(table["missing"] == "natural") & (table["scope"] == "phenotyping")].set_index("model")
    blocks = expected.loc["phenotyping"]
    np.testing.assert_allclose(phenotyping["average_rank"],
                               rankdata(-blocks.to_numpy(), axis=1).mean(axis=0)[
                                   [list(signals).index(m) for m in phenotyping.index]])
    assert (phenotyping["n_blocks"] == 6).all()

    two_models = table[table["missing"] == "miss0.5"]  # 2 models: ranks and CD, no Friedman test
    assert set(two_models["scope"]) == {ALL_TASKS, "mortality"}
    assert two_models["friedman_chi2"].isna().all() and two_models["cd"].notna().all()

    markdown = (tmp_path / "tables" / "ranking.md").read_text()
    assert "little power" in markdown and "Friedman" in markdown and "at least 3 models" in markdown
    for suffix in (".csv", ".tex"):
        assert (tmp_path / "tables" / f"ranking{suffix}").is_file()
    for suffix in (".png", ".svg"):
        assert (tmp_path / "figures" / f"ranking_cd{suffix}").stat().st_size > 0


def test_model_lacking_a_task_leaves_the_all_tasks_scope(tmp_path):
    write_grid(tmp_path, {"strong": 5.0, "medium": 1.5, "weak": 0.3})
    write_grid(tmp_path, {"extra": 2.0}, tasks={"mortality": ["mortality"]})
    modalities = {model: ["ehr"] for model in ("strong", "medium", "weak", "extra")}
    table = run_ranking(run_dirs(tmp_path), modalities, tmp_path / "tables", tmp_path / "figures")["ranking"]
    assert set(table.loc[table["scope"] == ALL_TASKS, "model"]) == {"strong", "medium", "weak"}
    assert "extra" in set(table.loc[table["scope"] == "mortality", "model"])
    assert "left out extra" in (tmp_path / "tables" / "ranking.md").read_text()
