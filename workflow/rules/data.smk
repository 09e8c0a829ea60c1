if SYNTHETIC:

    rule synthesize:
        output:
            mimic_iv=directory(MIMIC_IV),
            mimic_cxr=directory(MIMIC_CXR),
            oracle=f"{RESULTS}/raw/oracle.parquet",
            signal_map=f"{RESULTS}/raw/signal_map.json",
        log:
            f"logs/{DATASET}/synthesize.log",
        benchmark:
            f"{RESULTS}/benchmarks/synthesize.tsv"
        conda:
            "../../envs/data.yaml"
        threads: 2
        params:
            synthetic=config["synthetic"],
        script:
            "../../scripts/synthesize.py"


rule cohort:
    input:
        unpack(cohort_inputs),
    output:
        stays="results/{dataset}/cohort/stays.parquet",
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
    log:
        "logs/{dataset}/cohort.log",
    conda:
        "../../envs/data.yaml"
    params:
        cohort=config["cohort"],
        # the synthetic generator writes the official MIMIC-CXR-JPG tree
        cxr_image_layout="official" if SYNTHETIC else config["raw"].get("cxr_image_layout", "official"),
    script:
        "../../scripts/cohort.py"


# Priorities put the short whole-machine jobs first, then the CXR chain (cxr_cache -> pretrain_cxr -> cxr_features)
# that every CXR cell waits for, so the EHR-only cells fill the remaining cores meanwhile.
rule ehr_tensor:
    input:
        mimic_iv=MIMIC_IV,
        stays="results/{dataset}/cohort/stays.parquet",
    output:
        "results/{dataset}/ehr/{task}.nc",
    log:
        "logs/{dataset}/ehr_tensor/{task}.log",
    benchmark:
        "results/{dataset}/benchmarks/ehr_tensor/{task}.tsv"
    priority: 30
    conda:
        "../../envs/data.yaml"
    threads: 2  # pyarrow decompresses and parses in parallel with the filtering; >= 4: both tables at once
    params:
        ehr=config["ehr"],
    script:
        "../../scripts/ehr_tensor.py"


rule cxr_cache:
    input:
        # image root: raw.cxr_images (e.g. resized JPEGs kept elsewhere), by default the MIMIC-CXR-JPG root
        cxr_images=[] if not HAS_CXR else MIMIC_CXR if SYNTHETIC else config["raw"].get("cxr_images") or MIMIC_CXR,
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
    output:
        images="results/{dataset}/cxr/images.npy",
        index="results/{dataset}/cxr/index.parquet",
    log:
        "logs/{dataset}/cxr_cache.log",
    benchmark:
        "results/{dataset}/benchmarks/cxr_cache.tsv"
    priority: 20
    conda:
        "../../envs/data.yaml"
    threads: 2
    params:
        image_size=config["cxr"]["image_size"],
    script:
        "../../scripts/cxr_cache.py"
