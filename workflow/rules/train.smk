rule train:
    input:
        unpack(train_inputs),
    output:
        metrics="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/metrics.json",
        predictions="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/predictions.parquet",
        model="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/model.pt",
        history="results/{dataset}/runs/{task}/{model}/{missing}/seed{seed}/history.csv",
    params:
        settings=cell_settings,
    log:
        "logs/{dataset}/train/{task}/{model}/{missing}/seed{seed}.log",
    benchmark:
        "results/{dataset}/benchmarks/train/{task}/{model}/{missing}/seed{seed}.tsv"
    threads: 1
    priority: train_priority
    resources:
        gpu=1,
    conda:
        "../../envs/torch.yaml"
    script:
        "../../scripts/train.py"
