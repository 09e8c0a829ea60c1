# DDL-CXR (docs/MODELS.md): pairs -> autoencoder -> latents -> diffusion per generator -> generated latents, which the
# ddl_cxr cells of the grid (rules/train.smk) read. Seeds as the grid's; one diffusion model per generator of
# config ddl_cxr.generators (copy_x0: no diffusion, the last real latent).


# The X-ray pairs (x0, x1) and each stay's prediction X-ray with its age; an EHR tensor (ddl_tensor) tells which
# hours hold an observation.
rule ddl_pairs:
    input:
        stays="results/{dataset}/cohort/stays.parquet",
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
        ehr=ddl_tensor,
    output:
        pairs="results/{dataset}/ddl_cxr/pairs.parquet",
        prediction="results/{dataset}/ddl_cxr/prediction_x0.parquet",
    log:
        "logs/{dataset}/ddl_pairs.log",
    priority: 30  # every ddl_diffusion waits for it; at the default 0 the chain ran after every cell (demo: 2 min)
    conda:
        "../../envs/data.yaml"
    params:
        pairs=config["ddl_cxr"]["pairs"],
    script:
        "../../scripts/ddl_pairs.py"


# Stage 1: the KL autoencoder with its CheXpert head, on the train-split subjects' cached frontal images.
rule ddl_autoencoder:
    input:
        stays="results/{dataset}/cohort/stays.parquet",
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
        images="results/{dataset}/cxr/images.npy",
        index="results/{dataset}/cxr/index.parquet",
    output:
        model="results/{dataset}/ddl_cxr/seed{seed}/autoencoder.pt",
        history="results/{dataset}/ddl_cxr/seed{seed}/autoencoder_history.csv",
    log:
        "logs/{dataset}/ddl_autoencoder/seed{seed}.log",
    benchmark:
        "results/{dataset}/benchmarks/ddl_autoencoder/seed{seed}.tsv"
    priority: 30  # the head of the longest chain of the workflow
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        autoencoder=config["ddl_cxr"]["autoencoder"],
        device=config["train"]["device"],
    script:
        "../../scripts/ddl_autoencoder.py"


# One encoding pass: the latent of every cached image.
rule ddl_latents:
    input:
        model="results/{dataset}/ddl_cxr/seed{seed}/autoencoder.pt",
        images="results/{dataset}/cxr/images.npy",
    output:
        latents="results/{dataset}/ddl_cxr/seed{seed}/latents.npy",
    log:
        "logs/{dataset}/ddl_latents/seed{seed}.log",
    priority: 30
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        device=config["train"]["device"],
    script:
        "../../scripts/ddl_latents.py"


# Stage 2: the conditional latent diffusion model of one generator variant.
rule ddl_diffusion:
    input:
        pairs="results/{dataset}/ddl_cxr/pairs.parquet",
        latents="results/{dataset}/ddl_cxr/seed{seed}/latents.npy",
        index="results/{dataset}/cxr/index.parquet",
        ehr=ddl_tensor,
    output:
        model="results/{dataset}/ddl_cxr/seed{seed}/{generator}/diffusion.pt",
        history="results/{dataset}/ddl_cxr/seed{seed}/{generator}/diffusion_history.csv",
    log:
        "logs/{dataset}/ddl_diffusion/seed{seed}/{generator}.log",
    benchmark:
        "results/{dataset}/benchmarks/ddl_diffusion/seed{seed}/{generator}.tsv"
    priority: 30
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        diffusion=config["ddl_cxr"]["diffusion"],
        variant=lambda wildcards: config["ddl_cxr"]["generators"][wildcards.generator],
        device=config["train"]["device"],
    script:
        "../../scripts/ddl_diffusion.py"


# Stage 3: the latent at prediction time of every stay with a paired X-ray, by DDIM (or z0 itself for copy_x0).
rule ddl_generate:
    input:
        unpack(ddl_generate_inputs),
    output:
        generated="results/{dataset}/ddl_cxr/seed{seed}/{generator}/generated.npz",
    log:
        "logs/{dataset}/ddl_generate/seed{seed}/{generator}.log",
    benchmark:
        "results/{dataset}/benchmarks/ddl_generate/seed{seed}/{generator}.tsv"
    priority: 30
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        generation=config["ddl_cxr"]["generation"],
        device=config["train"]["device"],
    script:
        "../../scripts/ddl_generate.py"


# How close each quality generator's latents come to the true latent of x1 on the test pairs (first seed); decoded
# examples as a figure on synthetic data only.
rule ddl_quality:
    input:
        unpack(ddl_quality_inputs),
    output:
        ddl_quality_report_files(),
    log:
        f"logs/{DATASET}/ddl_quality.log",
    benchmark:
        f"{RESULTS}/benchmarks/ddl_quality.tsv"
    priority: 10  # above the cells (train_priority): run beside them, not in the analyses' tail
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        generators={
            name: config["ddl_cxr"]["generators"][name] is not None
            for name in config["ddl_cxr"]["quality"]["generators"]
        },
        quality=config["ddl_cxr"]["quality"],
        generation=config["ddl_cxr"]["generation"],
        evaluate=config["evaluate"],
        depth=config["cxr"]["depth"],
        seed=config["seeds"][0],
        examples=config["ddl_cxr"]["quality"]["examples"] if SYNTHETIC else 0,
        device=config["train"]["device"],
    script:
        "../../scripts/ddl_quality.py"
