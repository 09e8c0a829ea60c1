if SYNTHETIC:

    rule synthesize:
        output:
            mimic_iv=directory(MIMIC_IV),
            mimic_cxr=directory(MIMIC_CXR),
            oracle=f"{RESULTS}/raw/oracle.parquet",
            signal_map=f"{RESULTS}/raw/signal_map.json",
        params:
            synthetic=config["synthetic"],
        log:
            f"logs/{DATASET}/synthesize.log",
        benchmark:
            f"{RESULTS}/benchmarks/synthesize.tsv"
        threads: 2
        conda:
            "../../envs/data.yaml"
        script:
            "../../scripts/synthesize.py"


rule cohort:
    input:
        unpack(cohort_inputs),
    output:
        stays="results/{dataset}/cohort/stays.parquet",
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
    params:
        cohort=config["cohort"],
        # the synthetic generator writes the official MIMIC-CXR-JPG tree
        cxr_image_layout="official" if SYNTHETIC else config["raw"].get("cxr_image_layout", "official"),
    log:
        "logs/{dataset}/cohort.log",
    conda:
        "../../envs/data.yaml"
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
    params:
        ehr=config["ehr"],
    log:
        "logs/{dataset}/ehr_tensor/{task}.log",
    benchmark:
        "results/{dataset}/benchmarks/ehr_tensor/{task}.tsv"
    threads: 2  # pyarrow decompresses and parses in parallel with the filtering; >= 4: both tables at once
    priority: 30
    conda:
        "../../envs/data.yaml"
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
    params:
        image_size=config["cxr"]["image_size"],
    log:
        "logs/{dataset}/cxr_cache.log",
    benchmark:
        "results/{dataset}/benchmarks/cxr_cache.tsv"
    threads: 2
    priority: 20
    conda:
        "../../envs/data.yaml"
    script:
        "../../scripts/cxr_cache.py"
