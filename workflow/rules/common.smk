import copy
import os
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.sourcecache import LocalSourceFile
from snakemake.utils import validate

# Jobs import ehrcxr from src/ of the checkout this file lies in, without installing it (works in conda-isolated
# jobs, and in a project that uses this workflow as a module, where workflow.basedir is the project's); so does
# this process. A remote module (snakefile: github(...)) has no src/ or resources/ to import.
RULES_DIR = workflow.current_basedir
if not isinstance(RULES_DIR, LocalSourceFile):
    raise WorkflowError(
        f"ehrcxr is used as a module from {RULES_DIR.get_path_or_uri(secret_free=True)}, but its jobs import the "
        "ehrcxr package (src/) and reference data (resources/) from a local checkout: clone the release you deploy "
        "and give the module that clone's workflow/Snakefile, e.g. snakefile: '<clone>/workflow/Snakefile' "
        "(README, 'Deployed into your own project')"
    )
CHECKOUT = Path(RULES_DIR.get_path_or_uri(secret_free=True)).parents[1]
SRC = str(CHECKOUT / "src")
os.environ.update(PYTHONPATH=SRC)
sys.path.insert(0, SRC)


def standalone_config():
    """The command line's config when its --configfile files hold a whole config (every key the schema requires),
    else None. Snakemake merges --configfile into the workflow's config/config.yaml key by key, so the default's
    model entries and their keys (e.g. missing: [natural]) would leak into config/mimic.yaml's grid; a whole config
    replaces the default instead, as --replace-workflow-config does. A partial file (overrides) updates it."""
    given = workflow.config_settings.overwrite_config
    schema = yaml.safe_load((CHECKOUT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    if not workflow.overwrite_configfiles or not all(key in given for key in schema["required"]):
        return None
    return copy.deepcopy(given)


if (whole := standalone_config()) is not None:
    config.clear()
    config.update(whole)
validate(config, schema="../schemas/config.schema.yaml")

from ehrcxr.data.tasks import tensor_task
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
            problems.append(
                f"model {model!r}: cxr.image_size {cxr['image_size']} differs from the image cache's "
                f"{config['cxr']['image_size']}"
            )
        if "cxr" in settings["pretrained"] and cxr["weights"] != config["cxr"]["weights"]:
            problems.append(
                f"model {model!r} declares pretrained: [cxr], so its encoder comes from pretrain_cxr, "
                f"which starts from cxr.weights {config['cxr']['weights']!r}, not its own "
                f"{cxr['weights']!r}"
            )
    return problems


def generator_conflicts():
    """Model entries naming a DDL-CXR generator that config ddl_cxr.generators lacks, or one without X-ray input."""
    known = config["ddl_cxr"]["generators"]
    return [
        (
            f"model {model!r}: generator {s['generator']!r} is not in ddl_cxr.generators ({', '.join(known)})"
            if s["generator"] not in known
            else f"model {model!r} has a generator but does not read the cxr modality"
        )
        for model, s in SETTINGS.items()
        if "generator" in s and (s["generator"] not in known or "cxr" not in s["modalities"])
    ]


def quality_conflicts():
    """Quality generators that config ddl_cxr.generators lacks."""
    known = config["ddl_cxr"]["generators"]
    return [
        f"ddl_cxr.quality.generators: {name!r} is not in ddl_cxr.generators ({', '.join(known)})"
        for name in config["ddl_cxr"]["quality"]["generators"]
        if name not in known
    ]


def analysis_conflicts():
    """A fusion baseline (analysis.fusion_baseline) that is no fusion model of the config."""
    baseline = config["analysis"].get("fusion_baseline")
    if baseline is None or (baseline in SETTINGS and len(SETTINGS[baseline]["modalities"]) == 2):
        return []
    return [f"analysis.fusion_baseline: {baseline!r} is not a model of the config that reads both modalities"]


def pairs_conflicts():
    """A DDL-CXR pairing window that opens before the cohort keeps X-rays (cohort.cxr_lookback_hours): the pairs
    would silently miss the images taken in between."""
    start, lookback = config["ddl_cxr"]["pairs"]["window_hours"][0], config["cohort"]["cxr_lookback_hours"]
    if start >= -lookback:
        return []
    return [
        f"ddl_cxr.pairs.window_hours starts at {start} h, before the X-rays the cohort keeps (from "
        f"-cohort.cxr_lookback_hours = -{lookback} h): widen cxr_lookback_hours or narrow the window"
    ]


CONFLICTS = (
    shared_cxr_conflicts() + generator_conflicts() + quality_conflicts() + analysis_conflicts() + pairs_conflicts()
)
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
    task="|".join(sorted(set(config["tasks"]) | {tensor_task(task) for task in config["tasks"]})),
    model="|".join(config["models"]),
    missing=r"natural|miss[0-9.]+",
    seed=r"[0-9]+",
    depth=r"18|34|50",
    generator="|".join(config["ddl_cxr"]["generators"]),


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


def task_missing(task):
    """The grid's missingness settings for one task: all of them for the tasks of `missing_tasks` (every task when
    null), natural only for the others. A task it names that `tasks` lacks is no cell, not an error, so that a
    grid narrowed with --config tasks=[...] needs no second edit."""
    missing_tasks = config.get("missing_tasks")
    if missing_tasks is None or task in missing_tasks:
        return grid_missing()
    return [m for m in grid_missing() if m == "natural"]


def trained_missing(model, task):
    """The missingness settings a model is trained at for a task (``task_missing``). A miss<r> cell withholds the
    X-ray only from models that read one, on the same paired stays at every rate, so an EHR-only model's miss<r>
    cells are identical: it is trained at the task's first miss<r> only, and the aggregation reports that run for
    every miss<r>. A model entry's `missing:` list keeps only those of the grid's settings."""
    settings = task_missing(task)
    allowed = config["models"][model].get("missing")  # an entry may restrict its cells (e.g. a costly ablation)
    if allowed is not None:
        return [m for m in settings if m in allowed]
    if uses_cxr(model):
        return settings
    first_rate = [m for m in settings if m != "natural"][:1]
    return [m for m in settings if m == "natural" or m in first_rate]


def run_dir(task, model, missing, seed):
    return f"{RESULTS}/runs/{task}/{model}/{missing}/seed{seed}"


def grid_runs():
    """Every cell of the grid that is trained, as a run directory."""
    return [
        run_dir(task, model, missing, seed)
        for task in config["tasks"]
        for model in grid_models()
        for missing in trained_missing(model, task)
        for seed in config["seeds"]
    ]


def ddl_tensor(wildcards):
    """The EHR tensor of DDL-CXR's stages (observed hours of the pairs, the diffusion model's EHR windows, the
    generation's): phenotyping's (every cohort stay) when the grid has it, else the first task's (no extra tensor is
    built for DDL-CXR; length of stay reads mortality's stays, a subset of phenotyping's)."""
    task = "phenotyping" if "phenotyping" in config["tasks"] else tensor_task(config["tasks"][0])
    return f"{RESULTS}/ehr/{task}.nc"


def ddl_generated(seed, generator):
    """A DDL-CXR generator's latents at prediction time (rule ddl_generate)."""
    return f"{RESULTS}/ddl_cxr/seed{seed}/{generator}/generated.npz"


def ddl_generate_inputs(wildcards):
    """Generation reads the latents, the cohort's paired X-rays, the EHR windows and, except for copy_x0 (the last
    real latent as it is), the generator's diffusion model."""
    inputs = {
        "latents": f"{RESULTS}/ddl_cxr/seed{wildcards.seed}/latents.npy",
        "stays": f"{RESULTS}/cohort/stays.parquet",
        "index": f"{RESULTS}/cxr/index.parquet",
        "ehr": ddl_tensor(wildcards),
    }
    if config["ddl_cxr"]["generators"][wildcards.generator] is not None:
        inputs["diffusion"] = f"{RESULTS}/ddl_cxr/seed{wildcards.seed}/{wildcards.generator}/diffusion.pt"
    return inputs


def ddl_in_grid():
    """True when a model of the grid reads a DDL-CXR generator (then its stages and quality table run)."""
    return any("generator" in SETTINGS[model] for model in grid_models()) and HAS_CXR


def ddl_quality_files():
    """The generation-quality table (CSV, Markdown, LaTeX) and, on synthetic data only, the figure of decoded
    examples (never real patients' images in published outputs); none without DDL-CXR in the grid or quality
    generators."""
    if not ddl_in_grid() or not config["ddl_cxr"]["quality"]["generators"]:
        return []
    tables = [f"{RESULTS}/tables/ddl_generation_quality.{ext}" for ext in ("csv", "md", "tex")]
    figures = [f"{RESULTS}/figures/ddl_examples.{ext}" for ext in ("png", "svg")] if SYNTHETIC else []
    return tables + figures


def ddl_quality_report_files():
    """The generation-quality outputs; the Markdown table and the figure go into the Snakemake report."""
    files = []
    for path in ddl_quality_files():  # (a line may not start with report(: snakemake would read the report: keyword)
        shown = path.endswith((".md", ".png"))
        files.append(report(path, caption="../report/ddl_quality.rst", category="6 DDL-CXR") if shown else path)
    return files


def ddl_quality_inputs(wildcards):
    """The test pairs, the first seed's latents, autoencoder and CXR encoder, and each quality generator's diffusion
    model (none for copy_x0)."""
    seed = config["seeds"][0]
    inputs = {
        "pairs": f"{RESULTS}/ddl_cxr/pairs.parquet",
        "latents": f"{RESULTS}/ddl_cxr/seed{seed}/latents.npy",
        "autoencoder": f"{RESULTS}/ddl_cxr/seed{seed}/autoencoder.pt",
        "cxr_encoder": cxr_encoder(seed, config["cxr"]["depth"]),
        "index": f"{RESULTS}/cxr/index.parquet",
        "images": f"{RESULTS}/cxr/images.npy",
        "ehr": ddl_tensor(wildcards),
    }
    for name in config["ddl_cxr"]["quality"]["generators"]:
        if config["ddl_cxr"]["generators"][name] is not None:
            inputs[f"diffusion_{name}"] = f"{RESULTS}/ddl_cxr/seed{seed}/{name}/diffusion.pt"
    return inputs


def final_outputs():
    ddl_pairs = [f"{RESULTS}/ddl_cxr/pairs.parquet"] if HAS_CXR else []  # DDL-CXR needs X-rays
    return (
        [f"{RESULTS}/tables/main_results.csv", f"{RESULTS}/tables/main_results.md"]
        + analysis_outputs()
        + ddl_pairs
        + ddl_quality_files()
    )


# The report's analyses: rule name -> (tables, figures) it writes under tables/ and figures/ (rules/analysis.smk).
# Those that compare an X-ray with its absence need X-ray data; without it they are left out (the report says so).
ANALYSES = {
    "fusion_gain": (["fusion_gain"], ["fusion_gain"]),
    "modality_imbalance": (["modality_imbalance"], ["modality_imbalance"]),
    "robustness": (
        ["robustness_train", "robustness_train_summary", "robustness_test", "robustness_test_summary"],
        ["robustness_train", "robustness_test"],
    ),
    "xray_age": (["xray_age", "xray_age_gain"], ["xray_age", "xray_age_gain"]),
    "ranking": (["ranking"], ["ranking_cd"]),
    "calibration": (["calibration"], ["reliability"]),
    "fairness": (
        ["fairness_groups", "fairness_gaps", "fairness_fusion_effect", "fairness_missing_correlation"],
        ["fairness_gaps"],
    ),
}
NEEDS_CXR = ("fusion_gain", "modality_imbalance", "robustness", "xray_age")
ANALYSIS_CLUSTER_THREADS = 16  # an analysis job's cores on a cluster (benchmarks/bench_analyses.py: paper scale)


def train_priority(wildcards):
    """Start the longest cells first, so that no long cell runs alone at the end of the grid: `natural` cells (every
    stay) before `miss<r>` ones (paired stays only), phenotyping (every cohort stay) before the other tasks (0-3,
    below every job that feeds them). Demo: the last phenotyping cell ran alone for 35 s in DAG order."""
    return 2 * int(wildcards.missing == "natural") + int(wildcards.task == "phenotyping")


def given_cores():
    """--cores of this run; 1 where none is given (e.g. snakemake --report in a deployed project, which lacks the
    clone's workflow profile and its cores: all)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def aggregate_threads(wildcards):
    """Cores of the main-table job: 2 on a cluster; on one machine half of --cores, so that it runs beside the
    slowest analysis (fairness) instead of before it (demo: 9 s of wall time)."""
    return 2 if not workflow.local_exec else max(1, given_cores() // 2)


def analysis_threads(wildcards):
    """Cores of an analysis job: 16 on a cluster; on one machine half of --cores (at least 1), so that two analyses
    run side by side and the serial parts of one (start-up, reading the cells, writing tables and figures) overlap
    the slices of the other. Demo on 2 cores: all analyses in 38 s, against 65 s when each took both cores in turn."""
    if not workflow.local_exec:
        return ANALYSIS_CLUSTER_THREADS
    return max(1, min(ANALYSIS_CLUSTER_THREADS, given_cores() // 2))


def grid_analyses():
    """The analyses this dataset allows (every one with X-ray data; without, those that need none)."""
    return [name for name in ANALYSES if HAS_CXR or name not in NEEDS_CXR]


def analysis_files(name):
    """The output files of one analysis: every table as CSV, Markdown and LaTeX, every figure as PNG and SVG."""
    tables, figures = ANALYSES[name]
    return [f"{RESULTS}/tables/{t}.{ext}" for t in tables for ext in ("csv", "md", "tex")] + [
        f"{RESULTS}/figures/{f}.{ext}" for f in figures for ext in ("png", "svg")
    ]


def analysis_outputs():
    return [path for name in grid_analyses() for path in analysis_files(name)]


def analysis_report_files(name, category):
    """An analysis's outputs; its figures and Markdown tables go into the Snakemake report under ``category``."""
    caption, shown = f"../report/{name}.rst", (".png", ".md")
    files = analysis_files(name)
    return [report(f, caption=caption, category=category) if f.endswith(shown) else f for f in files]


def analysis_params(wildcards):
    """What every analysis script needs besides its inputs (JSON-serialisable, so a change reruns it)."""
    return {
        "modalities": model_modalities(),
        "missing_aware": missing_aware_models(),
        "ehr_only_models": ehr_only_models(),
        "grid_missing": grid_missing(),
        "evaluate": config["evaluate"],
        "settings": config["analysis"],
        "tables_dir": f"{RESULTS}/tables",
        "figures_dir": f"{RESULTS}/figures",
    }


def model_modalities():
    """model -> the modalities it reads, for the analyses."""
    return {model: list(config["models"][model]["modalities"]) for model in config["models"]}


def missing_aware_models():
    """model -> whether its config declares it handles a missing X-ray."""
    return {model: bool(config["models"][model].get("missing_aware", False)) for model in config["models"]}


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


def ehr_tensor_file(wildcards):
    """The EHR tensor a task reads (length of stay reads mortality's: same stays, same first 48 h)."""
    return f"{RESULTS}/ehr/{tensor_task(wildcards.task)}.nc"


def train_inputs(wildcards):
    """A cell needs the cohort and its task's EHR tensor; CXR models also the image cache; and every part the
    model declares `pretrained:` its pretraining output (cxr: the encoder of its seed and cxr depth, plus its pooled
    image features when the model keeps every stage frozen; ehr: its own EHR encoder), and a model with a DDL-CXR
    `generator:` that generator's latents. A CXR model that declares no pretrained cxr starts from cxr.weights."""
    settings = SETTINGS[wildcards.model]
    inputs = {
        "stays": f"{RESULTS}/cohort/stays.parquet",
        "ehr": ehr_tensor_file(wildcards),
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
    if "generator" in settings:
        inputs["ddl_generated"] = ddl_generated(wildcards.seed, settings["generator"])
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


def analysis_inputs(wildcards):
    """Every cell's outputs, the cohort (groups, X-ray ages) and, on synthetic data, the signal map."""
    inputs = aggregation_inputs(grid_runs())
    inputs.pop("oracle", None)
    inputs["stays"] = f"{RESULTS}/cohort/stays.parquet"
    if SYNTHETIC:
        inputs["signal_map"] = f"{RESULTS}/raw/signal_map.json"
    return inputs


def available_aggregate_inputs(wildcards):
    """Only the cells whose outputs exist when the DAG is built (e.g. after `snakemake --keep-going` left
    failed ones): they are brought up to date first; the others are listed as missing by the script."""
    finished = [
        run
        for run in grid_runs()
        if os.path.exists(f"{run}/metrics.json") and os.path.exists(f"{run}/predictions.parquet")
    ]
    return aggregation_inputs(finished)
