"""Software environments: every workflow rule that runs something has a conda env and a log, its env file
provides every package its script imports (directly or through ehrcxr modules, transitively), and the envs
of the rules that ask for a GPU are CUDA builds of PyTorch."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# import name -> the conda-forge packages that provide it (any one of them suffices)
IMPORT_PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",), "pandas": ("pandas",), "pyarrow": ("pyarrow",), "xarray": ("xarray",),
    "h5netcdf": ("h5netcdf",), "scipy": ("scipy",), "matplotlib": ("matplotlib",), "tabulate": ("tabulate",),
    "sklearn": ("scikit-learn",), "PIL": ("pillow",), "yaml": ("pyyaml",), "threadpoolctl": ("threadpoolctl",),
    "torch": ("pytorch-gpu", "pytorch", "pytorch-cpu"), "torchvision": ("torchvision",), "diffusers": ("diffusers",),
}
# packages named only by a string: the engine="..." keyword of xarray / pandas readers and writers
ENGINE_PACKAGES = {"h5netcdf": "h5netcdf", "pyarrow": "pyarrow"}
# pandas methods whose optional dependency is imported only when they are called
METHOD_PACKAGES = {"to_markdown": "tabulate", "to_parquet": "pyarrow", "read_parquet": "pyarrow"}
# ehrcxr modules that import every module of a package at run time (importlib), which a static walk cannot see
DYNAMIC_IMPORTS = {"ehrcxr.models.registry": "ehrcxr.models"}
CUDA_PINS = ("cuda-version", "cudatoolkit")

# Loads the workflow with snakemake's API (in a child process: common.smk changes os.environ and the cwd)
# and writes each rule's directives as JSON to argv[2].
LOAD_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings

repo = Path(sys.argv[1])
with SnakemakeApi(OutputSettings(dryrun=True, enable_file_logging=False)) as api:
    workflow = api.workflow(ResourceSettings(), snakefile=repo / "workflow" / "Snakefile", workdir=repo)._workflow
    rules = [{"name": rule.name, "basedir": str(Path(str(rule.snakefile)).parent), "runs": not rule.norun,
              "conda": rule.conda_env, "script": rule.script, "n_logs": len(rule.log),
              "gpu": "gpu" in (rule.resources or {})} for rule in workflow.rules]
Path(sys.argv[2]).write_text(json.dumps(rules))
"""


@dataclass(frozen=True)
class Need:
    """A package that the code at ``where`` needs: ``what`` names the import or call, ``packages`` its providers."""

    where: str
    what: str
    packages: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """A rule that runs a script: its conda env file, its script and whether it asks for a GPU."""

    name: str
    env: Path
    script: Path
    gpu: bool


def module_path(name: str) -> Path | None:
    """Source file of the ehrcxr module ``name`` (module.py or package/__init__.py); None if there is none."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _with_parent_packages(name: str) -> list[str]:
    """'ehrcxr.a.b' -> ['ehrcxr', 'ehrcxr.a', 'ehrcxr.a.b']: importing a module runs its packages' __init__."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def file_needs(path: Path, label: str) -> tuple[list[str], list[Need]]:
    """(ehrcxr modules imported, third-party needs) of one source file; ``label`` names it in the needs.

    Every import statement counts, also those inside functions: they run when the function does."""
    tree = ast.parse(path.read_text(), filename=str(path))
    imported: list[str] = []
    needs: list[Need] = []

    def add_module(name: str) -> None:
        top = name.split(".")[0]
        if top == "ehrcxr":
            imported.extend(_with_parent_packages(name))
        elif top not in sys.stdlib_module_names:
            assert top in IMPORT_PACKAGES, f"{label} imports {name}: add its conda package(s) to IMPORT_PACKAGES"
            needs.append(Need(label, f"import {name}", IMPORT_PACKAGES[top]))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; ehrcxr uses absolute imports"
            add_module(node.module)
            for alias in node.names:  # `from ehrcxr.data import raw` imports the submodule ehrcxr.data.raw
                if node.module.split(".")[0] == "ehrcxr" and module_path(f"{node.module}.{alias.name}"):
                    imported.append(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "engine" and isinstance(keyword.value, ast.Constant):
                    engine = keyword.value.value
                    assert engine in ENGINE_PACKAGES, f"{label} uses engine={engine!r}: add it to ENGINE_PACKAGES"
                    needs.append(Need(label, f"engine={engine!r}", (ENGINE_PACKAGES[engine],)))
            if isinstance(node.func, ast.Attribute) and node.func.attr in METHOD_PACKAGES:
                needs.append(Need(label, f".{node.func.attr}()", (METHOD_PACKAGES[node.func.attr],)))
    return imported, needs


def script_needs(script: Path) -> tuple[list[Need], dict[str, str]]:
    """Every third-party need of ``script`` and of the ehrcxr modules it reaches, with, for each module
    reached, the import chain from the script ('scripts/train.py -> ehrcxr.train.cell -> ...')."""
    start = script.relative_to(REPO).as_posix()
    chain = {start: start}
    pending = [(start, script)]
    needs: list[Need] = []
    while pending:
        name, path = pending.pop()
        imported, found = file_needs(path, chain[name])
        needs += found
        if name in DYNAMIC_IMPORTS:
            package = DYNAMIC_IMPORTS[name]
            imported += [f"{package}.{file.stem}" for file in sorted(module_path(package).parent.glob("*.py"))
                         if file.stem != "__init__"]
        for module in imported:
            if module in chain:
                continue
            source = module_path(module)
            assert source is not None, f"{chain[name]} imports {module}, which is no module under {SRC}"
            chain[module] = f"{chain[name]} -> {module}"
            pending.append((module, source))
    return needs, chain


def env_packages(env: Path) -> dict[str, str]:
    """Package name -> full spec ('pytorch-gpu=2.7') of a conda env file's dependencies."""
    dependencies = yaml.safe_load(env.read_text())["dependencies"]
    packages = {}
    for spec in dependencies:
        assert isinstance(spec, str), f"{env}: only conda specs are checked, not {spec!r} (a pip section?)"
        name = re.split(r"[=<>!~ \[]", spec.split("::")[-1].strip(), maxsplit=1)[0]
        packages[name] = spec
    return packages


def missing_packages(rule: Rule, packages: set[str]) -> list[str]:
    """One message per need of ``rule``'s script that none of ``packages`` provides."""
    needs, _ = script_needs(rule.script)
    return sorted({f"rule {rule.name!r}: {need.where} needs {need.what}, but "
                   f"{' or '.join(repr(p) for p in need.packages)} is missing from {rule.env.relative_to(REPO)}"
                   for need in needs if not set(need.packages) & packages})


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("rules") / "rules.json"
    result = subprocess.run([sys.executable, "-c", LOAD_RULES, str(REPO), str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def script_rules(workflow_rules) -> dict[str, Rule]:
    """The rules that run a script, by name, with absolute env and script paths."""
    return {rule["name"]: Rule(rule["name"], (Path(rule["basedir"]) / rule["conda"]).resolve(),
                               (Path(rule["basedir"]) / rule["script"]).resolve(), rule["gpu"])
            for rule in workflow_rules if rule["runs"] and rule["conda"] and rule["script"]}


def test_every_running_rule_has_a_conda_env_a_log_and_a_script(workflow_rules):
    names = {rule["name"] for rule in workflow_rules}
    assert {"synthesize", "cohort", "ehr_tensor", "cxr_cache", "pretrain_cxr", "pretrain_ehr", "train",
            "aggregate"} <= names
    problems = []
    for rule in workflow_rules:
        if not rule["runs"]:  # target rules such as `all` run nothing
            continue
        if not rule["conda"]:
            problems.append(f"rule {rule['name']!r} has no conda: directive")
        elif not (Path(rule["basedir"]) / rule["conda"]).is_file():
            problems.append(f"rule {rule['name']!r}: conda env {rule['conda']} does not exist")
        if not rule["n_logs"]:
            problems.append(f"rule {rule['name']!r} has no log: directive")
        if not rule["script"]:
            problems.append(f"rule {rule['name']!r} runs no script: (this check reads scripts only)")
        elif not (Path(rule["basedir"]) / rule["script"]).is_file():
            problems.append(f"rule {rule['name']!r}: script {rule['script']} does not exist")
    assert not problems, "\n".join(problems)


def test_each_rule_env_provides_every_package_its_code_imports(script_rules):
    problems = [message for rule in script_rules.values()
                for message in missing_packages(rule, set(env_packages(rule.env)))]
    assert not problems, "\n".join(problems)


def test_the_import_walk_follows_ehrcxr_modules_and_reports_a_missing_package(script_rules):
    train = script_rules["train"]
    needs, chain = script_needs(train.script)
    # scripts/train.py -> cell -> loop -> metrics imports sklearn; cell -> models -> registry imports every model
    assert chain["ehrcxr.evaluate.metrics"].startswith("scripts/train.py -> ehrcxr.train.cell -> ")
    assert "ehrcxr.models.drfuse" in chain and "ehrcxr.models.registry" in chain["ehrcxr.models.drfuse"]
    assert {"import torch", "import xarray", "engine='h5netcdf'"} <= {need.what for need in needs}

    packages = set(env_packages(train.env)) - {"scikit-learn"}
    messages = missing_packages(train, packages)
    assert len(messages) == 1
    assert messages[0].startswith(f"rule 'train': {chain['ehrcxr.evaluate.metrics']} needs import sklearn.metrics")
    assert "'scikit-learn' is missing from envs/torch.yaml" in messages[0]

    aggregate = script_rules["aggregate"]
    messages = missing_packages(aggregate, set(env_packages(aggregate.env)) - {"tabulate"})
    assert len(messages) == 1 and "ehrcxr.evaluate.aggregate needs .to_markdown()" in messages[0]
    assert "'tabulate' is missing from envs/report.yaml" in messages[0]


def test_dynamic_imports_are_declared():
    """The walk follows importlib only where DYNAMIC_IMPORTS says so; a new dynamic import must be added."""
    dynamic = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr == "import_module") or (
                    isinstance(node, ast.Name) and node.id == "__import__"):
                dynamic.add(".".join(path.relative_to(SRC).with_suffix("").parts))
    assert dynamic == set(DYNAMIC_IMPORTS)


def test_gpu_rules_envs_ask_for_a_cuda_build(script_rules):
    gpu_rules = {name for name, rule in script_rules.items() if rule.gpu}
    assert {"train", "pretrain_cxr", "pretrain_ehr"} <= gpu_rules
    for name in gpu_rules:
        needs, _ = script_needs(script_rules[name].script)
        assert any(need.packages == IMPORT_PACKAGES["torch"] for need in needs), (
            f"rule {name!r} asks for a GPU but imports no torch")
    for env in {script_rules[name].env for name in gpu_rules}:
        packages = env_packages(env)
        cuda_pinned = any(re.search(r"[=<>]", packages.get(pin, "")) for pin in CUDA_PINS)
        cuda_build = "pytorch-gpu" in packages or ("pytorch" in packages and cuda_pinned)
        assert cuda_build and "pytorch-cpu" not in packages, (
            f"{env.relative_to(REPO)} must ask for a CUDA build: pytorch-gpu, or pytorch with a cuda-version pin")
