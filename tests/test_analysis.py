"""Tests of the analyses' shared machinery, fusion gain, modality imbalance and robustness, each statistic checked
against an independent computation (scikit-learn on np.repeat-expanded resamples, a hand Benjamini–Hochberg)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from analysis_runs import noisy_scores, write_run
from ehrcxr.analysis.core import benjamini_hochberg, bootstrap_p_value, load_cells
from ehrcxr.analysis.fusion_gain import fusion_gain_table, run_fusion_gain
from ehrcxr.analysis.imbalance import imbalance_table
from ehrcxr.analysis.robustness import missingness_at_test_time, missingness_in_training, withheld_stays
from ehrcxr.analysis.publish import latex_table, write_table
from ehrcxr.evaluate.bootstrap import resample_weights

LABELS = ["ph_a", "ph_b", "ph_c"]
MODALITIES = {"ehr_model": ["ehr"], "cxr_model": ["cxr"], "fused": ["ehr", "cxr"]}
N_BOOT = 200


def _scores(rng, labels, signal):
    """Scores separating each label's classes by its ``signal`` (standard deviations)."""
    return 1 / (1 + np.exp(-(np.asarray(signal) * (labels - 0.5) + rng.standard_normal(labels.shape))))


@pytest.fixture
def grid(tmp_path):
    """Three models on three labels: the EHR model sees labels a and b, the CXR model c; the fused model all.
    Its X-ray-withheld scores lose label c; its EHR-withheld scores lose a and b."""
    rng = np.random.default_rng(0)
    y = {s: rng.integers(0, 2, (n, 3)) for s, n in (("val", 120), ("test", 150))}
    ids = {"val": np.arange(120), "test": np.arange(10_000, 10_150)}
    strength = {"ehr_model": [2.5, 2.5, 0.0], "cxr_model": [0.0, 0.0, 2.5], "fused": [2.5, 2.5, 2.5]}
    for model, signal in strength.items():
        for seed in (1, 2):
            sets = {}
            for eval_set, part in (("val", "val"), ("paired_test", "test"), ("partial_test", "test")):
                labels = y[part]
                p = _scores(rng, labels, signal)
                withheld_cxr, withheld_ehr = _scores(rng, labels, [2.5, 2.5, 0.0]), _scores(rng, labels, [0, 0, 2.5])
                sets[eval_set] = {"stay_id": ids[part], "y": labels, "p": p,
                                  "p_nocxr": withheld_cxr if model == "fused" else p,
                                  "p_noehr": withheld_ehr if model == "fused" else p}
            write_run(tmp_path, "phenotyping", model, "natural", seed, LABELS, sets)
    return tmp_path


def _runs(root):
    return sorted((root / "runs").glob("*/*/*/seed*"))


def _slow_difference(y, p_a_by_seed, p_b_by_seed, column, weights):
    """Seed-pooled AUROC difference per weight row by np.repeat and scikit-learn."""
    values = []
    for row in weights:
        index = np.repeat(np.arange(y.shape[0]), row.astype(int))
        a = np.mean([roc_auc_score(y[index, column], p[index, column]) for p in p_a_by_seed])
        b = np.mean([roc_auc_score(y[index, column], p[index, column]) for p in p_b_by_seed])
        values.append(a - b)
    return np.array(values)


def test_fusion_gain_equals_sklearn_on_the_shared_resamples_and_reference_is_chosen_on_validation(grid):
    cells = load_cells(_runs(grid), MODALITIES)
    table = fusion_gain_table(cells, n_boot=N_BOOT, seed=3)
    rows = table[(table["eval_set"] == "paired_test") & (table["metric"] == "auroc")
                 & (table["reference"] == "best_ehr_only")]
    assert set(rows["reference_model"]) == {"ehr_model"}
    # the best unimodal model on validation macro AUPRC: the EHR model sees two labels, the CXR model one
    assert set(table.loc[table["reference"] == "best_unimodal", "reference_model"]) == {"ehr_model"}
    fused, reference = cells["phenotyping", "fused", "natural"], cells["phenotyping", "ehr_model", "natural"]
    y = fused.labels_of("paired_test")
    weights = resample_weights(y.shape[0], N_BOOT, 3)
    slow = _slow_difference(y, fused.scores("paired_test"), reference.scores("paired_test"), 2, weights)
    row = rows[rows["label"] == "ph_c"].iloc[0]
    assert row["gain"] == pytest.approx(slow[0], abs=1e-12)
    assert row["ci_low"] == pytest.approx(np.percentile(slow[1:], 2.5), abs=1e-12)
    assert row["ci_high"] == pytest.approx(np.percentile(slow[1:], 97.5), abs=1e-12)
    below, above = (slow[1:] <= 0).sum(), (slow[1:] >= 0).sum()
    assert row["p_value"] == pytest.approx(min(1.0, 2 * min(below + 1, above + 1) / (N_BOOT + 1)))
    # the planted structure: a large gain on the X-ray label, none on the EHR labels
    assert row["ci_low"] > 0.2 and row["q_value"] < 0.05
    for label in ("ph_a", "ph_b"):
        other = rows[rows["label"] == label].iloc[0]
        assert other["ci_low"] < 0 < other["ci_high"]
    # macro = mean of the label gains (every label has both classes in every resample here)
    macro = rows[rows["label"] == "macro"].iloc[0]
    assert macro["gain"] == pytest.approx(rows[rows["label"] != "macro"]["gain"].mean(), abs=1e-12)


def test_fusion_gain_against_the_fusion_baseline(grid):
    # a second fusion model that fuses badly: it sees the EHR labels a and b only, like the EHR model
    rng = np.random.default_rng(5)
    fused = load_cells(_runs(grid), MODALITIES)["phenotyping", "fused", "natural"]
    for seed in (1, 2):
        sets = {}
        for eval_set in ("val", "paired_test", "partial_test"):
            labels, ids = fused.labels_of(eval_set), fused.stays(eval_set)
            p = _scores(rng, labels, [2.5, 2.5, 0.0])
            sets[eval_set] = {"stay_id": ids, "y": labels, "p": p, "p_nocxr": p, "p_noehr": p}
        write_run(grid, "phenotyping", "weak_fusion", "natural", seed, LABELS, sets)
    cells = load_cells(_runs(grid), {**MODALITIES, "weak_fusion": ["ehr", "cxr"]})
    table = fusion_gain_table(cells, n_boot=N_BOOT, seed=3, baseline="weak_fusion")
    against = table[table["reference"] == "baseline"]
    # every other fusion model against the baseline, on both test sets; never the baseline against itself
    assert set(zip(against["model"], against["reference_model"])) == {("fused", "weak_fusion")}
    assert set(against["eval_set"]) == {"paired_test", "partial_test"}
    assert {"best_unimodal", "best_ehr_only"} <= set(table.loc[table["model"] == "weak_fusion", "reference"])
    rows = against[(against["eval_set"] == "paired_test") & (against["metric"] == "auroc")].set_index("label")
    weak = cells["phenotyping", "weak_fusion", "natural"]
    y = fused.labels_of("paired_test")
    slow = _slow_difference(y, fused.scores("paired_test"), weak.scores("paired_test"), 2,
                            resample_weights(y.shape[0], N_BOOT, 3))
    assert rows.loc["ph_c", "gain"] == pytest.approx(slow[0], abs=1e-12)
    assert rows.loc["ph_c", "ci_low"] == pytest.approx(np.percentile(slow[1:], 2.5), abs=1e-12)
    assert rows.loc["ph_c", "ci_low"] > 0.2  # the X-ray label: the baseline never uses the X-ray
    for label in ("ph_a", "ph_b"):  # both see the EHR labels alike
        assert rows.loc[label, "ci_low"] < 0 < rows.loc[label, "ci_high"]
    # no baseline named, or one not in the grid: no baseline rows
    for baseline in (None, "no_such_model"):
        assert "baseline" not in set(fusion_gain_table(cells, n_boot=20, seed=3, baseline=baseline)["reference"])


def test_benjamini_hochberg_matches_a_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan])
    finite = p[:4]
    order = np.argsort(finite)
    ranked = finite[order] * 4 / np.arange(1, 5)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    expected = np.empty(4)
    expected[order] = np.minimum(adjusted, 1)
    q = benjamini_hochberg(p)
    np.testing.assert_allclose(q[:4], expected)
    assert np.isnan(q[4])


def test_bootstrap_p_value_is_two_sided_and_never_zero():
    differences = np.array([0.3, *np.linspace(0.01, 1, 99)])  # row 0 = the estimate; every resample > 0
    assert bootstrap_p_value(differences) == pytest.approx(2 * 1 / 100)
    symmetric = np.array([0.0, *np.linspace(-1, 1, 100)])
    assert bootstrap_p_value(symmetric) == pytest.approx(1.0)


def test_modality_imbalance_drop_equals_sklearn_and_shows_which_modality_a_label_needs(grid):
    cells = load_cells(_runs(grid), MODALITIES)
    table = imbalance_table(cells, n_boot=N_BOOT, seed=3)
    assert set(table["model"]) == {"fused"}  # unimodal models are not fusion models
    auroc = table[table["metric"] == "auroc"].set_index(["withheld", "label"])
    fused = cells["phenotyping", "fused", "natural"]
    y = fused.labels_of("paired_test")
    for modality, score in (("cxr", "p_nocxr"), ("ehr", "p_noehr")):
        for j, label in enumerate(LABELS):
            expected = np.mean([roc_auc_score(y[:, j], p[:, j]) for p in fused.scores("paired_test")]) - np.mean(
                [roc_auc_score(y[:, j], p[:, j]) for p in fused.scores("paired_test", score)])
            assert auroc.loc[(modality, label), "drop"] == pytest.approx(expected, abs=1e-12)
    assert auroc.loc[("cxr", "ph_c"), "ci_low"] > 0.2  # the X-ray label needs the X-ray
    assert auroc.loc[("cxr", "ph_a"), "ci_low"] < 0 < auroc.loc[("cxr", "ph_a"), "ci_high"]
    assert auroc.loc[("ehr", "ph_a"), "ci_low"] > 0.2
    assert auroc.loc[("ehr", "ph_c"), "ci_low"] < 0 < auroc.loc[("ehr", "ph_c"), "ci_high"]


def test_withheld_stays_are_nested_and_sized_by_the_rate():
    masks = [withheld_stays(101, rate, 5) for rate in (0.0, 0.25, 0.5, 1.0)]
    assert [int(m.sum()) for m in masks] == [0, 25, 50, 101]  # round(25.25), round(50.5) (banker's), 101
    for smaller, larger in zip(masks, masks[1:]):
        assert not (smaller & ~larger).any()


def test_test_time_missingness_mixes_scores_as_withheld(grid):
    cells = load_cells(_runs(grid), MODALITIES)
    curve, summary = missingness_at_test_time(cells, {"fused": True}, [0.0, 0.5, 1.0], n_boot=N_BOOT, seed=3)
    assert set(curve["model"]) == {"cxr_model", "fused"}  # models that read an X-ray
    fused = cells["phenotyping", "fused", "natural"]
    y = fused.labels_of("paired_test")
    mask = withheld_stays(y.shape[0], 0.5, 3)[:, None]
    mixed = [np.where(mask, a, p) for p, a in zip(fused.scores("paired_test"), fused.scores("paired_test", "p_nocxr"))]
    rows = curve[(curve["model"] == "fused") & (curve["metric"] == "auroc") & (curve["label"] == "ph_c")]
    estimate = rows.set_index("rate")["estimate"]
    for rate, scores in ((0.0, fused.scores("paired_test")), (0.5, mixed),
                         (1.0, fused.scores("paired_test", "p_nocxr"))):
        assert estimate[rate] == pytest.approx(np.mean([roc_auc_score(y[:, 2], p[:, 2]) for p in scores]), abs=1e-12)
    row = summary[(summary["model"] == "fused") & (summary["metric"] == "auroc")].iloc[0]
    macro = curve[(curve["model"] == "fused") & (curve["metric"] == "auroc") & (curve["label"] == "macro")]
    values = macro.set_index("rate")["estimate"]
    assert row["auc"] == pytest.approx((values[0.0] + 2 * values[0.5] + values[1.0]) / 4, abs=1e-12)
    assert row["drop"] == pytest.approx(values[0.0] - values[1.0], abs=1e-12)
    assert row["drop_low"] > 0 and bool(row["missing_aware"])
    # against a baseline: the difference of the two drops on the same resamples
    _, against = missingness_at_test_time(cells, {}, [0.0, 0.5, 1.0], baseline="fused", n_boot=N_BOOT, seed=3)
    against = against[against["metric"] == "auroc"].set_index("model")
    assert against.loc["cxr_model", "drop_vs_baseline"] == pytest.approx(
        against.loc["cxr_model", "drop"] - against.loc["fused", "drop"], abs=1e-12)
    assert np.isnan(against.loc["fused", "drop_vs_baseline"])


def test_train_missingness_curve_reports_every_rate_and_serves_ehr_only_runs(tmp_path):
    rng = np.random.default_rng(1)
    y = {"val": rng.integers(0, 2, (80, 1)), "test": rng.integers(0, 2, (100, 1))}
    ids = {"val": np.arange(80), "test": np.arange(500, 600)}
    for model, missing, signal in (("fused", "miss0.0", 3.0), ("fused", "miss0.5", 1.5), ("fused", "miss1.0", 0.5),
                                   ("ehr_model", "miss0.0", 1.0)):
        sets = {}
        for eval_set, part in (("val", "val"), ("paired_test", "test"), ("partial_test", "test")):
            sets[eval_set] = {"stay_id": ids[part], "y": y[part], "p": noisy_scores(rng, y[part], signal)}
        write_run(tmp_path, "mortality", model, missing, 1, ["mortality"], sets)
    cells = load_cells(_runs(tmp_path), MODALITIES, ehr_only_models=["ehr_model"],
                       grid_missing=["miss0.0", "miss0.5", "miss1.0"])
    curve, summary = missingness_in_training(cells, {"fused": True}, n_boot=N_BOOT, seed=0)
    ehr = curve[(curve["model"] == "ehr_model") & (curve["metric"] == "auroc") & (curve["eval_set"] == "paired_test")]
    assert list(ehr["rate"]) == [0.0, 0.5, 1.0] and ehr["estimate"].nunique() == 1  # one run serves every rate
    fused = curve[(curve["model"] == "fused") & (curve["metric"] == "auroc") & (curve["eval_set"] == "paired_test")]
    expected = [roc_auc_score(y["test"][:, 0], cells["mortality", "fused", m].scores("paired_test")[0][:, 0])
                for m in ("miss0.0", "miss0.5", "miss1.0")]
    np.testing.assert_allclose(fused.sort_values("rate")["estimate"], expected, atol=1e-12)
    row = summary[(summary["model"] == "fused") & (summary["metric"] == "auroc")
                  & (summary["eval_set"] == "paired_test")].iloc[0]
    assert row["auc"] == pytest.approx((expected[0] + 2 * expected[1] + expected[2]) / 4, abs=1e-12)
    assert row["drop"] == pytest.approx(expected[0] - expected[2], abs=1e-12) and row["drop_low"] > 0


def test_drop_against_the_fusion_baseline_equals_sklearn_on_the_shared_resamples(tmp_path):
    # a robust model keeps its signal as the training X-ray share falls, the baseline loses it; a third model is
    # trained at two of the three rates only, so it has no drop over the baseline's rates
    rng = np.random.default_rng(2)
    y = {"val": rng.integers(0, 2, (80, 1)), "test": rng.integers(0, 2, (120, 1))}
    ids = {"val": np.arange(80), "test": np.arange(500, 620)}
    runs = (("robust", "miss0.0", 2.0), ("robust", "miss0.5", 2.0), ("robust", "miss1.0", 1.9),
            ("baseline", "miss0.0", 2.5), ("baseline", "miss0.5", 1.2), ("baseline", "miss1.0", 0.2),
            ("partial", "miss0.0", 2.0), ("partial", "miss0.5", 1.0))
    for model, missing, signal in runs:
        sets = {eval_set: {"stay_id": ids[part], "y": y[part], "p": noisy_scores(rng, y[part], signal)}
                for eval_set, part in (("val", "val"), ("paired_test", "test"), ("partial_test", "test"))}
        write_run(tmp_path, "mortality", model, missing, 1, ["mortality"], sets)
    modalities = {name: ["ehr", "cxr"] for name in ("robust", "baseline", "partial")}
    cells = load_cells(_runs(tmp_path), modalities, grid_missing=["miss0.0", "miss0.5", "miss1.0"])
    _, summary = missingness_in_training(cells, {}, baseline="baseline", n_boot=N_BOOT, seed=4)
    rows = summary[(summary["metric"] == "auroc") & (summary["eval_set"] == "paired_test")].set_index("model")
    weights = resample_weights(y["test"].shape[0], N_BOOT, 4)

    def drop(model):  # AUROC at rate 0 minus at rate 1, per resample, by np.repeat and scikit-learn
        first, last = (cells["mortality", model, m].scores("paired_test") for m in ("miss0.0", "miss1.0"))
        return _slow_difference(y["test"], first, last, 0, weights)

    slow = drop("robust") - drop("baseline")
    assert rows.loc["robust", "drop_vs_baseline"] == pytest.approx(slow[0], abs=1e-12)
    assert rows.loc["robust", "drop_vs_baseline"] == pytest.approx(
        rows.loc["robust", "drop"] - rows.loc["baseline", "drop"], abs=1e-12)
    assert rows.loc["robust", "drop_vs_baseline_low"] == pytest.approx(np.percentile(slow[1:], 2.5), abs=1e-12)
    assert rows.loc["robust", "drop_vs_baseline_high"] == pytest.approx(np.percentile(slow[1:], 97.5), abs=1e-12)
    below, above = (slow[1:] <= 0).sum(), (slow[1:] >= 0).sum()
    assert rows.loc["robust", "drop_vs_baseline_p"] == pytest.approx(min(1.0, 2 * min(below + 1, above + 1)
                                                                         / (N_BOOT + 1)))
    assert rows.loc["robust", "drop_vs_baseline_high"] < 0  # it loses less than the baseline
    assert np.isnan(rows.loc["baseline", "drop_vs_baseline"]) and np.isnan(rows.loc["partial", "drop_vs_baseline"])
    # without a baseline (or one not in the grid) the columns are there, empty
    for baseline in (None, "no_such_model"):
        _, plain = missingness_in_training(cells, {}, baseline=baseline, n_boot=20, seed=4)
        assert plain["drop_vs_baseline"].isna().all()


def test_fusion_gain_writes_tables_and_figures_with_aggregates_only(grid, tmp_path):
    signal_map = tmp_path / "signal_map.json"
    signal_map.write_text('{"ph_a": "ehr", "ph_b": "ehr", "ph_c": "cxr", "mortality_description": "x"}')
    table = run_fusion_gain(_runs(grid), MODALITIES, tmp_path / "out" / "fusion_gain", tmp_path / "fig" / "fusion_gain",
                            signal_map=signal_map, n_boot=N_BOOT)
    for suffix in (".csv", ".md", ".tex"):
        assert (tmp_path / "out" / f"fusion_gain{suffix}").stat().st_size > 0
    for suffix in (".png", ".svg"):
        assert (tmp_path / "fig" / f"fusion_gain{suffix}").stat().st_size > 0
    assert "\\toprule" in (tmp_path / "out" / "fusion_gain.tex").read_text()
    assert dict(zip(table["label"], table["signal"]))["ph_c"] == "cxr"
    # a signal class's gain is the mean of its labels' gains, on every resample
    auroc = table[(table["metric"] == "auroc") & (table["eval_set"] == "paired_test")
                  & (table["reference"] == "best_ehr_only")].set_index("label")
    assert auroc.loc["class:cxr", "gain"] == pytest.approx(auroc.loc["ph_c", "gain"], abs=1e-12)
    assert auroc.loc["class:ehr", "gain"] == pytest.approx(auroc.loc[["ph_a", "ph_b"], "gain"].mean(), abs=1e-12)
    assert auroc.loc["class:cxr", "q_value"] < 0.05 < auroc.loc["class:ehr", "q_value"]
    written = pd.read_csv(tmp_path / "out" / "fusion_gain.csv")
    assert "stay_id" not in written.columns and len(written) == len(table)


def test_slices_in_parallel_processes_give_the_serial_tables(grid):
    """Two (task, missing) slices: the tables on 2 cores (one forked worker per slice) equal those on 1."""
    rng = np.random.default_rng(5)
    natural = load_cells(_runs(grid), MODALITIES)
    for (task, model, _), cell in natural.items():
        for seed, run in zip((1, 2), cell.runs):
            sets = {}
            for eval_set in ("val", "paired_test", "partial_test"):
                frame = run.eval_set(eval_set)
                y = frame[[f"y_{label}" for label in LABELS]].to_numpy()
                sets[eval_set] = {"stay_id": frame["stay_id"].to_numpy(), "y": y, "p": _scores(rng, y, 1.5),
                                  "p_nocxr": _scores(rng, y, 1.0), "p_noehr": _scores(rng, y, 0.5),
                                  "has_cxr": frame["has_cxr"].to_numpy()}
            write_run(grid, task, model, "miss0.5", seed, LABELS, sets)
    cells = load_cells(_runs(grid), MODALITIES)
    options = dict(n_boot=50, seed=3)
    for table in (lambda threads: fusion_gain_table(cells, threads=threads, **options),
                  lambda threads: imbalance_table(cells, threads=threads, **options),
                  lambda threads: missingness_at_test_time(cells, {}, [0, 0.5, 1], threads=threads, **options)[0]):
        serial, parallel = table(1), table(2)
        assert set(serial["missing"]) == {"natural", "miss0.5"}
        pd.testing.assert_frame_equal(serial, parallel)


def test_published_table_formats(tmp_path):
    long = pd.DataFrame({"model": ["late_fusion", "a&b"], "estimate": [0.8125, np.nan], "n": pd.array([12, None],
                         dtype="Int64"), "suppressed": [False, True], "group": ["50% / x_y", "{#$~^\\}"]})
    write_table(long, tmp_path / "t", title="Gap_x & y", notes=["note"])
    csv = (tmp_path / "t.csv").read_text().splitlines()
    assert csv == ['"model","estimate","n","suppressed","group"', '"late_fusion",0.8125,12,false,"50% / x_y"',
                   '"a&b",,,true,"{#$~^\\}"']
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["suppressed"].tolist() == [False, True] and back["group"].tolist() == ["50% / x_y", "{#$~^\\}"]
    assert np.isnan(back.loc[1, "estimate"]) and back.loc[0, "n"] == 12 and np.isnan(back.loc[1, "n"])
    tex = (tmp_path / "t.tex").read_text().splitlines()
    assert tex[:5] == ["\\begin{table}", "\\caption{Gap\\_x \\& y}\\label{tab:t}", "\\begin{tabular}{lrrll}",
                       "\\toprule", "model & estimate & n & suppressed & group \\\\"]
    assert tex[6] == "late\\_fusion & 0.8125 & 12 & False & 50\\% / x\\_y \\\\"
    assert tex[7] == ("a\\&b &  &  & True & \\{\\#\\$\\textasciitilde{}\\textasciicircum{}\\textbackslash{}\\} \\\\")
    assert tex[-3:] == ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    many = pd.DataFrame({"x": np.arange(41)})
    long_tex = latex_table(many, caption="c", label="tab:c").splitlines()
    assert long_tex[0] == "\\begin{longtable}{r}" and long_tex[-1] == "\\end{longtable}"
    assert "\\endhead" in long_tex and sum(line.endswith("\\\\") and line[0].isdigit() for line in long_tex) == 41
