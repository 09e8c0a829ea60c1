import os
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

# Jobs import ehrcxr from src/ without installing it (works in conda-isolated jobs too).
SRC = str(Path(workflow.basedir).parent / "src")
os.environ.update(PYTHONPATH=SRC)

DATASET = config["dataset"]
SYNTHETIC = DATASET == "synthetic"
RESULTS = f"results/{DATASET}"
if SYNTHETIC:  # the generator writes the raw files in the official layouts here
    MIMIC_IV, MIMIC_CXR = f"{RESULTS}/raw/mimic-iv", f"{RESULTS}/raw/mimic-cxr-jpg"
else:
    MIMIC_IV, MIMIC_CXR = config["raw"]["mimic_iv"], config["raw"].get("mimic_cxr")
HAS_CXR = MIMIC_CXR is not None


wildcard_constraints:
    dataset=DATASET,
    task="|".join(config["tasks"]),
    model="|".join(config["models"]),
    missing=r"natural|miss[0-9.]+",
    seed=r"[0-9]+",


def uses_cxr(model):
    """True if the model reads chest X-rays (its config entry lists the cxr modality)."""
    return "cxr" in config["models"][model]["modalities"]


def grid_models():
    """Models of the grid; without CXR data only the EHR-only models can run."""
    return [m for m in config["models"] if HAS_CXR or not uses_cxr(m)]


def grid_missing():
    """Missingness settings; miss<r> needs paired stays, so only 'natural' without CXR data."""
    return config["missing"] if HAS_CXR else [m for m in config["missing"] if m == "natural"]


def run_dir(task, model, missing, seed):
    return f"{RESULTS}/runs/{task}/{model}/{missing}/seed{seed}"


def grid_runs():
    """Every cell of the grid as a run directory."""
    return [
        run_dir(task, model, missing, seed)
        for task in config["tasks"]
        for model in grid_models()
        for missing in grid_missing()
        for seed in config["seeds"]
    ]


def final_outputs():
    return [f"{RESULTS}/tables/main_results.csv", f"{RESULTS}/tables/main_results.md"]


def cohort_inputs(wildcards):
    inputs = {"mimic_iv": MIMIC_IV}
    if HAS_CXR:
        inputs["mimic_cxr"] = MIMIC_CXR
    return inputs


def train_inputs(wildcards):
    """A cell needs the cohort and its task's EHR tensor; CXR models also the image cache and encoder."""
    inputs = {
        "stays": f"{RESULTS}/cohort/stays.parquet",
        "ehr": f"{RESULTS}/ehr/{wildcards.task}.nc",
    }
    if HAS_CXR and uses_cxr(wildcards.model):
        inputs["cxr_index"] = f"{RESULTS}/cxr/index.parquet"
        inputs["cxr_images"] = f"{RESULTS}/cxr/images.npy"
        inputs["cxr_encoder"] = f"{RESULTS}/pretrain/cxr_encoder.pt"
    elif HAS_CXR:
        # An EHR-only cell reads the index only to know which test stays have a usable image. cxr_cache rewrites
        # it unchanged when only cxr.image_size changes, so its timestamp must not rerun these cells: ancient().
        # A new cohort still reruns them (stays.parquet); if the usable images change without a new cohort,
        # the aggregation stops with one message naming every outdated run and the command that reruns them all.
        inputs["cxr_index"] = ancient(f"{RESULTS}/cxr/index.parquet")
    return inputs


def model_params(wildcards):
    return config["models"][wildcards.model]


def cxr_params(wildcards):
    """CXR settings only for models that read X-rays, so EHR-only cells ignore CXR config changes."""
    return config["cxr"] if uses_cxr(wildcards.model) else {}


def aggregation_inputs(runs):
    """What the aggregation reads of the given run directories (+ the oracle on synthetic data)."""
    inputs = {
        "metrics": [f"{run}/metrics.json" for run in runs],
        "predictions": [f"{run}/predictions.parquet" for run in runs],
    }
    if SYNTHETIC:
        inputs["oracle"] = f"{RESULTS}/raw/oracle.parquet"
    return inputs


def aggregate_inputs(wildcards):
    """Every cell of the grid: the main tables wait for all of them."""
    return aggregation_inputs(grid_runs())


def available_aggregate_inputs(wildcards):
    """Only the cells whose outputs exist when the DAG is built (e.g. after `snakemake --keep-going` left
    failed ones): they are brought up to date first; the others are listed as missing by the script."""
    finished = [
        run
        for run in grid_runs()
        if os.path.exists(f"{run}/metrics.json") and os.path.exists(f"{run}/predictions.parquet")
    ]
    return aggregation_inputs(finished)
