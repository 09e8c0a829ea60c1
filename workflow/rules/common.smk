import os
import sys
from pathlib import Path

from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

# Jobs import ehrcxr from src/ without installing it (works in conda-isolated jobs too); so does this process.
SRC = str(Path(workflow.basedir).parent / "src")
os.environ.update(PYTHONPATH=SRC)
sys.path.insert(0, SRC)

from ehrcxr.settings import model_settings

# Every model's resolved settings (modalities, pretrained, params, train, cxr), checked once when the DAG is built.
SETTINGS = {model: model_settings(config, model) for model in config["models"]}


def shared_cxr_conflicts():
    """Model cxr overrides that shared stages cannot honour: one image cache is built (cxr.image_size), and
    pretrain_cxr starts from the config's cxr.weights (a model loading its encoder would silently ignore its own)."""
    problems = []
    for model, settings in SETTINGS.items():
        cxr = settings["cxr"]
        if cxr and cxr["image_size"] != config["cxr"]["image_size"]:
            problems.append(f"model {model!r}: cxr.image_size {cxr['image_size']} differs from the image cache's "
                            f"{config['cxr']['image_size']}")
        if "cxr" in settings["pretrained"] and cxr["weights"] != config["cxr"]["weights"]:
            problems.append(f"model {model!r} declares pretrained: [cxr], so its encoder comes from pretrain_cxr, "
                            f"which starts from cxr.weights {config['cxr']['weights']!r}, not its own "
                            f"{cxr['weights']!r}")
    return problems


CONFLICTS = shared_cxr_conflicts()
if CONFLICTS:
    raise ValueError("config: " + "; ".join(CONFLICTS))

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
    depth=r"18|34|50",


def uses_cxr(model):
    """True if the model reads chest X-rays (its config entry lists the cxr modality)."""
    return "cxr" in config["models"][model]["modalities"]


def grid_models():
    """Models of the grid; without CXR data only the EHR-only models can run."""
    return [m for m in config["models"] if HAS_CXR or not uses_cxr(m)]


def grid_missing():
    """Missingness settings; miss<r> needs paired stays, so only 'natural' without CXR data."""
    return config["missing"] if HAS_CXR else [m for m in config["missing"] if m == "natural"]


def ehr_only_models():
    """Models of the grid that read no X-ray."""
    return [m for m in grid_models() if not uses_cxr(m)]


def trained_missing(model):
    """The missingness settings a model is trained at. A miss<r> cell withholds the X-ray only from models that
    read one, on the same paired stays at every rate, so an EHR-only model's miss<r> cells are identical: it is
    trained at the grid's first miss<r> only, and the aggregation reports that run for every miss<r>."""
    if uses_cxr(model):
        return grid_missing()
    first_rate = [m for m in grid_missing() if m != "natural"][:1]
    return [m for m in grid_missing() if m == "natural" or m in first_rate]


def run_dir(task, model, missing, seed):
    return f"{RESULTS}/runs/{task}/{model}/{missing}/seed{seed}"


def grid_runs():
    """Every cell of the grid that is trained, as a run directory."""
    return [
        run_dir(task, model, missing, seed)
        for task in config["tasks"]
        for model in grid_models()
        for missing in trained_missing(model)
        for seed in config["seeds"]
    ]


def final_outputs():
    return [f"{RESULTS}/tables/main_results.csv", f"{RESULTS}/tables/main_results.md"]


def cohort_inputs(wildcards):
    inputs = {"mimic_iv": MIMIC_IV}
    if HAS_CXR:
        inputs["mimic_cxr"] = MIMIC_CXR
    return inputs


def cxr_encoder(seed, depth):
    """The CheXpert-pretrained CXR encoder of a seed and ResNet depth (rule pretrain_cxr)."""
    return f"{RESULTS}/pretrain/seed{seed}/cxr_resnet{depth}.pt"


def cxr_features(seed, depth):
    """That encoder's pooled features of every cached image (rule cxr_features), read by wholly frozen encoders."""
    return f"{RESULTS}/pretrain/seed{seed}/cxr_resnet{depth}_features.npy"


def ehr_encoder(seed, task, model):
    """A model's EHR encoder pretrained on the task's EHR alone (rule pretrain_ehr)."""
    return f"{RESULTS}/pretrain/seed{seed}/ehr/{task}/{model}.pt"


def train_inputs(wildcards):
    """A cell needs the cohort and its task's EHR tensor; CXR models also the image cache; and every part the
    model declares `pretrained:` its pretraining output (cxr: the encoder of its seed and cxr depth, plus its pooled
    image features when the model keeps every stage frozen; ehr: its own EHR encoder). A CXR model that declares no
    pretrained cxr starts from cxr.weights."""
    settings = SETTINGS[wildcards.model]
    inputs = {
        "stays": f"{RESULTS}/cohort/stays.parquet",
        "ehr": f"{RESULTS}/ehr/{wildcards.task}.nc",
    }
    if HAS_CXR and uses_cxr(wildcards.model):
        inputs["cxr_index"] = f"{RESULTS}/cxr/index.parquet"
        inputs["cxr_images"] = f"{RESULTS}/cxr/images.npy"
        if "cxr" in settings["pretrained"]:
            inputs["cxr_encoder"] = cxr_encoder(wildcards.seed, settings["cxr"]["depth"])
            if settings["cxr"]["frozen_stages"] == 4:
                inputs["cxr_features"] = cxr_features(wildcards.seed, settings["cxr"]["depth"])
    elif HAS_CXR:
        # An EHR-only cell reads the index only to know which test stays have a usable image. cxr_cache rewrites
        # it unchanged when only cxr.image_size changes, so its timestamp must not rerun these cells: ancient().
        # A new cohort still reruns them (stays.parquet); if the usable images change without a new cohort,
        # the aggregation stops with one message naming every outdated run and the command that reruns them all.
        inputs["cxr_index"] = ancient(f"{RESULTS}/cxr/index.parquet")
    if "ehr" in settings["pretrained"]:
        inputs["ehr_encoder"] = ehr_encoder(wildcards.seed, wildcards.task, wildcards.model)
    return inputs


def cell_settings(wildcards):
    """The model's resolved settings: its cells rerun exactly when one of them changes (cxr is empty for an
    EHR-only model, so its cells ignore CXR settings)."""
    return SETTINGS[wildcards.model]


def ehr_pretrain_settings(wildcards):
    """What EHR pretraining of a model uses: its params and train settings (never the CXR ones)."""
    return {key: SETTINGS[wildcards.model][key] for key in ("params", "train")}


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
