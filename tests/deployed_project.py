"""A project that uses this checkout as a Snakemake module, as `snakedeploy deploy-workflow` lays it out."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# snakedeploy's template (use_module.smk.jinja) with the module's snakefile a path to this checkout instead of
# github("<owner>/ehrcxr", path="workflow/Snakefile", tag=...), as the README tells users to set it.
DEPLOYED_SNAKEFILE = """\
from snakemake.utils import min_version


min_version("9.0")


configfile: "config/config.yaml"


# declare ehrcxr as a module
module ehrcxr:
    snakefile:
        "{snakefile}"
    config:
        config


# use all rules from ehrcxr
use rule * from ehrcxr
"""


def deploy(project: Path, config: dict, snakefile: str | None = None) -> Path:
    """``project`` as snakedeploy leaves it: workflow/Snakefile importing this checkout as a module, config/ and
    profiles/ copied, config/config.yaml replaced by ``config`` (the user's edit)."""
    (project / "workflow").mkdir(parents=True)
    snakefile = snakefile or (REPO / "workflow" / "Snakefile").as_posix()
    (project / "workflow" / "Snakefile").write_text(DEPLOYED_SNAKEFILE.format(snakefile=snakefile))
    shutil.copytree(REPO / "config", project / "config")
    shutil.copytree(REPO / "profiles", project / "profiles")
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return project


def run_deployed(project: Path, *args: str, env: dict[str, str] | None = None,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    """snakemake in the project folder, as its user runs it: no -s, no --directory and no PYTHONPATH."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)
