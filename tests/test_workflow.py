"""End-to-end: the whole workflow on a tiny synthetic config, through the snakemake CLI."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    config["models"]["late_fusion"]["cxr"] = {"frozen_stages": 4}  # reads the encoder's stored pooled features
    config["pretrain"].update(epochs=1)
    config["train"].update(epochs=2, patience=1)
    config["missing"] = ["natural", "miss0.0", "miss0.5"]
    config["evaluate"].update(n_bootstrap=50)
    del config["models"]["ddl_cxr"]["missing"]  # DDL-CXR at every missingness level (the demo: natural only)
    config["ddl_cxr"]["autoencoder"].update(epochs=1)
    config["ddl_cxr"]["diffusion"].update(epochs=2)
    config["ddl_cxr"]["generation"].update(steps=2)
    # one task keeps the run short: the rerun and SLURM tests run mortality, the MIMIC-demo test every task
    # (length of stay included) and test_length_of_stay a length-of-stay cell
    config["tasks"] = ["phenotyping"]
    # the fusion zoo trains in its own tests (tests/test_zoo_*.py, test_models); here one complete-modality method
    # (natural only) and one missing-modality method (every level) stand for the rest
    for model in ("early_fusion", "cross_attention", "utde", "daft", "aug", "inforeg", "healnet", "flexmoe", "umse",
                  "m3care", "smil"):
        del config["models"][model]
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


def dry_run(workdir: Path, config: dict, *targets: str) -> tuple[dict[str, int], list[str]]:
    """Jobs per rule and the sorted outputs of the planned jobs, for ``config`` written to ``workdir``."""
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(workdir, *targets, "--dry-run")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    stats = output[output.index("Job stats:"):]
    jobs = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", stats[:stats.index("\ntotal")], re.M)}
    outputs = [path for line in re.findall(r"^\s*output: (.+)$", output, re.MULTILINE) for path in line.split(", ")]
    return jobs, sorted(outputs)


def test_single_target_builds_only_its_ancestors(workdir):
    target = "results/synthetic/runs/phenotyping/ehr_lstm/natural/seed1/metrics.json"
    result = snakemake(workdir, target, "--dry-run", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    rules = {line.split()[0] for line in result.stdout.splitlines() if line and line.split()[0] in
             {"synthesize", "cohort", "ehr_tensor", "cxr_cache", "pretrain_cxr", "pretrain_ehr", "train", "aggregate"}}
    # an EHR-only cell needs the CXR index (to know which stays are paired) but neither pretraining nor aggregation
    assert rules == {"synthesize", "cohort", "ehr_tensor", "cxr_cache", "train"}


def test_declared_pretrained_parts_drive_the_dag(tmp_path):
    results = "results/synthetic"
    cell = f"{results}/runs/phenotyping/{{model}}/miss0.5/seed{{seed}}/metrics.json"
    jobs, outputs = dry_run(tmp_path, tiny_config(), cell.format(model="medfuse", seed=1))
    # medfuse declares [ehr, cxr]: its own EHR encoder for the task and the seed's ResNet-18 CheXpert encoder
    assert jobs == {"synthesize": 1, "cohort": 1, "ehr_tensor": 1, "cxr_cache": 1, "pretrain_cxr": 1,
                    "pretrain_ehr": 1, "train": 1}
    assert [path for path in outputs if "/pretrain/" in path] == [
        f"{results}/pretrain/seed1/cxr_resnet18.pt", f"{results}/pretrain/seed1/cxr_resnet18_history.csv",
        f"{results}/pretrain/seed1/ehr/phenotyping/medfuse.pt",
        f"{results}/pretrain/seed1/ehr/phenotyping/medfuse/history.csv"]

    # a CXR model that declares nothing starts from cxr.weights; one overriding cxr.depth gets its own encoder,
    # and every seed its own
    config = tiny_config()
    del config["models"]["late_fusion"]["pretrained"]
    config["models"]["cxr_resnet"]["cxr"] = {"depth": 34}
    config["seeds"] = [1, 2]
    jobs, outputs = dry_run(tmp_path, config, cell.format(model="late_fusion", seed=1),
                            *(cell.format(model="cxr_resnet", seed=seed) for seed in (1, 2)))
    assert jobs["train"] == 3 and "pretrain_ehr" not in jobs
    assert [path for path in outputs if path.endswith(".pt") and "/pretrain/" in path] == [
        f"{results}/pretrain/seed1/cxr_resnet34.pt", f"{results}/pretrain/seed2/cxr_resnet34.pt"]

    # the whole grid: one CXR encoder per seed and depth, one EHR encoder per task for medfuse only; the
    # encoder's pooled features once, for the model that keeps every stage frozen (late_fusion in tiny_config)
    two_tasks = {**tiny_config(), "tasks": ["phenotyping", "length_of_stay"]}
    jobs, outputs = dry_run(tmp_path, two_tasks)
    assert jobs["pretrain_cxr"] == 1 and jobs["pretrain_ehr"] == 2 and jobs["cxr_features"] == 1
    assert [path for path in outputs if path.endswith(".npy") and "/pretrain/" in path] == [
        f"{results}/pretrain/seed1/cxr_resnet18_features.npy"]
    config = {**tiny_config(), "tasks": two_tasks["tasks"]}
    del config["models"]["late_fusion"]["cxr"]
    jobs, _ = dry_run(tmp_path, config)
    assert "cxr_features" not in jobs  # frozen_stages 3 everywhere: each cell runs its frozen stages itself
    assert {path for path in outputs if path.endswith(".pt") and "/pretrain/" in path} == {
        f"{results}/pretrain/seed1/cxr_resnet18.pt", f"{results}/pretrain/seed1/ehr/length_of_stay/medfuse.pt",
        f"{results}/pretrain/seed1/ehr/phenotyping/medfuse.pt"}


def test_default_config_trains_ehr_only_models_at_the_first_miss_rate_only(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    jobs, outputs = dry_run(tmp_path, config)
    cells = {tuple(path.split("/")[3:6]) for path in outputs if path.endswith("/metrics.json")}
    ehr_only = {"ehr_lstm", "ehr_transformer"}
    assert {name for name, entry in config["models"].items() if entry["modalities"] == ["ehr"]} == ehr_only
    assert config["missing"] == ["natural", "miss0.0", "miss0.5"]
    # phenotyping (missing_tasks): the 10 CXR models without a `missing:` key (cxr_resnet, late fusion, MedFuse, DrFuse
    # and the 6 missing-modality methods) at all 3 settings, the 2 EHR-only ones at natural and miss0.0 (not
    # miss0.5), DDL-CXR, its copy-x0 baseline and the 7 complete-modality methods at natural only (their entries'
    # `missing:`); mortality: every model at natural only
    assert config["tasks"] == ["phenotyping", "mortality"] and config["missing_tasks"] == ["phenotyping"]
    natural_only = {"ddl_cxr", "ddl_cxr_copy_x0", "early_fusion", "cross_attention", "utde", "daft", "mmtm", "aug",
                    "inforeg"}
    assert {model for model, entry in config["models"].items() if entry.get("missing") == ["natural"]} == natural_only
    expected = {(task, model, missing) for task in config["tasks"] for model in config["models"]
                for missing in config["missing"] if not (model in ehr_only and missing == "miss0.5")
                and not (model in natural_only and missing != "natural")
                and not (task == "mortality" and missing != "natural")}
    assert cells == expected and jobs["train"] == (10 * 3 + 2 * 2 + 9) + 21 == 64
    # every task at every setting without missing_tasks; narrowed to mortality, the demo grid has no miss<r> cell
    assert dry_run(tmp_path, {**config, "missing_tasks": None})[0]["train"] == 2 * (10 * 3 + 2 * 2 + 9)
    assert dry_run(tmp_path, {**config, "tasks": ["mortality"]})[0]["train"] == 21
    # DDL-CXR: one autoencoder and latent pass per seed, one diffusion model per diffusion generator the grid uses or
    # the quality table scores (full, no_ehr; copy_x0 has none), one generation per generator of a grid model
    assert config["ddl_cxr"]["quality"]["generators"] == ["full", "no_ehr", "copy_x0"]
    assert (jobs["ddl_autoencoder"], jobs["ddl_latents"], jobs["ddl_diffusion"], jobs["ddl_generate"]) == (1, 1, 2, 2)
    assert jobs["ehr_tensor"] == 2


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


def test_settings_the_shared_stages_cannot_honour_are_config_errors(tmp_path):
    for model, entry, message in [
        ("ehr_lstm", {"pretrained": ["cxr"]}, "model 'ehr_lstm': pretrained must list parts of its modalities"),
        ("drfuse", {"cxr": {"weights": "imagenet"}}, "model 'drfuse' declares pretrained: [cxr], so its encoder comes "
                                                     "from pretrain_cxr, which starts from cxr.weights None, not its "
                                                     "own 'imagenet'"),
        ("late_fusion", {"cxr": {"image_size": 32}}, "model 'late_fusion': cxr.image_size 32 differs from the image "
                                                     "cache's 64"),
    ]:
        config = tiny_config()
        config["models"][model].update(entry)
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        result = snakemake(tmp_path, "--dry-run")
        assert result.returncode != 0 and message in result.stdout + result.stderr, (result.stdout + result.stderr)


def test_a_pairing_window_before_the_kept_x_rays_is_a_config_error(tmp_path):
    config = tiny_config()
    config["cohort"]["cxr_lookback_hours"] = 12  # the cohort keeps X-rays from intime - 12 h; the window opens at -24 h
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    assert ("ddl_cxr.pairs.window_hours starts at -24 h, before the X-rays the cohort keeps (from "
            "-cohort.cxr_lookback_hours = -12 h)") in result.stdout + result.stderr, result.stdout + result.stderr


def test_whole_grid_runs_to_the_tables(workdir):
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    config = tiny_config()
    table = pd.read_csv(workdir / "results/synthetic/tables/main_results.csv")
    assert list(table.columns) == ["task", "model", "missing", "run_missing", "eval_set", "metric", "estimate",
                                   "ci_low", "ci_high", "n_seeds", "selection", "n_stays", "n_positive",
                                   "n_labels_scored", "single_class_labels"]
    macro = table[table["metric"].isin(["auroc", "auprc"])]
    cells = {(t, m, s) for t in config["tasks"] for m in config["models"] for s in config["missing"]
             if s in config["models"][m].get("missing", config["missing"])}
    assert {tuple(row) for row in macro[macro["model"] != "oracle"][["task", "model", "missing"]].values} == cells
    # EHR-only models were trained at natural and miss0.0 only; their miss0.5 rows are the miss0.0 run's
    runs = workdir / "results/synthetic/runs"
    assert not any((runs / task / model / "miss0.5").exists() for task in config["tasks"]
                   for model in ("ehr_lstm", "ehr_transformer"))
    shared = macro[macro["run_missing"] != macro["missing"]]
    assert set(zip(shared["model"], shared["missing"], shared["run_missing"])) == {
        ("ehr_lstm", "miss0.5", "miss0.0"), ("ehr_transformer", "miss0.5", "miss0.0")}
    trained = macro.set_index(["task", "model", "missing", "eval_set", "metric"])
    for row in shared.itertuples():
        source = trained.loc[(row.task, row.model, "miss0.0", row.eval_set, row.metric)]
        assert (row.estimate, row.ci_low, row.ci_high, row.n_seeds) == pytest.approx(
            (source["estimate"], source["ci_low"], source["ci_high"], 1), nan_ok=True)
    markdown = (workdir / "results/synthetic/tables/main_results.md").read_text()
    assert "phenotyping/ehr_lstm: 1 run(s) at miss0.0 also give miss0.5" in markdown
    assert "EHR item map `corrected`: blood glucose and blood pH only." in markdown  # the config's ehr.itemid_map
    # per-seed pretraining: the seed's CXR encoder and medfuse's EHR encoder of each task
    pretrain = workdir / "results/synthetic/pretrain/seed1"
    for path in ("cxr_resnet18.pt", "cxr_resnet18_history.csv", "ehr/phenotyping/medfuse.pt",
                 "ehr/phenotyping/medfuse/history.csv", "cxr_resnet18_features.npy"):
        assert (pretrain / path).is_file(), path
    assert "read from" in (workdir / "logs/synthetic/train/phenotyping/late_fusion/natural/seed1.log").read_text()
    # DDL-CXR's pairs: within a stay (so within a subject and a split), by the config's rules, counts in the log
    pairs = pd.read_parquet(workdir / "results/synthetic/ddl_cxr/pairs.parquet")
    prediction = pd.read_parquet(workdir / "results/synthetic/ddl_cxr/prediction_x0.parquet")
    stays = pd.read_parquet(workdir / "results/synthetic/cohort/stays.parquet").set_index("stay_id")
    assert len(pairs) > 0 and (pairs["gap_hours"] > 12).all() and (pairs["ehr_bins"] >= 6).all()
    assert (pairs["split"].to_numpy() == stays.loc[pairs["stay_id"], "split"].to_numpy()).all()
    assert (pairs["subject_id"].to_numpy() == stays.loc[pairs["stay_id"], "subject_id"].to_numpy()).all()
    assert prediction["x0_age_hours"].between(0, 72).all() and prediction["stay_id"].is_unique
    pairs_log = (workdir / "logs/synthetic/ddl_pairs.log").read_text()
    assert f"'train': {int((pairs['split'] == 'train').sum())}" in pairs_log
    # DDL-CXR's stages: copy_x0 serves each paired stay's own cached latent; the diffusion generator samples others
    ddl = workdir / "results/synthetic/ddl_cxr/seed1"
    latents = np.load(ddl / "latents.npy")
    index = pd.read_parquet(workdir / "results/synthetic/cxr/index.parquet").set_index("dicom_id")
    assert latents.shape == (len(index), 4, 8, 8)
    copied, generated = (np.load(ddl / name / "generated.npz") for name in ("copy_x0", "full"))
    paired = stays.loc[copied["stay_id"]]
    np.testing.assert_array_equal(copied["latents"], latents[index.loc[paired["cxr_dicom_id"], "row"].to_numpy()])
    assert (copied["stay_id"] == generated["stay_id"]).all() and not np.allclose(copied["latents"],
                                                                                 generated["latents"])
    usable = paired["cxr_dicom_id"].map(index["status"]).eq("ok")
    assert usable.all() and len(paired) == (stays["cxr_dicom_id"].map(index["status"]) == "ok").sum()
    history = pd.read_csv(ddl / "full/diffusion_history.csv")
    assert len(history) == 2 and history["train_contrastive_loss"].iloc[1] > 0  # ramp 0 in epoch 1, 0.5 in 2
    assert "latents/s" in (workdir / "logs/synthetic/ddl_generate/seed1/full.log").read_text()
    quality = pd.read_csv(workdir / "results/synthetic/tables/ddl_generation_quality.csv")
    assert set(quality["generator"]) == {"full", "no_ehr", "copy_x0"} and "stay_id" not in quality.columns
    assert set(quality["metric"]) == {"latent_mse", "feature_distance", "chexpert_auroc"}
    assert (workdir / "results/synthetic/figures/ddl_examples.png").stat().st_size > 0  # synthetic data only
    assert set(macro["eval_set"]) == {"paired_test", "partial_test"}
    # the generator's oracle holds true probabilities of the binary labels, not of the length-of-stay classes
    assert set(table.loc[table["model"] == "oracle", "task"]) == {"phenotyping"}
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
    # every analysis wrote its tables (CSV, Markdown, LaTeX) and figures (PNG, SVG), aggregates only
    tables, figures = workdir / "results/synthetic/tables", workdir / "results/synthetic/figures"
    for name in ("fusion_gain", "modality_imbalance", "robustness_train", "robustness_test_summary", "xray_age",
                 "xray_age_gain", "ranking", "calibration", "fairness_groups", "fairness_gaps",
                 "fairness_fusion_effect"):
        for suffix in (".csv", ".md", ".tex"):
            assert (tables / f"{name}{suffix}").stat().st_size > 0, name + suffix
        assert "stay_id" not in pd.read_csv(tables / f"{name}.csv").columns
    for name in ("fusion_gain", "modality_imbalance", "robustness_train", "robustness_test", "xray_age",
                 "xray_age_gain", "ranking_cd", "reliability", "fairness_gaps"):
        for suffix in (".png", ".svg"):
            assert (figures / f"{name}{suffix}").stat().st_size > 0, name + suffix
    age_gain = pd.read_csv(tables / "xray_age_gain.csv")  # DDL-CXR over its copy-x0 baseline, paired per stratum
    assert set(zip(age_gain["model"], age_gain["reference"])) == {("ddl_cxr", "ddl_cxr_copy_x0")}
    assert set(age_gain["missing"]) == {"natural"}  # the baseline is trained at natural only
    gain = pd.read_csv(tables / "fusion_gain.csv")
    # the fusion models, each against references
    assert set(gain["model"]) == {"late_fusion", "medfuse", "drfuse", "ddl_cxr", "ddl_cxr_copy_x0", "mmtm", "shaspec"}
    assert set(gain["reference"]) == {"best_unimodal", "best_ehr_only", "baseline"}
    assert set(gain.loc[gain["reference"] == "baseline", "reference_model"]) == {"late_fusion"}
    assert "late_fusion" not in set(gain.loc[gain["reference"] == "baseline", "model"])
    # the report renders every table and figure
    report = snakemake(workdir, "--report", "report.html")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (workdir / "report.html").stat().st_size > 100_000
    # nothing left to do afterwards
    again = snakemake(workdir, "--dry-run", "--quiet")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
    # the command the aggregation prints for outdated runs retrains exactly those, then the tables
    outdated = ["results/synthetic/runs/phenotyping/drfuse/miss0.5/seed1",
                "results/synthetic/runs/phenotyping/ehr_lstm/natural/seed1"]
    command = shlex.split(rerun_command(outdated))
    assert command[0] == "snakemake"
    forced = snakemake(workdir, *command[1:], "--dry-run")
    output = forced.stdout + forced.stderr
    assert forced.returncode == 0, output[-5000:]
    stats = output[output.index("Job stats:"):]
    stats = stats[:stats.index("\ntotal")]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", stats, re.MULTILINE))
    analyses = ["fusion_gain", "modality_imbalance", "robustness", "xray_age", "ranking", "calibration", "fairness"]
    assert jobs == {"train": "2", "aggregate": "1", "all": "1", **{name: "1" for name in analyses}}
    assert sorted(re.findall(r"^\s*output: (\S*runs/\S+)/metrics\.json", output, re.MULTILINE)) == outdated
