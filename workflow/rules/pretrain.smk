rule pretrain_cxr:
    input:
        stays="results/{dataset}/cohort/stays.parquet",
        cxr_studies="results/{dataset}/cohort/cxr_studies.parquet",
        images="results/{dataset}/cxr/images.npy",
        index="results/{dataset}/cxr/index.parquet",
    output:
        encoder="results/{dataset}/pretrain/cxr_encoder.pt",
        history="results/{dataset}/pretrain/history.csv",
    params:
        cxr={key: config["cxr"][key] for key in ("depth", "weights")},  # not frozen_stages: a training setting
        pretrain=config["pretrain"],
        seed=config["seeds"][0],
        device=config["train"]["device"],
    log:
        "logs/{dataset}/pretrain_cxr.log",
    benchmark:
        "results/{dataset}/benchmarks/pretrain_cxr.tsv"
    threads: 2
    resources:
        gpu=1,
    conda:
        "../../envs/torch.yaml"
    script:
        "../../scripts/pretrain_cxr.py"
