"""`snakemake --profile profiles/slurm` on a real one-node SLURM cluster (slurm-wlm + munge, started here).

The tiny synthetic grid runs once through the SLURM executor plugin, from a project that uses this checkout as
a module (deployed_project: the layout snakedeploy writes, profiles/ copied), and once locally from the clone
(--cores 2): every job must become a SLURM job with the profile's resources, and the SLURM run must end with the
local run's results.
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

import pandas as pd
import pytest
import yaml

from deployed_project import deploy, run_deployed
from slurm_cluster import SlurmCluster, missing_programs, start_cluster
from test_workflow import tiny_config as workflow_tiny_config

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
GPU_RULES = ("pretrain_cxr", "cxr_features", "pretrain_ehr", "train")
RUN_TIMEOUT_S = 600
# What sbatch must get for each rule at attempt 1: CPUs from the rule's threads, memory (MB, capped at the test
# node's, see cpu_node_profile) and --time as squeue prints it from profiles/slurm.
EXPECTED_REQUESTS = {
    "synthesize": (2, 4000, "30:00"),
    "cohort": (1, 8000, "30:00"),
    "ehr_tensor": (2, 8000, "1:00:00"),
    "cxr_cache": (2, 8000, "2:00:00"),
    "pretrain_cxr": (1, 16000, "4:00:00"),
    "cxr_features": (1, 8000, "1:00:00"),
    "train": (1, 8000, "2:00:00"),
    "aggregate": (2, 4000, "30:00"),
}
# The plugin's job comment (rule_<rule>[_wildcards_<values joined by _>]) -> rule, for the 9 jobs of tiny_config()
SLURM_JOBS = {
    "rule_synthesize": "synthesize",
    "rule_cohort_wildcards_synthetic": "cohort",
    "rule_ehr_tensor_wildcards_synthetic_mortality": "ehr_tensor",
    "rule_cxr_cache_wildcards_synthetic": "cxr_cache",
    "rule_pretrain_cxr_wildcards_synthetic_1_18": "pretrain_cxr",
    "rule_cxr_features_wildcards_synthetic_1_18": "cxr_features",
    "rule_train_wildcards_synthetic_mortality_ehr_lstm_natural_1": "train",
    "rule_train_wildcards_synthetic_mortality_late_fusion_natural_1": "train",
    "rule_aggregate_wildcards_synthetic": "aggregate",
}
RUNS = ("mortality/ehr_lstm/natural/seed1", "mortality/late_fusion/natural/seed1")
TARGET = "results/synthetic/tables/main_results.md"  # the grid up to the main tables (the analyses run as any job)

pytestmark = pytest.mark.skipif(bool(missing_programs()), reason=(
    f"SLURM/MUNGE programs missing ({', '.join(missing_programs())}); "
    ".ci/run installs the Debian packages slurm-wlm and munge"))


def tiny_config() -> dict:
    """The end-to-end test's config cut to 9 jobs: one task, one EHR-only and one fusion model, natural."""
    config = workflow_tiny_config()
    config["synthetic"].update(n_stays=200)
    config["train"].update(epochs=1)
    config["tasks"] = ["mortality"]
    config["models"] = {name: config["models"][name] for name in ("ehr_lstm", "late_fusion")}
    config["missing"] = ["natural"]
    config["evaluate"].update(n_bootstrap=20)
    return config


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """snakemake from the clone, run in ``workdir`` on its config.yaml (the local side of the comparison)."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
               "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def cpu_node_profile(cluster: SlurmCluster, target: Path) -> None:
    """Write to ``target`` the repository's SLURM profile, changed only where this GPU-less test node cannot
    honour it: no GPU for the GPU rules, and memory requests capped at the node's memory."""
    profile = yaml.safe_load(PROFILE.read_text())
    for rule, resources in profile["set-resources"].items():
        if rule in GPU_RULES:
            assert resources["gpu"] == 1, f"{PROFILE}: {rule} should ask for one GPU"
            resources["gpu"] = 0
        resources["mem_mb"] = f"min({resources['mem_mb']}, {cluster.memory_mb})"
    target.mkdir(parents=True)
    (target / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory) -> dict:
    """The tiny grid through SLURM from a deployed project and locally from the clone: both folders and the SLURM
    run's snakemake output."""
    slurm_dir = deploy(tmp_path_factory.mktemp("slurm_run") / "project", tiny_config())
    local_dir = tmp_path_factory.mktemp("local_run")
    (local_dir / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    shutil.rmtree(slurm_dir / "profiles" / "slurm")
    cpu_node_profile(cluster, slurm_dir / "profiles" / "slurm")  # the copied profile, edited for this node
    env = {**cluster.env, "EHRCXR_SLURM_ACCOUNT": "ehrcxr", "EHRCXR_SLURM_PARTITION": cluster.partition}

    start = time.monotonic()
    # faster status checks than the profile's (first after 40 s, then every 10 s): the 9 jobs form a chain of 7;
    # keep the logs of successful jobs to inspect them
    slurm = run_deployed(slurm_dir, "--profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks", "2",
                         "--seconds-between-status-checks", "2", "--slurm-keep-successful-logs", TARGET, env=env,
                         timeout=RUN_TIMEOUT_S)
    slurm_s = time.monotonic() - start
    output = slurm.stdout + slurm.stderr
    assert slurm.returncode == 0, output[-8000:] + "\n" + cluster.logs()
    start = time.monotonic()
    local = snakemake(local_dir, "--cores", "2", TARGET)
    local_s = time.monotonic() - start
    assert local.returncode == 0, (local.stdout + local.stderr)[-8000:]
    print(f"\nSLURM run {slurm_s:.0f} s, local run {local_s:.0f} s")
    return {"slurm_dir": slurm_dir, "local_dir": local_dir, "output": output}


def submitted_job_ids(output: str) -> list[str]:
    """SLURM job ids of the plugin's 'Job N has been submitted with SLURM jobid M' lines, in order."""
    return re.findall(r"has been submitted with SLURM jobid (\d+)", output)


def slurm_jobs(cluster: SlurmCluster, output: str) -> pd.DataFrame:
    """This run's jobs as SLURM still lists them (MinJobAge keeps finished jobs): one row per job."""
    run_id = re.search(r"SLURM run ID: (\S+)", output).group(1)
    columns = ["job_id", "comment", "state", "partition", "account", "time_limit", "memory", "cpus", "start",
               "elapsed"]
    lines = cluster.client("squeue", "--states=all", "--noheader", f"--name={run_id}",
                           "--format=%i|%k|%T|%P|%a|%l|%m|%C|%S|%M").splitlines()
    return pd.DataFrame([line.split("|") for line in lines], columns=columns)


def test_every_job_ran_as_a_slurm_job_with_the_profiles_resources(cluster, runs):
    jobs = slurm_jobs(cluster, runs["output"])
    print(jobs[["job_id", "comment", "state", "start", "elapsed", "time_limit", "memory", "cpus"]]
          .to_string(index=False))
    assert sorted(jobs["job_id"], key=int) == sorted(submitted_job_ids(runs["output"]), key=int)
    assert sorted(jobs["comment"]) == sorted(SLURM_JOBS)
    jobs["rule"] = jobs["comment"].map(SLURM_JOBS)
    assert (jobs["state"] == "COMPLETED").all()
    assert set(jobs["partition"]) == {cluster.partition} and set(jobs["account"]) == {"ehrcxr"}
    for job in jobs.itertuples():
        cpus, memory_mb, time_limit = EXPECTED_REQUESTS[job.rule]
        assert (int(job.cpus), job.memory, job.time_limit) == (cpus, f"{min(memory_mb, cluster.memory_mb)}M",
                                                                time_limit), job
        # the job's own log (kept by --slurm-keep-successful-logs) is snakemake running that rule inside SLURM
        log = next((runs["slurm_dir"] / ".snakemake" / "slurm_logs" / f"rule_{job.rule}").rglob(f"{job.job_id}.log"))
        assert f"rule {job.rule}:" in log.read_text(), log


def test_slurm_run_gives_the_local_runs_results(runs):
    for run in RUNS:
        metrics = [json.loads((runs[side] / "results/synthetic/runs" / run / "metrics.json").read_text())
                   for side in ("slurm_dir", "local_dir")]
        assert metrics[0] == metrics[1], run
    tables = [pd.read_csv(runs[side] / "results/synthetic/tables/main_results.csv")
              for side in ("slurm_dir", "local_dir")]
    assert len(tables[0]) > 0
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
