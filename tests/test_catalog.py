"""Snakemake-workflow-catalog usage: snakefmt formatting, the catalog metadata, and this workflow deployed into
another project as a module (the Snakefile `snakedeploy deploy-workflow` writes, plus a copied config/)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from deployed_project import deploy, run_deployed
from test_slurm import tiny_config

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / ".snakemake-workflow-catalog.yml"


def test_workflow_is_snakefmt_formatted():
    """`snakefmt --check workflow/` passes with the pinned snakefmt (line length from pyproject.toml)."""
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "--diff", "workflow/"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, "run `snakefmt workflow/`:\n" + (result.stdout + result.stderr)[-5000:]


def test_catalog_metadata_names_files_that_exist():
    usage = yaml.safe_load(CATALOG.read_text())["usage"]
    assert usage["software-stack-deployment"]["conda"] is True
    assert usage["report"] is True
    flags = usage["mandatory-flags"]["flags"].split()
    assert flags[flags.index("--configfile") + 1] == "config/mimic.yaml"
    assert (REPO / flags[flags.index("--configfile") + 1]).is_file()
    assert (REPO / flags[flags.index("--profile") + 1] / "config.yaml").is_file()
    for required in ("workflow/Snakefile", "config/README.md", "config/config.yaml"):
        assert (REPO / required).is_file(), required


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    """The SLURM test's tiny grid (mortality, ehr_lstm + late_fusion, natural), every target and the report."""
    project = deploy(tmp_path_factory.mktemp("deployed") / "my_project", tiny_config())
    result = run_deployed(project, "--cores", "2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    report = run_deployed(project, "--report", "report.html")
    assert report.returncode == 0, (report.stdout + report.stderr)[-8000:]
    return project


def test_deployed_module_runs_to_its_tables_in_the_project(deployed):
    """Outputs and logs land in the project; scripts, envs, schemas, resources and src/ come from the module."""
    table = pd.read_csv(deployed / "results" / "synthetic" / "tables" / "main_results.csv")
    assert set(table["model"]) == {"ehr_lstm", "late_fusion", "oracle"} and set(table["task"]) == {"mortality"}
    assert (deployed / "logs" / "synthetic" / "aggregate.log").is_file()
    for analysis in ("fusion_gain", "ranking", "calibration", "fairness_groups"):
        assert (deployed / "results" / "synthetic" / "tables" / f"{analysis}.md").is_file(), analysis
    assert not (deployed / "workflow" / "scripts").exists() and not (deployed / "src").exists()


def test_deployed_report_holds_the_module_captions(deployed):
    """The report's front page (the module's report/workflow.rst, rendered with the project's config) and a rule's
    caption (report/main_results.rst) resolve from the module."""
    html = (deployed / "report.html").read_text(errors="replace")
    assert len(html) > 100_000
    assert "when does fusing EHR with chest X-rays help clinical prediction?" in html
    assert "models ehr_lstm, late_fusion" in html  # rendered from the project's config/config.yaml
    assert "confidence intervals from bootstrap resamples of test stays" in html


def test_deployed_config_is_validated_by_the_modules_schema(tmp_path):
    config = tiny_config()
    config["train"]["epochs"] = 0
    result = run_deployed(deploy(tmp_path / "bad_project", config), "--cores", "1", "--dry-run")
    assert result.returncode != 0
    assert "epochs" in result.stdout + result.stderr and "minimum" in result.stdout + result.stderr


def planned_train_outputs(project: Path, *args: str) -> list[str]:
    result = run_deployed(project, "--cores", "1", "--dry-run", *args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return sorted(re.findall(r"results/synthetic/runs/(\S+)/metrics\.json", output))


def test_a_whole_configfile_replaces_the_default_and_a_partial_one_updates_it(tmp_path):
    """--configfile config/mimic.yaml must not inherit config/config.yaml's model entries (snakemake merges key by
    key): a file holding a whole config replaces the default, a file of overrides updates it."""
    project = deploy(tmp_path / "project", tiny_config())  # default: ehr_lstm and late_fusion, seed 1
    whole = tiny_config()
    whole["models"] = {"ehr_lstm": whole["models"]["ehr_lstm"]}
    whole["analysis"]["fusion_baseline"] = None  # no fusion model left to be the baseline
    (project / "config" / "whole.yaml").write_text(yaml.safe_dump(whole))
    (project / "config" / "seeds.yaml").write_text(yaml.safe_dump({"seeds": [1, 2]}))
    assert set(planned_train_outputs(project)) == {"mortality/ehr_lstm/natural/seed1",
                                                   "mortality/late_fusion/natural/seed1"}
    assert set(planned_train_outputs(project, "--configfile", "config/whole.yaml")) == {
        "mortality/ehr_lstm/natural/seed1"}
    assert set(planned_train_outputs(project, "--configfile", "config/seeds.yaml")) == {
        f"mortality/{model}/natural/seed{seed}" for model in ("ehr_lstm", "late_fusion") for seed in (1, 2)}


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs this checkout's git history")
def test_a_remote_module_stops_with_a_clear_error(tmp_path):
    """A module read from git (as github(...) is) has no src/ or resources/ on disk: the run stops at once, saying
    what to do, instead of failing in every job on `import ehrcxr`."""
    snakefile = f"git+file:{REPO.as_posix()}/workflow/Snakefile@HEAD"
    project = deploy(tmp_path / "project", tiny_config(), snakefile=snakefile)
    result = run_deployed(project, "--cores", "1", "--dry-run")
    assert result.returncode != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert "its jobs import the ehrcxr package (src/) and reference data (resources/) from a local checkout" in message
    assert "give the module that clone's workflow/Snakefile" in message
