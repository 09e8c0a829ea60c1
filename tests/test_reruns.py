"""Exact partial reruns and failed cells, through the snakemake CLI on a tiny grid.

One real run of a 4-cell grid (mortality × {ehr_lstm, late_fusion, cxr_resnet, medfuse} × natural × seed 1, with
the seed's CXR pretraining and medfuse's EHR pretraining) is shared by the workflow tests; each config change is
checked with a dry run: only the jobs that read the changed setting are planned. Then a changed setting retrains
a cell for real, and one cell is made to fail for real while the others finish and `aggregate_available`
tabulates them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from ehrcxr.evaluate.aggregate import aggregate_runs
from test_workflow import tiny_config

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("results/synthetic/runs")
TABLES = Path("results/synthetic/tables")
# EHR only; both modalities, pretrained cxr; CXR only, pretrained cxr; both modalities, pretrained ehr and cxr
MODELS = ("ehr_lstm", "late_fusion", "cxr_resnet", "medfuse")
CXR_MODELS = {"late_fusion", "cxr_resnet", "medfuse"}
CELLS = {model: f"mortality/{model}/natural/seed1" for model in MODELS}
ANALYSIS_RULES = ("fusion_gain", "modality_imbalance", "robustness", "xray_age", "ranking", "calibration", "fairness")


def rerun_config() -> dict:
    """The smallest grid that still has an EHR-only, a CXR-only and two fusion cells, one loading both
    pretraining stages."""
    config = tiny_config()
    config["synthetic"].update(n_stays=200)
    config["tasks"] = ["mortality"]
    config["models"] = {model: config["models"][model] for model in MODELS}
    config["missing"] = ["natural"]
    config["seeds"] = [1]
    config["pretrain"].update(epochs=1)
    config["train"].update(epochs=1, patience=1)
    config["evaluate"].update(n_bootstrap=20)
    return config


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    """The snakemake CLI in ``workdir`` on 2 cores, with ``config`` written to its config.yaml."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory",
               str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def dry_run(workdir: Path, config: dict, *targets: str) -> str:
    result = snakemake(workdir, config, *targets, "--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


def planned_jobs(workdir: Path, config: dict, *targets: str) -> tuple[dict[str, int], str]:
    """Dry run: the number of jobs per rule (analyses included), and the dry run's output."""
    output = dry_run(workdir, config, *targets)
    if "Nothing to be done" in output:
        return {}, output
    stats = output[output.index("Job stats:"):]
    stats = stats[:stats.index("\ntotal")]
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)\s*$", stats, re.MULTILINE)}, output


def planned(workdir: Path, config: dict, *targets: str) -> tuple[dict[str, int], set[str]]:
    """Dry run: the number of jobs per rule, and the cells (task/model/missing/seedN) that would be trained. The
    analyses read every cell and the evaluate: settings, so for the default target they follow every retrained
    cell and every evaluate: change (checked here, then left out of the returned jobs)."""
    jobs, output = planned_jobs(workdir, config, *targets)
    analyses = {rule: jobs.pop(rule) for rule in ANALYSIS_RULES if rule in jobs}
    if not targets and ("train" in jobs or "aggregate" in jobs):  # the default target: the whole grid
        assert analyses == {rule: 1 for rule in ANALYSIS_RULES}, analyses
    cells = set(re.findall(r"^\s*output: \S*runs/([^/\s]+/[^/\s]+/[^/\s]+/seed\d+)/metrics\.json", output,
                           re.MULTILINE))
    return jobs, cells


def planned_encoders(workdir: Path, config: dict) -> set[str]:
    """Dry run: the pretrained encoders (under results/synthetic/pretrain/) that would be built."""
    outputs = ", ".join(re.findall(r"^\s*output: (.+)$", dry_run(workdir, config), re.MULTILINE)).split(", ")
    return {path.removeprefix("results/synthetic/pretrain/") for path in outputs
            if path.startswith("results/synthetic/pretrain/") and path.endswith(".pt")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("reruns")
    result = snakemake(workdir, rerun_config())
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


def test_finished_grid_plans_nothing(workdir):
    assert planned(workdir, rerun_config()) == ({}, set())


def test_model_hyperparameter_reruns_only_that_models_cells(workdir):
    config = rerun_config()
    config["models"]["ehr_lstm"]["params"]["hidden"] = 48
    assert planned(workdir, config) == ({"train": 1, "aggregate": 1, "all": 1}, {CELLS["ehr_lstm"]})


def test_evaluation_setting_reruns_only_the_aggregation(workdir):
    config = rerun_config()
    config["evaluate"]["n_bootstrap"] = 30
    assert planned(workdir, config) == ({"aggregate": 1, "all": 1}, set())


def test_analysis_setting_reruns_only_the_analyses(workdir):
    config = rerun_config()
    config["analysis"]["fairness_min_stays"] = 11
    assert planned_jobs(workdir, config)[0] == {rule: 1 for rule in ANALYSIS_RULES} | {"all": 1}


def test_training_setting_reruns_every_cell_and_ehr_pretraining_but_no_data_stage(workdir):
    # medfuse's EHR pretraining trains with its train: settings; CXR pretraining has its own pretrain: section
    config = rerun_config()
    config["train"]["lr"] = 0.002
    assert planned(workdir, config) == ({"pretrain_ehr": 1, "train": 4, "aggregate": 1, "all": 1},
                                        set(CELLS.values()))


def test_cxr_image_size_reruns_the_image_stages_and_cxr_cells_only(workdir):
    config = rerun_config()
    config["cxr"]["image_size"] = 32
    jobs, cells = planned(workdir, config)
    assert jobs == {"cxr_cache": 1, "pretrain_cxr": 1, "cxr_features": 1, "train": 3, "aggregate": 1, "all": 1}
    assert cells == {CELLS[model] for model in CXR_MODELS}


def test_frozen_stages_reruns_the_cxr_cells_but_not_pretraining(workdir):
    config = rerun_config()
    config["cxr"]["frozen_stages"] = 2  # late_fusion keeps its own frozen_stages 4 (tiny_config)
    assert planned(workdir, config) == ({"train": 2, "aggregate": 1, "all": 1},
                                        {CELLS[model] for model in CXR_MODELS - {"late_fusion"}})


def test_cohort_setting_reruns_everything_after_synthesis(workdir):
    # the EHR-only cell reads the CXR index as ancient(); a new cohort must still rerun it (via stays.parquet)
    config = rerun_config()
    config["cohort"]["min_age"] = 19
    jobs, cells = planned(workdir, config)
    assert jobs == {"cohort": 1, "ehr_tensor": 1, "cxr_cache": 1, "pretrain_cxr": 1, "cxr_features": 1,
                    "pretrain_ehr": 1, "train": 4, "aggregate": 1, "ddl_pairs": 1, "all": 1}
    assert cells == set(CELLS.values())


def _published_medfuse(config: dict, mode: str) -> None:
    config["settings"] = mode
    config["models"]["medfuse"]["published"] = {"train": {"optimiser": "adam", "lr": 0.0001}}


@pytest.mark.parametrize("change, jobs, models", [
    pytest.param(lambda c: c["models"]["late_fusion"].update(train={"optimiser": "adam"}), {"train": 1},
                 {"late_fusion"}, id="a model's own train override"),
    pytest.param(lambda c: c["train"].update(selection="val_auroc"), {"pretrain_ehr": 1, "train": 4}, set(MODELS),
                 id="a new train key"),
    pytest.param(lambda c: c["cxr"].update(augment=None), {"train": 3}, CXR_MODELS, id="cxr augmentation"),
    pytest.param(lambda c: c["pretrain"].update(epochs=2), {"pretrain_cxr": 1, "cxr_features": 1, "train": 3},
                 CXR_MODELS,
                 id="cxr pretraining"),
    pytest.param(lambda c: c["models"]["medfuse"]["params"].update(hidden=48), {"pretrain_ehr": 1, "train": 1},
                 {"medfuse"}, id="params of the ehr-pretrained model"),
    pytest.param(lambda c: c["models"]["medfuse"].update(pretrained=["cxr"]), {"train": 1}, {"medfuse"},
                 id="ehr pretraining dropped"),
    pytest.param(lambda c: c["models"]["late_fusion"].pop("pretrained"), {"train": 1}, {"late_fusion"},
                 id="cxr pretraining dropped"),
    pytest.param(lambda c: _published_medfuse(c, "harmonised"), {}, set(), id="published block, harmonised"),
    pytest.param(lambda c: _published_medfuse(c, "published"), {"pretrain_ehr": 1, "train": 1}, {"medfuse"},
                 id="published block, published"),
])
def test_model_settings_rerun_exactly_the_jobs_that_use_them(workdir, change, jobs, models):
    config = rerun_config()
    change(config)
    expected = ({**jobs, "aggregate": 1, "all": 1}, {CELLS[model] for model in models}) if jobs else ({}, set())
    assert planned(workdir, config) == expected


def test_pretraining_is_per_seed_and_per_cxr_depth(workdir):
    config = rerun_config()
    config["seeds"] = [1, 2]
    jobs, cells = planned(workdir, config)
    assert jobs == {"pretrain_cxr": 1, "cxr_features": 1, "pretrain_ehr": 1, "train": 4, "aggregate": 1, "all": 1}
    assert cells == {cell.replace("seed1", "seed2") for cell in CELLS.values()}
    assert planned_encoders(workdir, config) == {"seed2/cxr_resnet18.pt", "seed2/ehr/mortality/medfuse.pt"}

    config = rerun_config()
    config["models"]["cxr_resnet"]["cxr"] = {"depth": 34}  # its own encoder; the others keep ResNet-18's
    assert planned(workdir, config) == ({"pretrain_cxr": 1, "train": 1, "aggregate": 1, "all": 1},
                                        {CELLS["cxr_resnet"]})
    assert planned_encoders(workdir, config) == {"seed1/cxr_resnet34.pt"}


def test_deleted_metrics_rebuild_only_their_job(workdir):
    metrics = RUNS / CELLS["late_fusion"] / "metrics.json"
    aside = workdir / metrics.with_name("metrics.json.aside")
    shutil.move(workdir / metrics, aside)
    try:
        result = planned(workdir, rerun_config(), str(metrics))
    finally:
        shutil.move(aside, workdir / metrics)
    assert result == ({"train": 1}, {CELLS["late_fusion"]})


def test_changed_setting_retrains_the_cell(workdir):
    # the rerun must not resume from the finished run's checkpoint.pt, which holds the old model
    run = workdir / RUNS / CELLS["ehr_lstm"]
    before = pd.read_parquet(run / "predictions.parquet")
    config = rerun_config()
    config["train"]["lr"] = 0.01
    result = snakemake(workdir, config, str(RUNS / CELLS["ehr_lstm"] / "metrics.json"))
    assert result.returncode == 0, result.stderr[-5000:]
    after = pd.read_parquet(run / "predictions.parquet")
    assert not np.allclose(before["p_mortality"], after["p_mortality"])


def _markdown_rows(section: str) -> list[list[str]]:
    """Body rows of the first Markdown table in ``section``, cells stripped."""
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def _auroc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    return roc_auc_score(y, p) if len(np.unique(y)) == 2 else np.nan


def test_failed_cell_keeps_going_and_available_results_list_it(workdir):
    config = rerun_config()
    config["train"]["lr"] = 0.002  # every cell is retrained ...
    config["models"]["ehr_lstm"]["params"]["dropout"] = 1.5  # ... and nn.Dropout rejects p > 1 in this one
    started = time.time()
    result = snakemake(workdir, config, "--keep-going")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "dropout probability has to be between 0 and 1" in output, output[-5000:]
    assert not (workdir / RUNS / CELLS["ehr_lstm"] / "metrics.json").exists()
    for model in ("late_fusion", "cxr_resnet"):  # rerun despite the failure
        assert (workdir / RUNS / CELLS[model] / "metrics.json").stat().st_mtime > started
    assert (workdir / TABLES / "main_results.csv").stat().st_mtime < started  # the strict tables wait

    # the strict tables need the failed cell; the available-results target only tabulates what exists
    assert planned(workdir, config, "--forcerun", "aggregate") == ({"train": 1, "aggregate": 1, "all": 1},
                                                                   {CELLS["ehr_lstm"]})
    assert planned(workdir, config, "aggregate_available") == ({"aggregate_available": 1}, set())
    result = snakemake(workdir, config, "aggregate_available")
    assert result.returncode == 0, result.stderr[-5000:]

    table = pd.read_csv(workdir / TABLES / "available_results.csv")
    assert set(table["model"]) == {"late_fusion", "cxr_resnet", "medfuse", "oracle"}
    predictions = pd.read_parquet(workdir / RUNS / CELLS["late_fusion"] / "predictions.parquet")
    partial = predictions[predictions["eval_set"] == "partial_test"]
    row = table[(table["model"] == "late_fusion") & (table["eval_set"] == "partial_test")
                & (table["metric"] == "auroc")]
    assert row["estimate"].to_numpy() == pytest.approx(
        [_auroc_or_nan(partial["y_mortality"].to_numpy(), partial["p_mortality"].to_numpy())], nan_ok=True)

    markdown = (workdir / TABLES / "available_results.md").read_text()
    assert markdown.startswith("# Available results")
    missing = markdown.split("## Missing cells: 1 of 4 runs")[1].split("\n## ")[0]
    assert _markdown_rows(missing) == [["mortality", "ehr_lstm", "natural", "1", str(RUNS / CELLS["ehr_lstm"])]]
    log = (workdir / "logs/synthetic/aggregate_available.log").read_text()
    assert f"1 of 4 runs are missing and left out of the tables: {RUNS / CELLS['ehr_lstm']}" in log


def _write_run(run_dir: Path, model: str, stays: np.ndarray, paired: np.ndarray, y: np.ndarray,
               p: np.ndarray, missing: str = "natural", seed: int = 1, selection: str = "val_auprc") -> Path:
    run_dir.mkdir(parents=True)
    frame = pd.DataFrame({"stay_id": stays, "y_mortality": y, "p_mortality": p})
    pd.concat([frame[paired].assign(eval_set="paired_test"), frame.assign(eval_set="partial_test")]).to_parquet(
        run_dir / "predictions.parquet")
    (run_dir / "metrics.json").write_text(json.dumps(
        {"task": "mortality", "model": model, "missing": missing, "seed": seed, "labels": ["mortality"],
         "selection_metric": selection}))
    return run_dir


def test_ehr_only_runs_at_one_rate_are_reported_at_every_rate(tmp_path):
    rng = np.random.default_rng(1)
    stays, y = np.arange(200, 240), np.tile([0, 1, 0, 1, 1], 8)
    paired = stays % 3 != 0
    p = {name: rng.random(40) for name in ("lstm_natural", "lstm_seed1", "lstm_seed2", "fusion_0.1", "fusion_0.5")}
    runs = tmp_path / "runs" / "mortality"
    run_dirs = [
        _write_run(runs / "lstm/natural/seed1", "lstm", stays, paired, y, p["lstm_natural"]),
        _write_run(runs / "lstm/miss0.1/seed1", "lstm", stays, paired, y, p["lstm_seed1"], "miss0.1", 1, "val_auroc"),
        _write_run(runs / "lstm/miss0.1/seed2", "lstm", stays, paired, y, p["lstm_seed2"], "miss0.1", 2, "val_auroc"),
        _write_run(runs / "fusion/miss0.1/seed1", "fusion", stays, paired, y, p["fusion_0.1"], "miss0.1"),
        _write_run(runs / "fusion/miss0.5/seed1", "fusion", stays, paired, y, p["fusion_0.5"], "miss0.5", 1,
                   "val_loss"),
    ]
    out_csv, out_md = tmp_path / "main.csv", tmp_path / "main.md"
    grid = ["natural", "miss0.1", "miss0.5", "miss0.9"]
    table = aggregate_runs(run_dirs, out_csv, out_md, n_boot=10, ehr_only_models=["lstm"], grid_missing=grid)
    written = pd.read_csv(out_csv)
    assert written[["model", "missing", "run_missing"]].equals(table[["model", "missing", "run_missing"]])
    macro = table[table["metric"] == "auroc"].set_index(["model", "missing", "eval_set"])
    # the EHR-only model's two miss0.1 runs give its rows at every miss<r> of the grid; the fusion model only has
    # the rates it was trained at
    assert set(macro.index.droplevel("eval_set")) == {("lstm", "natural"), ("lstm", "miss0.1"), ("lstm", "miss0.5"),
                                                     ("lstm", "miss0.9"), ("fusion", "miss0.1"), ("fusion", "miss0.5")}
    for eval_set, rows in (("paired_test", paired), ("partial_test", slice(None))):
        pooled = np.mean([roc_auc_score(y[rows], p[f"lstm_seed{seed}"][rows]) for seed in (1, 2)])
        for missing in ("miss0.1", "miss0.5", "miss0.9"):
            row = macro.loc[("lstm", missing, eval_set)]
            assert row["estimate"] == pytest.approx(pooled)
            assert (row["run_missing"], row["n_seeds"], row["selection"]) == ("miss0.1", 2, "val_auroc")
        assert macro.loc[("lstm", "natural", eval_set), "estimate"] == pytest.approx(
            roc_auc_score(y[rows], p["lstm_natural"][rows]))
    assert (macro.xs("fusion")["run_missing"] == macro.xs("fusion").index.get_level_values("missing")).all()
    assert macro.loc[("lstm", "natural", "paired_test"), "run_missing"] == "natural"

    markdown = out_md.read_text()
    assert ("**† EHR-only: one run serves every miss<r>.**" in markdown
            and "mortality/lstm: 2 run(s) at miss0.1 also give miss0.5, miss0.9." in markdown)
    assert "**Selected without validation AUPRC**: mortality/fusion/miss0.5 (val_loss)." in markdown  # not val_auroc
    auroc = markdown.split("## mortality — paired_test")[1].split("### Macro AUROC")[1].split("\n## ")[0]
    header, lstm = auroc.strip().splitlines()[0], next(r for r in _markdown_rows(auroc) if r[0] == "lstm")
    assert [cell.strip() for cell in header.strip("|").split("|")] == ["model", "natural", "miss0.1", "miss0.5",
                                                                      "miss0.9"]
    assert [cell.endswith("†") for cell in lstm[1:]] == [False, False, True, True]

    # without the grid, every row is its own runs'
    plain = aggregate_runs(run_dirs, out_csv, out_md, n_boot=10)
    assert (plain["run_missing"] == plain["missing"]).all() and "miss0.9" not in set(plain["missing"])


def test_aggregate_lists_missing_runs_and_checks_shared_test_stays(tmp_path):
    rng = np.random.default_rng(0)
    stays, y = np.arange(100, 130), np.tile([0, 1, 1], 10)
    paired = stays % 2 == 0
    p_lstm, p_fusion = rng.random(30), rng.random(30)
    runs = tmp_path / "runs" / "mortality"
    present = [_write_run(runs / "lstm/natural/seed1", "lstm", stays, paired, y, p_lstm),
               _write_run(runs / "fusion/natural/seed1", "fusion", stays, paired, y, p_fusion)]
    failed = runs / "fusion" / "miss0.5" / "seed2"
    failed.mkdir(parents=True)  # a failed job leaves its directory without outputs
    never_run = tmp_path / "runs" / "phenotyping" / "lstm" / "natural" / "seed1"
    run_dirs = present + [failed, never_run]
    out_csv, out_md = tmp_path / "available.csv", tmp_path / "available.md"
    with pytest.raises(FileNotFoundError, match="miss0.5/seed2"):
        aggregate_runs(run_dirs, out_csv, out_md, n_boot=10)

    table = aggregate_runs(run_dirs, out_csv, out_md, n_boot=10, allow_missing=True)
    assert set(zip(table["model"], table["missing"])) == {("lstm", "natural"), ("fusion", "natural")}
    estimate = table.loc[(table["model"] == "fusion") & (table["eval_set"] == "paired_test")
                         & (table["metric"] == "auroc"), "estimate"]
    assert estimate.to_numpy() == pytest.approx([roc_auc_score(y[paired], p_fusion[paired])])
    markdown = out_md.read_text()
    assert markdown.startswith("# Available results")
    assert markdown.index("## Missing cells: 2 of 4 runs") < markdown.index("## mortality — paired_test")
    missing = markdown.split("## Missing cells: 2 of 4 runs")[1].split("\n## ")[0]
    assert _markdown_rows(missing) == [["mortality", "fusion", "miss0.5", "2", str(failed)],
                                       ["phenotyping", "lstm", "natural", "1", str(never_run)]]
    # nothing missing: the page says so
    aggregate_runs(present, out_csv, out_md, n_boot=10, allow_missing=True)
    assert "No missing cells: all 2 runs of the grid are present." in out_md.read_text()
    aggregate_runs(present, out_csv, out_md, n_boot=10)  # strict: the main-results page, no missing section
    markdown = out_md.read_text()
    assert markdown.startswith("# Main results") and "Missing cells" not in markdown

    # a run scored on other test stays (trained on an older cohort or CXR index, so older) is named, not pooled
    stale = _write_run(runs / "stale/natural/seed1", "stale", stays, stays % 3 == 0, y, p_lstm)
    os.utime(stale / "predictions.parquet", ns=(0, 0))
    with pytest.raises(ValueError, match=r"1 of 3 runs are outdated .*\n  \S*stale/natural/seed1: 10 paired_test "
                                         r"stays, the newest run 15 "):
        aggregate_runs(present + [stale], out_csv, out_md, n_boot=10)
