"""End-to-end: the whole workflow on a tiny synthetic config, through the snakemake CLI."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ehrcxr.evaluate.aggregate import rerun_command

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def tiny_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["synthetic"].update(n_stays=400, image_size=64)
    config["cxr"].update(image_size=64, frozen_stages=3)
    config["pretrain"].update(epochs=1)
    config["train"].update(epochs=2, patience=1)
    config["missing"] = ["natural", "miss0.5"]
    config["evaluate"].update(n_bootstrap=50)
    return config


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [*SNAKEMAKE, "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    return workdir


def test_single_target_builds_only_its_ancestors(workdir):
    target = "results/synthetic/runs/mortality/ehr_lstm/natural/seed1/metrics.json"
    result = snakemake(workdir, target, "--dry-run", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    rules = {line.split()[0] for line in result.stdout.splitlines() if line and line.split()[0] in
             {"synthesize", "cohort", "ehr_tensor", "cxr_cache", "pretrain_cxr", "train", "aggregate"}}
    # an EHR-only cell needs the CXR index (to know which stays are paired) but neither pretraining nor aggregation
    assert rules == {"synthesize", "cohort", "ehr_tensor", "cxr_cache", "train"}


def test_lint_is_clean(workdir):
    result = snakemake(workdir, "--lint")
    assert result.returncode == 0 and "Congratulations" in result.stdout + result.stderr, result.stdout


def test_config_is_validated_against_the_schema(tmp_path):
    config = tiny_config()
    config["missing"] = ["natural", "drop50"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Error validating config file" in output and "'drop50' does not match" in output


def test_whole_grid_runs_to_the_tables(workdir):
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    config = tiny_config()
    table = pd.read_csv(workdir / "results/synthetic/tables/main_results.csv")
    assert list(table.columns) == ["task", "model", "missing", "eval_set", "metric", "estimate", "ci_low",
                                   "ci_high", "n_seeds", "selection", "n_stays", "n_positive", "n_labels_scored",
                                   "single_class_labels"]
    macro = table[table["metric"].isin(["auroc", "auprc"])]
    cells = {(t, m, s) for t in config["tasks"] for m in config["models"] for s in config["missing"]}
    assert {tuple(row) for row in macro[macro["model"] != "oracle"][["task", "model", "missing"]].values} == cells
    assert set(macro["eval_set"]) == {"paired_test", "partial_test"}
    assert set(table.loc[table["model"] == "oracle", "task"]) == set(config["tasks"])
    # percentile intervals need not contain the estimate (AUPRC is biased upward under resampling)
    assert ((0 <= macro["ci_low"]) & (macro["ci_low"] <= macro["ci_high"]) & (macro["ci_high"] <= 1)).all()
    assert macro["estimate"].between(0, 1).all()
    assert "stay_id" not in table.columns
    metrics = json.loads((workdir / "results/synthetic/runs/phenotyping/drfuse/miss0.5/seed1/metrics.json").read_text())
    assert metrics["task"] == "phenotyping" and len(metrics["labels"]) == 25
    # every row says what it rests on: the run's own test-set sizes and selection criterion
    rows = macro[(macro["task"] == "phenotyping") & (macro["model"] == "drfuse") & (macro["missing"] == "miss0.5")]
    assert (rows["selection"] == metrics["selection_metric"]).all()
    for eval_set in ("paired_test", "partial_test"):
        assert (rows.loc[rows["eval_set"] == eval_set, "n_stays"] == metrics["n_stays"][eval_set]).all()
    # snakemake benchmark files stay with the dataset's results, out of the repository's benchmarks/ scripts
    assert (workdir / "results/synthetic/benchmarks/train/phenotyping/drfuse/miss0.5/seed1.tsv").is_file()
    assert (workdir / "results/synthetic/benchmarks/aggregate.tsv").is_file() and not (workdir / "benchmarks").exists()
    # nothing left to do afterwards
    again = snakemake(workdir, "--dry-run", "--quiet")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # the command the aggregation prints for outdated runs retrains exactly those, then the tables
    outdated = ["results/synthetic/runs/mortality/ehr_lstm/natural/seed1",
                "results/synthetic/runs/phenotyping/drfuse/miss0.5/seed1"]
    command = shlex.split(rerun_command(outdated))
    assert command[0] == "snakemake"
    forced = snakemake(workdir, *command[1:], "--dry-run")
    output = forced.stdout + forced.stderr
    assert forced.returncode == 0, output[-5000:]
    stats = output[output.index("Job stats:"):]
    stats = stats[:stats.index("\ntotal")]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", stats, re.MULTILINE))
    assert jobs == {"train": "2", "aggregate": "1", "all": "1"}
    assert sorted(re.findall(r"^\s*output: (\S*runs/\S+)/metrics\.json", output, re.MULTILINE)) == outdated
