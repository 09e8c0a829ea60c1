rule train:
    input:
        unpack(train_inputs),
    output:
        metrics="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/metrics.json",
        predictions="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/predictions.parquet",
        model="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/model.pt",
        history="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/history.csv",
    log:
        "logs/{dataset}/train/{task}/{model}/{missing}/seed{seed}.log",
    benchmark:
        "results/{dataset}/benchmarks/train/{task}/{model}/{missing}/seed{seed}.tsv"
    priority: train_priority
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        gpu=1,
    params:
        settings=cell_settings,
    script:
        "../../scripts/train.py"
