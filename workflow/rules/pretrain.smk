# CXR encoder per seed and ResNet depth: a model overriding cxr.depth gets its own. Not cxr.frozen_stages or
# cxr.image_size in params: the first is a training setting, the second reaches this rule through the cache.
rule pretrain_cxr:
    input:
        stays="results/{dataset}/cohort/stays.parquet",
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
        images="results/{dataset}/cxr/images.npy",
        index="results/{dataset}/cxr/index.parquet",
    output:
        encoder="results/{dataset}/pretrain/seed{seed}/cxr_resnet{depth}.pt",
        history="results/{dataset}/pretrain/seed{seed}/cxr_resnet{depth}_history.csv",
    log:
        "logs/{dataset}/pretrain_cxr/seed{seed}/resnet{depth}.log",
    benchmark:
        "results/{dataset}/benchmarks/pretrain_cxr/seed{seed}/resnet{depth}.tsv"
    priority: 20  # every CXR cell waits for it (see ehr_tensor in data.smk)
    conda:
        "../../envs/torch.yaml"
    # One thread: on 2 cores CXR pretraining took 295 s on 1 thread vs 164-186 s on 2 (328-372 core-seconds), and
    # the EHR-only cells fill the other core meanwhile (rule priorities start the CXR chain first).
    threads: 1
    resources:
        gpu=1,
    params:
        weights=config["cxr"]["weights"],
        pretrain=config["pretrain"],
        device=config["train"]["device"],
    script:
        "../../scripts/pretrain_cxr.py"


# The pretrained encoder's pooled features of every cached image, for the cells that keep the whole encoder frozen
# (cxr.frozen_stages 4): each image passes the encoder once per seed and depth instead of once per cell.
rule cxr_features:
    input:
        encoder="results/{dataset}/pretrain/seed{seed}/cxr_resnet{depth}.pt",
        images="results/{dataset}/cxr/images.npy",
    output:
        features="results/{dataset}/pretrain/seed{seed}/cxr_resnet{depth}_features.npy",
    log:
        "logs/{dataset}/cxr_features/seed{seed}/resnet{depth}.log",
    benchmark:
        "results/{dataset}/benchmarks/cxr_features/seed{seed}/resnet{depth}.tsv"
    priority: 20
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        device=config["train"]["device"],
    script:
        "../../scripts/cxr_features.py"


# A model's own EHR encoder on its task's EHR alone (MedFuse's first stage), for models declaring pretrained: [ehr].
rule pretrain_ehr:
    input:
        stays="results/{dataset}/cohort/stays.parquet",
        ehr=ehr_tensor_file,
    output:
        encoder="results/{dataset}/pretrain/seed{seed}/ehr/{task}/{model}.pt",
        history="results/{dataset}/pretrain/seed{seed}/ehr/{task}/{model}/history.csv",
    log:
        "logs/{dataset}/pretrain_ehr/seed{seed}/{task}/{model}.log",
    benchmark:
        "results/{dataset}/benchmarks/pretrain_ehr/seed{seed}/{task}/{model}.tsv"
    priority: 10  # above the cells (train_priority), or its model's cells wait for it at the end of the grid
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        settings=ehr_pretrain_settings,
    script:
        "../../scripts/pretrain_ehr.py"
